"""Per-token rewards and GAE (tether/core/advantages.py) on ragged, padded batches.

Tier: hand-computed math, a plain-loop reference, identities (gamma = lam = 1 is reward-to-go
minus value; padding content never matters). Offline, CPU, milliseconds.
"""

from __future__ import annotations

import pytest
import torch

from tether.core import compute_gae, last_true_index, per_token_rewards

GAE_TOL = {"rtol": 1e-5, "atol": 1e-5}  # compute_gae works in float32
EXACT = {"rtol": 0.0, "atol": 0.0}


def _prefix_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def _ragged(seed: int, batch: int = 6, width: int = 9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random rewards, values and a prefix mask whose lengths include 0, 1 and the full width."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [0, 1, width] + torch.randint(1, width + 1, (batch - 3,), generator=gen).tolist()
    rewards = torch.randn(batch, width, generator=gen)
    values = torch.randn(batch, width, generator=gen)
    return rewards, values, _prefix_mask(lengths, width)


def _reference_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence at a time, over its real length only; the episode ends after the last real token."""
    advantages = torch.zeros(rewards.shape, dtype=torch.float64)
    returns = torch.zeros(rewards.shape, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        length = int(mask[b].sum())
        r, v = rewards[b, :length].tolist(), values[b, :length].tolist()
        running = 0.0
        for t in reversed(range(length)):
            next_value = v[t + 1] if t + 1 < length else 0.0  # terminal: nothing to bootstrap from
            delta = r[t] + gamma * next_value - v[t]
            running = delta + gamma * lam * running
            advantages[b, t] = running
            returns[b, t] = running + v[t]
    return advantages.float(), returns.float()


# --- last_true_index / per_token_rewards -------------------------------------------------------------


def test_last_true_index_per_row_and_zero_for_an_empty_row():
    mask = _prefix_mask([3, 1, 0, 5], 5)
    torch.testing.assert_close(last_true_index(mask), torch.tensor([2, 0, 0, 4]), **EXACT)


def test_per_token_rewards_match_hand_computation_on_a_ragged_batch():
    # Rows of length 3, 1 (its only token is its first), 4 (full) and 0 (no response at all).
    mask = _prefix_mask([3, 1, 4, 0], 4)
    scores = torch.tensor([1.0, -0.5, 2.0, 7.0])
    kl = torch.tensor(
        [
            [0.1, 0.2, 0.3, 99.0],
            [0.4, 99.0, 99.0, 99.0],
            [-0.1, 0.0, 0.5, 1.0],
            [99.0, 99.0, 99.0, 99.0],
        ]
    )
    expected = torch.tensor(
        [
            [-0.01, -0.02, -0.03 + 1.0, 0.0],  # score on the last real token, padding is 0
            [-0.04 - 0.5, 0.0, 0.0, 0.0],  # a single token gets both its KL term and the score
            [0.01, 0.0, -0.05, -0.1 + 2.0],
            [0.0, 0.0, 0.0, 0.0],  # nowhere to put the score: all zeros
        ]
    )
    rewards = per_token_rewards(scores, kl, mask, kl_coef=0.1)
    assert rewards.dtype == torch.float32
    torch.testing.assert_close(rewards, expected, rtol=0.0, atol=1e-6)


def test_per_token_rewards_ignore_nan_kl_at_padding():
    mask = _prefix_mask([2, 3], 4)
    kl = torch.tensor([[0.2, 0.4, float("nan"), float("inf")], [0.1, 0.1, 0.1, float("nan")]])
    rewards = per_token_rewards(torch.tensor([1.0, 2.0]), kl, mask, kl_coef=0.5)
    expected = torch.tensor([[-0.1, -0.2 + 1.0, 0.0, 0.0], [-0.05, -0.05, -0.05 + 2.0, 0.0]])
    torch.testing.assert_close(rewards, expected, rtol=0.0, atol=1e-6)


def test_per_token_rewards_with_zero_kl_coef_are_the_score_on_the_last_token_only():
    _, _, mask = _ragged(0)
    scores = torch.arange(mask.shape[0], dtype=torch.float32) + 1.0
    rewards = per_token_rewards(scores, torch.randn(mask.shape), mask, kl_coef=0.0)
    torch.testing.assert_close(rewards.sum(1), torch.where(mask.any(1), scores, 0.0), **EXACT)
    assert (rewards != 0).sum() == mask.any(1).sum()


# --- compute_gae ----------------------------------------------------------------------------------


def test_gae_hand_computed_example_t3():
    # gamma 0.9, lam 0.8 (gamma * lam = 0.72). Row 0 is full, row 1 has one padded position.
    #   row 0: delta_2 = 2 - 1.5 = 0.5                          A_2 = 0.5
    #          delta_1 = 0 + 0.9 * 1.5 - 1.0 = 0.35              A_1 = 0.35 + 0.72 * 0.5  = 0.71
    #          delta_0 = 1 + 0.9 * 1.0 - 0.5 = 1.4               A_0 = 1.4  + 0.72 * 0.71 = 1.9112
    #   row 1: delta_1 = 2 - 1.0 = 1      (terminal: no V_2)     A_1 = 1
    #          delta_0 = 1 + 0.9 * 1.0 - 0.5 = 1.4               A_0 = 1.4  + 0.72 * 1    = 2.12
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 2.0, float("nan")]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 123.0]])
    mask = _prefix_mask([3, 2], 3)
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages, torch.tensor([[1.9112, 0.71, 0.5], [2.12, 1.0, 0.0]]), **GAE_TOL)
    torch.testing.assert_close(returns, torch.tensor([[2.4112, 1.71, 2.0], [2.62, 2.0, 0.0]]), **GAE_TOL)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (1.0, 0.0), (0.5, 1.0)])
def test_gae_matches_a_plain_per_sequence_loop_on_ragged_batches(seed, gamma, lam):
    rewards, values, mask = _ragged(seed)
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    expected_adv, expected_ret = _reference_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, expected_adv, **GAE_TOL)
    torch.testing.assert_close(returns, expected_ret, **GAE_TOL)


def test_gae_with_lam_zero_is_the_one_step_td_error():
    rewards, values, mask = _ragged(4)
    advantages, _ = compute_gae(rewards, values, mask, gamma=0.9, lam=0.0)
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(values.shape[0], 1)], dim=1)
    td_error = (rewards + 0.9 * next_values - values) * mask
    torch.testing.assert_close(advantages, td_error, **GAE_TOL)


@pytest.mark.parametrize("seed", [0, 5])
def test_gae_with_gamma_and_lam_one_is_reward_to_go_minus_value(seed):
    rewards, values, mask = _ragged(seed)
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    masked_rewards = rewards * mask
    reward_to_go = masked_rewards.flip(1).cumsum(1).flip(1)  # sum_{k >= t} r_k over real tokens
    torch.testing.assert_close(advantages, (reward_to_go - values) * mask, **GAE_TOL)
    torch.testing.assert_close(returns, reward_to_go * mask, **GAE_TOL)


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), 1e30])
def test_gae_ignores_whatever_is_in_padded_rewards_and_values(garbage):
    rewards, values, mask = _ragged(6)
    clean = compute_gae(rewards * mask, values * mask, mask, 0.99, 0.95)
    fill = torch.full_like(rewards, garbage)
    dirty = compute_gae(torch.where(mask, rewards, fill), torch.where(mask, values, -fill), mask, 0.99, 0.95)
    torch.testing.assert_close(dirty[0], clean[0], **EXACT)
    torch.testing.assert_close(dirty[1], clean[1], **EXACT)


def test_gae_is_unchanged_by_extra_padding_columns():
    rewards, values, mask = _ragged(7)
    pad = torch.full((rewards.shape[0], 4), float("nan"))
    no_tokens = torch.zeros(rewards.shape[0], 4, dtype=torch.bool)
    wide_inputs = torch.cat([rewards, pad], 1), torch.cat([values, pad], 1), torch.cat([mask, no_tokens], 1)
    wide = compute_gae(*wide_inputs, 0.99, 0.95)
    narrow = compute_gae(rewards, values, mask, 0.99, 0.95)
    torch.testing.assert_close(wide[0][:, : rewards.shape[1]], narrow[0], **EXACT)
    torch.testing.assert_close(wide[1][:, : rewards.shape[1]], narrow[1], **EXACT)


def test_gae_advantages_and_returns_are_zero_at_padding():
    rewards, values, mask = _ragged(8)
    advantages, returns = compute_gae(rewards + 3.0, values + 3.0, mask, 0.99, 0.95)
    torch.testing.assert_close(advantages[~mask], torch.zeros_like(advantages[~mask]), **EXACT)
    torch.testing.assert_close(returns[~mask], torch.zeros_like(returns[~mask]), **EXACT)


def test_gae_returns_are_advantages_plus_values_on_real_tokens():
    rewards, values, mask = _ragged(9)
    advantages, returns = compute_gae(rewards, values, mask, 0.99, 0.95)
    torch.testing.assert_close(returns[mask], (advantages + values)[mask], **GAE_TOL)


# --- masks with holes: the tool output of a multi-turn episode (tether/episodes.py) ---------------


def test_gae_steps_over_masked_out_tool_tokens_hand_computed():
    # Model tokens at 0, 1 and 4; tool output at 2, 3 (masked out: neither a reward, a value nor an
    # end). gamma 0.9, lam 0.8 (gamma * lam = 0.72):
    #   t=4: delta = 3 - 2.0 = 1                              A_4 = 1
    #   t=1: delta = 0 + 0.9 * V_4 - V_1 = 1.8 - 1.0 = 0.8    A_1 = 0.8 + 0.72 * 1    = 1.52
    #   t=0: delta = 1 + 0.9 * V_1 - V_0 = 1.9 - 0.5 = 1.4    A_0 = 1.4 + 0.72 * 1.52 = 2.4944
    rewards = torch.tensor([[1.0, 0.0, 50.0, 50.0, 3.0]])
    values = torch.tensor([[0.5, 1.0, -9.0, -9.0, 2.0]])
    mask = torch.tensor([[True, True, False, False, True]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages, torch.tensor([[2.4944, 1.52, 0.0, 0.0, 1.0]]), **GAE_TOL)
    torch.testing.assert_close(returns, torch.tensor([[2.9944, 2.52, 0.0, 0.0, 3.0]]), **GAE_TOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_with_holes_equals_gae_of_the_model_tokens_pushed_together(seed):
    """Over a mask with holes, GAE is the plain recursion over the masked-in tokens alone."""
    gen = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(5, 12, generator=gen), torch.randn(5, 12, generator=gen)
    mask = torch.rand(5, 12, generator=gen) < 0.6
    mask[0] = False  # a row with no model token at all
    advantages, returns = compute_gae(rewards, values, mask, 0.99, 0.95)
    for row in range(5):
        kept = mask[row].nonzero().flatten()
        packed = _prefix_mask([len(kept)], 12)
        packed_rewards = torch.zeros(1, 12)
        packed_values = torch.zeros(1, 12)
        packed_rewards[0, : len(kept)], packed_values[0, : len(kept)] = rewards[row, kept], values[row, kept]
        expected_adv, expected_ret = _reference_gae(packed_rewards, packed_values, packed, 0.99, 0.95)
        torch.testing.assert_close(advantages[row, kept], expected_adv[0, : len(kept)], **GAE_TOL)
        torch.testing.assert_close(returns[row, kept], expected_ret[0, : len(kept)], **GAE_TOL)
        assert (advantages[row, ~mask[row]] == 0).all() and (returns[row, ~mask[row]] == 0).all()
