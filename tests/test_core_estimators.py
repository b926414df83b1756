"""Critic-free advantage estimators and DAPO's sampling rules (tether/core/advantages.py): RLOO,
reward-to-go, REINFORCE++ and REINFORCE++-baseline, the (B,) -> (B, T) spread, the overlong penalty
and the dynamic-sampling filter.

Tier: hand-computed numbers, plain-Python loop references, identities (RLOO = k/(k-1) * Dr. GRPO,
baseline = REINFORCE++ on group-centred scores). Offline, CPU, milliseconds.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from tether.core import (
    KL_ESTIMATORS,
    discounted_returns,
    group_advantages,
    informative_groups,
    kl_per_token,
    masked_mean,
    masked_var,
    masked_whiten,
    overlong_penalty,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    spread_over_tokens,
)

TIGHT = {"rtol": 1e-6, "atol": 1e-6}
F32 = {"rtol": 1e-5, "atol": 1e-5}
EXACT = {"rtol": 0.0, "atol": 0.0}


def _prefix_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def _whiten_list(values: list[float]) -> list[float]:
    """(v - mean) / sqrt(sample variance + 1e-8), the convention of masked_whiten, in plain Python."""
    mean = statistics.mean(values)
    scale = math.sqrt(statistics.variance(values) + 1e-8)
    return [(v - mean) / scale for v in values]


def _reference_reinforce_pp(scores, kl, mask, kl_coef, gamma) -> torch.Tensor:
    """Per sequence: r_t = -kl_coef * kl_t (+ score on the last token), reward-to-go, then whitening
    over every real token of the batch, all in Python floats."""
    per_row: list[list[float]] = []
    for b in range(mask.shape[0]):
        length = int(mask[b].sum())
        rewards = [-kl_coef * float(kl[b, t]) for t in range(length)]
        if length:
            rewards[-1] += float(scores[b])
        returns, running = [0.0] * length, 0.0
        for t in reversed(range(length)):
            running = rewards[t] + gamma * running
            returns[t] = running
        per_row.append(returns)
    flat = _whiten_list([v for row in per_row for v in row])
    out = torch.zeros(mask.shape, dtype=torch.float64)
    k = 0
    for b, row in enumerate(per_row):
        for t in range(len(row)):
            out[b, t] = flat[k]
            k += 1
    return out.float()


# --- RLOO -----------------------------------------------------------------------------------------


def test_rloo_matches_a_hand_computation():
    # Two groups of four, interleaved: group 7 = [1, 0, 0, 1] (sum 2), group 2 = [5, 3, 1, 2] (sum 11).
    #   group 7: 1 - (2 - 1) / 3 = 2/3,   0 - (2 - 0) / 3 = -2/3
    #   group 2: 5 - 6/3 = 3,  3 - 8/3 = 1/3,  1 - 10/3 = -7/3,  2 - 9/3 = -1
    scores = torch.tensor([1.0, 5.0, 0.0, 3.0, 0.0, 1.0, 1.0, 2.0])
    groups = torch.tensor([7, 2, 7, 2, 7, 2, 7, 2])
    expected = torch.tensor([2 / 3, 3.0, -2 / 3, 1 / 3, -2 / 3, -7 / 3, 2 / 3, -1.0])
    advantages = rloo_advantages(scores, groups)
    assert advantages.dtype == torch.float32
    torch.testing.assert_close(advantages, expected, **TIGHT)


def test_rloo_groups_of_two_and_three_by_hand():
    # [4, 2]: 4 - 2 = 2 and 2 - 4 = -2.   [3, 0, 0]: 3 - 0 = 3, 0 - (3 + 0) / 2 = -1.5 (twice).
    scores = torch.tensor([4.0, 3.0, 2.0, 0.0, 0.0])
    groups = torch.tensor([0, 1, 0, 1, 1])
    torch.testing.assert_close(rloo_advantages(scores, groups), torch.tensor([2.0, 3.0, -2.0, -1.5, -1.5]), **TIGHT)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rloo_matches_a_leave_one_out_loop_on_ragged_groups(seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = [2, 3, 5, 4]
    groups = torch.cat([torch.full((k,), g) for g, k in enumerate(sizes)])
    groups = groups[torch.randperm(len(groups), generator=gen)]  # membership from labels, not order
    scores = torch.randn(len(groups), generator=gen)
    expected = []
    for i in range(len(scores)):
        others = [float(scores[j]) for j in range(len(scores)) if j != i and groups[j] == groups[i]]
        expected.append(float(scores[i]) - sum(others) / len(others))
    torch.testing.assert_close(rloo_advantages(scores, groups), torch.tensor(expected), **TIGHT)


def test_rloo_is_k_over_k_minus_one_times_the_mean_only_advantage_and_sums_to_zero():
    gen = torch.Generator().manual_seed(3)
    groups = torch.arange(3).repeat_interleave(4)  # k = 4
    scores = torch.randn(12, generator=gen)
    rloo = rloo_advantages(scores, groups)
    torch.testing.assert_close(rloo, 4 / 3 * group_advantages(scores, groups, scale=False), **F32)
    torch.testing.assert_close(rloo.view(3, 4).sum(1), torch.zeros(3), rtol=0, atol=1e-5)


def test_rloo_refuses_a_group_of_one():
    with pytest.raises(ValueError, match="at least two"):
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))


# --- spread_over_tokens / discounted_returns -------------------------------------------------------


def test_spread_over_tokens_copies_each_value_onto_its_real_tokens_only():
    values = torch.tensor([1.5, float("nan"), -2.0])  # the NaN row has no tokens: it must not leak
    mask = _prefix_mask([2, 0, 3], 3)
    expected = torch.tensor([[1.5, 1.5, 0.0], [0.0, 0.0, 0.0], [-2.0, -2.0, -2.0]])
    torch.testing.assert_close(spread_over_tokens(values, mask), expected, **EXACT)
    assert spread_over_tokens(torch.tensor([1, 2, 3]), mask).dtype == torch.float32


def test_discounted_returns_by_hand():
    # gamma 0.5. Row 0: G2 = 2, G1 = 0 + 0.5 * 2 = 1, G0 = 1 + 0.5 * 1 = 1.5. Row 1 (length 2):
    # G1 = 1, G0 = 3 + 0.5 = 3.5; its NaN padding is never read.
    rewards = torch.tensor([[1.0, 0.0, 2.0], [3.0, 1.0, float("nan")]])
    returns = discounted_returns(rewards, _prefix_mask([3, 2], 3), gamma=0.5)
    torch.testing.assert_close(returns, torch.tensor([[1.5, 1.0, 2.0], [3.5, 1.0, 0.0]]), **TIGHT)


# --- REINFORCE++ ----------------------------------------------------------------------------------


def test_reinforce_pp_matches_a_hand_computation():
    # kl_coef 0.5, gamma 1. Rows of length 2 and 3.
    #   rewards row 0: [-0.1, 0.2 + 1]         = [-0.1, 1.2]          returns [1.1, 1.2]
    #   rewards row 1: [-0.05, -0.15, -0.25 - 1] = [-0.05, -0.15, -1.25] returns [-1.45, -1.4, -1.25]
    # over the 5 real tokens: mean -0.36, deviations 1.46, 1.56, -1.09, -1.04, -0.89,
    # squares sum 7.627, sample variance 7.627 / 4 = 1.90675.
    scores = torch.tensor([1.0, -1.0])
    kl = torch.tensor([[0.2, -0.4, float("nan")], [0.1, 0.3, 0.5]])
    mask = _prefix_mask([2, 3], 3)
    advantages = reinforce_pp_advantages(scores, mask, kl, kl_coef=0.5, gamma=1.0)
    scale = math.sqrt(1.90675 + 1e-8)
    expected = torch.tensor([[1.46, 1.56, 0.0], [-1.09, -1.04, -0.89]]) / scale
    expected[0, 2] = 0.0
    torch.testing.assert_close(advantages, expected, **F32)


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_a_plain_loop_for_every_kl_estimator(estimator, gamma):
    # k1, k2 and k3 in the reward are all expressible: kl_per_token(...) feeds the estimator as is.
    gen = torch.Generator().manual_seed(4)
    mask = _prefix_mask([5, 1, 3, 0, 4], 5)
    old_logprobs, ref_logprobs = -torch.rand(5, 5, generator=gen) * 3, -torch.rand(5, 5, generator=gen) * 3
    kl = kl_per_token(old_logprobs, ref_logprobs, estimator)
    scores = torch.randn(5, generator=gen)
    advantages = reinforce_pp_advantages(scores, mask, kl, kl_coef=0.05, gamma=gamma)
    torch.testing.assert_close(advantages, _reference_reinforce_pp(scores, kl, mask, 0.05, gamma), **F32)


def test_reinforce_pp_without_kl_is_the_whitened_score_on_every_token():
    scores = torch.tensor([2.0, 0.0, 1.0])
    mask = _prefix_mask([1, 3, 2], 3)
    advantages = reinforce_pp_advantages(scores, mask)
    # gamma 1: every token's return is its score, so tokens are [2, 0, 0, 0, 1, 1].
    flat = _whiten_list([2.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    expected = torch.tensor([[flat[0], 0.0, 0.0], flat[1:4], [flat[4], flat[5], 0.0]])
    torch.testing.assert_close(advantages, expected, **F32)


def test_reinforce_pp_whitening_is_over_the_whole_batch():
    gen = torch.Generator().manual_seed(5)
    mask = _prefix_mask([4, 2, 3, 4, 1, 3], 4)
    scores, kl = torch.randn(6, generator=gen), torch.randn(6, 4, generator=gen)
    advantages = reinforce_pp_advantages(scores, mask, kl, kl_coef=0.1)
    # Zero mean, unit (sample) variance over all real tokens, 0 at padding.
    torch.testing.assert_close(masked_mean(advantages, mask), torch.tensor(0.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(masked_var(advantages, mask), torch.tensor(1.0), rtol=0, atol=1e-5)
    assert torch.equal(advantages[~mask], torch.zeros_like(advantages[~mask]))
    # Whitening each half on its own (what a rank would do without the gather) gives other numbers.
    halves = torch.cat(
        [
            reinforce_pp_advantages(scores[:3], mask[:3], kl[:3], 0.1),
            reinforce_pp_advantages(scores[3:], mask[3:], kl[3:], 0.1),
        ]
    )
    assert not torch.allclose(halves, advantages, atol=1e-3)


# --- REINFORCE++-baseline -------------------------------------------------------------------------


def test_reinforce_pp_baseline_matches_a_hand_computation():
    # Groups [1, 0] and [3, 1]: means 0.5 and 2, centred [0.5, -0.5, 1, -1]; no KL, gamma 1, so every
    # token carries its sequence's centred score. Lengths 1, 2, 2, 1 give the tokens
    # [0.5, -0.5, -0.5, 1, 1, -1]: mean 1/12, deviations 5, -7, -7, 11, 11, -13 (twelfths),
    # squares 534 / 144, sample variance 534 / 144 / 5.
    scores = torch.tensor([1.0, 0.0, 3.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])
    mask = _prefix_mask([1, 2, 2, 1], 2)
    scale = math.sqrt(534 / 144 / 5 + 1e-8)
    expected = torch.tensor([[5.0, 0.0], [-7.0, -7.0], [11.0, 11.0], [-13.0, 0.0]]) / 12 / scale
    torch.testing.assert_close(reinforce_pp_baseline_advantages(scores, groups, mask), expected, **F32)


def test_reinforce_pp_baseline_is_reinforce_pp_on_group_centred_scores():
    gen = torch.Generator().manual_seed(6)
    groups = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])
    mask = _prefix_mask([3, 5, 1, 4, 2, 5, 5, 3], 5)
    scores, kl = torch.randn(8, generator=gen), torch.randn(8, 5, generator=gen)
    centred = torch.tensor(
        [
            float(scores[i]) - statistics.mean(float(s) for s, g in zip(scores, groups, strict=True) if g == groups[i])
            for i in range(8)
        ]
    )
    baseline = reinforce_pp_baseline_advantages(scores, groups, mask, kl, kl_coef=0.2)
    torch.testing.assert_close(baseline, _reference_reinforce_pp(centred, kl, mask, 0.2, 1.0), **F32)
    # A constant added to a group's scores is removed by its baseline.
    shifted = scores + torch.tensor([5.0, -3.0, 0.5])[groups]
    torch.testing.assert_close(
        reinforce_pp_baseline_advantages(shifted, groups, mask, kl, kl_coef=0.2), baseline, **F32
    )


def test_reinforce_pp_baseline_refuses_a_group_of_one():
    with pytest.raises(ValueError, match="at least two"):
        reinforce_pp_baseline_advantages(
            torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]), _prefix_mask([1, 1, 1], 1)
        )


def test_masked_whiten_is_what_the_estimators_use():
    # The documented convention: Bessel-corrected std and 1/sqrt(var + 1e-8) (masked_whiten's).
    scores, mask = torch.tensor([1.0, 3.0, -2.0]), _prefix_mask([2, 1, 3], 3)
    rewards = torch.zeros(3, 3)
    rewards[0, 1], rewards[1, 0], rewards[2, 2] = 1.0, 3.0, -2.0
    returns = discounted_returns(rewards, mask)
    torch.testing.assert_close(reinforce_pp_advantages(scores, mask), masked_whiten(returns, mask), **EXACT)


# --- DAPO: overlong penalty and dynamic sampling --------------------------------------------------


def _dapo_eq13(length: int, max_len: int, cache_len: int) -> float:
    """Yu et al. 2025, eq. 13, case by case."""
    if length <= max_len - cache_len:
        return 0.0
    if length <= max_len:
        return ((max_len - cache_len) - length) / cache_len
    return -1.0


def test_overlong_penalty_by_hand():
    # max_len 20, cache 4: free up to 16 tokens, then -1/4 per token down to -1 at 20, -1 beyond.
    lengths = torch.tensor([0, 10, 16, 17, 18, 19, 20, 21, 30])
    expected = torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, 20, 4), expected, **EXACT)
    torch.testing.assert_close(overlong_penalty(lengths, 20, 4, penalty=0.5), expected * 0.5, **EXACT)
    # No cache: only the hard step past max_len.
    hard = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, 20, 0), hard, **EXACT)


@pytest.mark.parametrize(("max_len", "cache_len"), [(20, 4), (16, 16), (64, 7), (10, 1)])
def test_overlong_penalty_follows_eq_13_case_by_case(max_len, cache_len):
    lengths = torch.arange(0, max_len + 5)
    expected = torch.tensor([_dapo_eq13(int(n), max_len, cache_len) for n in lengths])
    torch.testing.assert_close(overlong_penalty(lengths, max_len, cache_len), expected, **TIGHT)


def test_overlong_penalty_refuses_a_cache_longer_than_the_budget():
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(torch.tensor([3]), max_len=4, cache_len=5)


def test_informative_groups_by_hand():
    # group 5 all 1 (no signal), group 3 mixed, group 8 all 0.5, group 1 a single response.
    scores = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0, 0.5, 0.0, 2.0, 1.0])
    groups = torch.tensor([5, 3, 8, 5, 3, 8, 3, 1, 5])
    expected = torch.tensor([False, True, False, False, True, False, True, False, False])
    assert torch.equal(informative_groups(scores, groups), expected)


def test_informative_groups_compare_exactly_and_agree_with_zero_group_advantages():
    scores = torch.tensor([0.3, 0.3 + 1e-6, 0.7, 0.7, 0.0, 1.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    keep = informative_groups(scores, groups)
    assert keep.tolist() == [True, True, False, False, True, True, False, False]
    zero = group_advantages(scores, groups, scale=False) == 0
    assert torch.equal(~keep, zero)  # dropped exactly where the group-relative advantage vanishes
