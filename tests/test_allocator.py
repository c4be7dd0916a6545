"""keep_freed_memory: large tensors come from glibc's heap (kept on free) instead of fresh mmaps."""

import subprocess
import sys

import pytest

# Allocates a 256 MiB tensor and prints how many bytes glibc holds in mmapped blocks while it lives.
PROBE = """
import ctypes, sys, torch
from eopd.allocator import keep_freed_memory, return_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
x = torch.ones(64, 2**20)
mapped = libc.mallinfo2().hblkhd
del x
return_freed_memory()
print(applied, mapped)
"""


def mapped_bytes_while_a_large_tensor_lives(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_a_large_tensor_comes_from_the_kept_heap_instead_of_its_own_mapping():
    try:
        applied, kept = mapped_bytes_while_a_large_tensor_lives("keep")
    except subprocess.CalledProcessError as error:  # no mallinfo2: not glibc, or glibc < 2.33
        pytest.skip(f"glibc's mallinfo2 is not available here: {error.stderr[-200:]}")
    if applied != "True":
        pytest.skip("not glibc: keep_freed_memory is a no-op here")
    _, system = mapped_bytes_while_a_large_tensor_lives("system")
    assert system >= 256 * 2**20  # glibc's default: the tensor is a mapping of its own, unmapped on free
    assert kept < 256 * 2**20  # kept: from the heap, whose freed pages the next tensors reuse
