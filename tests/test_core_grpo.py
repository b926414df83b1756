"""GRPO's math against hand computations: group-relative advantages and the k3 KL loss term."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from tether.core import group_advantages, kl_loss


def test_group_advantages_match_a_hand_computation():
    # Two groups of four, interleaved on purpose: membership comes from the labels, not the order.
    scores = torch.tensor([1.0, 5.0, 0.0, 3.0, 0.0, 1.0, 1.0, 2.0])
    groups = torch.tensor([7, 2, 7, 2, 7, 2, 7, 2])
    first = [1.0, 0.0, 0.0, 1.0]  # mean 0.5, sample std sqrt(1/3)
    second = [5.0, 3.0, 1.0, 2.0]  # mean 2.75, sample std sqrt(2.9166...)
    expected = []
    for i, score in enumerate(scores.tolist()):
        members = first if i % 2 == 0 else second
        expected.append((score - statistics.mean(members)) / (statistics.stdev(members) + 1e-4))
    torch.testing.assert_close(group_advantages(scores, groups), torch.tensor(expected), atol=1e-6, rtol=0)
    # By hand for the first member: (1 - 0.5) / (sqrt(1/3) + 1e-4)
    assert float(group_advantages(scores, groups)[0]) == pytest.approx(0.5 / (math.sqrt(1 / 3) + 1e-4), abs=1e-6)


def test_mean_only_advantages_keep_the_scale():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 4.0, 2.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 1.0, -1.0])
    torch.testing.assert_close(group_advantages(scores, groups, scale=False), expected)


def test_a_group_whose_scores_are_all_equal_gets_zero_advantage():
    scores = torch.tensor([0.7, 0.7, 0.7, 0.0, 1.0, 0.5])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    for scale in (True, False):
        advantages = group_advantages(scores, groups, scale=scale)
        assert torch.equal(advantages[:3], torch.zeros(3)), "an all-equal group must carry no signal"
        assert torch.all(torch.isfinite(advantages))
        assert advantages[3:].abs().sum() > 0


def test_advantages_sum_to_zero_within_each_group_and_are_shift_invariant():
    torch.manual_seed(0)
    scores = torch.randn(12)
    groups = torch.arange(3).repeat_interleave(4)
    advantages = group_advantages(scores, groups)
    torch.testing.assert_close(advantages.view(3, 4).sum(dim=1), torch.zeros(3), atol=1e-5, rtol=0)
    # A constant added to one group's scores changes nothing: the baseline is the group's own mean.
    shifted = scores + torch.tensor([10.0, 0.0, -3.0]).repeat_interleave(4)
    torch.testing.assert_close(group_advantages(shifted, groups), advantages, atol=1e-4, rtol=0)


def test_a_group_of_one_is_refused():
    with pytest.raises(ValueError, match="at least two"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))


def test_kl_loss_is_zero_at_the_reference_and_matches_k3_by_hand():
    ref = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss, stats = kl_loss(ref.clone(), ref, mask)
    assert float(loss) == 0.0 and float(stats["policy/ref_kl"]) == 0.0

    logprobs = torch.tensor([[-0.5, -2.5, -0.5], [-2.0, -1.2, 50.0]], requires_grad=True)
    loss, _ = kl_loss(logprobs, ref, mask)
    # k3 = exp(ref - logp) - 1 - (ref - logp) per real token, averaged over the 5 real tokens.
    by_hand = []
    for row, col in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]:
        d = float(ref[row, col]) - float(logprobs.detach()[row, col])
        by_hand.append(math.exp(d) - 1 - d)
    assert float(loss.detach()) == pytest.approx(sum(by_hand) / 5, rel=1e-6)
    loss.backward()
    assert logprobs.grad is not None
    # d k3 / d logp = 1 - exp(ref - logp); padding gets no gradient at all (even at logp = 50).
    expected_grad = torch.where(mask, (1 - torch.exp(ref - logprobs.detach())) / 5, torch.zeros_like(ref))
    torch.testing.assert_close(logprobs.grad, expected_grad)


def test_kl_loss_over_micro_batches_sums_to_the_whole_batch():
    torch.manual_seed(1)
    logprobs, ref = -torch.rand(4, 5) * 3, -torch.rand(4, 5) * 3
    mask = torch.rand(4, 5) > 0.3
    whole, _ = kl_loss(logprobs, ref, mask)
    count = mask.sum()
    parts = kl_loss(logprobs[:1], ref[:1], mask[:1], count)[0] + kl_loss(logprobs[1:], ref[1:], mask[1:], count)[0]
    torch.testing.assert_close(parts, whole)
