"""The policy: the causal LM being trained (full or LoRA), and its response log-probs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor

from tether.config import SpeedConfig
from tether.core.logprobs import logprobs_and_entropy, logprobs_from_logits
from tether.roles.forward import forward_trimmed, model_forward


def response_logprobs(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_start: int,
    temperature: float,
    *,
    speed: SpeedConfig,
    with_entropy: bool = False,
    value_head: Any = None,
) -> tuple[Tensor, ...]:
    """log pi(response token | everything before it), then optionally the per-token entropy, then
    optionally the values `value_head` (roles/value.py ValueHead) reads off the same pass.

    input_ids, attention_mask: (B, P + R) as [left-padded prompt | response], response from column
    `response_start`. returns ((B, R),), plus a (B, R) entropy and/or a (B, R) value; values at
    padding are meaningless.
    """

    def forward(ids: Tensor, mask: Tensor, response_len: int) -> tuple[Tensor, ...]:
        # Only the logits that predict response tokens: the last R + 1 positions minus the final
        # one. Skipping the prompt's logits saves the LM head (vocab x hidden) on every prompt token.
        with lm_head_input(model if value_head is not None else None) as hidden:
            out, _, _ = model_forward(
                model,
                ids,
                mask,
                speed,
                shareable_columns=ids.shape[1] - response_len,
                prefix_kwargs={"logits_to_keep": 1},
                logits_to_keep=response_len + 1,
            )
        logits = out.logits[:, :-1]  # (B, r, V)
        tokens = ids[:, -response_len:]
        outputs = (
            logprobs_and_entropy(logits, tokens, temperature)
            if with_entropy
            else (logprobs_from_logits(logits, tokens, temperature),)
        )
        if value_head is not None:
            # The state before token t is read where the logits predicting t are: the same positions.
            outputs = (*outputs, value_head(hidden[-1][:, :-1]))  # the last call: a shared prefix's comes first
        return outputs

    return forward_trimmed(forward, input_ids, attention_mask, response_start)


@contextmanager
def lm_head_input(model: Any) -> Iterator[list[Tensor]]:
    """Within the block, the hidden states the model's LM head reads (after the final norm, at the
    positions `logits_to_keep` kept) land in the yielded list. A hook on the output embedding, not
    `output_hidden_states`, so it is the LM head's own input whatever the architecture does before
    it. model None: nothing is recorded."""
    seen: list[Tensor] = []
    if model is None:
        yield seen
        return
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()
