"""The first update step reuses the old log-probs' pass (speed.reuse_old_pass).

When the first optimizer step of an update takes the whole rollout in one micro-batch in one
process, its policy forward pass is the old log-probs' pass over again: same weights, same rows in
the same order (optim.epoch_order), same function. The old pass then keeps its autograd graph, its
output detached is the old log-probs, and the first step backpropagates through it instead of
running the policy again: one forward pass fewer per iteration, and the first step's ratio is
exactly 1 by construction. Switched off, the first step runs its own pass and gets the same numbers.
"""

from __future__ import annotations

from tether.config import RolloutSizes, SpeedConfig
from tether.optim import one_pass_update


def reuses_old_pass(speed: SpeedConfig, sizes: RolloutSizes) -> bool:
    return speed.reuse_old_pass and one_pass_update(sizes)
