"""keep_freed_memory: a large tensor allocated again reuses the freed pages instead of faulting in new ones."""

import subprocess
import sys

import pytest

# Allocates and fills a 256 MiB tensor twice and prints the page faults of the second time.
PROBE = """
import resource, sys, torch
from eopd.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.ones(64, 2**20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(64, 2**20).sum()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_of_a_second_allocation(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_a_freed_large_tensor_is_reused_instead_of_mapped_again():
    applied, kept = faults_of_a_second_allocation("keep")
    if applied != "True":
        pytest.skip("not glibc: keep_freed_memory is a no-op here")
    _, system = faults_of_a_second_allocation("system")
    pages = 256 * 2**20 // 4096
    assert system > pages // 2  # glibc maps and faults in the 65,536 pages again
    assert kept < pages // 20  # served from the kept heap
