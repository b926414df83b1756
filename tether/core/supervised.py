"""Losses of the stages before PPO: the reward model's pairwise loss and SFT's response-only loss.

Like the PPO losses, each takes an optional normaliser (`pair_count` / `token_count`) so that the
losses of micro-batches *sum* to the batch's loss, and returns (loss, stats) with stats keyed by
metric name.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.functional import logsigmoid

from tether.core.masked import masked_sum


def pairwise_loss(
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    margin: Tensor | float = 0.0,
    pair_count: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry loss of a reward model on preference pairs (Ouyang et al. 2022, eq. 1).

    loss = -log sigmoid(r_chosen - r_rejected - margin), averaged over pairs; with a margin (Llama 2,
    Touvron et al. 2023, eq. 2) a pair must be won by at least that much before its loss flattens.
    accuracy counts a pair as won when r_chosen > r_rejected (a tie is half a win).
    chosen_scores, rejected_scores: (N,); margin: a number or (N,).
    """
    n = float(pair_count if pair_count is not None else max(len(chosen_scores), 1))
    gap = chosen_scores - rejected_scores  # (N,)
    loss = -logsigmoid(gap - margin).sum() / n
    with torch.no_grad():
        wins = (gap > 0).float() + 0.5 * (gap == 0).float()
        stats = {
            "loss/rm": loss.detach(),
            "rm/accuracy": wins.sum() / n,
            "rm/margin": gap.sum() / n,
            "rm/chosen_score": chosen_scores.sum() / n,
            "rm/rejected_score": rejected_scores.sum() / n,
        }
    return loss, stats


def response_nll(
    logprobs: Tensor, response_mask: Tensor, token_count: Tensor | float | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """SFT loss: the mean negative log-likelihood of response tokens only (prompt tokens and
    padding are masked out). logprobs, response_mask: (B, R); token_count: the batch's response
    tokens when this is one micro-batch of it."""
    n = torch.as_tensor(
        token_count if token_count is not None else response_mask.sum().clamp(min=1), dtype=torch.float32
    )
    loss = -masked_sum(logprobs, response_mask) / n
    return loss, {"loss/sft": loss.detach()}


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    pair_count: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Direct preference optimisation (Rafailov et al. 2023, eq. 7), or IPO (Azar et al. 2023, eq. 17).

    The implicit reward of a response is beta * (log pi(y|x) - log pi_ref(y|x)); with
    h = (chosen - ref_chosen) - (rejected - ref_rejected),
      sigmoid: loss = -log sigmoid(beta * h)          (log 2 when the policy is the reference)
      ipo:     loss = (h - 1 / (2 * beta)) ** 2        (pass per-token mean log-probs, as IPO does)
    All inputs (N,) sequence log-probs; stats are keyed by the names DPO users read.
    """
    n = float(pair_count if pair_count is not None else max(len(chosen_logps), 1))
    chosen_reward = beta * (chosen_logps - ref_chosen_logps)  # (N,)
    rejected_reward = beta * (rejected_logps - ref_rejected_logps)  # (N,)
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected 'sigmoid' or 'ipo'")
    loss = losses.sum() / n
    with torch.no_grad():
        margin = chosen_reward - rejected_reward
        stats = {
            "loss/dpo": loss.detach(),
            "rewards/chosen": chosen_reward.sum() / n,
            "rewards/rejected": rejected_reward.sum() / n,
            "rewards/margins": margin.sum() / n,
            "rewards/accuracies": ((margin > 0).float() + 0.5 * (margin == 0).float()).sum() / n,
        }
    return loss, stats
