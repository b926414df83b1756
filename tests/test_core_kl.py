"""KL estimators and KL-coefficient controllers (tether/core/kl.py).

Tier: hand-computed math, a seeded Monte-Carlo check of unbiasedness, controller arithmetic.
Offline, CPU, milliseconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from tether.core import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_per_token,
    make_kl_controller,
)

TIGHT = {"rtol": 1e-6, "atol": 1e-6}


def test_estimators_at_log_ratio_one_half_match_hand_numbers():
    logprobs, ref_logprobs = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])  # log_ratio = 0.5
    torch.testing.assert_close(kl_per_token(logprobs, ref_logprobs, "k1"), torch.tensor([[0.5]]), **TIGHT)
    torch.testing.assert_close(kl_per_token(logprobs, ref_logprobs, "k2"), torch.tensor([[0.125]]), **TIGHT)
    # exp(-0.5) - 1 + 0.5 = 0.6065306597 - 0.5 = 0.1065306597
    torch.testing.assert_close(kl_per_token(logprobs, ref_logprobs, "k3"), torch.tensor([[0.1065306597]]), **TIGHT)


def test_estimators_match_formulas_on_several_log_ratios():
    log_ratios = [-2.0, -0.3, -1e-4, 0.0, 1e-4, 0.7, 3.0]
    ref = torch.full((1, len(log_ratios)), -2.0)
    logprobs = ref + torch.tensor([log_ratios])
    k1 = kl_per_token(logprobs, ref, "k1")[0].tolist()
    k2 = kl_per_token(logprobs, ref, "k2")[0].tolist()
    k3 = kl_per_token(logprobs, ref, "k3")[0].tolist()
    for i, lr in enumerate(log_ratios):
        lr = (logprobs[0, i] - ref[0, i]).item()  # the float32 difference the estimator actually sees
        torch.testing.assert_close(k1[i], lr, **TIGHT)
        torch.testing.assert_close(k2[i], 0.5 * lr * lr, **TIGHT)
        torch.testing.assert_close(k3[i], math.expm1(-lr) + lr, rtol=1e-5, atol=1e-9)


def test_k1_is_the_default_estimator():
    logprobs, ref = torch.tensor([[-0.2, -3.0]]), torch.tensor([[-1.0, -1.0]])
    torch.testing.assert_close(kl_per_token(logprobs, ref), kl_per_token(logprobs, ref, "k1"), rtol=0.0, atol=0.0)


def test_k2_and_k3_are_non_negative_while_k1_can_be_negative():
    gen = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(8, 16, generator=gen) * 5.0
    ref = -torch.rand(8, 16, generator=gen) * 5.0
    assert (kl_per_token(logprobs, ref, "k2") >= 0).all()
    assert (kl_per_token(logprobs, ref, "k3") >= 0).all()
    assert (kl_per_token(logprobs, ref, "k1") < 0).any()


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_every_estimator_is_zero_when_policy_equals_reference(estimator):
    logprobs = -torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) * 4.0
    kl = kl_per_token(logprobs, logprobs.clone(), estimator)
    torch.testing.assert_close(kl, torch.zeros_like(kl), rtol=0.0, atol=0.0)


def test_estimators_return_float32_for_bf16_inputs():
    logprobs = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16)
    assert kl_per_token(logprobs, logprobs - 0.5, "k3").dtype == torch.float32


def test_unknown_estimator_raises_value_error():
    with pytest.raises(ValueError, match="k4"):
        kl_per_token(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


# Policy p and reference q over 4 tokens, far enough apart that k2's bias is visible.
P = torch.tensor([0.7, 0.2, 0.05, 0.05], dtype=torch.float64)
Q = torch.tensor([0.2, 0.3, 0.3, 0.2], dtype=torch.float64)


def _monte_carlo(estimator: str, n: int = 200_000) -> tuple[float, float, float]:
    """(mean estimate over n tokens sampled from P, exact KL(P || Q), 6 standard errors)."""
    exact = float((P * (P / Q).log()).sum())  # ~0.637 nats
    samples = torch.multinomial(P, n, replacement=True, generator=torch.Generator().manual_seed(1234))
    logprobs, ref_logprobs = P.log()[samples].view(1, n), Q.log()[samples].view(1, n)
    estimate = float(kl_per_token(logprobs, ref_logprobs, estimator).double().mean())
    # The estimator's exact per-sample variance is also a sum over the 4 categories. Six standard
    # errors: with the seed fixed the test is deterministic, and any other seed would pass too.
    per_category = kl_per_token(P.log().view(1, -1), Q.log().view(1, -1), estimator).double()[0]
    variance = float((P * per_category**2).sum()) - float((P * per_category).sum()) ** 2
    return estimate, exact, 6.0 * math.sqrt(variance / n)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_k1_and_k3_are_unbiased_monte_carlo_estimates_of_kl(estimator):
    estimate, exact, tolerance = _monte_carlo(estimator)
    assert tolerance < 0.025 * exact  # tight enough to mean something (~2% of the KL)
    assert abs(estimate - exact) < tolerance, (estimate, exact, tolerance)


def test_k2_is_biased_so_the_monte_carlo_check_has_teeth():
    # The same check rejects k2 (E_p[0.5 log_ratio^2] = 0.694 vs KL 0.637): the test above can fail.
    estimate, exact, tolerance = _monte_carlo("k2")
    assert abs(estimate - exact) > 5 * tolerance, (estimate, exact, tolerance)


# --- KL controllers -------------------------------------------------------------------------------


def test_fixed_controller_never_changes():
    ctl = FixedKLController(0.05)
    for kl, n_steps in [(0.0, 64), (100.0, 64), (-5.0, 1), (6.0, 10_000)]:
        ctl.update(kl, n_steps)
        assert ctl.value == 0.05


def test_adaptive_controller_follows_hand_computed_updates():
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=10_000.0)
    # KL 9 -> error 0.5 clipped to +0.2;  coef *= 1 + 0.2 * 64 / 10000 = 1.00128
    ctl.update(9.0, 64)
    assert ctl.value == pytest.approx(0.100128, rel=1e-12)
    # KL 3 -> error -0.5 clipped to -0.2;  coef *= 1 - 0.2 * 64 / 10000 = 0.99872
    ctl.update(3.0, 64)
    assert ctl.value == pytest.approx(0.09999983616, rel=1e-12)
    # KL 6.6 -> error 0.1 (inside the clip);  coef *= 1 + 0.1 * 100 / 10000 = 1.001
    ctl.update(6.6, 100)
    assert ctl.value == pytest.approx(0.10009983599616, rel=1e-12)
    # KL on target -> error 0, coef unchanged
    ctl.update(6.0, 500)
    assert ctl.value == pytest.approx(0.10009983599616, rel=1e-12)
    # KL 0 -> error -1 clipped to -0.2;  coef *= 1 - 0.2 * 5000 / 10000 = 0.9
    ctl.update(0.0, 5000)
    assert ctl.value == pytest.approx(0.090089852396544, rel=1e-12)


@pytest.mark.parametrize(("kl_at_clip", "kl_beyond"), [(7.2, 600.0), (4.8, 0.0)])
def test_adaptive_error_saturates_at_plus_and_minus_point_two(kl_at_clip, kl_beyond):
    at_clip = AdaptiveKLController(1.0, 6.0, 1000.0)
    beyond = AdaptiveKLController(1.0, 6.0, 1000.0)
    at_clip.update(kl_at_clip, 10)
    beyond.update(kl_beyond, 10)
    assert beyond.value == pytest.approx(at_clip.value, rel=1e-12)
    expected = 1.0 + (0.2 if kl_at_clip > 6.0 else -0.2) * 10 / 1000
    assert at_clip.value == pytest.approx(expected, rel=1e-12)


def test_adaptive_step_scales_with_n_steps_over_horizon():
    small, large = AdaptiveKLController(1.0, 6.0, 2000.0), AdaptiveKLController(1.0, 6.0, 2000.0)
    small.update(6.3, 10)  # error 0.05: relative change 0.05 * 10 / 2000
    large.update(6.3, 40)  # four times the sequences, four times the step
    assert small.value - 1.0 == pytest.approx(0.05 * 10 / 2000, rel=1e-9)
    assert large.value - 1.0 == pytest.approx(4 * (small.value - 1.0), rel=1e-9)


def test_adaptive_state_dict_round_trip_continues_identically():
    original = AdaptiveKLController(0.2, 6.0, 10_000.0)
    original.update(8.0, 256)
    restored = AdaptiveKLController(99.0, 1.0, 1.0)
    restored.load_state_dict(original.state_dict())
    assert restored.state_dict() == original.state_dict()
    for kl in [12.0, 2.0, 6.5]:
        original.update(kl, 128)
        restored.update(kl, 128)
        assert restored.value == original.value


def test_fixed_state_dict_round_trip():
    restored = FixedKLController(1.0)
    restored.load_state_dict(FixedKLController(0.03).state_dict())
    assert restored.value == 0.03
    assert restored.state_dict() == {"value": 0.03}


def test_make_kl_controller_is_fixed_without_target_and_adaptive_with_one():
    fixed = make_kl_controller(0.05, None, 10_000.0)
    assert isinstance(fixed, FixedKLController)
    assert fixed.value == 0.05

    adaptive = make_kl_controller(0.05, 6.0, 10_000.0)
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.05, 6.0, 10_000.0)


def test_truncated_importance_weights_by_hand():
    """min(pi_train / pi_sample, C) per token, from log-probs: exp(-0.1 - -0.3) = e^0.2 = 1.2214 stays,
    exp(0 - -1) = e = 2.718 is cut to C = 2, exp(-2 - -1) = e^-1 = 0.3679 stays (no floor: TIS caps only)."""
    from tether.core import truncated_is_weights

    train = torch.tensor([[-0.1, 0.0, -2.0]], requires_grad=True)
    sample = torch.tensor([[-0.3, -1.0, -1.0]])
    weights = truncated_is_weights(train, sample, cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[math.exp(0.2), 2.0, math.exp(-1.0)]]))
    assert not weights.requires_grad  # a factor of the loss, never a path for its gradient
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_is_weights(train, sample, cap=0.0)


def test_importance_weights_scale_each_tokens_policy_loss():
    """With weights w the clipped loss is sum_t w_t * l_t / n; weights of 1 change nothing."""
    from tether.core import clipped_policy_loss, ppo_policy_loss

    logprobs = torch.tensor([[-1.0, -0.5, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -0.5, -1.8]])
    advantages = torch.tensor([[1.0, -2.0, 0.5]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    plain, _ = ppo_policy_loss(logprobs, old, advantages, mask, 0.2)
    ones, _ = ppo_policy_loss(logprobs, old, advantages, mask, 0.2, token_weights=torch.ones(1, 3))
    assert torch.equal(plain, ones)
    weights = torch.tensor([[0.5, 2.0, 1.0]])
    weighted, _ = clipped_policy_loss(logprobs, old, advantages, mask, 0.2, 0.2, token_weights=weights)
    ratio = torch.exp(logprobs - old).detach()
    per_token = torch.max(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2))
    assert float(weighted) == pytest.approx(float((weights * per_token).sum() / 3), rel=1e-6)
