"""Direct preference optimisation: the policy learns from preference pairs directly, no reward
model and no sampling; the reference is the starting model.

    tether dpo --config configs/dpo.yaml --output runs/dpo
    DPOTrainer(load_config(DPOConfig, "configs/dpo.yaml"), "runs/dpo").train()

The reference log-probs of every pair (train and held-out) are computed once, with the starting
weights, before the first step, and written to RUN/reference_logprobs.pt: a resumed run reads them
back instead of recomputing them with trained weights, and no second model is kept in memory (for
LoRA and full fine-tuning alike). Logged as DPO users read it: the implicit rewards of the chosen
and rejected responses, their margin, and the share of pairs whose margin is positive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from tether import console as term
from tether.config import DPOConfig
from tether.console import StatusKeys
from tether.core.masked import masked_sum
from tether.core.supervised import dpo_loss
from tether.data import PreferencePair, load_preferences, shipped_data
from tether.loading.models import ModelKind
from tether.roles.policy import response_logprobs
from tether.runtime import is_main
from tether.stages.offline import Encoder, OfflineTrainer, pack

SHIPPED = {"train": "preferences_train.jsonl", "eval": "preferences_test.jsonl"}
REFERENCE_FILE = "reference_logprobs.pt"


@dataclass
class EncodedPreference:
    prompt: list[int]
    chosen: list[int]  # chosen response + EOS
    rejected: list[int]  # rejected response + EOS
    reference: Tensor = field(default_factory=lambda: torch.zeros(2))  # (2,) ref log-probs, set by prepare()


class DPOTask:
    name = "dpo"
    kind: ModelKind = "causal"
    # A resume reads the reference log-probs back: computed again they would come from trained weights.
    resume_needs: tuple[str, ...] = (REFERENCE_FILE,)
    status_keys: StatusKeys = (
        ("loss", "loss/dpo", ".3f"),
        ("accuracy", "rewards/accuracies", ".3f"),
        ("margin", "rewards/margins", ".3f"),
    )

    def __init__(self, config: DPOConfig, pad_id: int) -> None:
        self.config = config
        self.pad_id = pad_id

    def load(self, path: str | None, split: str) -> list[PreferencePair]:
        return load_preferences(path or shipped_data(SHIPPED[split]))

    def encode(self, pair: PreferencePair, encoder: Encoder) -> EncodedPreference | None:
        prompt = encoder.prompt(pair.prompt)
        chosen, rejected = encoder.response(pair.chosen), encoder.response(pair.rejected)
        if not (encoder.fits(prompt, chosen) and encoder.fits(prompt, rejected)):
            return None
        return EncodedPreference(prompt, chosen, rejected)

    def count(self, batch: list[EncodedPreference]) -> float:
        return float(len(batch))

    def sequence_logprobs(self, model: Any, batch: list[EncodedPreference]) -> tuple[Tensor, Tensor]:
        """log pi(chosen | prompt) and log pi(rejected | prompt), in one forward pass: (N,), (N,).

        Sums over response tokens (EOS included); for IPO, per-token means."""
        device = next(model.parameters()).device
        prompts = [e.prompt for e in batch] * 2
        responses = [e.chosen for e in batch] + [e.rejected for e in batch]
        ids, attn, mask, start = pack(prompts, responses, self.pad_id)
        mask = mask.to(device)
        (logprobs,) = response_logprobs(model, ids.to(device), attn.to(device), start, 1.0, speed=self.config.speed)
        per_sequence = masked_sum(logprobs, mask, dim=1)  # (2N,)
        if self.config.dpo.loss_type == "ipo":
            per_sequence = per_sequence / mask.sum(dim=1)
        return per_sequence[: len(batch)], per_sequence[len(batch) :]

    def loss(self, model: Any, batch: list[EncodedPreference], count: float) -> tuple[Tensor, dict[str, Tensor]]:
        chosen, rejected = self.sequence_logprobs(model, batch)
        reference = torch.stack([e.reference for e in batch]).to(chosen.device)  # (N, 2)
        cfg = self.config.dpo
        return dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], cfg.beta, cfg.loss_type, count)

    def evaluate(self, model: Any, pairs: list[EncodedPreference], batch_size: int) -> dict[str, float]:
        totals: dict[str, float] = {}
        for i in range(0, len(pairs), batch_size):
            _, stats = self.loss(model, pairs[i : i + batch_size], float(len(pairs)))
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + float(value)
        return {("eval/loss" if key == "loss/dpo" else f"eval/{key}"): value for key, value in totals.items()}

    def prepare(self, model: Any, splits: dict[str, list[Any]], run_dir: Path, resumed: bool) -> None:
        """The reference log-probs: read back on resume, else computed now with the starting weights."""
        path = run_dir / REFERENCE_FILE
        if resumed:  # Run checked that it is there (resume_needs): never recomputed with trained weights
            saved = torch.load(path, map_location="cpu")
        else:
            term.console.print("dpo: reference log-probs of every pair, with the starting weights (once)")
            saved = {}
            with torch.no_grad():
                for split, examples in splits.items():
                    parts = [
                        torch.stack(self.sequence_logprobs(model, examples[i : i + 8]), dim=1).cpu()
                        for i in range(0, len(examples), 8)
                    ]
                    saved[split] = torch.cat(parts)  # (N, 2)
            if is_main():  # every process computed the same numbers; one writes them
                partial = path.with_name(f".{path.name}.tmp")  # written whole, then renamed
                torch.save(saved, partial)
                partial.replace(path)
        for split, examples in splits.items():
            if len(saved[split]) != len(examples):
                raise RuntimeError(f"{path} holds {len(saved[split])} {split} pairs, the data {len(examples)}")
            for example, reference in zip(examples, saved[split], strict=True):
                example.reference = reference

    def finish(self, model: Any, eval_examples: list[EncodedPreference], batch_size: int) -> tuple[Any, dict[str, Any]]:
        return model, {}


class DPOTrainer(OfflineTrainer):
    """`tether dpo`: the offline trainer with the DPO task."""

    def __init__(self, config: DPOConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False):
        def make_task(tokenizer: PreTrainedTokenizerBase) -> DPOTask:
            return DPOTask(config, int(tokenizer.pad_token_id))

        super().__init__("dpo", config, make_task, run_dir, resume, overwrite)
