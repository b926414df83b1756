"""Forward-pass conventions shared by the roles: position ids from the mask, padding trimmed,
the shared prompt prefix where it is switched on, rows in chunks.

Sequences are laid out as [left-padded prompt (P) | right-padded response (R)] with an explicit
attention mask. Position ids are always derived from that mask (docs/concepts/details.md item 3),
exactly as `generate` derives them, so a token's log-prob does not depend on how much padding
surrounds it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from tether.config import SpeedConfig
from tether.core.masked import position_ids_from_mask
from tether.speed.shared_prefix import PrefixSplit, forward_sharing_prefix


def model_forward(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    speed: SpeedConfig,
    shareable_columns: int | None = None,
    prefix_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[Any, Any, PrefixSplit | None]:
    """model(...) over (B, L) rows without a cache, position ids from the mask: the plain pass.

    With speed.shared_prefix, the prompt prefix every row shares is computed once
    (speed/shared_prefix.py); then the output covers the rest of each row, and the prefix's output
    and the split come back too (outputs indexed from the end, such as `logits_to_keep`'s, are the
    plain pass's). Returns (output, prefix output or None, split or None).
    """
    if speed.shared_prefix:
        shared = forward_sharing_prefix(model, input_ids, attention_mask, shareable_columns, prefix_kwargs, **kwargs)
        if shared is not None:
            return shared
    plain = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **kwargs,
    )
    return plain, None, None


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
