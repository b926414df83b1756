"""speed.keep_freed_memory (tether/speed/heap.py): the heap keeps the memory tensors free, so a
working set allocated again is not page-faulted in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tether.speed import heap

# A child process allocates an iteration-like working set (100 x 4 MiB tensors and one 64 MiB
# tensor, above glibc's largest mmap threshold), frees it, allocates it again, and reports the
# minor page faults of the second round: memory handed back to the OS has to be faulted in again.
_WORKING_SET_TWICE = """
import json, resource, sys
import torch
from tether.speed import heap
applied = heap.keep_freed_memory() if sys.argv[1] == "keep" else False
def working_set():
    return [torch.ones(2**20) for _ in range(100)] + [torch.ones(2**24)]
tensors = working_set()
del tensors
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
tensors = working_set()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults}))
"""
WORKING_SET_PAGES = (100 * 4 + 64) * 2**20 // 4096


def _second_round(mode: str, extra_env: dict[str, str] | None = None) -> dict[str, int | bool]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | (extra_env or {})
    out = subprocess.run(
        [sys.executable, "-c", _WORKING_SET_TWICE, mode], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(heap._find_mallopt() is None, reason="needs glibc's mallopt")
def test_keep_freed_memory_reuses_the_working_set_without_page_faults():
    kept = _second_round("keep")
    assert kept["applied"] is True
    # Not zero: the allocations around the tensors vary a little from run to run, and now and then
    # the 64 MiB tensor no longer fits the freed space and takes fresh pages (14% of the set).
    assert kept["faults"] < 0.25 * WORKING_SET_PAGES, kept
    # The same program on glibc's defaults faults nearly all of it in again: the check can fail.
    default = _second_round("default")
    assert default["faults"] > 0.75 * WORKING_SET_PAGES, default


@pytest.mark.skipif(heap._find_mallopt() is None, reason="needs glibc's mallopt")
def test_keep_freed_memory_leaves_a_users_malloc_settings_alone():
    assert _second_round("keep", {"MALLOC_TRIM_THRESHOLD_": "131072"})["applied"] is False
