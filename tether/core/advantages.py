"""Per-token rewards and generalised advantage estimation over ragged, masked response batches,
and GRPO's group-relative advantages.

Shapes: B sequences, T response positions. `mask` (B, T) is True on real response tokens (the
response up to and including its EOS) and False on padding. Values at masked positions are
ignored completely: padding never bootstraps into a real token, and NaN there cannot leak.
"""

from __future__ import annotations

import torch
from torch import Tensor


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

    rewards, values: (B, T); mask: (B, T) True on real tokens (a prefix of each row).
    returns (advantages, returns), both (B, T) and 0 at padding; returns = advantages + values.
    """
    mask_f = mask.float()
    rewards = torch.where(mask.bool(), rewards.float(), torch.zeros_like(mask_f))
    values = torch.where(mask.bool(), values.float(), torch.zeros_like(mask_f))
    num_steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    next_mask = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(num_steps)):
        # A masked next step is the end of the episode: no bootstrap through padding.
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        next_advantage = delta + gamma * lam * next_mask * next_advantage
        advantages[:, t] = next_advantage
        next_value, next_mask = values[:, t], mask_f[:, t]
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
