"""tether's speed tricks, each behind one switch of the `speed:` config section (config/sections.py
SpeedConfig), each with a test that the plain path gives the same numbers (tests/test_speed.py).

    shared_prefix.py    speed.shared_prefix        the prompt prefix all rows share, computed once
    prepared_linears.py speed.prepared_linears     sampling's linear layers on weights prepared once
    sampler.py          speed.inverse_cdf_sampler  one uniform number per sampled token
    old_pass.py         speed.reuse_old_pass       the first update step reuses the old log-probs' pass
    heap.py             speed.keep_freed_memory    glibc keeps freed memory instead of faulting it in again
    (optim.py)          speed.fused_adamw          AdamW's fused kernel

The algorithm's code reads the same with every switch off: each trick is a call that the plain
path skips. A trick that an architecture cannot take is refused for it by a rule decided from the
model's config (`shared_prefix.unsupported`), so a switch left on never gives a wrong number.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tether.config import SpeedConfig
from tether.speed import shared_prefix

FAST = SpeedConfig()  # every trick on (the defaults)
PLAIN = SpeedConfig(**{f.name: False for f in dataclasses.fields(SpeedConfig)})  # every trick off


def refusals(speed: SpeedConfig, model: Any) -> list[str]:
    """What of `speed` this model's architecture does not take, and why: for the start-of-run log."""
    found = []
    reason = shared_prefix.unsupported(model) if speed.shared_prefix else None
    if reason is not None:
        found.append(f"speed.shared_prefix is off for this model: {reason}")
    return found
