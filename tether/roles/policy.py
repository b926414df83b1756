"""The policy: the causal LM being trained (full or LoRA), and its response log-probs."""

from __future__ import annotations

from typing import Any

from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from torch import Tensor
from transformers import PreTrainedModel

from tether.config import LoraConfig
from tether.core.logprobs import logprobs_and_entropy, logprobs_from_logits
from tether.roles.batching import forward_trimmed, position_ids_from_mask


def add_lora(model: PreTrainedModel, lora: LoraConfig, task_type: TaskType = TaskType.CAUSAL_LM) -> PeftModel:
    """Wrap `model` in a fresh LoRA adapter (B = 0, so the wrapped model starts identical)."""
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, peft_config)


def response_logprobs(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_start: int,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[Tensor, ...]:
    """log pi(response token | everything before it), and optionally the per-token entropy.

    input_ids, attention_mask: (B, P + R) as [left-padded prompt | response], response from column
    `response_start`. returns ((B, R),) or ((B, R), (B, R)); values at padding are meaningless.
    """

    def forward(ids: Tensor, mask: Tensor, response_len: int) -> tuple[Tensor, ...]:
        # Only the logits that predict response tokens: the last R + 1 positions minus the final
        # one. Skipping the prompt's logits saves the LM head (vocab x hidden) on every prompt token.
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            logits_to_keep=response_len + 1,
            use_cache=False,
        )
        logits = out.logits[:, :-1]  # (B, r, V)
        tokens = ids[:, -response_len:]
        if with_entropy:
            return logprobs_and_entropy(logits, tokens, temperature)
        return (logprobs_from_logits(logits, tokens, temperature),)

    return forward_trimmed(forward, input_ids, attention_mask, response_start)
