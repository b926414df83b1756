"""A forward pass that computes the prompt prefix every row shares once, not once per row.

Chat templates put the same tokens in front of every prompt: SmolLM2's default system message and
the turn markers are 24 of the 35-46 prompt tokens of the shipped prompts, about a third of every
sequence the roles read. In a causal model a prefix's hidden states and keys/values depend only on
the prefix itself (its positions are 0..c-1 in every row, padding comes before it), so one row's
forward of the prefix gives every row's. Its KV cache, repeated over the batch, is the past of a
second forward over the rest of each row. With grad, backward sums the rows' gradients through the
repeat: the same gradient as B separate copies of the prefix.

Layout of the second pass: each row minus its first c real tokens, its left padding kept, so the
padding now sits between the prefix and the rest of the prompt; the attention mask says so and the
position ids continue from c over real tokens only, as `generate` derives them. Outputs differ from
the plain pass by float rounding only (the sums of attention and matmuls run over differently shaped
blocks).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from tether.core.masked import position_ids_from_mask

# Below this many shared tokens the prefix's own forward call (one more pass through every layer,
# with a single row) costs about what it saves.
MIN_SHARED_TOKENS = 8


@dataclass(frozen=True)
class PrefixSplit:
    """A (B, L) batch as one shared prefix (c tokens) and B rests (L - c columns each)."""

    prefix_ids: Tensor  # (1, c)
    rest_ids: Tensor  # (B, L - c): each row without its first c real tokens, its padding kept
    rest_positions: Tensor  # (B, L - c): the positions those tokens had in the full row
    attention_mask: Tensor  # (B, L): c ones for the prefix, then the rests' mask
    order: Tensor  # (B, L) long: column j of [prefix | rest] came from column order[:, j]

    @property
    def length(self) -> int:
        return self.prefix_ids.shape[1]


def unsupported(model: Any) -> str | None:
    """Why this model's architecture cannot share a prefix, decided from its config; None if it can.

    The second pass puts each row's left padding between the prefix and the rest of the row. That
    is invisible to attention that sees every earlier position, but not to
    - a sliding window, which counts cache columns, not positions: the padding pushes real tokens
      out of the window (2-7 nats per token off on tiny Mistral, Gemma 2/3, Phi-3, Starcoder2,
      OLMo 3, Cohere 2 and GPT-OSS models, tests/test_speed.py);
    - recurrent layers (state-space, linear attention, short convolutions: Mamba, LFM2,
      Qwen3-Next), whose state the padding would run through, and whose caches cannot be repeated
      over the rows.
    The layer types come from transformers' own reading of the config (the cache it would build).
    """
    config = _text_config(model)
    if config is None:
        return None
    try:
        probe = DynamicCache(config=config)
        sliding, recurrent = any(probe.is_sliding), any(getattr(probe, "is_linear", []))
    except Exception:  # a config the cache cannot read: judge by its attributes
        sliding, recurrent = bool(getattr(config, "sliding_window", None)), False
    if recurrent:
        return "recurrent layers (state-space or linear attention) cannot take a shared prefix"
    if sliding:
        return f"sliding-window attention (window {getattr(config, 'sliding_window', '?')}) counts padding"
    return None


def _text_config(model: Any) -> Any:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    return getattr(config, "text_config", None) or config


def split_shared_prefix(
    input_ids: Tensor, attention_mask: Tensor, shareable_columns: int | None = None
) -> PrefixSplit | None:
    """The longest run of leading real tokens all rows share, if it is worth sharing (None if not).

    Each row's real tokens must start at its first real column and run on without gaps over the
    prefix. shareable_columns: only tokens in columns before it may be shared (the prompt block),
    and every row keeps at least one real token there, so the position that predicts its first
    later token stays in the rest. None: the whole row, keeping one real token.
    """
    batch, width = input_ids.shape
    if batch < 2:
        return None
    real = attention_mask.bool()
    block = real[:, :shareable_columns] if shareable_columns is not None else real
    available = int(block.sum(dim=1).min()) - 1  # at least one real token of the block stays in every rest
    if available < MIN_SHARED_TOKENS:
        return None
    first = real.long().argmax(dim=1)  # (B,) first real column
    columns = first[:, None] + torch.arange(available, device=input_ids.device)  # (B, available)
    tokens = input_ids.gather(1, columns)
    same = (tokens == tokens[:1]).all(dim=0) & real.gather(1, columns).all(dim=0)  # (available,)
    length = int(same.long().cumprod(dim=0).sum())
    if length < MIN_SHARED_TOKENS:
        return None

    all_columns = torch.arange(width, device=input_ids.device).expand(batch, width)
    in_prefix = (all_columns >= first[:, None]) & (all_columns < first[:, None] + length)
    rest = ~in_prefix
    rest_mask = attention_mask[rest].view(batch, width - length)
    return PrefixSplit(
        prefix_ids=input_ids[:1, first[0] : first[0] + length],
        rest_ids=input_ids[rest].view(batch, width - length),
        rest_positions=position_ids_from_mask(attention_mask)[rest].view(batch, width - length),
        attention_mask=torch.cat([torch.ones_like(rest_mask[:, :1]).expand(batch, length), rest_mask], dim=1),
        order=torch.cat([columns[:, :length], all_columns[rest].view(batch, width - length)], dim=1),
    )


def forward_sharing_prefix(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    shareable_columns: int | None = None,
    prefix_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[Any, Any, PrefixSplit] | None:
    """model(...) over the batch, its shared prompt prefix computed once; None when there is no
    prefix worth sharing or the model cannot share one (`unsupported`): the caller runs the plain pass.

    Returns (output over the rest, output over the prefix, split). Outputs indexed from the end
    (`logits_to_keep`, the last R positions) are the plain pass's; `expand_to_columns` rebuilds
    full-width hidden states. prefix_kwargs: extra arguments for the prefix call only (e.g.
    logits_to_keep=1).
    """
    if unsupported(model) is not None:
        return None
    split = split_shared_prefix(input_ids, attention_mask, shareable_columns)
    if split is None:
        return None
    prefix, cache = prefix_pass(model, split, input_ids.shape[0], **(prefix_kwargs or {}))
    if cache is None:  # a model without a KV cache
        return None
    rest = model(
        input_ids=split.rest_ids,
        attention_mask=split.attention_mask,
        position_ids=split.rest_positions,
        use_cache=False,
        **{cache_keyword(model): cache},
        **kwargs,
    )
    return rest, prefix, split


def prefix_pass(model: Any, split: PrefixSplit, batch_size: int, **kwargs: Any) -> tuple[Any, Any]:
    """(model's output over the prefix, its KV cache repeated for batch_size rows); the cache is
    None for a model that returns none."""
    prefix = model(
        input_ids=split.prefix_ids,
        position_ids=torch.arange(split.length, device=split.prefix_ids.device)[None],
        use_cache=True,
        **kwargs,
    )
    cache = prefix.get(cache_keyword(model))  # a model output is a mapping of what it returned
    if cache is not None:
        cache.batch_repeat_interleave(batch_size)
    return prefix, cache


@functools.cache
def _forward_takes_cache(model_class: Any) -> bool:
    return "cache" in inspect.signature(model_class.forward).parameters


def cache_keyword(model: Any) -> str:
    """The name a model's forward (and generate) gives its KV cache, in and out: 'cache' from
    transformers 5.24 on (where 'past_key_values' is deprecated, to be removed in 5.40),
    'past_key_values' before."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_class: Any = type(inner)
    return "cache" if _forward_takes_cache(model_class) else "past_key_values"


def expand_to_columns(prefix_states: Tensor, rest_states: Tensor, split: PrefixSplit) -> Tensor:
    """(1, c, H) prefix and (B, L - c, H) rest states -> (B, L, H) in the original columns."""
    batch = rest_states.shape[0]
    stacked = torch.cat([prefix_states.expand(batch, -1, -1), rest_states], dim=1)  # columns in `order`
    back = split.order.argsort(dim=1)  # original column -> its place in `order`
    return stacked.gather(1, back[:, :, None].expand(-1, -1, stacked.shape[2]))
