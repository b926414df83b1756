"""Masked statistics (tether/core/masked.py) against plain-Python computations over the kept entries.

Tier: hand-computed math and identities. Offline, CPU, milliseconds.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from tether.core import explained_variance, masked_mean, masked_sum, masked_var, masked_whiten

EXACT = {"rtol": 0.0, "atol": 0.0}
F64 = {"rtol": 1e-12, "atol": 1e-12}


def _ragged_batch(seed: int, rows: int = 4, cols: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Random float64 values and a random (non-prefix) mask with at least two kept entries."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 3.0 + 1.5
    mask = torch.rand(rows, cols, generator=gen) < 0.6
    mask[0, :2] = True  # unbiased variance needs two kept entries
    return values, mask


def _kept(values: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """The kept entries, collected with a plain loop (the reference does not reuse torch masking)."""
    kept = []
    for v, m in zip(values.flatten().tolist(), mask.flatten().tolist(), strict=True):
        if m:
            kept.append(v)
    return kept


def _poison(values: torch.Tensor, mask: torch.Tensor, garbage: float) -> torch.Tensor:
    """Same kept entries, `garbage` everywhere the mask is False."""
    return torch.where(mask, values, torch.full_like(values, garbage))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_sum_mean_var_match_python_statistics_over_kept_entries(seed):
    values, mask = _ragged_batch(seed)
    kept = _kept(values, mask)

    torch.testing.assert_close(masked_sum(values, mask).item(), math.fsum(kept), **F64)
    torch.testing.assert_close(masked_mean(values, mask).item(), statistics.mean(kept), **F64)
    # Bessel-corrected by default (statistics.variance), population variance on request.
    torch.testing.assert_close(masked_var(values, mask).item(), statistics.variance(kept), **F64)
    torch.testing.assert_close(masked_var(values, mask, unbiased=False).item(), statistics.pvariance(kept), **F64)


def test_masked_sum_and_mean_along_a_dim_are_per_row():
    values, mask = _ragged_batch(3)
    mask[2] = False  # one row with nothing kept
    for row in range(values.shape[0]):
        kept = _kept(values[row], mask[row])
        expected_mean = statistics.mean(kept) if kept else 0.0
        torch.testing.assert_close(masked_sum(values, mask, dim=1)[row].item(), math.fsum(kept), **F64)
        torch.testing.assert_close(masked_mean(values, mask, dim=1)[row].item(), expected_mean, **F64)


def test_masked_mean_accepts_a_float_zero_one_mask():
    values, mask = _ragged_batch(4)
    torch.testing.assert_close(masked_mean(values, mask.double()), masked_mean(values, mask), **F64)


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf"), 1e30, -1e300])
def test_masked_entries_never_affect_any_statistic(garbage):
    values, mask = _ragged_batch(5)
    clean = _poison(values, mask, 0.0)
    dirty = _poison(values, mask, garbage)
    returns = clean * 0.5 + 1.0

    # Bit-for-bit: the garbage is replaced by 0 before any arithmetic touches it.
    torch.testing.assert_close(masked_sum(dirty, mask), masked_sum(clean, mask), **EXACT)
    torch.testing.assert_close(masked_mean(dirty, mask), masked_mean(clean, mask), **EXACT)
    torch.testing.assert_close(masked_mean(dirty, mask, dim=1), masked_mean(clean, mask, dim=1), **EXACT)
    torch.testing.assert_close(masked_var(dirty, mask), masked_var(clean, mask), **EXACT)
    torch.testing.assert_close(masked_whiten(dirty, mask), masked_whiten(clean, mask), **EXACT)
    torch.testing.assert_close(
        masked_whiten(dirty, mask, shift_mean=False), masked_whiten(clean, mask, shift_mean=False), **EXACT
    )
    torch.testing.assert_close(
        explained_variance(dirty, returns, mask), explained_variance(clean, returns, mask), **EXACT
    )
    torch.testing.assert_close(
        explained_variance(returns, dirty, mask), explained_variance(returns, clean, mask), **EXACT
    )


def test_masked_entries_never_affect_the_result_in_float32_either():
    # 1e30 squared overflows float32 to inf: the variance must still not see it.
    values, mask = _ragged_batch(6)
    values = values.float()
    clean, dirty = _poison(values, mask, 0.0), _poison(values, mask, 1e30)
    assert torch.isfinite(masked_var(dirty, mask))
    torch.testing.assert_close(masked_var(dirty, mask), masked_var(clean, mask), **EXACT)
    torch.testing.assert_close(masked_whiten(dirty, mask), masked_whiten(clean, mask), **EXACT)


def test_masked_mean_of_an_all_false_mask_is_zero_not_nan():
    values = torch.tensor([[1.0, float("nan")], [3.0, 4.0]])
    nothing = torch.zeros(2, 2, dtype=torch.bool)
    torch.testing.assert_close(masked_mean(values, nothing), torch.tensor(0.0), **EXACT)
    torch.testing.assert_close(masked_sum(values, nothing), torch.tensor(0.0), **EXACT)
    torch.testing.assert_close(masked_mean(values, nothing, dim=1), torch.zeros(2), **EXACT)


@pytest.mark.parametrize("seed", [0, 7])
def test_whiten_matches_hand_formula_and_gives_mean_zero_std_one(seed):
    values, mask = _ragged_batch(seed)
    kept = _kept(values, mask)
    mean, std = statistics.mean(kept), statistics.stdev(kept)

    whitened = masked_whiten(values, mask, eps=0.0)
    for w, v in zip(_kept(whitened, mask), kept, strict=True):
        torch.testing.assert_close(w, (v - mean) / std, **F64)

    # With the default eps the kept entries are still standardised (eps=1e-8 vs var ~9 is invisible).
    out = _kept(masked_whiten(values, mask), mask)
    torch.testing.assert_close(statistics.mean(out), 0.0, rtol=0.0, atol=1e-9)
    torch.testing.assert_close(statistics.stdev(out), 1.0, rtol=0.0, atol=1e-8)


def test_whiten_without_mean_shift_keeps_the_mean_and_rescales_to_std_one():
    values, mask = _ragged_batch(8)
    kept = _kept(values, mask)
    out = _kept(masked_whiten(values, mask, shift_mean=False), mask)
    # Rewards are whitened this way so that their sign still means something.
    torch.testing.assert_close(statistics.mean(out), statistics.mean(kept), rtol=0.0, atol=1e-9)
    torch.testing.assert_close(statistics.stdev(out), 1.0, rtol=0.0, atol=1e-8)
    # ... and it is exactly the shifted whitening plus the mean.
    shifted = masked_whiten(values, mask)
    torch.testing.assert_close(
        masked_whiten(values, mask, shift_mean=False)[mask], shifted[mask] + statistics.mean(kept), **F64
    )


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_leaves_zeros_at_masked_positions(shift_mean):
    values, mask = _ragged_batch(9)
    values = _poison(values, mask, float("nan"))
    out = masked_whiten(values, mask, shift_mean=shift_mean)
    torch.testing.assert_close(out[~mask], torch.zeros_like(out[~mask]), **EXACT)
    assert torch.isfinite(out).all()


def test_explained_variance_matches_numpy_over_kept_entries():
    gen = torch.Generator().manual_seed(10)
    returns = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    values = returns + 0.3 * torch.randn(3, 5, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)

    r = np.array(_kept(returns, mask))
    v = np.array(_kept(values, mask))
    expected = 1.0 - np.var(r - v, ddof=1) / np.var(r, ddof=1)
    torch.testing.assert_close(explained_variance(values, returns, mask).item(), float(expected), **F64)


def test_explained_variance_is_one_for_a_perfect_critic_and_zero_for_predicting_the_mean():
    values, mask = _ragged_batch(11)
    kept_mean = masked_mean(values, mask)
    torch.testing.assert_close(explained_variance(values, values, mask).item(), 1.0, **F64)
    constant = torch.full_like(values, kept_mean.item())
    torch.testing.assert_close(explained_variance(constant, values, mask).item(), 0.0, rtol=0.0, atol=1e-12)
    # Worse than the mean is negative.
    assert explained_variance(-values, values, mask).item() < 0.0


def test_explained_variance_is_not_finite_when_the_returns_are_constant():
    # Callers must guard the logged metric: 0/0 is NaN, x/0 is -inf.
    returns = torch.full((2, 3), 2.0)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert not torch.isfinite(explained_variance(returns, returns, mask))
    assert not torch.isfinite(explained_variance(torch.randn(2, 3), returns, mask))
