"""Sampling responses: batched generation with the KV cache, into a Trajectory (trajectory.py).

Prompts are left-padded so that every response starts in the same column; `generate` derives
position ids from the attention mask, and every later forward pass does the same (roles/forward.py).
Each response is truncated after its first EOS (docs/concepts/details.md item 5). Three speed tricks
apply here, each behind its switch: the prompt prefix every row shares is computed once
(speed.shared_prefix), linear layers run on weights prepared once per call (speed.prepared_linears),
and each token is drawn with one uniform number per row (speed.inverse_cdf_sampler).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessorList

from tether.config import SpeedConfig
from tether.speed.prepared_linears import prepared_linears
from tether.speed.sampler import SampleTokens
from tether.speed.shared_prefix import cache_keyword, prefix_pass, split_shared_prefix, unsupported
from tether.trajectory import Trajectory


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


def right_pad(rows: list[list[Any]], value: float | bool, dtype: torch.dtype) -> Tensor:
    """Per-token lists -> (B, W) of `dtype`, `value` after each row's end; W is the longest (at least 1)."""
    out = torch.full((len(rows), max(1, max((len(r) for r in rows), default=0))), value, dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


def trajectory_from_rows(
    prompts: list[list[int]], samples_per_prompt: int, rows: list[list[int]], pad_id: int, eos_ids: list[int]
) -> Trajectory:
    """The trajectory of sampled token rows (a prompt's samples together, prompts in order): the
    layout `generate` returns, each response truncated after its first EOS. For samplers other
    than transformers' generate (the vLLM engine, the tests' deterministic one)."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    response_ids, response_mask, finished = truncate_after_eos(right_pad(rows, pad_id, torch.long), eos_ids, pad_id)
    return Trajectory(
        prompt_ids=prompt_ids.repeat_interleave(samples_per_prompt, dim=0),
        prompt_mask=prompt_mask.repeat_interleave(samples_per_prompt, dim=0),
        response_ids=response_ids,
        response_mask=response_mask,
        finished=finished,
        prompt_index=torch.arange(len(prompts)).repeat_interleave(samples_per_prompt),
    )


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
    *,
    speed: SpeedConfig,
    return_logprobs: bool = False,
) -> tuple[Trajectory, Tensor | None]:
    """Sample `samples_per_prompt` responses for each prompt in one batched `generate` call.

    temperature > 0 samples from the full tempered distribution (no top-k / top-p:
    docs/concepts/details.md item 1); temperature 0 is greedy. Returns the trajectory's sampled
    fields, and with return_logprobs the (B, R) log-probs of the sampled tokens under the
    distribution generate sampled from (for checks; training recomputes them).
    """
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    prompt_ids = prompt_ids.repeat_interleave(samples_per_prompt, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(samples_per_prompt, dim=0)
    prompt_index = torch.arange(len(prompts)).repeat_interleave(samples_per_prompt)
    device = next(model.parameters()).device
    # With speed.inverse_cdf_sampler, sampling is generate's greedy decoding behind a processor
    # that has already drawn the token (speed/sampler.py).
    sampler = SampleTokens(temperature) if temperature > 0 and speed.inverse_cdf_sampler else None
    hf_samples = temperature > 0 and sampler is None
    # Every setting generate uses is here: the model's own generation_config is set aside for the
    # call (_without_model_defaults), so nothing it carries (repetition penalties, banned or
    # forced tokens, a minimum length, ...) changes the distribution the log-probs assume.
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=hf_samples,
        # HF's own sampling from the full tempered distribution: top_k=0 turns off its default of 50.
        **({"temperature": temperature, "top_k": 0, "top_p": 1.0} if hf_samples else {}),
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        use_cache=True,
        return_dict_in_generate=True,
        output_scores=return_logprobs and sampler is None,
    )
    linears = prepared_linears(model) if speed.prepared_linears else nullcontext()
    with linears, _without_model_defaults(model):
        inputs = _generate_inputs(model, prompt_ids.to(device), prompt_mask.to(device), speed)
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
        else:  # HF's scores: after its temperature warper when sampling, the raw logits when greedy
            scores = torch.stack(out.scores, dim=1).float().cpu()  # (B, R, V)
            logprobs = torch.log_softmax(scores, dim=-1).gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    trajectory = Trajectory(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        finished=finished,
        prompt_index=prompt_index,
    )
    return trajectory, logprobs


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


def _generate_inputs(model: Any, prompt_ids: Tensor, prompt_mask: Tensor, speed: SpeedConfig) -> dict[str, Any]:
    """generate's inputs. With speed.shared_prefix, the prompt prefix every row shares is already in
    a KV cache (computed once, not once per row: speed/shared_prefix.py); the rows are then
    [prefix | padding | rest of the prompt], the mask marks the padding and generate derives
    position ids from it, so every token keeps its position. The prompt width is unchanged, so
    responses start where they did."""
    plain = {"input_ids": prompt_ids, "attention_mask": prompt_mask.long()}
    if not speed.shared_prefix or unsupported(model) is not None:
        return plain
    split = split_shared_prefix(prompt_ids, prompt_mask)
    if split is None:
        return plain
    _, cache = prefix_pass(model, split, len(prompt_ids), logits_to_keep=1)
    if cache is None:
        return plain
    ids = torch.cat([split.prefix_ids.expand(len(prompt_ids), -1), split.rest_ids], dim=1)
    return {"input_ids": ids, "attention_mask": split.attention_mask.long(), cache_keyword(model): cache}


# Samples one turn: (contexts, samples per context) -> (the trajectory of the responses, their (B, R)
# sampler log-probs or None), rows in the order of repeat_interleave. episodes.py calls it per turn.
SampleTurn = Callable[[list[list[int]], int], tuple[Trajectory, Tensor | None]]


def turn_sampler(
    model: Any,
    pad_id: int,
    eos_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    speed: SpeedConfig,
    return_logprobs: bool = False,
) -> SampleTurn:
    """`generate` with everything but the contexts and the number of samples fixed."""

    def turn(contexts: list[list[int]], samples: int) -> tuple[Trajectory, Tensor | None]:
        return generate(
            model,
            contexts,
            samples,
            max_new_tokens,
            temperature,
            pad_id,
            eos_ids,
            speed=speed,
            return_logprobs=return_logprobs,
        )

    return turn


def decode_responses(tokenizer: Any, trajectory: Trajectory, eos_ids: list[int]) -> tuple[str, ...]:
    """Response texts without EOS and special tokens: what reward functions and people read."""
    return tuple(
        decode_tokens(tokenizer, [int(t) for t in ids[mask]], eos_ids)
        for ids, mask in zip(trajectory.response_ids, trajectory.response_mask, strict=True)
    )


def decode_tokens(tokenizer: Any, ids: list[int], eos_ids: list[int]) -> str:
    """One response's text: its tokens without EOS and special tokens."""
    return str(tokenizer.decode([i for i in ids if i not in eos_ids], skip_special_tokens=True))
