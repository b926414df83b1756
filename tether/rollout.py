"""Sampling responses: batched generation with the KV cache, then the frozen Rollout record.

Prompts are left-padded so that every response starts in the same column; `generate` derives
position ids from the attention mask, and every later forward pass does the same
(roles/batching.py). Each response is truncated after its first EOS (RLHF-DETAILS 5). While
sampling, linear layers run on weights prepared once per call (sampling_linears.py), and each token
is drawn by `core.logprobs.sample_tokens` (one uniform number per row, not one per vocabulary entry).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from tether.core.logprobs import sample_tokens
from tether.roles.shared_prefix import prefix_pass, split_shared_prefix
from tether.sampling_linears import sampling_linears


@dataclass(frozen=True)
class Rollout:
    """B sampled sequences, laid out as [left-padded prompt | right-padded response]."""

    prompt_ids: Tensor  # (B, P) long, left-padded with the pad id
    prompt_mask: Tensor  # (B, P) bool, True on real prompt tokens
    response_ids: Tensor  # (B, R) long, pad id after the first EOS
    response_mask: Tensor  # (B, R) bool, True on response tokens up to and including the first EOS
    finished: Tensor  # (B,) bool, the response ended with EOS (not cut by max_new_tokens)
    prompt_index: Tensor  # (B,) long, which prompt of the batch each sequence answers

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)  # (B, P + R)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)  # (B, P + R)

    @property
    def response_start(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(dim=1)  # (B,)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]


def concat_rollouts(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts sampled by several processes as one batch, rows in the order given: prompts
    left-padded and responses right-padded to the widest, prompt indices offset so each part keeps
    its own prompts apart (part k's come after part k-1's)."""
    width_p = max(r.prompt_ids.shape[1] for r in rollouts)
    width_r = max(r.response_ids.shape[1] for r in rollouts)
    offsets = [0]
    for r in rollouts[:-1]:
        offsets.append(offsets[-1] + (int(r.prompt_index.max()) + 1 if len(r) else 0))
    return Rollout(
        prompt_ids=torch.cat([pad_columns(r.prompt_ids, width_p, pad_id, left=True) for r in rollouts]),
        prompt_mask=torch.cat([pad_columns(r.prompt_mask, width_p, False, left=True) for r in rollouts]),
        response_ids=torch.cat([pad_columns(r.response_ids, width_r, pad_id) for r in rollouts]),
        response_mask=torch.cat([pad_columns(r.response_mask, width_r, False) for r in rollouts]),
        finished=torch.cat([r.finished for r in rollouts]),
        prompt_index=torch.cat([r.prompt_index + offset for r, offset in zip(rollouts, offsets, strict=True)]),
    )


def pad_columns(x: Tensor, width: int, value: float | bool, left: bool = False) -> Tensor:
    """(B, W) -> (B, width) with `value` in the new columns, on the right (or the left)."""
    extra = width - x.shape[1]
    if extra <= 0:
        return x
    padding = torch.full((x.shape[0], extra), value, dtype=x.dtype, device=x.device)
    return torch.cat([padding, x] if left else [x, padding], dim=1)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token lists -> (ids (B, P), mask (B, P) bool), padded on the left to the longest."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = True
    return ids, mask


def truncate_after_eos(response_ids: Tensor, eos_ids: list[int], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Cut each response after its first EOS.

    returns (ids with pad after the first EOS, mask True through the first EOS, finished (B,)).
    """
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device))
    finished = is_eos.any(dim=1)
    # Positions strictly after the first EOS: the running count of EOS seen before this position.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = eos_before == 0
    ids = torch.where(mask, response_ids, torch.full_like(response_ids, pad_id))
    return ids, mask, finished


@torch.no_grad()
def generate(
    model: Any,
    prompts: list[list[int]],
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    pad_id: int,
    eos_ids: list[int],
    return_logprobs: bool = False,
) -> tuple[Rollout, Tensor | None]:
    """Sample `samples_per_prompt` responses for each prompt in one batched `generate` call.

    temperature > 0 samples from the full tempered distribution (no top-k / top-p: RLHF-DETAILS 1);
    temperature 0 is greedy. With return_logprobs, also the (B, R) log-probs of the sampled tokens
    under the distribution generate sampled from (for checks; training recomputes them).
    """
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    prompt_ids = prompt_ids.repeat_interleave(samples_per_prompt, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(samples_per_prompt, dim=0)
    prompt_index = torch.arange(len(prompts)).repeat_interleave(samples_per_prompt)
    device = next(model.parameters()).device
    # Sampling is generate's greedy decoding behind a processor that has already drawn the token
    # (SampleTokens): HF's own sampling spends a random number on every vocabulary entry.
    sampler = SampleTokens(temperature) if temperature > 0 else None
    # Every setting generate uses is here: the model's own generation_config is set aside for the
    # call (_without_model_defaults), so nothing it carries (repetition penalties, banned or
    # forced tokens, a minimum length, ...) changes the distribution the log-probs assume.
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        use_cache=True,
        return_dict_in_generate=True,
        output_scores=return_logprobs and sampler is None,
    )
    with sampling_linears(model), _without_model_defaults(model):
        inputs = _inputs_sharing_prefix(model, prompt_ids.to(device), prompt_mask.to(device))
        out = model.generate(
            **inputs,
            generation_config=generation_config,
            logits_processor=LogitsProcessorList([sampler] if sampler is not None else []),
        )
    response_ids = out.sequences[:, prompt_ids.shape[1] :].cpu()
    response_ids, response_mask, finished = truncate_after_eos(response_ids, eos_ids, pad_id)
    logprobs = None
    if return_logprobs:
        if sampler is not None:  # generate may have run a step more than it kept
            logprobs = torch.stack(sampler.logprobs, dim=1)[:, : response_ids.shape[1]].float().cpu()
        else:  # greedy: the log-probs of the raw logits
            scores = torch.stack(out.scores, dim=1).float().cpu()  # (B, R, V)
            logprobs = torch.log_softmax(scores, dim=-1).gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    rollout = Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        finished=finished,
        prompt_index=prompt_index,
    )
    return rollout, logprobs


class SampleTokens(LogitsProcessor):
    """Draws each step's tokens (`sample_tokens`) inside generate's greedy decoding: the scores it
    returns are -inf except at the drawn token, so the argmax is the sample. Keeps the drawn
    tokens' log-probs (one (B,) tensor per step) for `generate(return_logprobs=True)`."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.logprobs: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        tokens, logprobs = sample_tokens(scores, self.temperature)
        self.logprobs.append(logprobs)
        # In place: generate hands every step a fresh copy of the logits (and keeps none, as
        # tether never asks for output_logits).
        return scores.fill_(float("-inf")).scatter_(1, tokens[:, None], 0.0)


@contextmanager
def _without_model_defaults(model: Any) -> Iterator[None]:
    """generate fills every setting its config leaves unset from the model's generation_config (a
    checkpoint's generation_config.json; instruct models often ship a repetition penalty), and a
    setting whose neutral value is None (bad_words_ids, suppress_tokens, ...) cannot be pinned in
    the config. So the model gets an empty one for the call: only HF's neutral defaults remain."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


def _inputs_sharing_prefix(model: Any, prompt_ids: Tensor, prompt_mask: Tensor) -> dict[str, Any]:
    """generate's inputs, with the prompt prefix every row shares already in a KV cache (computed
    once, not once per row: roles/shared_prefix.py). The rows are then [prefix | padding | rest of
    the prompt]; the mask marks the padding and generate derives position ids from it, so every
    token keeps its position. The prompt width is unchanged, so responses start where they did."""
    plain = {"input_ids": prompt_ids, "attention_mask": prompt_mask.long()}
    split = split_shared_prefix(prompt_ids, prompt_mask)
    if split is None:
        return plain
    _, cache = prefix_pass(model, split, len(prompt_ids), logits_to_keep=1)
    if cache is None:
        return plain
    ids = torch.cat([split.prefix_ids.expand(len(prompt_ids), -1), split.rest_ids], dim=1)
    return {"input_ids": ids, "attention_mask": split.attention_mask.long(), "past_key_values": cache}


def decode_responses(tokenizer: Any, rollout: Rollout, eos_ids: list[int]) -> list[str]:
    """Response texts without EOS and special tokens: what reward functions and people read."""
    texts = []
    for ids, mask in zip(rollout.response_ids, rollout.response_mask, strict=True):
        kept = [int(t) for t in ids[mask] if int(t) not in eos_ids]
        texts.append(str(tokenizer.decode(kept, skip_special_tokens=True)))
    return texts
