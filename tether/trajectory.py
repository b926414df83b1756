"""The one record a rollout batch travels in, from sampling to the update.

Sampling (sampling.py) fills the token fields; each later step of an iteration returns a copy with
its own fields added (`dataclasses.replace`), never changing a field already set. Advantages and
returns are not fields: they are computed from a trajectory and handed to the update beside it.

Layout: B sequences as [left-padded prompt (P) | right-padded response (R)]; every response starts
in column P, so per-token tensors of the response are (B, R) and line up with `response_mask`.
A multi-turn episode (episodes.py) is one response too: the model's turns and the tool output
between them, in the order they came; `tool_mask` marks the tool's tokens, which are read as
context and never trained on (`mask` leaves them out).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tether.runtime import gather_objects, world


def _empty() -> Tensor:
    return torch.empty(0)


@dataclass(frozen=True)
class Trajectory:
    # Sampled (sampling.generate).
    prompt_ids: Tensor  # (B, P) long, left-padded with the pad id
    prompt_mask: Tensor  # (B, P) bool, True on real prompt tokens
    response_ids: Tensor  # (B, R) long, pad id after the first EOS
    response_mask: Tensor  # (B, R) bool, True on response tokens up to and including the first EOS
    finished: Tensor  # (B,) bool, the response ended with EOS (not cut by max_new_tokens)
    prompt_index: Tensor  # (B,) long, which prompt of the batch each sequence answers (its group)
    # Read back: the texts reward functions and people see.
    prompts: tuple[str, ...] = ()  # (B,) the prompt each sequence answers
    responses: tuple[str, ...] = ()  # (B,) decoded, up to the first EOS (an episode: its last model turn)
    # Multi-turn episodes (episodes.py); empty for one-turn responses.
    tool_mask: Tensor = field(default_factory=_empty)  # (B, R) bool, True on tokens the environment wrote
    episodes: tuple[tuple[tuple[str, str], ...], ...] = ()  # (B,) each episode's turns as (role, text)
    environment_scores: Tensor = field(default_factory=_empty)  # (B,) each episode's summed reward
    # What the sampler reported: the (B, R) log-probs it drew each token with (the gap to
    # old_logprobs is the sampler's mismatch with the trainer: rollout/logprob_gap_*).
    sample_logprobs: Tensor = field(default_factory=_empty)
    # The roles' passes, without grad, under the rollout temperature.
    old_logprobs: Tensor = field(default_factory=_empty)  # (B, R) the policy's at sampling time
    entropy: Tensor = field(default_factory=_empty)  # (B, R) the policy's entropy at each position
    ref_logprobs: Tensor = field(default_factory=_empty)  # (B, R) the reference's
    values: Tensor | None = None  # (B, R) the critic's (ppo)
    # Scoring.
    scores: Tensor = field(default_factory=_empty)  # (B,) reward sources plus the missing-EOS penalty
    score_parts: dict[str, Tensor] = field(default_factory=dict)  # each source's raw (B,) scores, "gold" too

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)  # (B, P + R)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)  # (B, P + R)

    @property
    def mask(self) -> Tensor:
        """(B, R): True on the tokens every loss and statistic counts, the ones the policy sampled."""
        if self.tool_mask.numel():
            return self.response_mask & ~self.tool_mask
        return self.response_mask

    @property
    def response_start(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(dim=1)  # (B,) an episode's tool output included

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def to(self, device: torch.device) -> Trajectory:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        parts = {name: value.to(device) for name, value in self.score_parts.items()}
        return dataclasses.replace(self, **moved, score_parts=parts)


def pad_columns(x: Tensor, width: int, value: float | bool, left: bool = False) -> Tensor:
    """(B, W) -> (B, width) with `value` in the new columns, on the right (or the left)."""
    extra = width - x.shape[1]
    if extra <= 0:
        return x
    padding = torch.full((x.shape[0], extra), value, dtype=x.dtype, device=x.device)
    return torch.cat([padding, x] if left else [x, padding], dim=1)


def concat_trajectories(parts: list[Trajectory], pad_id: int) -> Trajectory:
    """Trajectories of several processes as one batch, rows in the order given: prompts left-padded
    and per-token tensors right-padded to the widest, prompt indices offset so each part keeps its
    own groups apart (part k's come after part k-1's)."""
    width_p = max(t.prompt_ids.shape[1] for t in parts)
    width_r = max(t.response_ids.shape[1] for t in parts)
    offsets = [0]
    for t in parts[:-1]:
        offsets.append(offsets[-1] + (int(t.prompt_index.max()) + 1 if len(t) else 0))

    def tokens(name: str) -> Tensor:  # (B, R) per-token tensors, 0 in the new columns
        return torch.cat([pad_columns(getattr(t, name), width_r, 0.0) for t in parts])

    first = parts[0]
    return Trajectory(
        prompt_ids=torch.cat([pad_columns(t.prompt_ids, width_p, pad_id, left=True) for t in parts]),
        prompt_mask=torch.cat([pad_columns(t.prompt_mask, width_p, False, left=True) for t in parts]),
        response_ids=torch.cat([pad_columns(t.response_ids, width_r, pad_id) for t in parts]),
        response_mask=torch.cat([pad_columns(t.response_mask, width_r, False) for t in parts]),
        finished=torch.cat([t.finished for t in parts]),
        prompt_index=torch.cat([t.prompt_index + offset for t, offset in zip(parts, offsets, strict=True)]),
        prompts=tuple(text for t in parts for text in t.prompts),
        responses=tuple(text for t in parts for text in t.responses),
        tool_mask=torch.cat([pad_columns(t.tool_mask, width_r, False) for t in parts])
        if first.tool_mask.numel()
        else first.tool_mask,
        episodes=tuple(turns for t in parts for turns in t.episodes),
        environment_scores=torch.cat([t.environment_scores for t in parts])
        if first.environment_scores.numel()
        else first.environment_scores,
        sample_logprobs=tokens("sample_logprobs") if first.sample_logprobs.numel() else first.sample_logprobs,
        old_logprobs=tokens("old_logprobs") if first.old_logprobs.numel() else first.old_logprobs,
        entropy=tokens("entropy") if first.entropy.numel() else first.entropy,
        ref_logprobs=tokens("ref_logprobs") if first.ref_logprobs.numel() else first.ref_logprobs,
        values=tokens("values") if first.values is not None else None,
        scores=torch.cat([t.scores for t in parts]),
        score_parts={name: torch.cat([t.score_parts[name] for t in parts]) for name in first.score_parts},
    )


def gather_trajectory(trajectory: Trajectory, pad_id: int) -> Trajectory:
    """Every process's rows as the one global batch, in rank order, in every process. Each process
    then computes the same advantages, whitening and KL statistics from it as a single process
    would; only the forward and backward passes of the update are split. A single process gets its
    trajectory back unchanged."""
    if world().size == 1:
        return trajectory
    device = trajectory.prompt_ids.device
    parts = gather_objects(trajectory.to(torch.device("cpu")))
    return concat_trajectories(parts, pad_id).to(device)


def select_rows(trajectory: Trajectory, rows: Tensor) -> Trajectory:
    """The trajectory of some of its rows, in the order given ((n,) long indices)."""
    picked: dict[str, Any] = {}
    for f in dataclasses.fields(trajectory):
        value = getattr(trajectory, f.name)
        if isinstance(value, Tensor) and value.numel():
            picked[f.name] = value[rows.to(value.device)]
        elif isinstance(value, tuple) and value:
            picked[f.name] = tuple(value[int(i)] for i in rows)
    parts = {name: value[rows.to(value.device)] for name, value in trajectory.score_parts.items()}
    return dataclasses.replace(trajectory, **picked, score_parts=parts)
