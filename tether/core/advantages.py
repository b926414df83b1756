"""Per-token rewards, generalised advantage estimation, and the critic-free estimators over ragged,
masked response batches: GRPO / Dr. GRPO, RLOO, REINFORCE++ and REINFORCE++-baseline; plus DAPO's
overlong penalty and its dynamic-sampling filter.

Shapes: B sequences, T response positions. `mask` (B, T) is True on real response tokens (the
response up to and including its EOS) and False on padding. Values at masked positions are
ignored completely: padding never bootstraps into a real token, and NaN there cannot leak.
`scores` (B,) are outcome rewards, one per response; `group_ids` (B,) label the responses sampled
for the same prompt (any values, equal within a group, in any order).

Batch-level statistics (the REINFORCE++ whitening) are exact under data parallelism because tether
gathers the whole batch onto every process before computing advantages (`gather_batch` in the
stages), so "the batch" here is the global batch, never one rank's shard.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tether.core.masked import masked_whiten


def last_true_index(mask: Tensor) -> Tensor:
    """Index of the last True entry of each row. (B, T) -> (B,); 0 for an all-False row."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values


def per_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """r_t = -kl_coef * KL_t on every response token, plus the sequence score on its last token.

    scores: (B,) one score per response (reward sources, EOS penalty included).
    kl:     (B, T) per-token KL estimate to the reference.
    returns (B, T), zero at padding. (Ziegler et al. 2019, eq. 2; N+ details, detail 9.)
    """
    mask = mask.bool()
    rewards = torch.where(mask, -kl_coef * kl.float(), torch.zeros_like(kl, dtype=torch.float32))
    has_token = mask.any(dim=1)
    rows = torch.arange(mask.shape[0], device=mask.device)[has_token]
    rewards[rows, last_true_index(mask)[has_token]] += scores.float()[has_token]
    return rewards


def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) per response.

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}
    with V and A taken as 0 after the last real token (the response ends the episode).

    rewards, values: (B, T); mask: (B, T) True on the tokens the policy chose. t + 1 is the next of
    those: positions outside the mask are skipped, not ends, so in a multi-turn episode the tool
    output between two model turns (masked out: tether/episodes.py) is stepped over and the
    model's last token before it bootstraps from the value at its first token after it. For a
    mask that is a prefix of each row (one response, then padding) this is the plain recursion.
    returns (advantages, returns), both (B, T) and 0 outside the mask; returns = advantages + values.
    """
    mask = mask.bool()
    mask_f = mask.float()
    rewards = torch.where(mask, rewards.float(), torch.zeros_like(mask_f))
    values = torch.where(mask, values.float(), torch.zeros_like(mask_f))
    num_steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    has_next = torch.zeros_like(rewards[:, 0])  # 1 once a masked-in token lies after t: no bootstrap past the end
    for t in reversed(range(num_steps)):
        delta = rewards[:, t] + gamma * next_value * has_next - values[:, t]
        advantage = delta + gamma * lam * has_next * next_advantage
        advantages[:, t] = advantage
        # Only a masked-in token becomes "the next step"; a masked-out one leaves the state as it is.
        here = mask[:, t]
        next_advantage = torch.where(here, advantage, next_advantage)
        next_value = torch.where(here, values[:, t], next_value)
        has_next = torch.where(here, torch.ones_like(has_next), has_next)
    advantages = advantages * mask_f
    returns = (advantages + values) * mask_f
    return advantages, returns


def group_advantages(scores: Tensor, group_ids: Tensor, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's outcome advantages (Shao et al. 2024, DeepSeekMath, section 4.1.2).

    A_i = (r_i - mean(r of i's group)) / (std(r of i's group) + eps), the group being the responses
    sampled for the same prompt; with scale=False only the mean is removed (Liu et al. 2025, "Dr.
    GRPO", argue the division favours groups that are nearly all right or all wrong). std is the
    sample standard deviation (n - 1), as in the paper's reference code. A group whose scores are
    all equal gets 0 for every member: it carries no learning signal.

    scores: (B,) one score per response; group_ids: (B,) any labels, equal within a group (every
    group needs at least two members). Returns (B,) float32.
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    counts = torch.bincount(inverse, minlength=num_groups).float()
    if bool((counts < 2).any()):
        raise ValueError("every group needs at least two responses for a group-relative advantage")
    scores = scores.float()
    sums = torch.zeros(num_groups, device=scores.device).index_add_(0, inverse, scores)
    centred = scores - (sums / counts)[inverse]
    if not scale:
        return centred
    squares = torch.zeros(num_groups, device=scores.device).index_add_(0, inverse, centred**2)
    std = (squares / (counts - 1)).sqrt()
    return centred / (std[inverse] + eps)


# --- critic-free estimators ---------------------------------------------------------------------


def _group_index(group_ids: Tensor) -> tuple[Tensor, int, Tensor]:
    """(inverse (B,) group index in [0, G), G, counts (G,) float32)."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    counts = torch.bincount(inverse, minlength=num_groups).float()
    return inverse, num_groups, counts


def rloo_advantages(scores: Tensor, group_ids: Tensor) -> Tensor:
    """REINFORCE leave-one-out advantages (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline
    for Free!"; Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
    Learning from Human Feedback in LLMs", their RLOO estimator).

    A_i = r_i - (1 / (k - 1)) * sum_{j in group(i), j != i} r_j, k the size of i's group: each
    response's baseline is the mean score of the *other* responses to its prompt, so it does not
    depend on r_i and the estimate stays unbiased. Equal to k / (k - 1) times the mean-only
    (Dr. GRPO) advantage. No division by a standard deviation.

    scores: (B,); group_ids: (B,), every group of at least two. Returns (B,) float32. For the
    per-token form with the KL in the reward (OpenRLHF's "rloo"), spread this over the tokens with
    `per_token_rewards(advantages, kl, mask, kl_coef)` and `discounted_returns(..., gamma=1.0)`.
    """
    inverse, num_groups, counts = _group_index(group_ids)
    if bool((counts < 2).any()):
        raise ValueError("every group needs at least two responses for a leave-one-out baseline")
    scores = scores.float()
    sums = torch.zeros(num_groups, device=scores.device).index_add_(0, inverse, scores)
    k = counts[inverse]
    return scores - (sums[inverse] - scores) / (k - 1)


def spread_over_tokens(values: Tensor, mask: Tensor) -> Tensor:
    """One number per sequence copied onto each of its real tokens. (B,), (B, T) -> (B, T), 0 at padding."""
    values = values if values.is_floating_point() else values.float()
    per_token = values.unsqueeze(1).expand(mask.shape)
    return torch.where(mask.bool(), per_token, torch.zeros_like(per_token))


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Reward-to-go G_t = sum_{k >= t} gamma^(k - t) r_k over each response's real tokens.

    The episode ends after the last real token, so padding never contributes; positions outside the
    mask (tool output in a multi-turn episode) are stepped over and count no discount step. This is GAE with
    V = 0 and lam = 1 (Schulman et al. 2016, eq. 18 with V = 0), and is computed that way.
    rewards, mask: (B, T); returns (B, T) float32, 0 at padding.
    """
    return compute_gae(rewards, torch.zeros_like(rewards, dtype=torch.float32), mask, gamma, 1.0)[0]


def reinforce_pp_advantages(
    scores: Tensor,
    mask: Tensor,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
) -> Tensor:
    """REINFORCE++ advantages (Hu et al. 2025, "REINFORCE++", arXiv 2501.03262: token-level KL
    penalty in the reward, reward-to-go, global advantage normalisation).

    1. r_t = -kl_coef * KL_t on every real token, plus the score on the last one (`per_token_rewards`;
       the paper uses k1 = log(pi_old / pi_ref), any `kl_per_token` estimator can be passed);
    2. A_t = sum_{k >= t} gamma^(k - t) r_k, the discounted reward-to-go (gamma = 1 in the paper);
    3. global whitening: (A - mean) / std over *all real tokens of the whole batch* (`masked_whiten`:
       the Bessel-corrected std, and 1/sqrt(var + 1e-8); OpenRLHF divides by the population std and
       clamps var at 1e-8, a relative difference of ~1/(2N) for N tokens).

    Exact under data parallelism: tether gathers the whole batch before computing advantages.
    scores: (B,); mask: (B, T); kl: (B, T) or None for no penalty. Returns (B, T) float32, 0 at padding.
    """
    kl_values = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device) if kl is None else kl
    rewards = per_token_rewards(scores, kl_values, mask, kl_coef)
    return masked_whiten(discounted_returns(rewards, mask, gamma), mask)


def reinforce_pp_baseline_advantages(
    scores: Tensor,
    group_ids: Tensor,
    mask: Tensor,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
) -> Tensor:
    """REINFORCE++-baseline (Hu et al. 2025, arXiv 2501.03262, "REINFORCE++ w/ baseline"), following
    OpenRLHF's `reinforce_baseline` estimator (`compute_advantages_and_returns`):

    1. r_i - mean(r of i's group): the group mean is the baseline, with *no* division by the group's
       std (OpenRLHF: "/ std is not needed in RL variance reduction theory");
    2. per-token rewards with the KL penalty (if given) and the reward-to-go with gamma = 1 (OpenRLHF
       forces gamma = 1 for every group estimator);
    3. global whitening over all real tokens of the batch, as in `reinforce_pp_advantages`.

    Exact under data parallelism: tether gathers the whole batch before computing advantages.
    scores, group_ids: (B,), every group of at least two; mask: (B, T); kl: (B, T) or None.
    Returns (B, T) float32, 0 at padding.
    """
    centred = group_advantages(scores, group_ids, scale=False)
    return reinforce_pp_advantages(centred, mask, kl, kl_coef, gamma=1.0)


# --- DAPO's sampling rules ------------------------------------------------------------------------


def overlong_penalty(lengths: Tensor, max_len: int, cache_len: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", eq. 13), scaled by `penalty`.

    With L_max = max_len and L_cache = cache_len:
      0                                   if |y| <= L_max - L_cache
      ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max   (0 down to -1, linear)
      -1                                  if |y| > L_max
    times `penalty` (DAPO: 1; verl's and OpenRLHF's `overlong_penalty_factor`). Add it to the
    response's score. cache_len = 0 leaves only the hard step at L_max.
    lengths: (B,) response lengths in tokens. Returns (B,) float32, <= 0.
    """
    if not 0 <= cache_len <= max_len:
        raise ValueError(f"need 0 <= cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    lengths = lengths.float()
    if cache_len == 0:
        return torch.where(lengths > max_len, -float(penalty), 0.0).float()
    soft = ((max_len - cache_len) - lengths) / cache_len
    return penalty * soft.clamp(min=-1.0, max=0.0)


def informative_groups(scores: Tensor, group_ids: Tensor) -> Tensor:
    """DAPO's dynamic-sampling filter (Yu et al. 2025, section 3.2: keep a group only when
    0 < |{correct}| < G): True for each response whose group's scores are not all equal.
    (B,), (B,) -> (B,) bool.

    A group whose scores are all equal has zero group-relative advantage for every member, so it adds
    no gradient and only dilutes the batch; dynamic sampling keeps sampling until the batch is full of
    informative groups. Scores are compared exactly. A group of one is never informative (verl keeps
    singletons; they carry no group-relative signal here).
    """
    inverse, num_groups, _ = _group_index(group_ids)
    values = scores.double()
    high = torch.full((num_groups,), -torch.inf, dtype=torch.float64, device=values.device)
    low = torch.full((num_groups,), torch.inf, dtype=torch.float64, device=values.device)
    high = high.scatter_reduce(0, inverse, values, reduce="amax")
    low = low.scatter_reduce(0, inverse, values, reduce="amin")
    return (high > low)[inverse]
