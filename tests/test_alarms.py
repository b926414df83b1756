"""Alarms over metric rows (tether/evaluation/alarms.py).

Tier: pure functions on synthetic metric streams. Each alarm fires on a stream that shows its
failure and stays quiet on a healthy one; thresholds are checked at the exact boundary with
numbers that are exact in binary floating point. Offline, CPU, milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest

from tether.config import AlarmsConfig, ConfigError, PPOConfig, load_config
from tether.evaluation.alarms import ALARM_KEYS, check_alarms

DEFAULT = AlarmsConfig()
KL_TARGET = 6.0
N = 20


def make_rows(n: int, **series: Sequence[Any] | Any) -> list[dict[str, Any]]:
    """n metric rows, `step` from 1. Keyword names use `__` for `/` (objective__kl -> objective/kl); each
    value is a sequence of n values (one a row) or a single value repeated in every row."""
    rows: list[dict[str, Any]] = [{"step": i + 1} for i in range(n)]
    for name, values in series.items():
        key = name.replace("__", "/")
        if isinstance(values, Sequence) and not isinstance(values, str):
            assert len(values) == n, f"{key}: {len(values)} values for {n} rows"
            for row, value in zip(rows, values, strict=True):
                row[key] = value
        else:
            for row in rows:
                row[key] = values
    return rows


def healthy_series(n: int = N) -> dict[str, list[float]]:
    """A run going well: score rising, length and distinct-2 wobbling around a level, KL climbing
    then settling below the target of 6, entropy declining gently, openings varied."""
    return {
        "objective__scores": [0.1 * i for i in range(n)],
        "response__length_mean": [50.0 + (3.0 if i % 2 else -2.0) for i in range(n)],
        "response__distinct_2": [0.8 + (0.02 if i % 3 == 0 else -0.01) for i in range(n)],
        "objective__kl": [min(0.5 * i, 4.0 + 0.25 * (i % 3)) for i in range(n)],
        "objective__entropy": [2.0 * 0.98**i for i in range(n)],
        "response__top_opening_share": [(0.1, 0.25, 0.15, 0.3)[i % 4] for i in range(n)],
        "rollout__logprob_gap_mean": [(4e-6, 6e-6, 1e-5)[i % 3] for i in range(n)],  # vLLM agreeing (docs/vllm.md)
    }


def healthy(**overrides: Sequence[Any] | Any) -> list[dict[str, Any]]:
    return make_rows(N, **{**healthy_series(N), **overrides})


def keys(
    history: Sequence[dict[str, Any]], settings: AlarmsConfig = DEFAULT, kl_target: float | None = None
) -> list[str]:
    return [alarm.key for alarm in check_alarms(history, settings, kl_target)]


# Failure streams, each the healthy run with one failure written into it.
KL_RUNAWAY = {"objective__kl": [2.0 * i for i in range(N)]}  # ends at 30-38: above 3 x 6 and above 30
ENTROPY_COLLAPSE = {"objective__entropy": [2.0 * 0.85**i for i in range(N)]}  # 2.0 down to about 0.09
LENGTH_HACKING = {
    # 10% longer and 4% less diverse every iteration: +33% length and -11.5% distinct-2 between the
    # window's halves (3 iterations apart), while the healthy score keeps rising.
    "response__length_mean": [50.0 * 1.1**i for i in range(N)],
    "response__distinct_2": [0.8 * 0.96**i for i in range(N)],
}
REPEATED_OPENING = {"response__top_opening_share": [0.2] * (N - 1) + [0.75]}
SAMPLER_GAP = {"rollout__logprob_gap_mean": [6e-6] * (N - 1) + [0.2]}  # the engine fell out of step
FAILURES = {
    "kl_runaway": KL_RUNAWAY,
    "entropy_collapse": ENTROPY_COLLAPSE,
    "length_hacking": LENGTH_HACKING,
    "repeated_opening": REPEATED_OPENING,
    "sampler_gap": SAMPLER_GAP,
}


# --- healthy runs -------------------------------------------------------------------------------


@pytest.mark.parametrize("kl_target", [KL_TARGET, None])
def test_healthy_run_fires_nothing_at_any_prefix(kl_target):
    history = healthy()
    for i in range(len(history) + 1):
        assert keys(history[:i], kl_target=kl_target) == [], f"prefix of {i} rows"


def test_healthy_run_is_close_enough_to_the_thresholds_to_mean_something():
    # Guard against a "healthy" stream that is quiet only because it is trivially far from every
    # threshold: it must actually rise in score and move in KL.
    history = healthy()
    assert history[-1]["objective/scores"] > history[0]["objective/scores"]
    assert 3.0 < history[-1]["objective/kl"] < KL_TARGET
    assert history[-1]["objective/entropy"] < history[0]["objective/entropy"]


# --- each failure fires its own alarm and only it ------------------------------------------------


@pytest.mark.parametrize("kl_target", [KL_TARGET, None])
@pytest.mark.parametrize("key", list(FAILURES))
def test_each_failure_fires_exactly_its_alarm(key, kl_target):
    assert keys(healthy(**FAILURES[key]), kl_target=kl_target) == [key]


@pytest.mark.parametrize("key", list(FAILURES))
def test_each_failure_is_quiet_when_its_metrics_are_missing(key):
    history = healthy(**FAILURES[key])
    for row in history:
        for name in FAILURES[key]:
            del row[name.replace("__", "/")]
    assert keys(history, kl_target=KL_TARGET) == []


def test_all_failures_at_once_fire_in_a_fixed_order():
    everything = {name: values for failure in FAILURES.values() for name, values in failure.items()}
    assert keys(healthy(**everything), kl_target=KL_TARGET) == list(ALARM_KEYS)


def test_rows_without_any_metric_fire_nothing():
    for n in range(12):
        assert keys(make_rows(n), kl_target=KL_TARGET) == []
        assert keys(make_rows(n), kl_target=None) == []


def test_every_alarm_says_what_it_saw_and_what_to_do():
    everything = {name: values for failure in FAILURES.values() for name, values in failure.items()}
    for alarm in check_alarms(healthy(**everything), DEFAULT, KL_TARGET):
        assert alarm.key in ALARM_KEYS
        assert any(ch.isdigit() for ch in alarm.saw), alarm
        assert len(alarm.advice) > 40, alarm


def test_settings_reject_a_window_too_short_to_have_two_halves():
    with pytest.raises(ConfigError, match="alarms.window must be at least 2"):
        load_config(PPOConfig, None, ["alarms.window=1"], allow_missing=True)


def test_advice_names_the_settings_of_the_run_s_algorithm():
    """A grpo run is told about grpo.kl_coef, never about ppo's keys it does not have."""
    rows = make_rows(5, objective__kl=[40.0] * 5)
    [ppo] = check_alarms(rows, DEFAULT, None, "ppo")
    [grpo] = check_alarms(rows, DEFAULT, None, "grpo")
    assert "ppo.kl_coef" in ppo.advice and "ppo.kl_target" in ppo.advice
    assert "grpo.kl_coef" in grpo.advice and "ppo." not in grpo.advice + grpo.saw


# --- kl_runaway -----------------------------------------------------------------------------------


def test_kl_saw_names_the_mean_the_window_and_the_bound():
    [alarm] = check_alarms(make_rows(5, objective__kl=41.2), DEFAULT, KL_TARGET)
    assert alarm.key == "kl_runaway"
    assert "41.2" in alarm.saw and "last 5 iterations" in alarm.saw and "3 x target 6" in alarm.saw
    assert "kl_coef" in alarm.advice and "lr" in alarm.advice


def test_kl_needs_two_rows():
    assert keys(make_rows(1, objective__kl=100.0), kl_target=KL_TARGET) == []
    assert keys(make_rows(2, objective__kl=100.0), kl_target=KL_TARGET) == ["kl_runaway"]


def test_kl_exactly_at_factor_times_target_is_quiet_and_just_above_fires():
    assert keys(make_rows(5, objective__kl=18.0), kl_target=6.0) == []  # 3.0 x 6.0 exactly
    assert keys(make_rows(5, objective__kl=18.0001), kl_target=6.0) == ["kl_runaway"]


def test_kl_without_target_exactly_at_kl_max_is_quiet_and_just_above_fires():
    assert keys(make_rows(5, objective__kl=30.0), kl_target=None) == []
    assert keys(make_rows(5, objective__kl=30.0001), kl_target=None) == ["kl_runaway"]
    [alarm] = check_alarms(make_rows(5, objective__kl=30.5), DEFAULT, None)
    assert "30.5" in alarm.saw and "kl_max 30" in alarm.saw


def test_kl_target_replaces_the_absolute_limit():
    history = make_rows(5, objective__kl=35.0)
    assert keys(history, kl_target=None) == ["kl_runaway"]  # 35 > kl_max 30
    assert keys(history, kl_target=20.0) == []  # 35 < 3 x 20
    assert keys(make_rows(5, objective__kl=10.0), kl_target=3.0) == ["kl_runaway"]  # 10 > 3 x 3, though < 30


def test_kl_uses_the_mean_over_the_last_window_only():
    # Early spikes have left the window; the mean of the last 5 is 15 < 18.
    assert keys(make_rows(8, objective__kl=[100.0, 100.0, 100.0, 15.0, 15.0, 15.0, 15.0, 15.0]), kl_target=6.0) == []
    # One spike inside the window moves the mean: (4 x 15 + 40) / 5 = 20 > 18.
    assert keys(make_rows(5, objective__kl=[15.0, 15.0, 40.0, 15.0, 15.0]), kl_target=6.0) == ["kl_runaway"]
    assert keys(make_rows(5, objective__kl=[15.0, 15.0, 40.0, 15.0, 15.0]), AlarmsConfig(window=2), 6.0) == []


def test_kl_skips_null_and_nan_instead_of_counting_them():
    # Mean of the finite values is 20 > 18; counted as zeros it would be 12, and NaN would poison it.
    history = make_rows(5, objective__kl=[None, math.nan, 20.0, 20.0, 20.0])
    assert keys(history, kl_target=6.0) == ["kl_runaway"]
    assert keys(make_rows(5, objective__kl=[None, math.nan, None, math.nan, None]), kl_target=6.0) == []


def test_kl_written_as_runlogs_infinity_fires_without_overflow_error():
    # runlog writes +inf as 1e308; summing five of them overflows to inf, which is still a runaway.
    assert keys(make_rows(5, objective__kl=1e308), kl_target=6.0) == ["kl_runaway"]


# --- entropy_collapse -----------------------------------------------------------------------------


def test_entropy_needs_window_plus_one_rows():
    # With window 10, ten rows would already fire without the guard: start 2.0, mean of all ten 0.6.
    settings = AlarmsConfig(window=10)
    collapsed = [2.0] * 3 + [0.0] * 8
    assert keys(make_rows(10, objective__entropy=collapsed[:10]), settings) == []
    assert keys(make_rows(11, objective__entropy=collapsed), settings) == ["entropy_collapse"]


def test_entropy_exactly_at_the_fraction_is_quiet_and_just_below_fires():
    # Starting: mean of the first 3 rows = 2.0. Recent: mean of the last 5.
    assert keys(make_rows(10, objective__entropy=[2.0] * 3 + [1.5] * 2 + [1.0] * 5)) == []
    assert keys(make_rows(10, objective__entropy=[2.0] * 3 + [1.5] * 2 + [0.99] * 5)) == ["entropy_collapse"]


def test_entropy_starting_value_is_the_mean_of_the_first_three_rows():
    # The first three rows average 2.0. Recent 0.95 < 0.5 x 2.0 fires (it would not against a start
    # of 1.9 or less); recent 1.2 is quiet (it would fire against row 0 alone, 3.0).
    assert keys(make_rows(10, objective__entropy=[3.0, 2.0, 1.0] + [1.5] * 2 + [0.95] * 5)) == ["entropy_collapse"]
    assert keys(make_rows(10, objective__entropy=[3.0, 2.0, 1.0] + [1.5] * 2 + [1.2] * 5)) == []


def test_entropy_saw_and_advice():
    [alarm] = check_alarms(make_rows(10, objective__entropy=[2.0] * 5 + [0.5] * 5), DEFAULT, None)
    assert "0.500" in alarm.saw and "2.000" in alarm.saw
    assert "deterministic" in alarm.advice and "samples.jsonl" in alarm.advice


def test_entropy_skips_null_and_nan():
    # NaN at the start and in the window are skipped: start 2.0, recent 0.5.
    entropy = [math.nan, 2.0, None, 1.5, 1.5, 0.5, None, 0.5, math.nan, 0.5]
    assert keys(make_rows(10, objective__entropy=entropy)) == ["entropy_collapse"]
    assert keys(make_rows(10, objective__entropy=[None] * 3 + [0.1] * 7)) == []  # no starting value


# --- length_hacking -------------------------------------------------------------------------------

# Window 5: first half = rows 1-2 of the window, last half = rows 4-5 (the middle row is left out).
HACK = {
    "response__length_mean": [100.0, 100.0, 110.0, 130.0, 130.0],  # +30%
    "objective__scores": [1.0, 1.0, 1.5, 2.0, 2.0],
    "response__distinct_2": [0.8, 0.8, 0.7, 0.6, 0.6],  # -25%
}


def test_length_hacking_fires_on_the_pattern_and_names_the_numbers():
    [alarm] = check_alarms(make_rows(5, **HACK), DEFAULT, None)
    assert alarm.key == "length_hacking"
    for text in ("100.0", "130.0", "30%", "0.800", "0.600", "25%", "1.000", "2.000"):
        assert text in alarm.saw, text
    assert "length penalty" in alarm.advice and "gold" in alarm.advice


def test_length_hacking_needs_a_full_window():
    rows = make_rows(5, **HACK)
    assert keys(rows[1:]) == []  # 4 rows < window 5
    assert keys(rows[1:], AlarmsConfig(window=4)) == ["length_hacking"]  # halves of 2 rows: 105 -> 130 tokens


@pytest.mark.parametrize(
    "name, flat",
    [
        ("response__length_mean", [100.0] * 5),
        ("objective__scores", [1.0] * 5),  # the score must rise strictly
        ("response__distinct_2", [0.8] * 5),
    ],
)
def test_length_hacking_needs_all_three_signs(name, flat):
    assert keys(make_rows(5, **{**HACK, name: flat})) == []


@pytest.mark.parametrize("middle", [0.0, 100.0, 1e6])
def test_length_hacking_leaves_the_middle_row_of_an_odd_window_out(middle):
    assert keys(make_rows(5, **{**HACK, "response__length_mean": [100.0, 100.0, middle, 130.0, 130.0]})) == [
        "length_hacking"
    ]


def test_length_hacking_thresholds_are_inclusive():
    settings = AlarmsConfig(length_rise=0.2, diversity_drop=0.125)
    at = {
        "response__length_mean": [100.0, 100.0, 0.0, 120.0, 120.0],  # exactly +20%
        "objective__scores": [1.0, 1.0, 0.0, 1.5, 1.5],
        "response__distinct_2": [1.0, 1.0, 0.0, 0.875, 0.875],  # exactly -12.5%
    }
    assert keys(make_rows(5, **at), settings) == ["length_hacking"]
    below_length = {**at, "response__length_mean": [100.0, 100.0, 0.0, 119.0, 119.0]}
    assert keys(make_rows(5, **below_length), settings) == []
    below_diversity = {**at, "response__distinct_2": [1.0, 1.0, 0.0, 0.9, 0.9]}
    assert keys(make_rows(5, **below_diversity), settings) == []


def test_length_hacking_looks_at_the_last_window_only():
    # A hacking episode 10 rows ago, then a stable tail: quiet.
    stable = {"response__length_mean": [130.0] * 5, "objective__scores": [2.0] * 5, "response__distinct_2": [0.6] * 5}
    series = {name: HACK[name] + [0.0] * 5 + stable[name] for name in HACK}
    assert keys(make_rows(15, **series)) == []


def test_length_hacking_skips_null_and_nan_and_needs_a_value_in_each_half():
    with_gaps = {**HACK, "objective__scores": [None, 1.0, math.nan, math.nan, 2.0]}
    assert keys(make_rows(5, **with_gaps)) == ["length_hacking"]
    no_early_score = {**HACK, "objective__scores": [None, math.nan, 1.5, 2.0, 2.0]}
    assert keys(make_rows(5, **no_early_score)) == []


def test_length_hacking_is_quiet_on_a_zero_base():
    assert keys(make_rows(5, **{**HACK, "response__length_mean": [0.0, 0.0, 5.0, 10.0, 10.0]})) == []
    assert keys(make_rows(5, **{**HACK, "response__distinct_2": [0.0, 0.0, 0.0, 0.0, 0.0]})) == []


# --- repeated_opening -----------------------------------------------------------------------------


def test_opening_share_exactly_at_threshold_is_quiet_and_above_fires():
    assert keys(make_rows(1, response__top_opening_share=0.5)) == []
    assert keys(make_rows(1, response__top_opening_share=0.51)) == ["repeated_opening"]
    [alarm] = check_alarms(make_rows(1, response__top_opening_share=0.75), DEFAULT, None)
    assert "75%" in alarm.saw and "50%" in alarm.saw
    assert "Sure, I'd be happy to" in alarm.advice and "samples.jsonl" in alarm.advice


def test_opening_share_reads_only_the_last_row():
    assert keys(make_rows(3, response__top_opening_share=[0.9, 0.9, 0.2])) == []
    assert keys(make_rows(3, response__top_opening_share=[0.9, 0.9, None])) == []
    assert keys(make_rows(3, response__top_opening_share=[0.9, 0.9, math.nan])) == []
