"""The losses of the stages before PPO (tether/core/supervised.py): the reward model's pairwise
Bradley-Terry loss and SFT's response-only negative log-likelihood.

Tier: hand-computed math (every number written out), gradients against their closed form, and the
key property shared with the PPO losses: with the batch's normaliser passed in, the losses and
stats of micro-batches *sum* to the whole batch's. Offline, CPU, milliseconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from tether.core.supervised import pairwise_loss, response_nll

TIGHT = {"rtol": 1e-6, "atol": 1e-6}


def _t(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


# --- pairwise_loss ----------------------------------------------------------------------------------


def test_pairwise_loss_hand_computed_with_accuracy_margin_and_score_stats():
    """chosen [2, 0], rejected [0, 1]: gaps are +2 (won) and -1 (lost).
    -log sigmoid(2)  = log(1 + e^-2) = 0.126928...
    -log sigmoid(-1) = log(1 + e^1)  = 1.313262...
    loss = their mean = 0.720095...; accuracy 1/2; mean gap (2 - 1)/2 = 0.5; mean chosen score
    (2 + 0)/2 = 1; mean rejected score (0 + 1)/2 = 0.5."""
    chosen = torch.tensor([2.0, 0.0])
    rejected = torch.tensor([0.0, 1.0])
    loss, stats = pairwise_loss(chosen, rejected)

    by_hand = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(1.0))) / 2
    assert by_hand == pytest.approx(0.720095, abs=1e-6)
    torch.testing.assert_close(loss, _t(by_hand), **TIGHT)
    torch.testing.assert_close(stats["loss/rm"], _t(by_hand), **TIGHT)
    torch.testing.assert_close(stats["rm/accuracy"], _t(0.5), **TIGHT)
    torch.testing.assert_close(stats["rm/margin"], _t(0.5), **TIGHT)
    torch.testing.assert_close(stats["rm/chosen_score"], _t(1.0), **TIGHT)
    torch.testing.assert_close(stats["rm/rejected_score"], _t(0.5), **TIGHT)
    assert set(stats) == {"loss/rm", "rm/accuracy", "rm/margin", "rm/chosen_score", "rm/rejected_score"}
    assert not stats["loss/rm"].requires_grad


def test_pairwise_loss_with_a_margin_tensor_shifts_each_gap_but_not_the_stats():
    """With margins [1, 0.5] the loss is -log sigmoid(gap - margin): gaps 2 - 1 = 1 and -1 - 0.5 = -1.5.
    -log sigmoid(1)    = log(1 + e^-1)  = 0.313262...
    -log sigmoid(-1.5) = log(1 + e^1.5) = 1.701413...
    loss = 1.007337...; accuracy and the logged margin stat stay about the raw gap (1/2 and 0.5):
    a pair won by less than its margin is still a won pair."""
    chosen = torch.tensor([2.0, 0.0])
    rejected = torch.tensor([0.0, 1.0])
    loss, stats = pairwise_loss(chosen, rejected, margin=torch.tensor([1.0, 0.5]))
    by_hand = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.5))) / 2
    assert by_hand == pytest.approx(1.007337, abs=1e-6)
    torch.testing.assert_close(loss, _t(by_hand), **TIGHT)
    torch.testing.assert_close(stats["rm/accuracy"], _t(0.5), **TIGHT)
    torch.testing.assert_close(stats["rm/margin"], _t(0.5), **TIGHT)

    # A scalar margin is the same as that value repeated for every pair.
    scalar, _ = pairwise_loss(chosen, rejected, margin=0.5)
    repeated, _ = pairwise_loss(chosen, rejected, margin=torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(scalar, repeated, **TIGHT)
    expected = (math.log(1 + math.exp(-1.5)) + math.log(1 + math.exp(1.5))) / 2
    torch.testing.assert_close(scalar, _t(expected), **TIGHT)


def test_a_tie_counts_as_half_a_win():
    """Pairs: won (gap 3), tie (gap 0), lost (gap -0.5), tie (gap 0): accuracy (1 + 0.5 + 0 + 0.5)/4.
    A tie's loss is -log sigmoid(0) = log 2."""
    chosen = torch.tensor([3.0, 1.0, 0.0, -2.0])
    rejected = torch.tensor([0.0, 1.0, 0.5, -2.0])
    loss, stats = pairwise_loss(chosen, rejected)
    torch.testing.assert_close(stats["rm/accuracy"], _t(0.5), **TIGHT)
    by_hand = (math.log(1 + math.exp(-3.0)) + 2 * math.log(2.0) + math.log(1 + math.exp(0.5))) / 4
    torch.testing.assert_close(loss, _t(by_hand), **TIGHT)

    _, all_ties = pairwise_loss(torch.zeros(3), torch.zeros(3))
    torch.testing.assert_close(all_ties["rm/accuracy"], _t(0.5), **TIGHT)


def test_micro_batches_with_the_pair_count_sum_to_the_full_batch():
    """pair_count=4 passed to both halves of a 4-pair batch: each half's loss and every stat are
    divided by 4, so the two halves add up to the full batch's values exactly, gradients too."""
    gen = torch.Generator().manual_seed(0)
    chosen = torch.randn(4, generator=gen)
    rejected = torch.randn(4, generator=gen)
    margin = torch.rand(4, generator=gen)

    full_chosen = chosen.clone().requires_grad_(True)
    full_loss, full_stats = pairwise_loss(full_chosen, rejected, margin)
    full_loss.backward()

    split_chosen = chosen.clone().requires_grad_(True)
    summed: dict[str, torch.Tensor] = {}
    total = torch.zeros(())
    for half in (slice(0, 2), slice(2, 4)):
        loss, stats = pairwise_loss(split_chosen[half], rejected[half], margin[half], pair_count=4)
        loss.backward()
        total = total + loss.detach()
        for key, value in stats.items():
            summed[key] = summed.get(key, torch.zeros(())) + value
    torch.testing.assert_close(total, full_loss.detach(), **TIGHT)
    assert summed.keys() == full_stats.keys()
    for key in full_stats:
        torch.testing.assert_close(summed[key], full_stats[key], **TIGHT, msg=key)
    torch.testing.assert_close(split_chosen.grad, full_chosen.grad, **TIGHT)
    # Without pair_count each half would be averaged over 2 pairs, so halves would not sum.
    half_loss, _ = pairwise_loss(chosen[:2], rejected[:2], margin[:2])
    quarter_loss, _ = pairwise_loss(chosen[:2], rejected[:2], margin[:2], pair_count=4)
    torch.testing.assert_close(half_loss, 2 * quarter_loss, **TIGHT)


def test_pairwise_gradient_matches_its_closed_form():
    """d/d r_chosen of -log sigmoid(r_c - r_r - m) / n is -sigmoid(-(gap - m)) / n, and the
    rejected score's gradient is its negative."""
    chosen = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 1.0, -1.0], requires_grad=True)
    margin = torch.tensor([0.5, 0.0, 1.0])
    loss, _ = pairwise_loss(chosen, rejected, margin)
    loss.backward()
    gaps = [2.0 - 0.0 - 0.5, 0.0 - 1.0 - 0.0, -1.0 + 1.0 - 1.0]  # gap - margin
    expected = torch.tensor([-1.0 / (1.0 + math.exp(g)) / 3 for g in gaps])  # -sigmoid(-x) = -1/(1+e^x)
    torch.testing.assert_close(chosen.grad, expected, **TIGHT)
    torch.testing.assert_close(rejected.grad, -expected, **TIGHT)


def test_pairwise_loss_is_stable_for_large_gaps():
    """logsigmoid, not log(sigmoid()): a gap of -200 costs 200 (not inf) and one of +200 costs ~0."""
    loss, _ = pairwise_loss(torch.tensor([0.0]), torch.tensor([200.0]))
    torch.testing.assert_close(loss, _t(200.0), **TIGHT)
    loss, _ = pairwise_loss(torch.tensor([200.0]), torch.tensor([0.0]))
    assert 0.0 <= float(loss) < 1e-30


# --- response_nll -----------------------------------------------------------------------------------


def test_response_nll_is_the_masked_mean_of_minus_the_logprobs():
    """Row 0 has three response tokens, row 1 one (then padding): loss = (0.5 + 1 + 2 + 0.25) / 4
    = 0.9375. Positions outside the response mask hold huge values and must not matter."""
    logprobs = torch.tensor([[-0.5, -1.0, -2.0], [-0.25, -1e9, 1e9]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    loss, stats = response_nll(logprobs, mask)
    torch.testing.assert_close(loss, _t(0.9375), **TIGHT)
    torch.testing.assert_close(stats["loss/sft"], _t(0.9375), **TIGHT)
    assert set(stats) == {"loss/sft"}

    # Same response tokens, arbitrary (even non-finite) values elsewhere: same loss.
    wild = logprobs.clone()
    wild[~mask] = torch.tensor([float("inf"), float("nan")])
    loss_wild, _ = response_nll(wild, mask)
    torch.testing.assert_close(loss_wild, _t(0.9375), **TIGHT)


def test_response_nll_gives_no_gradient_to_masked_positions():
    logprobs = torch.tensor([[-0.5, -1.0, 5e8], [-0.25, -7e8, 3e8]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss, _ = response_nll(logprobs, mask)
    loss.backward()
    # d(-sum/3)/d logprob = -1/3 on the three response tokens, 0 elsewhere.
    expected = torch.tensor([[-1 / 3, -1 / 3, 0.0], [-1 / 3, 0.0, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected, **TIGHT)


def test_response_nll_with_the_token_count_splits_into_a_sum():
    """Rows of 4, 1 and 2 response tokens (7 in all): each row's loss with token_count=7 adds up to
    the whole batch's mean, and the batch's own loss is unchanged by passing its count."""
    gen = torch.Generator().manual_seed(3)
    logprobs = -torch.rand(3, 4, generator=gen) * 4
    mask = torch.arange(4).unsqueeze(0) < torch.tensor([4, 1, 2]).unsqueeze(1)
    full, _ = response_nll(logprobs, mask)
    torch.testing.assert_close(full, -logprobs[mask].mean(), **TIGHT)
    explicit, _ = response_nll(logprobs, mask, token_count=7)
    torch.testing.assert_close(explicit, full, **TIGHT)
    parts = [response_nll(logprobs[i : i + 1], mask[i : i + 1], token_count=7)[0] for i in range(3)]
    torch.testing.assert_close(sum(parts), full, **TIGHT)
    # A tensor token count works the same as a number.
    as_tensor, _ = response_nll(logprobs[:2], mask[:2], token_count=torch.tensor(7))
    torch.testing.assert_close(as_tensor, parts[0] + parts[1], **TIGHT)


def test_response_nll_of_an_empty_mask_is_zero_not_nan():
    loss, _ = response_nll(torch.full((2, 3), -1.0), torch.zeros(2, 3, dtype=torch.bool))
    assert float(loss) == 0.0
