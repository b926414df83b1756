"""Forward-pass conventions shared by the roles: position ids from the mask, padding trimmed.

Sequences are laid out as [left-padded prompt (P) | right-padded response (R)] with an explicit
attention mask. Position ids are always derived from that mask (RLHF-DETAILS 3), exactly as
`generate` derives them, so a token's log-prob does not depend on how much padding surrounds it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position of each real token among the real tokens of its row. (B, L) -> (B, L)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_trimmed(
    fn: Callable[[Tensor, Tensor, int], tuple[Tensor, ...]],
    input_ids: Tensor,
    attention_mask: Tensor,
    response_start: int,
) -> tuple[Tensor, ...]:
    """Call fn(input_ids, attention_mask, response_len) on the batch with all-padding columns cut.

    Columns of prompt padding shared by every row and response columns past the longest response
    cost compute and change nothing, so they are removed; fn's (B, r) outputs are padded back with
    zeros to the full response width R.
    input_ids, attention_mask: (B, P + R); returns tensors of shape (B, R).
    """
    full_response_len = input_ids.shape[1] - response_start
    real = attention_mask.bool()
    prompt_real = real[:, :response_start]
    first = int(prompt_real.float().argmax(dim=1).min()) if prompt_real.any(dim=1).all() else 0
    response_real = real[:, response_start:]
    response_len = int(response_real.sum(dim=1).max()) if response_real.numel() else 0
    response_len = max(response_len, 1)
    end = response_start + response_len
    outputs = fn(input_ids[:, first:end], attention_mask[:, first:end], response_len)
    pad = full_response_len - response_len
    return tuple(torch.nn.functional.pad(out, (0, pad)) if pad else out for out in outputs)


def in_chunks(
    fn: Callable[[Tensor, Tensor], tuple[Tensor, ...]],
    input_ids: Tensor,
    attention_mask: Tensor,
    chunk_size: int | None,
) -> tuple[Tensor, ...]:
    """fn over row chunks of at most chunk_size sequences (None: all at once), concatenated."""
    size = chunk_size or input_ids.shape[0]
    pieces = [fn(input_ids[i : i + size], attention_mask[i : i + size]) for i in range(0, input_ids.shape[0], size)]
    return tuple(torch.cat(parts, dim=0) for parts in zip(*pieces, strict=True))
