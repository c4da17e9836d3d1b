"""Host memory kept for reuse between steps, as a caching allocator keeps device memory.

A training step frees and allocates the same blocks every step (activations, gradients, buckets). glibc's
malloc serves blocks over its mmap threshold (128 KiB, raised only as larger blocks are freed) with fresh
``mmap`` pages and returns the top of its heap to the system once more than the trim threshold is free, so
a step's megabyte-sized tensors are page-faulted in again every step (what that cost a data-parallel MLP
step: BENCHMARKS.md, Training). ``keep_host_memory()`` raises
them once per process (``mallopt``), so freed blocks stay in the heap and the next step reuses them: the
static plan's "allocate once, reuse by lifetime" without a hand-written arena. The process then holds its
peak heap, which is what the memory plan predicts anyway. Linux/glibc only; ``SHARDFLOW_KEEP_HOST_MEMORY=0``
turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_AT = 32 << 20  # blocks below 32 MiB (glibc's largest mmap threshold on 64-bit) come from the heap
_TRIM_AT = 1 << 30  # and the heap keeps up to 1 GiB free rather than giving it back
_DONE: list[bool] = []


def keep_host_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process); whether it applies here."""
    if _DONE:
        return _DONE[0]
    ok = False
    if sys.platform.startswith("linux") and os.environ.get("SHARDFLOW_KEEP_HOST_MEMORY", "1") != "0":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_AT)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_AT))
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
            ok = False
    _DONE.append(ok)
    return ok
