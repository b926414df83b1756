"""Per-token KL estimators and the KL-coefficient controllers.

The tokens were sampled from the policy, so with log_ratio = logp_policy - logp_ref the three
estimators of KL(policy || reference) are (Schulman, "Approximating KL Divergence",
http://joschu.net/blog/kl-approx.html):

  k1 = log_ratio                          unbiased, high variance, can be negative per token
  k2 = 0.5 * log_ratio**2                 biased, low variance, always >= 0
  k3 = exp(-log_ratio) - 1 + log_ratio    unbiased, low variance, always >= 0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Estimate of KL(policy || reference) at every token. (B, T) -> (B, T); mask afterwards."""
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # expm1 keeps precision when the ratio is close to 1 (the usual case).
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")


@dataclass
class FixedKLController:
    """A constant KL coefficient."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt; kept so both controllers are used the same way."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Proportional controller of Ziegler et al. 2019 ("Fine-Tuning LMs from Human Preferences").

    error = clip(KL / target - 1, -0.2, 0.2);  coef *= 1 + error * n_steps / horizon
    `current_kl` is the per-sequence KL (sum over response tokens, nats); `n_steps` is the number of
    sequences that produced it, so the adaptation speed does not depend on the batch size.
    """

    value: float
    target: float
    horizon: float

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


KLController = FixedKLController | AdaptiveKLController


def make_kl_controller(kl_coef: float, kl_target: float | None, kl_horizon: float) -> KLController:
    """Adaptive when a target is given, fixed otherwise (the TRL / N+ convention)."""
    if kl_target is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, kl_target, kl_horizon)


def truncated_is_weights(train_logprobs: Tensor, sample_logprobs: Tensor, cap: float) -> Tensor:
    """Truncated importance weights min(pi_train_old / pi_sample, cap) per token, detached.

    The tokens were drawn by a sampler (vLLM) whose distribution pi_sample differs slightly from the
    trainer's pi_train_old at the same weights (other kernels, other precision). Weighting each
    token's policy loss by the ratio corrects the policy gradient for that mismatch, and the cap
    bounds the variance a rare large ratio would add (Yao et al. 2025, "Your efficient RL framework
    secretly brings you off-policy RL training": truncated importance sampling, TIS).
    (B, T), (B, T) -> (B, T) float32; padding gives whatever it gives: mask the loss.
    """
    if not cap > 0:
        raise ValueError(f"the importance-weight cap must be > 0, got {cap}")
    log_ratio = (train_logprobs.float() - sample_logprobs.float()).detach()
    return torch.exp(log_ratio).clamp(max=cap)
