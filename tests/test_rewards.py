"""Reward functions: loading by spec, the checks on what they return, and the shipped ones."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tether.errors import RewardError
from tether.loading.functions import load_function
from tether.reward_functions import concise
from tether.roles.reward import call_function

PROMPTS, RESPONSES = ["p1", "p2"], ["a b c", "d e"]


def test_load_function_from_a_module_and_from_a_file(tmp_path):
    assert load_function("tether.reward_functions:concise") is concise
    (tmp_path / "mine.py").write_text("def score(prompts, responses, **kw):\n    return [1.0] * len(responses)\n")
    assert load_function(f"{tmp_path / 'mine.py'}:score")(PROMPTS, RESPONSES) == [1.0, 1.0]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("no_colon_here", "must be 'path/to/file.py:name'"),
        ("/no/such/file.py:f", "does not exist"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("tether.reward_functions:missing", "no callable named 'missing'"),
    ],
)
def test_load_function_errors_name_the_problem(spec, expected):
    with pytest.raises(RewardError, match=expected):
        load_function(spec)


def test_a_file_that_fails_to_import_is_a_reward_error(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(RewardError, match="boom"):
        load_function(f"{tmp_path / 'broken.py'}:f")


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        ([1.0], "returned 1 values for 2 responses"),
        ([1.0, float("nan")], "returned nan for sample 1"),
        ([float("inf"), 0.0], "returned inf for sample 0"),
        ([1.0, "high"], "returned 'high' for sample 1; expected a number"),
        ([True, 0.0], "returned True for sample 0; expected a number"),
    ],
)
def test_what_a_function_returns_is_checked_per_sample(returned, expected):
    with pytest.raises(RewardError, match=expected):
        call_function(lambda p, r, **kw: returned, "test:f", PROMPTS, RESPONSES)


def test_a_function_that_raises_is_named():
    def broken(prompts, responses):
        raise ValueError("bad input")

    with pytest.raises(RewardError, match="'test:broken' raised ValueError"):
        call_function(broken, "test:broken", PROMPTS, RESPONSES)


def test_numpy_scalars_are_numbers_and_only_accepted_keywords_are_passed():
    seen = {}

    def picky(prompts, responses, finished):  # takes `finished` but not `target`
        seen["finished"] = finished
        return [np.float32(0.5), np.int64(2)]

    scores = call_function(picky, "test:picky", PROMPTS, RESPONSES, finished=[True, False], target=3)
    assert scores.tolist() == [0.5, 2.0] and seen["finished"] == [True, False]


@pytest.mark.parametrize(
    ("words", "expected"),
    [(0, 0.0), (2, 0.4), (5, 1.0), (25, 1.0), (50, 0.5), (75, 0.0), (200, 0.0)],
)
def test_concise_by_hand(words, expected):
    # min_words=5: below it words/5; up to target 25: 1; above: 1 - (words - 25) / 50, floored at 0.
    (score,) = concise(["q"], [" ".join(["w"] * words)], target_words=25, min_words=5)
    assert math.isclose(score, expected)
