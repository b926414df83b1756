"""Policy-gradient losses (PPO's clipped surrogate with asymmetric and dual clipping, GSPO), PPO's
clipped value loss, GRPO's KL loss term, and the loss aggregations, normalised so that
micro-batching is exact.

A policy loss is built in two steps: a per-token loss (B, T) (`clipped_surrogate` on a ratio), then
an aggregation to a scalar (`aggregate`), a separate choice:

  token_mean            sum over all real tokens / tokens of the minibatch (DAPO's token-level loss;
                        tether's default and the only mode of the original functions)
  seq_mean_token_mean   mean over sequences of each sequence's token mean (GRPO's eq. 3 as written)
  seq_mean_token_sum    mean over sequences of each sequence's token sum
  seq_sum_constant      sum of token losses / (sequences * a constant budget) (Dr. GRPO, Liu et al.
                        2025: the budget is max_new_tokens, so no response is down-weighted by its length)

The normaliser is computed ONCE from the mask of the whole minibatch (`loss_normaliser`) and passed to
every micro-batch, on every data-parallel rank: each mode divides a sum of per-row terms by it, so the
micro-batch losses (and gradients) *sum* to the minibatch value for any split of its rows (N+ details,
detail 13). Per-row quantities (a sequence's own token count) are always complete inside a
micro-batch, so only the global count (tokens, sequences or the constant) has to travel.

Every function returns (loss, stats); stats are detached tensors keyed by their metric name, token
means normalised by `token_count` (the minibatch's real tokens), so they sum across micro-batches too.
Without `token_count` / `normaliser` the micro-batch's own count is used.
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


AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_sum_constant")


def loss_normaliser(mask: Tensor, aggregation: str = "token_mean", constant: float | None = None) -> Tensor:
    """The divisor of `aggregate`, from the mask of the WHOLE minibatch (all micro-batches, all ranks).

    token_mean:                         real tokens
    seq_mean_token_mean, seq_mean_token_sum: sequences with at least one real token (an empty row
                                        has no token mean; OpenRLHF and verl skip it the same way)
    seq_sum_constant:                   rows * constant, constant = the per-sequence token budget
                                        (Dr. GRPO: max_new_tokens), rows counted whether empty or not
    mask: (B, T). Returns a float32 scalar, at least 1 for the count modes.
    """
    mask = mask.bool()
    if aggregation == "token_mean":
        return mask.sum().clamp(min=1).float()
    if aggregation in ("seq_mean_token_mean", "seq_mean_token_sum"):
        return mask.any(dim=1).sum().clamp(min=1).float()
    if aggregation == "seq_sum_constant":
        if constant is None or constant <= 0:
            raise ValueError("seq_sum_constant needs constant > 0: the token budget per sequence (max_new_tokens)")
        return torch.tensor(mask.shape[0] * float(constant), dtype=torch.float32, device=mask.device)
    raise ValueError(f"unknown loss aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}")


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    aggregation: str = "token_mean",
    normaliser: Tensor | float | None = None,
) -> Tensor:
    """Reduce a per-token loss (B, T) to a scalar; see the module docstring for the modes.

    token_mean, seq_mean_token_sum, seq_sum_constant:  sum_{i,t} l_it / normaliser
    seq_mean_token_mean:                              sum_i (sum_t l_it / |y_i|) / normaliser
    `normaliser` comes from `loss_normaliser` on the whole minibatch; None uses this batch's own
    (seq_sum_constant has no default: it needs its constant). Padding never contributes, even NaN.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}")
    if normaliser is None:
        normaliser = loss_normaliser(mask, aggregation)
    n = torch.as_tensor(normaliser, dtype=torch.float32, device=mask.device)
    if aggregation == "seq_mean_token_mean":
        lengths = mask.bool().sum(dim=1).clamp(min=1)
        return (masked_sum(per_token, mask, dim=1) / lengths).sum() / n
    return masked_sum(per_token, mask) / n


def clipped_surrogate(
    ratio: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped surrogate loss, before aggregation. ratio, advantages: (B, T) -> (B, T).

    loss_t = max(-A_t * r_t, -A_t * clip(r_t, 1 - clip_low, 1 + clip_high))
    (Schulman et al. 2017, eq. 7; decoupled epsilons are DAPO's clip-higher, Yu et al. 2025,
    section 3.1: clip_high > clip_low leaves room to raise unlikely tokens; clip_high=None is
    symmetric). With dual_clip = c > 1 (Ye et al. 2020, "Mastering Complex Control in MOBA Games with
    Deep RL", eq. 5), tokens with A_t < 0 take min(loss_t, -c * A_t): the objective is bounded below
    by c * A_t, so a huge ratio on a bad token cannot blow the update up (no gradient there).

    Returns the loss and detached 0/1 float indicators: "clipped_low" (A < 0, ratio below 1 - clip_low:
    the clipped branch is active), "clipped_high" (A > 0, ratio above 1 + clip_high) and, with
    dual_clip, "dual_clipped" (A < 0 and the -c * A bound active). Mask afterwards.
    """
    clip_high = clip_low if clip_high is None else clip_high
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.max(unclipped, clipped)
    with torch.no_grad():
        # The clipped branch wins only outside the trust region, on the side the advantage pushes to.
        clip_active = clipped > unclipped
        flags = {
            "clipped_low": (clip_active & (ratio < 1.0)).float(),
            "clipped_high": (clip_active & (ratio > 1.0)).float(),
        }
    if dual_clip is not None:
        if not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        bound = -dual_clip * advantages  # the largest loss a token with A < 0 may have
        negative = advantages < 0
        with torch.no_grad():
            flags["dual_clipped"] = (negative & (loss > bound)).float()
        loss = torch.where(negative, torch.min(loss, bound), loss)
    return loss, flags


def _log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    # 0 at padding: whatever is there (NaN, inf) never reaches exp, the loss or the gradient.
    log_ratio = logprobs - old_logprobs
    return torch.where(mask.bool(), log_ratio, torch.zeros_like(log_ratio))


def sequence_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """(1 / |y_i|) * sum_t (logp_t - old_logp_t) over each sequence's real tokens. (B, T) -> (B,).

    exp of it is GSPO's length-normalised sequence ratio s_i = (pi(y_i|x) / pi_old(y_i|x))^(1/|y_i|).
    """
    lengths = mask.bool().sum(dim=1).clamp(min=1)
    return masked_sum(_log_ratio(logprobs, old_logprobs, mask), mask, dim=1) / lengths


def _policy_stats(
    ratio: Tensor, log_ratio: Tensor, flags: dict[str, Tensor], mask: Tensor, token_count: Tensor | float | None
) -> dict[str, Tensor]:
    n = _count(mask, token_count)
    with torch.no_grad():
        low, high = masked_sum(flags["clipped_low"], mask) / n, masked_sum(flags["clipped_high"], mask) / n
        stats = {
            "policy/clipfrac": masked_sum(flags["clipped_low"] + flags["clipped_high"], mask) / n,
            "policy/clipfrac_low": low,
            "policy/clipfrac_high": high,
            # k3 estimate of KL(old || new): http://joschu.net/blog/kl-approx.html
            "policy/approxkl": masked_sum((torch.exp(log_ratio) - 1.0) - log_ratio, mask) / n,
            "policy/ratio_mean": masked_sum(ratio, mask) / n,
        }
        if "dual_clipped" in flags:
            stats["policy/dualclip_frac"] = masked_sum(flags["dual_clipped"], mask) / n
    return stats


def _normalisers(
    aggregation: str, normaliser: Tensor | float | None, token_count: Tensor | float | None
) -> tuple[Tensor | float | None, Tensor | float | None]:
    # Under token_mean the loss normaliser and the stats' token count are the same number: either fills in.
    if aggregation == "token_mean":
        return (token_count if normaliser is None else normaliser), (normaliser if token_count is None else token_count)
    return normaliser, token_count


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: str = "token_mean",
    normaliser: Tensor | float | None = None,
    token_count: Tensor | float | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate with DAPO's decoupled clip range and optional dual-clip, aggregated.

    ratio_t = exp(logprobs_t - old_logprobs_t); the per-token loss is `clipped_surrogate`'s, reduced
    by `aggregate(per_token, mask, aggregation, normaliser)`. All inputs (B, T); returns a scalar loss.
    Pass `normaliser = loss_normaliser(minibatch_mask, aggregation)` and `token_count` = the
    minibatch's real tokens to every micro-batch (under token_mean either one is enough).
    Stats: policy/clipfrac (= _low + _high), policy/clipfrac_low, policy/clipfrac_high,
    policy/approxkl, policy/ratio_mean and, with dual_clip, policy/dualclip_frac; all token means.
    token_weights: (B, T) detached factors of each token's loss (`truncated_is_weights`), or None.
    """
    normaliser, token_count = _normalisers(aggregation, normaliser, token_count)
    log_ratio = _log_ratio(logprobs, old_logprobs, mask)
    ratio = torch.exp(log_ratio)
    per_token, flags = clipped_surrogate(ratio, advantages, clip_low, clip_high, dual_clip)
    if token_weights is not None:
        per_token = per_token * token_weights
    loss = aggregate(per_token, mask, aggregation, normaliser)
    return loss, _policy_stats(ratio, log_ratio, flags, mask, token_count)


def gspo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 3e-4,
    clip_high: float | None = 4e-4,
    dual_clip: float | None = None,
    aggregation: str = "seq_mean_token_mean",
    normaliser: Tensor | float | None = None,
    token_count: Tensor | float | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Group Sequence Policy Optimization (Zheng et al. 2025, "Group Sequence Policy Optimization",
    arXiv 2507.18071: the GSPO objective and its GSPO-token variant), as a per-token loss so that it
    plugs into `aggregate`.

    s_i = exp((1 / |y_i|) * sum_t (logp_it - old_logp_it)), the length-normalised sequence ratio,
    is clipped to [1 - clip_low, 1 + clip_high] (the paper's runs: 3e-4 and 4e-4, far smaller than PPO's
    token epsilons because s_i is a geometric mean) and applied to the sequence advantage:
    loss_i = max(-A_i * s_i, -A_i * clip(s_i)).

    Computed in the GSPO-token form: token t of sequence i carries the ratio
    s_it = sg[s_i] * pi(y_it) / sg[pi(y_it)], whose value is s_i and whose gradient is
    s_i * grad log pi(y_it). With the default aggregation seq_mean_token_mean this is exactly GSPO's
    objective (1/G) sum_i loss_i, value and gradient (grad s_i = s_i * mean_t grad log pi(y_it)); any
    other mode weights sequence i by its per-row weight, identically for both forms.
    advantages: (B,) sequence advantages (GSPO) or (B, T) per-token ones (GSPO-token; with A_it = A_i
    the two coincide). logprobs, old_logprobs, mask: (B, T); returns a scalar loss.
    Stats as `clipped_policy_loss`, as token means; ratio_mean is the mean of s_i over tokens,
    approxkl the token-level k3 estimate of KL(old || new).
    """
    normaliser, token_count = _normalisers(aggregation, normaliser, token_count)
    log_ratio = _log_ratio(logprobs, old_logprobs, mask)
    lengths = mask.bool().sum(dim=1, keepdim=True).clamp(min=1)
    seq_log_ratio = (masked_sum(log_ratio, mask, dim=1).unsqueeze(1) / lengths).detach()  # (B, 1)
    # value: log s_i exactly (x - x is 0.0); gradient: d log pi(y_it) at token t only.
    ratio = torch.exp(seq_log_ratio + (log_ratio - log_ratio.detach()))  # (B, T)
    token_advantages = advantages.unsqueeze(1).expand(mask.shape) if advantages.dim() == 1 else advantages
    per_token, flags = clipped_surrogate(ratio, token_advantages, clip_low, clip_high, dual_clip)
    if token_weights is not None:
        per_token = per_token * token_weights
    loss = aggregate(per_token, mask, aggregation, normaliser)
    return loss, _policy_stats(ratio.detach(), log_ratio, flags, mask, token_count)


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_coef: float,
    token_count: Tensor | float | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise.

    loss_t = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_coef, 1 + clip_coef)),
    ratio_t = exp(logprobs_t - old_logprobs_t). At ratio 1 the loss is minus the mean advantage.
    All inputs (B, T); returns a scalar loss, the token mean (`clipped_policy_loss` with a symmetric
    range and token_mean aggregation). Stats: policy/clipfrac, policy/approxkl, policy/ratio_mean.
    """
    loss, stats = clipped_policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_coef,
        clip_coef,
        token_count=_count(mask, token_count),
        token_weights=token_weights,
    )
    return loss, {key: stats[key] for key in ("policy/clipfrac", "policy/approxkl", "policy/ratio_mean")}


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
