"""PPO's clipped policy loss and clipped value loss, and GRPO's KL loss term, normalised so that
micro-batching is exact.

Each loss is a token-level mean over a minibatch. When a minibatch is split into micro-batches
for gradient accumulation, pass the minibatch's total token count as `token_count` to every
micro-batch: the losses (and stats) then *sum* to the minibatch value, so the accumulated gradient
equals the full-batch gradient for any split (N+ details, detail 13). Without `token_count` the
micro-batch's own count is used.

Every function returns (loss, stats); stats are detached tensors keyed by their metric name and
normalised the same way, so they can be summed across micro-batches too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tether.core.kl import kl_per_token
from tether.core.masked import masked_sum


def _count(mask: Tensor, token_count: Tensor | float | None) -> Tensor:
    if token_count is None:
        return mask.sum().clamp(min=1).float()
    return torch.as_tensor(token_count, dtype=torch.float32, device=mask.device)


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_coef: float,
    token_count: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise.

    loss_t = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_coef, 1 + clip_coef)),
    ratio_t = exp(logprobs_t - old_logprobs_t). At ratio 1 the loss is minus the mean advantage.
    All inputs (B, T); returns a scalar loss.
    """
    n = _count(mask, token_count)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    loss = masked_sum(torch.max(unclipped, clipped), mask) / n
    with torch.no_grad():
        stats = {
            "policy/clipfrac": masked_sum((clipped > unclipped).float(), mask) / n,
            # k3 estimate of KL(old || new): http://joschu.net/blog/kl-approx.html
            "policy/approxkl": masked_sum((ratio - 1.0) - log_ratio, mask) / n,
            "policy/ratio_mean": masked_sum(ratio, mask) / n,
        }
    return loss, stats


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    value_clip: float | None,
    token_count: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped = old_v + clip(v - old_v, -c, c).

    value_clip=None gives the plain squared error. All inputs (B, T); returns a scalar loss.
    """
    n = _count(mask, token_count)
    unclipped = (values - returns) ** 2
    if value_clip is None:
        per_token = unclipped
        clip_hits = torch.zeros_like(unclipped)
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
        clipped = (v_clipped - returns) ** 2
        per_token = torch.max(unclipped, clipped)
        # Only a token whose change was actually clipped counts: inside the range v_clipped equals v
        # up to rounding (old + (v - old)), which would otherwise count ~0.1% of tokens at random.
        clip_hits = ((clipped > unclipped) & ((values - old_values).abs() > value_clip)).float()
    loss = 0.5 * masked_sum(per_token, mask) / n
    with torch.no_grad():
        stats = {"val/clipfrac": masked_sum(clip_hits, mask) / n}
    return loss, stats


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    token_count: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token mean of the k3 estimate of KL(policy || reference), differentiable in `logprobs`.

    GRPO puts the KL to the reference in the loss instead of the reward (Shao et al. 2024, eq. 4):
    k3 = exp(ref - logp) - 1 - (ref - logp) >= 0, zero exactly where policy and reference agree.
    Its gradient with respect to logp is 1 - exp(ref - logp). All inputs (B, T); scalar loss.
    """
    n = _count(mask, token_count)
    loss = masked_sum(kl_per_token(logprobs, ref_logprobs, "k3"), mask) / n
    return loss, {"policy/ref_kl": loss.detach()}
