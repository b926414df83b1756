"""Alarms: signs of a rollout run going wrong, read from its own metric rows
(docs/concepts/details.md item 20).

Pure functions over the stream of per-iteration metric rows, oldest first, exactly as written to
metrics.jsonl. `check_alarms(history, settings, kl_target, algorithm)` returns the alarms active at
the last row; each is logged as `alarm/<key>` and shown to the user with what it saw and what to do,
in the settings of the run's algorithm (`ppo.kl_coef` or `grpo.kl_coef`).

    kl_runaway        recent KL far above its target (or above kl_max without one)
    entropy_collapse  recent entropy below a fraction of the run's starting entropy
    length_hacking    over the window: length up, score up, distinct-2 down (a reward exploit)
    repeated_opening  more than a share of the last batch's responses open the same way
    sampler_gap       the sampler's log-probs differ from the trainer's (vLLM: a stale or mismatched engine)

A metric a row lacks, or one that is not a finite number (NaN is written as null), is skipped:
a missing metric means its alarm cannot fire, never an error. No torch import: this runs on the
rows of a finished run as well as inside the training loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tether.config import AlarmsConfig

ALARM_KEYS = ("kl_runaway", "entropy_collapse", "length_hacking", "repeated_opening", "sampler_gap")


@dataclass(frozen=True)
class Alarm:
    key: str  # short id, used as the metric name suffix: "alarm/<key>"
    saw: str  # what it saw, with the numbers (one sentence)
    advice: str  # what a user usually does about it (one or two sentences)


# Rows are read as JSON gives them: any value may be missing, null, NaN, or not a number at all.
Row = Mapping[str, Any]

STARTING_ROWS = 3  # the run's starting entropy is the mean over its first rows


def _finite_mean(rows: Sequence[Row], key: str) -> float | None:
    """Mean of the finite numbers under `key` in `rows`; None when there is none."""
    values = [
        float(v)
        for v in (row.get(key) for row in rows)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ]
    # Plain sum, not fsum: runlog writes +inf as 1e308, and fsum raises on the overflow where sum gives inf.
    return sum(values) / len(values) if values else None


def _early_late(early: Sequence[Row], late: Sequence[Row], key: str) -> tuple[float, float] | None:
    before, after = _finite_mean(early, key), _finite_mean(late, key)
    return None if before is None or after is None else (before, after)


def kl_runaway(
    history: Sequence[Row], settings: AlarmsConfig, kl_target: float | None, algorithm: str = "ppo"
) -> Alarm | None:
    if len(history) < 2:  # the first iteration's KL is 0 by construction: nothing to judge yet
        return None
    recent_rows = history[-settings.window :]
    kl = _finite_mean(recent_rows, "objective/kl")
    if kl is None:
        return None
    if kl_target is not None:
        limit = settings.kl_factor * kl_target
        bound = f"{settings.kl_factor:g} x target {kl_target:g}"
    else:
        limit = settings.kl_max
        no_target = "no ppo.kl_target set" if algorithm == "ppo" else "grpo has no KL target"
        bound = f"alarms.kl_max {settings.kl_max:g} ({no_target})"
    if not kl > limit:
        return None
    return Alarm(
        key="kl_runaway",
        saw=f"Mean KL {kl:.1f} nats per response over the last {len(recent_rows)} iterations, above {bound}.",
        advice=(
            f"The policy is drifting far from the reference: raise {algorithm}.kl_coef"
            + (" or set (or lower) ppo.kl_target" if algorithm == "ppo" else "")
            + ", lower train.lr, and check whether the reward is being exploited."
        ),
    )


def entropy_collapse(history: Sequence[Row], settings: AlarmsConfig, algorithm: str = "ppo") -> Alarm | None:
    if len(history) < settings.window + 1:  # the recent window must reach past the start
        return None
    starting = _finite_mean(history[:STARTING_ROWS], "objective/entropy")
    recent = _finite_mean(history[-settings.window :], "objective/entropy")
    if starting is None or recent is None or not recent < settings.entropy_drop * starting:
        return None
    return Alarm(
        key="entropy_collapse",
        saw=(
            f"Mean entropy {recent:.3f} nats per token over the last {settings.window} iterations, below "
            f"{settings.entropy_drop:g} x the starting {starting:.3f}."
        ),
        advice=(
            f"The policy is turning deterministic (mode collapse): lower train.lr or raise {algorithm}.kl_coef, "
            "and read samples.jsonl to see whether the responses have become the same few answers."
        ),
    )


def length_hacking(history: Sequence[Row], settings: AlarmsConfig, algorithm: str = "ppo") -> Alarm | None:
    if len(history) < settings.window:
        return None
    # The first half of the window against the last half; an odd window leaves its middle row out.
    recent = history[-settings.window :]
    half = settings.window // 2
    early, late = recent[:half], recent[-half:]
    length = _early_late(early, late, "response/length_mean")
    score = _early_late(early, late, "objective/scores")
    distinct = _early_late(early, late, "response/distinct_2")
    if length is None or score is None or distinct is None:
        return None
    (length0, length1), (score0, score1), (distinct0, distinct1) = length, score, distinct
    if length0 <= 0 or distinct0 <= 0:  # relative changes need a positive base
        return None
    length_rise = (length1 - length0) / length0
    distinct_drop = (distinct0 - distinct1) / distinct0
    if not (length_rise >= settings.length_rise and score1 > score0 and distinct_drop >= settings.diversity_drop):
        return None
    return Alarm(
        key="length_hacking",
        saw=(
            f"Over the last {settings.window} iterations the score rose from {score0:.3f} to {score1:.3f} while "
            f"the mean length rose {length_rise:.0%} ({length0:.1f} to {length1:.1f} tokens) and distinct-2 "
            f"fell {distinct_drop:.0%} ({distinct0:.3f} to {distinct1:.3f})."
        ),
        advice=(
            "The reward may prefer long, repetitive answers: compare the gold score if one is configured, "
            f"add a length penalty or normalise the score for length, or raise {algorithm}.kl_coef."
        ),
    )


def repeated_opening(history: Sequence[Row], settings: AlarmsConfig) -> Alarm | None:
    if not history:
        return None
    share = _finite_mean(history[-1:], "response/top_opening_share")
    if share is None or not share > settings.opening_share:
        return None
    return Alarm(
        key="repeated_opening",
        saw=f"{share:.0%} of the last batch's responses open the same way (threshold {settings.opening_share:.0%}).",
        advice=(
            'Templated openings ("Sure, I\'d be happy to...") are a classic reward hack: look at samples.jsonl '
            "and at the eval set's top openings."
        ),
    )


def sampler_gap(history: Sequence[Row], settings: AlarmsConfig) -> Alarm | None:
    if not history:
        return None
    gap = _finite_mean(history[-1:], "rollout/logprob_gap_mean")
    if gap is None or not gap > settings.sampler_gap:
        return None
    return Alarm(
        key="sampler_gap",
        saw=(
            f"The sampler's log-probs differ from the trainer's by {gap:.3g} nats per token on average in the last "
            f"batch (threshold {settings.sampler_gap:g})."
        ),
        advice=(
            "The rollouts come from another distribution than the one trained on: with rollout.engine=vllm, check "
            "its dtype (model.dtype=float32 agrees to ~1e-5) and version; rollout.is_correction=true corrects the "
            "policy gradient for a small gap."
        ),
    )


def check_alarms(
    history: Sequence[Row], settings: AlarmsConfig, kl_target: float | None, algorithm: str = "ppo"
) -> list[Alarm]:
    """The alarms active at the last row of `history` (metric rows, oldest first), in ALARM_KEYS
    order; `algorithm` names the config section their advice points at."""
    found = [
        kl_runaway(history, settings, kl_target, algorithm),
        entropy_collapse(history, settings, algorithm),
        length_hacking(history, settings, algorithm),
        repeated_opening(history, settings),
        sampler_gap(history, settings),
    ]
    return [alarm for alarm in found if alarm is not None]
