"""Process-level helpers of tether/runtime.py that no stage test observes directly."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import torch

from tether import runtime


def _resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


@pytest.mark.skipif(runtime._malloc_trim is None, reason="needs glibc's malloc_trim")
def test_release_freed_memory_returns_a_fragmented_heap_to_the_os():
    """100 KB tensors live on glibc's heap (below its mmap threshold). With every 16th kept, the
    freed ones leave holes glibc keeps; releasing them must shrink the resident set by most of
    the ~750 MB freed."""
    blocks = [torch.ones(25_000) for _ in range(8000)]
    kept = blocks[::16]
    del blocks
    before = _resident_mib()
    runtime.release_freed_memory()
    after = _resident_mib()
    assert len(kept) == 500
    assert before - after > 400, f"resident set {before:.0f} -> {after:.0f} MiB"
