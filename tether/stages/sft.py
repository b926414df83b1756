"""Supervised fine-tuning: the start point PPO needs, with the loss on response tokens only.

    tether sft --config configs/sft.yaml --output runs/sft
    SFTTrainer(load_config(SFTConfig, "configs/sft.yaml"), "runs/sft").train()

Each example is [prompt (chat template and generation prompt included) | response + EOS]; the loss
is the mean negative log-likelihood of the response tokens, EOS included (so the model learns to
stop), averaged over every response token of the batch. Prompt tokens and padding are never in the
loss. The final model (a full model, or the LoRA adapter) is what `model.name` of `tether ppo`
takes; a LoRA adapter is merged into its base when PPO loads it, so PPO's reference is the SFT
model (docs/concepts/details.md item 17).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from tether.config import SFTConfig, SpeedConfig
from tether.console import StatusKeys
from tether.core.supervised import response_nll
from tether.data import SFTExample, load_sft_examples, shipped_data
from tether.loading.models import ModelKind
from tether.roles.policy import response_logprobs
from tether.stages.offline import Encoder, OfflineTrainer, pack

SHIPPED = {"train": "sft_train.jsonl", "eval": "sft_test.jsonl"}


@dataclass(frozen=True)
class EncodedExample:
    prompt: list[int]
    response: list[int]  # response + EOS: the tokens in the loss


class SFTTask:
    name = "sft"
    resume_needs: tuple[str, ...] = ()
    kind: ModelKind = "causal"
    status_keys: StatusKeys = (("loss", "loss/sft", ".3f"),)

    def __init__(self, pad_id: int, speed: SpeedConfig) -> None:
        self.pad_id = pad_id
        self.speed = speed

    def load(self, path: str | None, split: str) -> list[SFTExample]:
        return load_sft_examples(path or shipped_data(SHIPPED[split]))

    def encode(self, example: SFTExample, encoder: Encoder) -> EncodedExample | None:
        prompt, response = encoder.prompt(example.prompt), encoder.response(example.response)
        return EncodedExample(prompt, response) if encoder.fits(prompt, response) else None

    def count(self, batch: list[EncodedExample]) -> float:
        return float(sum(len(e.response) for e in batch))

    def loss(self, model: Any, batch: list[EncodedExample], count: float) -> tuple[Tensor, dict[str, Tensor]]:
        device = next(model.parameters()).device
        ids, attn, response_mask, start = pack([e.prompt for e in batch], [e.response for e in batch], self.pad_id)
        (logprobs,) = response_logprobs(model, ids.to(device), attn.to(device), start, 1.0, speed=self.speed)  # (B, R)
        loss, stats = response_nll(logprobs, response_mask.to(device), count)
        return loss, {**stats, "sft/tokens": torch.tensor(float(response_mask.sum()))}

    def evaluate(self, model: Any, examples: list[EncodedExample], batch_size: int) -> dict[str, float]:
        total = self.count(examples)
        loss = sum(
            float(self.loss(model, examples[i : i + batch_size], total)[0]) for i in range(0, len(examples), batch_size)
        )
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}

    def prepare(self, model: Any, splits: dict[str, list[Any]], run_dir: Path, resumed: bool) -> None:
        pass

    def finish(self, model: Any, eval_examples: list[EncodedExample], batch_size: int) -> tuple[Any, dict[str, Any]]:
        return model, {}


class SFTTrainer(OfflineTrainer):
    """`tether sft`: the offline trainer with the SFT task."""

    def __init__(self, config: SFTConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False):
        def make_task(tokenizer: PreTrainedTokenizerBase) -> SFTTask:
            return SFTTask(int(tokenizer.pad_token_id), config.speed)

        super().__init__("sft", config, make_task, run_dir, resume, overwrite)
