"""Keeping freed host memory in the process while training on the CPU.

glibc's malloc hands every block above its mmap threshold (at most 32 MiB) back to the kernel when it is freed, and
trims the top of its heap. A training step's large activations (one [16,384, 1,024] bf16 tensor of the baby GPT is
32 MiB) are therefore mapped, zero-filled and page-faulted in again on every step, a large share of a baby-GPT
step on a small machine (RESULTS.md, "Figures behind choices in the code"). Preloading jemalloc or tcmalloc is
the usual cure for PyTorch on CPUs; glibc does the same when told to serve large blocks from its heap and never
to trim it (blocks over 64 MiB asked for by threads other than the main one are still mapped: a thread's heap
cannot hold them). The price is that the process keeps its peak heap. `TrainConfig.keep_host_memory` turns it off.
"""

from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4
_NEVER = -1  # as M_TRIM_THRESHOLD: never give the heap's free top back (mallopt(3))


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of returning it to the kernel, for the rest of this process.
    True when set; False where the C library is not glibc (elsewhere allocators differ and this does nothing)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER))
