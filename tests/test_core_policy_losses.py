"""Policy losses of the critic-free family and the loss aggregations (tether/core/losses.py):
asymmetric (clip-higher) and dual clipping, GSPO and GSPO-token, the four aggregation modes and their
normaliser, and the old `ppo_policy_loss` / `kl_loss` reproduced through the new path.

Tier: hand-computed numbers, a per-token brute-force loop, autograd of hand-written references, and
the key property: for every mode, the gradients of micro-batches (and of data-parallel shards) given
the whole minibatch's normaliser sum to the full-batch gradient. Offline, CPU, milliseconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from tether.core import (
    AGGREGATIONS,
    aggregate,
    clipped_policy_loss,
    clipped_surrogate,
    gspo_policy_loss,
    kl_loss,
    kl_per_token,
    logprobs_from_logits,
    loss_normaliser,
    masked_sum,
    ppo_policy_loss,
    sequence_log_ratio,
)

TIGHT = {"rtol": 1e-6, "atol": 1e-6}
EXACT = {"rtol": 0.0, "atol": 0.0}


def _prefix_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def _random_batch(seed: int, lengths: tuple[int, ...] = (7, 3, 1, 5, 6)) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (len(lengths), max(lengths))
    old_logprobs = -torch.rand(shape, generator=gen) * 3.0
    return {
        "old_logprobs": old_logprobs,
        # log-ratios in [-0.9, 0.9]: ratios 0.41..2.46, so both clip edges and a dual clip at 1.5 are crossed.
        "logprobs": old_logprobs + (torch.rand(shape, generator=gen) - 0.5) * 1.8,
        "advantages": torch.randn(shape, generator=gen),
        "mask": _prefix_mask(list(lengths), shape[1]),
    }


def _legacy_ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_coef, token_count=None):
    """tether's ppo_policy_loss before the aggregation rework, verbatim in its arithmetic."""
    n = mask.sum().clamp(min=1).float() if token_count is None else torch.as_tensor(token_count, dtype=torch.float32)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    loss = masked_sum(torch.max(unclipped, clipped), mask) / n
    with torch.no_grad():
        stats = {
            "policy/clipfrac": masked_sum((clipped > unclipped).float(), mask) / n,
            "policy/approxkl": masked_sum((ratio - 1.0) - log_ratio, mask) / n,
            "policy/ratio_mean": masked_sum(ratio, mask) / n,
        }
    return loss, stats


def _reference_aggregate(values: list[list[float]], mode: str, constant: float | None = None) -> float:
    """Plain-Python reduction of ragged per-token values (one list per sequence, possibly empty)."""
    rows = [row for row in values if row]
    tokens = sum(len(row) for row in values)
    total = sum(sum(row) for row in values)
    if mode == "token_mean":
        return total / tokens
    if mode == "seq_mean_token_mean":
        return sum(sum(row) / len(row) for row in rows) / len(rows)
    if mode == "seq_mean_token_sum":
        return total / len(rows)
    assert mode == "seq_sum_constant" and constant is not None
    return total / (len(values) * constant)


# --- aggregation ----------------------------------------------------------------------------------


def test_aggregations_by_hand_with_an_empty_row():
    # Rows [1, 2, 3], [4], [5, 6] and an empty one; the padding holds NaN.
    #   token_mean            21 / 6                     = 3.5
    #   seq_mean_token_mean   (2 + 4 + 5.5) / 3          = 3.8333  (the empty row has no mean: not counted)
    #   seq_mean_token_sum    (6 + 4 + 11) / 3           = 7
    #   seq_sum_constant      21 / (4 rows * budget 5)   = 1.05    (every row counts: the divisor is fixed)
    nan = float("nan")
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, nan, nan], [5.0, 6.0, nan], [nan, nan, nan]])
    mask = _prefix_mask([3, 1, 2, 0], 3)
    expected = {"token_mean": 3.5, "seq_mean_token_mean": 11.5 / 3, "seq_mean_token_sum": 7.0, "seq_sum_constant": 1.05}
    for mode, value in expected.items():
        normaliser = loss_normaliser(mask, mode, constant=5 if mode == "seq_sum_constant" else None)
        torch.testing.assert_close(aggregate(per_token, mask, mode, normaliser), torch.tensor(value), **TIGHT, msg=mode)
    # Without a normaliser the batch's own is used (seq_sum_constant has none: it needs its budget).
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
        torch.testing.assert_close(aggregate(per_token, mask, mode), torch.tensor(expected[mode]), **TIGHT, msg=mode)


def test_loss_normaliser_counts_by_hand():
    mask = _prefix_mask([3, 1, 2, 0], 3)
    assert float(loss_normaliser(mask)) == 6.0
    assert float(loss_normaliser(mask, "seq_mean_token_mean")) == 3.0
    assert float(loss_normaliser(mask, "seq_mean_token_sum")) == 3.0
    assert float(loss_normaliser(mask, "seq_sum_constant", constant=512)) == 4 * 512.0
    assert loss_normaliser(mask).dtype == torch.float32
    empty = torch.zeros(2, 3, dtype=torch.bool)  # never 0: an empty minibatch gives a 0 loss, not NaN
    assert float(loss_normaliser(empty)) == 1.0 and float(loss_normaliser(empty, "seq_mean_token_mean")) == 1.0


def test_unknown_aggregation_and_missing_constant_are_refused():
    mask = _prefix_mask([2], 2)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        loss_normaliser(mask, "sequence_mean")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(torch.ones(1, 2), mask, "sequence_mean", 1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        loss_normaliser(mask, "seq_sum_constant")
    with pytest.raises(ValueError, match="max_new_tokens"):
        aggregate(torch.ones(1, 2), mask, "seq_sum_constant")


def test_seq_sum_constant_does_not_down_weight_long_responses():
    # Dr. GRPO's point: with a per-sequence token mean, each token of a long response counts less.
    mask = _prefix_mask([1, 4], 4)
    per_token = torch.ones(2, 4, requires_grad=True)
    aggregate(per_token, mask, "seq_mean_token_mean").backward()
    assert per_token.grad is not None
    assert per_token.grad[0, 0] == 4 * per_token.grad[1, 0]  # the 1-token row's token weighs 4x more
    per_token.grad = None
    aggregate(per_token, mask, "seq_sum_constant", loss_normaliser(mask, "seq_sum_constant", 4)).backward()
    torch.testing.assert_close(per_token.grad, mask.float() / 8, **EXACT)  # every real token: 1 / (2 * 4)


# --- the old functions through the new path --------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("token_count", [None, 17.0])
def test_ppo_policy_loss_keeps_its_numbers_bit_for_bit(seed, token_count):
    batch = _random_batch(seed)
    args = (batch["old_logprobs"], batch["advantages"], batch["mask"], 0.2, token_count)
    new_logprobs = batch["logprobs"].clone().requires_grad_(True)
    old_logprobs = batch["logprobs"].clone().requires_grad_(True)
    loss, stats = ppo_policy_loss(new_logprobs, *args)
    legacy_loss, legacy_stats = _legacy_ppo_policy_loss(old_logprobs, *args)
    torch.testing.assert_close(loss, legacy_loss, **EXACT)
    assert set(stats) == set(legacy_stats)
    for key in stats:
        torch.testing.assert_close(stats[key], legacy_stats[key], **EXACT, msg=key)
    loss.backward()
    legacy_loss.backward()
    torch.testing.assert_close(new_logprobs.grad, old_logprobs.grad, **EXACT)


def test_ppo_policy_loss_is_clipped_policy_loss_with_a_symmetric_range_and_token_mean():
    batch = _random_batch(3)
    inputs = (batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["mask"])
    old, old_stats = ppo_policy_loss(*inputs, 0.2)
    new, new_stats = clipped_policy_loss(
        *inputs, clip_low=0.2, aggregation="token_mean", normaliser=loss_normaliser(batch["mask"])
    )
    torch.testing.assert_close(new, old, **EXACT)
    for key, value in old_stats.items():
        torch.testing.assert_close(new_stats[key], value, **EXACT, msg=key)
    # ...and the per-token pieces aggregate to it.
    ratio = torch.exp(batch["logprobs"] - batch["old_logprobs"])
    per_token, _ = clipped_surrogate(ratio, batch["advantages"], 0.2)
    torch.testing.assert_close(aggregate(per_token, batch["mask"]), old, **EXACT)


@pytest.mark.parametrize("token_count", [None, 9.0])
def test_kl_loss_is_the_token_mean_of_k3_through_aggregate(token_count):
    # KL in the loss (GRPO, k3) is kl_loss or, under any aggregation, aggregate(kl_per_token(.., "k3")).
    batch = _random_batch(4)
    lp, ref, mask = batch["logprobs"], batch["old_logprobs"], batch["mask"]
    loss, _ = kl_loss(lp, ref, mask, token_count)
    normaliser = loss_normaliser(mask) if token_count is None else token_count
    torch.testing.assert_close(aggregate(kl_per_token(lp, ref, "k3"), mask, "token_mean", normaliser), loss, **EXACT)


# --- clipped surrogate: asymmetric and dual clipping -----------------------------------------------


def test_clip_higher_by_hand():
    # clip_low 0.2, clip_high 0.28: the trust region is [0.8, 1.28]. Token by token:
    #   r 1.25, A +1: inside (a symmetric 0.2 would clip it)  -> loss -1.25
    #   r 1.5,  A +1: clipped high                           -> -1.28
    #   r 0.7,  A -1: clipped low: max(0.7, 0.8)              -> 0.8
    #   r 0.5,  A +1: unclipped                              -> -0.5
    #   r 1.5,  A -1: unclipped                              -> 1.5
    # mean (-1.25 - 1.28 + 0.8 - 0.5 + 1.5) / 5 = -0.146; clipfrac_low 1/5, clipfrac_high 1/5.
    ratios = torch.tensor([[1.25, 1.5, 0.7, 0.5, 1.5, 50.0]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, 1.0, -1.0, 1e6]])
    old_logprobs = torch.full((1, 6), -2.0)
    logprobs = (old_logprobs + ratios.log()).requires_grad_(True)
    mask = _prefix_mask([5], 6)
    loss, stats = clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(loss, torch.tensor(-0.146), **TIGHT)
    torch.testing.assert_close(stats["policy/clipfrac_low"], torch.tensor(0.2), **TIGHT)
    torch.testing.assert_close(stats["policy/clipfrac_high"], torch.tensor(0.2), **TIGHT)
    torch.testing.assert_close(stats["policy/clipfrac"], torch.tensor(0.4), **TIGHT)
    torch.testing.assert_close(stats["policy/ratio_mean"], torch.tensor(5.45 / 5), **TIGHT)
    approxkl = sum((r - 1) - math.log(r) for r in [1.25, 1.5, 0.7, 0.5, 1.5]) / 5
    torch.testing.assert_close(stats["policy/approxkl"], torch.tensor(approxkl), **TIGHT)
    assert "policy/dualclip_frac" not in stats
    # Unclipped tokens get d(-A r)/d logp / 5 = -A r / 5; clipped ones and padding get nothing.
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.25, 0.0, 0.0, -0.1, 0.3, 0.0]]), **TIGHT)


def test_dual_clip_by_hand():
    # clip 0.2 (region [0.8, 1.2]), dual_clip c = 3: for A < 0 the loss is capped at -c * A.
    #   r 4,   A -1: PPO max(4, 1.2) = 4    -> min(4, 3) = 3   (dual clip, no gradient)
    #   r 2,   A -1: PPO 2                  -> 2               (under the cap: full gradient)
    #   r 4,   A +1: PPO max(-4, -1.2) = -1.2 (clipped high; the dual clip is for A < 0 only)
    #   r 5,   A -2: PPO 10                 -> min(10, 6) = 6  (dual clip)
    #   r 0.5, A -1: PPO max(0.5, 0.8) = 0.8 (clipped low)
    # mean (3 + 2 - 1.2 + 6 + 0.8) / 5 = 2.12 (3.12 without the dual clip).
    ratios = torch.tensor([[4.0, 2.0, 4.0, 5.0, 0.5]])
    advantages = torch.tensor([[-1.0, -1.0, 1.0, -2.0, -1.0]])
    old_logprobs = torch.full((1, 5), -1.0)
    logprobs = (old_logprobs + ratios.log()).requires_grad_(True)
    mask = torch.ones(1, 5, dtype=torch.bool)
    loss, stats = clipped_policy_loss(logprobs, old_logprobs, advantages, mask, 0.2, dual_clip=3.0)
    torch.testing.assert_close(loss, torch.tensor(2.12), **TIGHT)
    torch.testing.assert_close(stats["policy/dualclip_frac"], torch.tensor(0.4), **TIGHT)
    torch.testing.assert_close(stats["policy/clipfrac_low"], torch.tensor(0.2), **TIGHT)
    torch.testing.assert_close(stats["policy/clipfrac_high"], torch.tensor(0.2), **TIGHT)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.4, 0.0, 0.0, 0.0]]), **TIGHT)
    without, _ = clipped_policy_loss(logprobs.detach(), old_logprobs, advantages, mask, 0.2)
    torch.testing.assert_close(without, torch.tensor(3.12), **TIGHT)


def test_dual_clip_bounds_the_objective_below_by_c_times_a():
    batch = _random_batch(5)
    ratio = torch.exp(batch["logprobs"] - batch["old_logprobs"]) * 3.0  # ratios up to ~7
    per_token, flags = clipped_surrogate(ratio, batch["advantages"], 0.2, 0.28, dual_clip=2.5)
    negative = batch["advantages"] < 0
    assert (-per_token[negative] >= 2.5 * batch["advantages"][negative] - 1e-6).all()
    assert flags["dual_clipped"][negative].sum() > 0 and flags["dual_clipped"][~negative].sum() == 0


@pytest.mark.parametrize("dual_clip", [1.0, 0.5])
def test_dual_clip_must_exceed_one(dual_clip):
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_surrogate(torch.ones(1, 2), torch.ones(1, 2), 0.2, dual_clip=dual_clip)


def _brute_force_clipped(batch, clip_low, clip_high, dual_clip):
    """Per real token, from the objective: min(r A, clip(r) A), then max(., c A) for A < 0."""
    losses: list[list[float]] = []
    counts = {"low": 0, "high": 0, "dual": 0}
    for b in range(batch["mask"].shape[0]):
        row = []
        for t in range(int(batch["mask"][b].sum())):
            r = math.exp(batch["logprobs"][b, t].item() - batch["old_logprobs"][b, t].item())
            a = batch["advantages"][b, t].item()
            clipped_r = min(max(r, 1.0 - clip_low), 1.0 + clip_high)
            objective = min(r * a, clipped_r * a)
            counts["low"] += a < 0 and r < 1.0 - clip_low
            counts["high"] += a > 0 and r > 1.0 + clip_high
            if dual_clip is not None and a < 0:
                counts["dual"] += objective < dual_clip * a
                objective = max(objective, dual_clip * a)
            row.append(-objective)
        losses.append(row)
    return losses, counts


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("clip_low", "clip_high", "dual_clip"), [(0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.3, 1.5)])
@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_clipped_policy_loss_matches_a_brute_force_loop(seed, clip_low, clip_high, dual_clip, mode):
    batch = _random_batch(seed)
    losses, counts = _brute_force_clipped(batch, clip_low, clip_high, dual_clip)
    tokens = int(batch["mask"].sum())
    assert counts["low"] > 0 and counts["high"] > 0 and (dual_clip is None or counts["dual"] > 0)
    normaliser = loss_normaliser(batch["mask"], mode, constant=8)
    loss, stats = clipped_policy_loss(
        batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["mask"],
        clip_low, clip_high, dual_clip, aggregation=mode, normaliser=normaliser,
    )  # fmt: skip
    torch.testing.assert_close(loss.item(), _reference_aggregate(losses, mode, 8), **TIGHT)
    torch.testing.assert_close(stats["policy/clipfrac_low"].item(), counts["low"] / tokens, **TIGHT)
    torch.testing.assert_close(stats["policy/clipfrac_high"].item(), counts["high"] / tokens, **TIGHT)
    torch.testing.assert_close(stats["policy/clipfrac"].item(), (counts["low"] + counts["high"]) / tokens, **TIGHT)
    if dual_clip is not None:
        torch.testing.assert_close(stats["policy/dualclip_frac"].item(), counts["dual"] / tokens, **TIGHT)
    assert loss.shape == () and not any(value.requires_grad for value in stats.values())


# --- GSPO -----------------------------------------------------------------------------------------


def _gspo_example() -> dict[str, torch.Tensor]:
    # Row 0: log-ratios [0.1, 0.3] (mean 0.2); row 1: [-0.3, 0.0, 0.15] (mean -0.05); NaN padding.
    old = torch.tensor([[-1.0, -2.0, float("nan")], [-1.5, -0.5, -3.0]])
    log_ratio = torch.tensor([[0.1, 0.3, float("nan")], [-0.3, 0.0, 0.15]])
    return {"old_logprobs": old, "logprobs": old + log_ratio, "mask": _prefix_mask([2, 3], 3)}


def test_sequence_log_ratio_is_the_mean_over_real_tokens():
    ex = _gspo_example()
    torch.testing.assert_close(
        sequence_log_ratio(ex["logprobs"], ex["old_logprobs"], ex["mask"]), torch.tensor([0.2, -0.05]), **TIGHT
    )


def test_gspo_by_hand():
    # clip 0.1 / 0.15: region [0.9, 1.15].
    #   row 0: s = exp(0.2)   = 1.2214, A +1 -> clipped high: loss -1.15 (no gradient)
    #   row 1: s = exp(-0.05) = 0.9512, A -2 -> inside: loss 2 s = 1.9025
    # seq_mean_token_mean (GSPO's 1/G sum_i): (-1.15 + 1.9025) / 2; token_mean: (2 * -1.15 + 3 * 1.9025) / 5.
    # Gradient (seq mean): row 1's tokens get (1/2) * (-A) * s * (1/3) = s / 3 each.
    ex = _gspo_example()
    logprobs = ex["logprobs"].clone().requires_grad_(True)
    advantages = torch.tensor([1.0, -2.0])
    s1 = math.exp(-0.05)
    loss, stats = gspo_policy_loss(logprobs, ex["old_logprobs"], advantages, ex["mask"], clip_low=0.1, clip_high=0.15)
    torch.testing.assert_close(loss, torch.tensor((-1.15 + 2 * s1) / 2), **TIGHT)
    token_mean, _ = gspo_policy_loss(
        ex["logprobs"], ex["old_logprobs"], advantages, ex["mask"], 0.1, 0.15, aggregation="token_mean"
    )
    torch.testing.assert_close(token_mean, torch.tensor((2 * -1.15 + 3 * 2 * s1) / 5), **TIGHT)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, 0.0], [s1 / 3] * 3]), **TIGHT)
    # Stats are token means: row 0's two tokens are clipped (high); ratio_mean is the mean of s over tokens.
    torch.testing.assert_close(stats["policy/clipfrac_high"], torch.tensor(0.4), **TIGHT)
    torch.testing.assert_close(stats["policy/clipfrac_low"], torch.tensor(0.0), **EXACT)
    torch.testing.assert_close(stats["policy/ratio_mean"], torch.tensor((2 * math.exp(0.2) + 3 * s1) / 5), **TIGHT)
    token_kl = sum(math.exp(x) - 1 - x for x in [0.1, 0.3, -0.3, 0.0, 0.15]) / 5
    torch.testing.assert_close(stats["policy/approxkl"], torch.tensor(token_kl), **TIGHT)


def _gspo_reference(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, length_weighted):
    """GSPO's objective written out per sequence: -(1/G) sum_i min(s_i A_i, clip(s_i) A_i),
    s_i = exp(mean_t log-ratio); with length_weighted, each sequence weighs |y_i| / total tokens."""
    terms, weights = [], []
    for i in range(mask.shape[0]):
        length = int(mask[i].sum())
        if length == 0:
            continue
        s = torch.exp((logprobs[i, :length] - old_logprobs[i, :length]).sum() / length)
        a = advantages[i]
        terms.append(-torch.min(s * a, torch.clamp(s, 1 - clip_low, 1 + clip_high) * a))
        weights.append(float(length) if length_weighted else 1.0)
    total = sum(w * term for w, term in zip(weights, terms, strict=True))
    return total / sum(weights)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("mode", "length_weighted"), [("seq_mean_token_mean", False), ("token_mean", True)])
def test_gspo_value_and_gradient_match_autograd_of_the_sequence_objective(seed, mode, length_weighted):
    batch = _random_batch(seed, lengths=(7, 3, 1, 5, 0, 6))
    gen = torch.Generator().manual_seed(100 + seed)
    advantages = torch.randn(6, generator=gen)
    # Sequence log-ratios are means (small), so a 0.05 / 0.08 region leaves clipped and unclipped rows.
    clip_low, clip_high = 0.05, 0.08
    ours = batch["logprobs"].clone().requires_grad_(True)
    theirs = batch["logprobs"].clone().requires_grad_(True)
    loss, stats = gspo_policy_loss(
        ours, batch["old_logprobs"], advantages, batch["mask"], clip_low, clip_high, aggregation=mode
    )
    reference = _gspo_reference(
        theirs, batch["old_logprobs"], advantages, batch["mask"], clip_low, clip_high, length_weighted
    )
    torch.testing.assert_close(loss, reference, **TIGHT)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(ours.grad, theirs.grad, **TIGHT)
    assert 0 < stats["policy/clipfrac"] < 1  # both branches exercised


def test_gspo_token_with_constant_advantages_is_gspo_and_with_per_token_ones_follows_its_gradient():
    batch = _random_batch(6, lengths=(4, 2, 5))
    mask, old = batch["mask"], batch["old_logprobs"]
    seq_adv = torch.tensor([0.7, -1.2, 0.4])
    clip_low, clip_high = 0.05, 0.08
    a = batch["logprobs"].clone().requires_grad_(True)
    b = batch["logprobs"].clone().requires_grad_(True)
    seq_loss, _ = gspo_policy_loss(a, old, seq_adv, mask, clip_low, clip_high)
    tok_loss, _ = gspo_policy_loss(b, old, seq_adv[:, None].expand(mask.shape).clone(), mask, clip_low, clip_high)
    seq_loss.backward()
    tok_loss.backward()
    torch.testing.assert_close(tok_loss, seq_loss, **EXACT)
    torch.testing.assert_close(b.grad, a.grad, **EXACT)

    # Per-token advantages (GSPO-token): d loss / d logp_it = -(1/G)(1/|y_i|) A_it s_i where
    # token t is unclipped, 0 where clipped, at the value s_it = s_i.
    gen = torch.Generator().manual_seed(7)
    token_adv = torch.randn(mask.shape, generator=gen)
    c = batch["logprobs"].clone().requires_grad_(True)
    gspo_policy_loss(c, old, token_adv, mask, clip_low, clip_high)[0].backward()
    expected = torch.zeros(mask.shape)
    for i in range(3):
        length = int(mask[i].sum())
        s = math.exp(sum(batch["logprobs"][i, t].item() - old[i, t].item() for t in range(length)) / length)
        for t in range(length):
            adv = token_adv[i, t].item()
            clipped = (adv > 0 and s > 1 + clip_high) or (adv < 0 and s < 1 - clip_low)
            expected[i, t] = 0.0 if clipped else -adv * s / (3 * length)
    torch.testing.assert_close(c.grad, expected, **TIGHT)


def test_gspo_and_clipped_losses_ignore_nan_padding_in_loss_and_gradient():
    batch = _random_batch(8)
    mask = batch["mask"]
    nan = torch.full_like(batch["logprobs"], float("nan"))
    logprobs = torch.where(mask, batch["logprobs"], nan).requires_grad_(True)
    old = torch.where(mask, batch["old_logprobs"], nan)
    advantages = torch.where(mask, batch["advantages"], nan)
    for fn, adv in ((clipped_policy_loss, advantages), (gspo_policy_loss, torch.randn(mask.shape[0]))):
        logprobs.grad = None
        loss, stats = fn(logprobs, old, adv, mask)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())
        assert logprobs.grad is not None
        assert torch.isfinite(logprobs.grad).all() and (logprobs.grad[~mask] == 0).all()


# --- micro-batch and data-parallel equivalence, every mode ----------------------------------------


class _TinyPolicy:
    """A linear 'model' in float64: features (B, T, D) -> logits (B, T, V) -> token log-probs."""

    def __init__(self, seed: int, dim: int = 4, vocab: int = 5):
        gen = torch.Generator().manual_seed(seed)
        self.weight = (torch.randn(dim, vocab, generator=gen, dtype=torch.float64) * 0.8).requires_grad_(True)

    def __call__(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return logprobs_from_logits(features @ self.weight, tokens, temperature=0.7)


def _minibatch(seed: int, dim: int = 4, vocab: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [6, 2, 5, 1, 0, 4, 3]  # ragged, with an empty row
    batch, width = len(lengths), max(lengths)
    return {
        "features": torch.randn(batch, width, dim, generator=gen, dtype=torch.float64),
        "tokens": torch.randint(0, vocab, (batch, width), generator=gen),
        "old_logprobs": -torch.rand(batch, width, generator=gen, dtype=torch.float64) * 2.0 - 0.5,
        "ref_logprobs": -torch.rand(batch, width, generator=gen, dtype=torch.float64) * 2.0 - 0.5,
        "advantages": torch.randn(batch, width, generator=gen, dtype=torch.float64),
        "seq_advantages": torch.randn(batch, generator=gen, dtype=torch.float64),
        "mask": _prefix_mask(lengths, width),
    }


def _loss(kind: str, model, mb, mode, normaliser, token_count):
    logprobs = model(mb["features"], mb["tokens"])
    if kind == "clipped":
        return clipped_policy_loss(
            logprobs, mb["old_logprobs"], mb["advantages"], mb["mask"], 0.2, 0.28, dual_clip=2.0,
            aggregation=mode, normaliser=normaliser, token_count=token_count,
        )  # fmt: skip
    if kind == "gspo":
        return gspo_policy_loss(
            logprobs, mb["old_logprobs"], mb["seq_advantages"], mb["mask"], 0.1, 0.15,
            aggregation=mode, normaliser=normaliser, token_count=token_count,
        )  # fmt: skip
    kl = aggregate(kl_per_token(logprobs, mb["ref_logprobs"], "k3"), mb["mask"], mode, normaliser)
    return kl, {"policy/ref_kl": kl.detach()}


def _accumulate(kind, model, batch, parts, mode, normaliser, token_count):
    """backward() on every part (a micro-batch on some rank: any set of rows), gradients and stats summed."""
    model.weight.grad = None
    totals: dict[str, torch.Tensor] = {}
    for rows in parts:
        index = torch.tensor(rows, dtype=torch.long)
        loss, stats = _loss(kind, model, {k: v[index] for k, v in batch.items()}, mode, normaliser, token_count)
        loss.backward()
        for key, value in stats.items():
            totals[key] = totals.get(key, torch.tensor(0.0, dtype=torch.float64)) + value
    assert sorted(r for rows in parts for r in rows) == list(range(batch["mask"].shape[0]))
    return model.weight.grad.clone(), totals


def _dp_split(seed: int, ranks: int, micro: int, n: int = 7) -> list[list[int]]:
    """Shuffle the rows, deal them to `ranks` processes, cut each share into micro-batches of `micro`."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    shares = [order[r::ranks] for r in range(ranks)]
    return [share[i : i + micro] for share in shares for i in range(0, len(share), micro)]


PARTS = {
    "1+6": [[0], [1, 2, 3, 4, 5, 6]],
    "3+4": [[0, 1, 2], [3, 4, 5, 6]],
    "2+2+2+1": [[0, 1], [2, 3], [4, 5], [6]],
    "singletons": [[i] for i in range(7)],
    "dp2x2": _dp_split(0, ranks=2, micro=2),
    "dp3x1": _dp_split(1, ranks=3, micro=3),
    "dp2x1": _dp_split(2, ranks=2, micro=1),
}


@pytest.mark.parametrize("parts", list(PARTS.values()), ids=list(PARTS))
@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("kind", ["clipped", "gspo", "kl"])
def test_micro_batch_and_data_parallel_gradients_sum_to_the_full_batch_ones(kind, mode, parts):
    model, batch = _TinyPolicy(0), _minibatch(0)
    mask = batch["mask"]
    # ONE normaliser (and token count) from the whole minibatch, given to every part.
    normaliser = loss_normaliser(mask, mode, constant=6)
    token_count = mask.sum()
    full_normaliser = normaliser if mode == "seq_sum_constant" else None  # the full batch computes its own
    full_grad, full_stats = _accumulate(kind, model, batch, [list(range(7))], mode, full_normaliser, None)
    split_grad, split_stats = _accumulate(kind, model, batch, parts, mode, normaliser, token_count)
    assert full_grad.abs().sum() > 0
    torch.testing.assert_close(split_grad, full_grad, rtol=1e-6, atol=1e-6)
    for key, value in full_stats.items():
        torch.testing.assert_close(split_stats[key], value, rtol=1e-6, atol=1e-6, msg=key)
    if kind != "kl":
        assert full_stats["policy/clipfrac"] > 0  # the example really clips


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_micro_batches_with_their_own_normaliser_do_not_match(mode):
    # Why the normaliser is global: per-micro-batch means re-weight rows (this can fail).
    model, batch = _TinyPolicy(0), _minibatch(0)
    full_grad, _ = _accumulate("clipped", model, batch, [list(range(7))], mode, None, None)
    split_grad, _ = _accumulate("clipped", model, batch, PARTS["1+6"], mode, None, None)
    assert not torch.allclose(split_grad, full_grad, rtol=1e-3, atol=1e-4)
