"""Keep freed memory in the process for reuse instead of returning it to the system (Linux, glibc).

PyTorch allocates CPU tensors with malloc and caches nothing. glibc serves a block above its mmap
threshold (32 MiB at most) with a fresh `mmap` and unmaps it on free, so each large tensor of a training
step (activations, a tile of logits over a 150k vocabulary) is new memory that the kernel faults in and
zeroes page by page, every step: about 0.1 s per 155 MB tile on the benchmark machine, more than an exp
over it (docs/performance.md).

`keep_freed_memory` tells glibc to serve every block from its heap and to keep what is freed there, so
later tensors reuse the same pages. The arithmetic is unchanged. The cost: freed memory is not given
back until the process ends, and the heap can fragment (PyTorch's 64-byte-aligned blocks do not always
fit a freed hole of their own size), so the resident set can exceed the peak in use. `eopd.train` applies
it with `keep_freed_memory=true` (off by default); it is the in-process form of
`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>` in the environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # the largest int mallopt takes: give back only past 2 GiB free at the top


def keep_freed_memory() -> bool:
    """Serve all allocations from the heap and keep freed memory there; False where not glibc (a no-op)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def return_freed_memory() -> None:
    """Give the memory kept by `keep_freed_memory` back to the system now (`malloc_trim`), e.g. before
    measuring how much a computation adds to the resident set. A no-op where not glibc."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)
