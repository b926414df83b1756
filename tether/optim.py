"""Optimizer steps: AdamW and its schedule, which rows each step takes, gradient clipping, and a
guard that never applies a non-finite gradient. Every stage's update goes through these.

Under torchrun every process draws the same rows for a step and takes its share of them
(runtime.shard); each loss is divided by the whole step's count, and `take_step` sums the
gradients over the processes, so each step is the one a single process would take
(docs/concepts/details.md item 13). Under model.fsdp the sharded parameters' gradients arrive summed
already (FSDP's reduce-scatter, engines/fsdp.py); the rest are summed here as without it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from transformers import get_scheduler

from tether.config import RolloutSizes
from tether.runtime import shard, shared_generator, sum_across_ranks, sum_gradients, world

log = logging.getLogger(__name__)


def make_optimizer(
    param_groups: list[dict[str, Any]],
    eps: float,
    weight_decay: float,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    fused: bool,
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the parameter groups, and the learning-rate schedule over `total_steps` steps.

    fused (speed.fused_adamw): the fused kernel where torch has one (float parameters on CPU or
    CUDA). On the CPU torch's default is a Python loop over the tensors, about 8x slower, which for
    two 135M-parameter models costs ~2 s per optimizer step on a 2-core machine (docs/benchmarks.md).
    """
    params = [p for group in param_groups for p in group["params"]]
    fusable = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(param_groups, eps=eps, weight_decay=weight_decay, fused=(fused and fusable) or None)
    scheduler = get_scheduler(
        schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(total_steps, 1)
    )
    return optimizer, scheduler


# --------------------------------------------------------------------------------------------
# Which rows each step takes (ppo, grpo)
# --------------------------------------------------------------------------------------------


def one_pass_update(sizes: RolloutSizes) -> bool:
    """Whether an update's first step is one forward pass over the whole rollout: one process, one
    minibatch, one micro-batch (then speed.reuse_old_pass can reuse the old log-probs' pass)."""
    return world().size == 1 and sizes.minibatch == sizes.rollout and sizes.micro == sizes.rollout


def epoch_order(n: int, sizes: RolloutSizes, seed: int, step: int, epoch: int) -> Tensor:
    """The row order of an epoch: a fresh shuffle, the same in every process, except the first
    epoch of a one-pass update (`one_pass_update`), which takes the rows in rollout order: its one
    minibatch holds every row, so the order changes only the order of a sum, and the old log-probs'
    pass can serve as its forward pass (speed/old_pass.py)."""
    if epoch == 0 and one_pass_update(sizes):
        return torch.arange(n)
    return torch.randperm(n, generator=shared_generator(seed, step, epoch))


@dataclass(frozen=True)
class Minibatch:
    """The rows of one optimizer step."""

    epoch: int
    first: bool  # the update's first step
    rows: Tensor  # (M,) every process's rows of this step (its loss is normalised over them)
    micro_batches: list[Tensor]  # this process's share of `rows`, in forward/backward passes


def minibatches(
    n: int, sizes: RolloutSizes, epochs: int, seed: int, step: int, device: torch.device
) -> Iterator[Minibatch]:
    """`epochs` passes over n rollout rows, each in minibatches of sizes.minibatch rows (a fresh
    order per epoch), each split over the processes and into micro-batches of sizes.micro rows."""
    for epoch in range(epochs):
        order = epoch_order(n, sizes, seed, step, epoch)
        for start in range(0, n, sizes.minibatch):
            rows = order[start : start + sizes.minibatch].to(device)
            mine = shard(rows)
            micro = [mine[i : i + sizes.micro] for i in range(0, len(mine), sizes.micro)]
            yield Minibatch(epoch, epoch == 0 and start == 0, rows, micro)


# --------------------------------------------------------------------------------------------
# Taking a step
# --------------------------------------------------------------------------------------------


class UpdateGuard:
    """Takes an optimizer step only when every clipped gradient norm is finite, and counts the rest."""

    def __init__(self) -> None:
        self.skipped_updates = 0  # optimizer steps skipped for a non-finite gradient, in all
        self.nonfinite_streak = 0  # ... and in a row, up to now
        self.last_nonfinite: dict[str, float] = {}

    def step(self, optimizer: torch.optim.Optimizer, stats: dict[str, float], step: int) -> None:
        """`stats` holds the step's losses and `*/grad_norm` entries (before clipping)."""
        if all(math.isfinite(v) for k, v in stats.items() if k.endswith("grad_norm")):
            optimizer.step()
            self.nonfinite_streak = 0
        else:  # a non-finite gradient never reaches the weights
            self.skipped_updates += 1
            self.nonfinite_streak += 1
            self.last_nonfinite = dict(stats)
            log.warning("step %d: non-finite gradient, update skipped (%s)", step, describe_update(stats))

    def state_dict(self) -> dict[str, int]:
        return {"skipped_updates": self.skipped_updates, "nonfinite_streak": self.nonfinite_streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_updates = int(state["skipped_updates"])
        self.nonfinite_streak = int(state["nonfinite_streak"])


def clip_gradients(params: list[Tensor], max_norm: float | None) -> float:
    """Clip in place; the norm before clipping (inf or nan when the gradient is not finite). For
    parameters sharded by model.fsdp the norm is the whole gradient's, the same in every process
    (each holds a shard; a non-finite value in any shard makes it non-finite everywhere)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def take_step(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    guard: UpdateGuard,
    clipped: dict[str, list[Tensor]],
    stats: dict[str, float],
    max_grad_norm: float | None,
    step: int,
) -> dict[str, float]:
    """One optimizer step on the accumulated gradients: summed over the processes, each group of
    `clipped` (its norm logged under its key, e.g. "policy/grad_norm") clipped on its own, applied
    only when finite. Returns the step's stats, summed over the processes, with the norms."""
    sum_gradients([p for params in clipped.values() for p in params])
    stats = sum_across_ranks(stats)
    for key, params in clipped.items():
        stats[key] = clip_gradients(params, max_grad_norm)
    guard.step(optimizer, stats, step)
    scheduler.step()  # the schedule counts step slots, skipped ones included
    return stats


def describe_update(stats: dict[str, float]) -> str:
    keys = ("loss/policy", "loss/value", "loss/kl", "policy/grad_norm", "val/grad_norm", "train/grad_norm")
    return ", ".join(f"{k} {stats[k]:.4g}" for k in keys if k in stats)
