"""PPO policy loss and clipped value loss (tether/core/losses.py).

Tier: hand-computed math, a per-token brute-force loop, identities (ratio 1 gives minus the mean
advantage) and the key property: gradients and stats do not depend on how a minibatch is split
into micro-batches. Offline, CPU, milliseconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from tether.core import clipped_value_loss, logprobs_from_logits, masked_mean, ppo_policy_loss

TIGHT = {"rtol": 1e-6, "atol": 1e-6}


def _prefix_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def _random_batch(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (5, 7)
    old_logprobs = -torch.rand(shape, generator=gen) * 3.0
    return {
        "old_logprobs": old_logprobs,
        # log-ratios in [-0.6, 0.6]: ratios 0.55..1.82, so both clip edges are crossed.
        "logprobs": old_logprobs + (torch.rand(shape, generator=gen) - 0.5) * 1.2,
        "advantages": torch.randn(shape, generator=gen),
        "mask": _prefix_mask([7, 3, 1, 5, 6], 7),
    }


# --- policy loss ----------------------------------------------------------------------------------


def test_policy_loss_at_ratio_one_is_minus_the_mean_advantage_with_no_clipping():
    batch = _random_batch(0)
    loss, stats = ppo_policy_loss(
        batch["old_logprobs"], batch["old_logprobs"], batch["advantages"], batch["mask"], clip_coef=0.2
    )
    torch.testing.assert_close(loss, -masked_mean(batch["advantages"], batch["mask"]), **TIGHT)
    torch.testing.assert_close(stats["policy/clipfrac"], torch.tensor(0.0), rtol=0.0, atol=0.0)
    torch.testing.assert_close(stats["policy/approxkl"], torch.tensor(0.0), rtol=0.0, atol=0.0)
    torch.testing.assert_close(stats["policy/ratio_mean"], torch.tensor(1.0), **TIGHT)


def test_policy_loss_hand_checked_clipping_in_all_four_quadrants():
    # clip_coef 0.2, so the trust region is [0.8, 1.2]. Token by token (loss = -min(r*A, clip(r)*A)):
    #   r 1.5, A +1: clipped   -> loss -1.2  (the objective stops rewarding a larger ratio)
    #   r 1.5, A -1: unclipped -> loss +1.5  (a bad action made likelier is punished in full)
    #   r 0.5, A +1: unclipped -> loss -0.5  (a good action made unlikelier is punished in full)
    #   r 0.5, A -1: clipped   -> loss +0.8
    # mean loss (-1.2 + 1.5 - 0.5 + 0.8) / 4 = 0.15, clipfrac 2 / 4. The 5th column is padding.
    ratios = torch.tensor([[1.5, 1.5, 0.5, 0.5, 50.0]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1e6]])
    old_logprobs = torch.full((1, 5), -2.0)
    logprobs = (old_logprobs + ratios.log()).requires_grad_(True)
    mask = _prefix_mask([4], 5)

    loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_coef=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.15), **TIGHT)
    torch.testing.assert_close(stats["policy/clipfrac"], torch.tensor(0.5), **TIGHT)
    approxkl = (2 * (0.5 - math.log(1.5)) + 2 * (-0.5 - math.log(0.5))) / 4  # mean of (r - 1) - log r
    torch.testing.assert_close(stats["policy/approxkl"], torch.tensor(approxkl), **TIGHT)
    torch.testing.assert_close(stats["policy/ratio_mean"], torch.tensor(1.0), **TIGHT)

    # Clipped tokens (and padding) get no gradient; unclipped ones get d(-A*r)/d(logp) / n = -A*r / 4.
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.375, -0.125, 0.0, 0.0]]), **TIGHT)


def _brute_force_policy_loss(batch: dict[str, torch.Tensor], clip_coef: float) -> tuple[float, float]:
    """Per-token loop over real tokens, written from the pessimistic objective min(r*A, clip(r)*A)."""
    total, clipped_count, count = 0.0, 0, 0
    for b in range(batch["mask"].shape[0]):
        for t in range(batch["mask"].shape[1]):
            if not batch["mask"][b, t]:
                continue
            ratio = math.exp(batch["logprobs"][b, t].item() - batch["old_logprobs"][b, t].item())
            adv = batch["advantages"][b, t].item()
            clipped_ratio = min(max(ratio, 1.0 - clip_coef), 1.0 + clip_coef)
            total += -min(ratio * adv, clipped_ratio * adv)
            # The clipped branch is the active one when A > 0 above the region or A < 0 below it.
            clipped_count += (adv > 0 and ratio > 1.0 + clip_coef) or (adv < 0 and ratio < 1.0 - clip_coef)
            count += 1
    return total / count, clipped_count / count


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("clip_coef", [0.1, 0.2, 0.3])
def test_policy_loss_matches_a_brute_force_per_token_loop(seed, clip_coef):
    batch = _random_batch(seed)
    expected_loss, expected_clipfrac = _brute_force_policy_loss(batch, clip_coef)
    assert 0.0 < expected_clipfrac < 1.0  # the batch really exercises both branches
    loss, stats = ppo_policy_loss(
        batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["mask"], clip_coef
    )
    torch.testing.assert_close(loss.item(), expected_loss, **TIGHT)
    torch.testing.assert_close(stats["policy/clipfrac"].item(), expected_clipfrac, **TIGHT)


def test_policy_stats_are_detached_and_loss_is_a_scalar():
    batch = _random_batch(3)
    logprobs = batch["logprobs"].clone().requires_grad_(True)
    loss, stats = ppo_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], batch["mask"], 0.2)
    assert loss.shape == () and loss.requires_grad
    assert set(stats) == {"policy/clipfrac", "policy/approxkl", "policy/ratio_mean"}
    assert not any(value.requires_grad for value in stats.values())


# --- value loss -----------------------------------------------------------------------------------


def test_value_loss_hand_checked_clipping():
    # value_clip 0.2; old value 1.0 for every token, so v_clipped = clamp(v, 0.8, 1.2).
    #   v 1.5, R 2.0: unclipped (1.5-2)^2 = 0.25, clipped (1.2-2)^2 = 0.64 -> 0.64 (clip hit)
    #   v 1.5, R 0.0: unclipped 2.25,             clipped 1.44             -> 2.25
    #   v 1.1, R 3.0: inside the region, both 3.61                         -> 3.61
    # loss = 0.5 * (0.64 + 2.25 + 3.61) / 3 = 1.083333..., clipfrac 1/3. The 4th column is padding.
    values = torch.tensor([[1.5, 1.5, 1.1, 40.0]])
    old_values = torch.ones(1, 4)
    returns = torch.tensor([[2.0, 0.0, 3.0, -40.0]])
    mask = _prefix_mask([3], 4)
    loss, stats = clipped_value_loss(values, old_values, returns, mask, value_clip=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (0.64 + 2.25 + 3.61) / 3), **TIGHT)
    torch.testing.assert_close(stats["val/clipfrac"], torch.tensor(1 / 3), **TIGHT)


def test_value_loss_matches_a_brute_force_per_token_loop():
    gen = torch.Generator().manual_seed(4)
    values, old_values, returns = (torch.randn(4, 6, generator=gen) for _ in range(3))
    mask = _prefix_mask([6, 2, 4, 1], 6)
    clip = 0.3
    total, hits, count = 0.0, 0, 0
    for b in range(4):
        for t in range(6):
            if not mask[b, t]:
                continue
            v, old, ret = values[b, t].item(), old_values[b, t].item(), returns[b, t].item()
            v_clipped = old + min(max(v - old, -clip), clip)
            total += 0.5 * max((v - ret) ** 2, (v_clipped - ret) ** 2)
            hits += (v_clipped - ret) ** 2 > (v - ret) ** 2
            count += 1
    assert 0 < hits < count
    loss, stats = clipped_value_loss(values, old_values, returns, mask, value_clip=clip)
    torch.testing.assert_close(loss.item(), total / count, **TIGHT)
    torch.testing.assert_close(stats["val/clipfrac"].item(), hits / count, **TIGHT)


def test_value_changes_inside_the_clip_range_never_count_as_clipped():
    """Inside the range old + (v - old) equals v only up to rounding, so the clipped square can
    exceed the unclipped one by an ulp (this triple does in float32); that is not a clipped token."""
    values, old_values, returns = (
        torch.tensor([[0.036155786365270615]]),
        torch.tensor([[0.11885771155357361]]),
        torch.tensor([[-0.4732849597930908]]),
    )
    v_clipped = old_values + torch.clamp(values - old_values, -0.2, 0.2)
    assert ((v_clipped - returns) ** 2 > (values - returns) ** 2).all()  # the rounding this guards against
    _, stats = clipped_value_loss(values, old_values, returns, torch.ones(1, 1, dtype=torch.bool), value_clip=0.2)
    assert stats["val/clipfrac"].item() == 0.0


def test_value_loss_without_clip_is_half_the_masked_mse():
    gen = torch.Generator().manual_seed(5)
    values, returns = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    old_values = values + 10.0  # far away: would dominate if it were used
    mask = _prefix_mask([4, 2, 3], 4)
    loss, stats = clipped_value_loss(values, old_values, returns, mask, value_clip=None)
    torch.testing.assert_close(loss, 0.5 * ((values - returns) ** 2)[mask].mean(), **TIGHT)
    torch.testing.assert_close(stats["val/clipfrac"], torch.tensor(0.0), rtol=0.0, atol=0.0)


# --- micro-batch equivalence (docs/concepts/details.md item 13) ---------------------------------------------


class _TinyPolicyAndCritic:
    """A linear 'model': features (B, T, D) -> logits (B, T, V) and values (B, T), all with grad."""

    def __init__(self, seed: int, dim: int = 4, vocab: int = 5):
        gen = torch.Generator().manual_seed(seed)
        self.w_logits = (torch.randn(dim, vocab, generator=gen) * 0.5).requires_grad_(True)
        self.w_value = (torch.randn(dim, generator=gen) * 0.5).requires_grad_(True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.w_logits, self.w_value]

    def __call__(self, features: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logprobs = logprobs_from_logits(features @ self.w_logits, tokens, temperature=0.7)
        return logprobs, features @ self.w_value


def _minibatch(seed: int, dim: int = 4, vocab: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [6, 2, 5, 1, 4]  # ragged, so micro-batches hold different token counts
    batch, width = len(lengths), max(lengths)
    return {
        "features": torch.randn(batch, width, dim, generator=gen),
        "tokens": torch.randint(0, vocab, (batch, width), generator=gen),
        "old_logprobs": -torch.rand(batch, width, generator=gen) * 2.0 - 0.5,
        "old_values": torch.randn(batch, width, generator=gen),
        "advantages": torch.randn(batch, width, generator=gen),
        "returns": torch.randn(batch, width, generator=gen),
        "mask": _prefix_mask(lengths, width),
    }


def _loss_and_stats(model, mb, token_count) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logprobs, values = model(mb["features"], mb["tokens"])
    pg_loss, pg_stats = ppo_policy_loss(
        logprobs, mb["old_logprobs"], mb["advantages"], mb["mask"], clip_coef=0.2, token_count=token_count
    )
    vf_loss, vf_stats = clipped_value_loss(
        values, mb["old_values"], mb["returns"], mb["mask"], value_clip=0.2, token_count=token_count
    )
    return pg_loss + 0.1 * vf_loss, {**pg_stats, **vf_stats, "loss": (pg_loss + 0.1 * vf_loss).detach()}


def _accumulate(model, batch, sizes, token_count) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Gradient accumulation: backward() on each micro-batch, gradients and stats summed."""
    for p in model.parameters():
        p.grad = None
    totals: dict[str, torch.Tensor] = {}
    start = 0
    for size in sizes:
        micro = {k: v[start : start + size] for k, v in batch.items()}
        start += size
        loss, stats = _loss_and_stats(model, micro, token_count)
        loss.backward()
        for key, value in stats.items():
            totals[key] = totals.get(key, torch.tensor(0.0)) + value
    assert start == batch["mask"].shape[0]
    return [p.grad.clone() for p in model.parameters()], totals


SPLITS = [[5], [1, 4], [4, 1], [2, 3], [2, 2, 1], [1, 1, 1, 1, 1], [3, 1, 1]]


@pytest.mark.parametrize("sizes", SPLITS, ids=lambda s: "+".join(map(str, s)))
def test_micro_batch_gradients_and_stats_sum_to_the_full_batch_ones(sizes):
    model, batch = _TinyPolicyAndCritic(0), _minibatch(0)
    token_count = batch["mask"].sum()  # the WHOLE minibatch's count, passed to every micro-batch

    full_grads, full_stats = _accumulate(model, batch, [5], token_count=None)
    split_grads, split_stats = _accumulate(model, batch, sizes, token_count=token_count)

    for full, split in zip(full_grads, split_grads, strict=True):
        assert full.abs().sum() > 0
        torch.testing.assert_close(split, full, rtol=1e-5, atol=1e-6)
    assert full_stats["policy/clipfrac"] > 0  # the example really clips, so the stats are non-trivial
    for key, full in full_stats.items():
        torch.testing.assert_close(split_stats[key], full, rtol=1e-5, atol=1e-6, msg=key)


def test_micro_batches_normalised_by_their_own_token_count_do_not_match():
    # Why token_count exists: averaging per micro-batch over-weights the short rows (this can fail).
    model, batch = _TinyPolicyAndCritic(0), _minibatch(0)
    full_grads, _ = _accumulate(model, batch, [5], token_count=None)
    split_grads, _ = _accumulate(model, batch, [1, 4], token_count=None)
    assert not torch.allclose(split_grads[0], full_grads[0], rtol=1e-3, atol=1e-4)


def test_token_count_as_float_and_as_tensor_agree():
    batch = _random_batch(6)
    args = (batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["mask"], 0.2)
    as_tensor, _ = ppo_policy_loss(*args, token_count=batch["mask"].sum())
    as_float, _ = ppo_policy_loss(*args, token_count=float(batch["mask"].sum()))
    own_count, _ = ppo_policy_loss(*args)
    torch.testing.assert_close(as_tensor, own_count, rtol=0.0, atol=0.0)
    torch.testing.assert_close(as_float, own_count, rtol=0.0, atol=0.0)
