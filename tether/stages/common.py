"""What every training stage does the same way: load a trainable model (full or LoRA, fresh or
from a checkpoint), save one, and build the optimizer and its schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel, TaskType
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from tether.config import LoraConfig
from tether.models import load_causal_lm, load_scalar_model, quiet_transformers, resolve_model_path
from tether.roles.policy import add_lora

ModelKind = Literal["causal", "scalar"]


def load_trainable(
    kind: ModelKind,
    name: str,
    lora: LoraConfig | None,
    tokenizer: PreTrainedTokenizerBase,
    checkpoint: Path | None = None,
    trust_remote_code: bool = False,
    new_head: Literal["zero", "reward"] = "zero",
) -> Any:
    """A model to train, in eval mode (dropout off, RLHF-DETAILS 2).

    kind 'causal' is a language model, 'scalar' a one-output sequence classifier (reward or value
    model). Full fine-tuning starts from `checkpoint` when given, else from `name`; LoRA always
    loads `name` as the base and takes the adapter from `checkpoint` (a fresh one without).
    A scalar model's head is trained in full under LoRA; `new_head` is how a new one starts.
    """

    def load(source: str) -> Any:
        if kind == "causal":
            return load_causal_lm(source, tokenizer, trust_remote_code)
        return load_scalar_model(source, tokenizer, trust_remote_code, new_head)

    if lora is None:
        return load(str(checkpoint) if checkpoint is not None else name).eval()
    base = load(name)
    if checkpoint is not None:
        return PeftModel.from_pretrained(base, str(checkpoint), is_trainable=True).eval()
    task = TaskType.CAUSAL_LM if kind == "causal" else TaskType.SEQ_CLS
    return add_lora(base, lora, task).eval()


def save_model(model: Any, folder: Path, tokenizer: PreTrainedTokenizerBase, base_name: str) -> None:
    """Hugging Face format (the adapter alone for LoRA), with the tokenizer beside it; any other
    module with a `save_pretrained` (ppo's value head) writes its own files, without a tokenizer."""
    if isinstance(model, PeftModel):
        # Point the adapter at a base that loads on this machine (the built-in name resolves to
        # its converted cache folder), so plain transformers + peft can load it too.
        model.peft_config["default"].base_model_name_or_path = resolve_model_path(base_name)
    with quiet_transformers():
        model.save_pretrained(folder)
        if isinstance(model, (PreTrainedModel, PeftModel)):
            tokenizer.save_pretrained(folder)


def make_optimizer(
    param_groups: list[dict[str, Any]],
    eps: float,
    weight_decay: float,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the parameter groups, and the learning-rate schedule over `total_steps` steps.

    The fused kernel where torch has one (float parameters on CPU or CUDA): on the CPU torch's
    default is a Python loop over the tensors, about 8x slower, which for two 135M-parameter
    models costs ~2 s per optimizer step on a 2-core machine (benchmarks/README.md).
    """
    params = [p for group in param_groups for p in group["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(param_groups, eps=eps, weight_decay=weight_decay, fused=fused or None)
    scheduler = get_scheduler(
        schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(total_steps, 1)
    )
    return optimizer, scheduler
