"""Statistics over the real (unmasked) entries of a padded tensor.

`mask` is a bool (or 0/1) tensor of the same shape as the values; True means the entry counts.
Every function here ignores the values at masked-out positions entirely, so padding never leaks
into a mean, a variance or a whitened result.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `values` where `mask` is True (masked entries contribute exactly 0, even NaN ones)."""
    zeros = torch.zeros((), dtype=values.dtype, device=values.device)
    kept = torch.where(mask.bool(), values, zeros)
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over the entries where `mask` is True; 0 when nothing is kept (never NaN)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over the kept entries; Bessel-corrected by default, as the RLHF references do."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    centred_sq = masked_sum((values - mean) ** 2, mask)
    denom = count - 1 if unbiased else count
    return centred_sq / denom.clamp(min=1)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(values - mean) / std over the kept entries; masked entries come back as 0.

    shift_mean=False keeps the mean and only rescales: the N-implementation-details recipe
    whitens *rewards* that way (so their sign still means something) and *advantages* with the
    mean removed.
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[returns - values] / Var[returns] over the kept entries.

    1 means the value function predicts the returns perfectly, 0 means no better than their mean,
    negative means worse than that. Not finite when the returns have no variance at all.
    """
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_returns


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position of each real token among the real tokens of its row. (B, L) -> (B, L).

    Every forward pass derives its position ids from the attention mask, exactly as `generate`
    does, so a token's log-prob does not depend on how much padding surrounds it
    (docs/concepts/details.md item 3)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
