"""A heap that keeps freed memory for the next tensors (glibc), as a GPU caching allocator does.

An RLHF iteration allocates and frees the same working set every time (activations, logits,
gradients: ~1.5 GiB for LoRA PPO on the embedded model). By default glibc maps every tensor above
its mmap threshold (at most 32 MiB) freshly and unmaps it on free, and gives the top of its heap
back whenever more than twice that is free, so every iteration faults most of its working set in
again: 150k-500k minor faults per phase, and on a VM each fault can cost 10-35 us, seconds per
iteration (docs/benchmarks.md). With no mmaps and a 2 GiB trim threshold the heap is reused: zero
faults in steady state, and the peak resident set levels off at the largest working set.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_GLIBC_HEAP_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for the process (no mmaps, a 2 GiB trim threshold). Returns
    whether it applied: glibc only, and never when the user set one of glibc's heap variables
    (`_GLIBC_HEAP_ENV`). Process-wide and not undone: it changes where memory comes from, never a
    number a run computes."""
    mallopt = _find_mallopt()
    if mallopt is None or any(name in os.environ for name in _GLIBC_HEAP_ENV):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def _find_mallopt() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).mallopt  # the process's own libc
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return None
