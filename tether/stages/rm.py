"""Reward-model training: a preference comparator, trained so the chosen response scores higher.

    tether rm --config configs/demo-rm.yaml --output runs/demo-rm
    RMTrainer(load_config(RMConfig, "configs/demo-rm.yaml"), "runs/demo-rm").train()

The model is a one-output sequence classifier read at the last real token (the response's EOS),
exactly as `reward.model` reads it in PPO. Loss: Bradley-Terry, -log sigmoid(r_chosen - r_rejected
[- margin]). Held out: accuracy (share of pairs ranked right), the mean score gap, the loss.
The final model (LoRA merged in) is saved with a gain and bias in its config.json so that its scores
on the held-out responses have mean 0 and std 1 (docs/concepts/details.md item 8); `reward.model` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from tether.config import RMConfig
from tether.console import StatusKeys
from tether.core.supervised import pairwise_loss
from tether.data import PreferencePair, load_preferences, shipped_data
from tether.loading.models import ModelKind
from tether.roles.reward import NORMALIZATION_KEY, last_token_scores
from tether.sampling import left_pad
from tether.stages.offline import Encoder, OfflineTrainer

SHIPPED = {"train": "preferences_train.jsonl", "eval": "preferences_test.jsonl"}


@dataclass(frozen=True)
class EncodedPair:
    chosen: list[int]  # prompt + chosen response + EOS
    rejected: list[int]  # prompt + rejected response + EOS
    margin: float


class RewardModelTask:
    name = "rm"
    resume_needs: tuple[str, ...] = ()
    kind: ModelKind = "scalar"
    status_keys: StatusKeys = (("loss", "loss/rm", ".3f"), ("accuracy", "rm/accuracy", ".3f"))

    def __init__(self, config: RMConfig, pad_id: int) -> None:
        self.config = config
        self.pad_id = pad_id
        self.last_eval_scores: tuple[Tensor, Tensor] | None = None

    def load(self, path: str | None, split: str) -> list[PreferencePair]:
        return load_preferences(path or shipped_data(SHIPPED[split]), with_margin=self.config.rm.margin)

    def encode(self, pair: PreferencePair, encoder: Encoder) -> EncodedPair | None:
        prompt = encoder.prompt(pair.prompt)
        chosen, rejected = encoder.response(pair.chosen), encoder.response(pair.rejected)
        if not (encoder.fits(prompt, chosen) and encoder.fits(prompt, rejected)):
            return None
        return EncodedPair(prompt + chosen, prompt + rejected, pair.margin)

    def count(self, batch: list[EncodedPair]) -> float:
        return float(len(batch))

    def scores(self, model: Any, batch: list[EncodedPair]) -> tuple[Tensor, Tensor]:
        """Raw scores of the chosen and the rejected responses, in one forward pass. (N,), (N,)."""
        device = next(model.parameters()).device
        ids, mask = left_pad([p.chosen for p in batch] + [p.rejected for p in batch], self.pad_id)
        scores = last_token_scores(model, ids.to(device), mask.to(device), self.config.speed)  # (2N,)
        return scores[: len(batch)], scores[len(batch) :]

    def loss(self, model: Any, batch: list[EncodedPair], count: float) -> tuple[Tensor, dict[str, Tensor]]:
        chosen, rejected = self.scores(model, batch)
        margin = torch.tensor([p.margin for p in batch], device=chosen.device)
        return pairwise_loss(chosen, rejected, margin, pair_count=count)

    def evaluate(self, model: Any, pairs: list[EncodedPair], batch_size: int) -> dict[str, float]:
        chosen, rejected = self._all_scores(model, pairs, batch_size)
        self.last_eval_scores = (chosen, rejected)  # finish() normalises with these: no second pass
        margin = torch.tensor([p.margin for p in pairs])
        _, stats = pairwise_loss(chosen, rejected, margin)
        return {
            "eval/loss": float(stats["loss/rm"]),
            "eval/accuracy": float(stats["rm/accuracy"]),
            "eval/margin": float(stats["rm/margin"]),
        }

    def _all_scores(self, model: Any, pairs: list[EncodedPair], batch_size: int) -> tuple[Tensor, Tensor]:
        chosen, rejected = [], []
        with torch.no_grad():
            for i in range(0, len(pairs), batch_size):
                c, r = self.scores(model, pairs[i : i + batch_size])
                chosen.append(c.cpu())
                rejected.append(r.cpu())
        return torch.cat(chosen), torch.cat(rejected)

    def prepare(self, model: Any, splits: dict[str, list[Any]], run_dir: Path, resumed: bool) -> None:
        pass

    def finish(self, model: Any, eval_pairs: list[EncodedPair], batch_size: int) -> tuple[Any, dict[str, Any]]:
        """Merge LoRA, and store the normalisation measured on the held-out responses."""
        if isinstance(model, PeftModel):
            model = model.merge_and_unload()
        extra: dict[str, Any] = {}
        if self.config.rm.normalize:
            # The trainer evaluates the final weights right before finish(); merging LoRA does not
            # change the function, so those scores are the merged model's too.
            chosen, rejected = self.last_eval_scores or self._all_scores(model, eval_pairs, batch_size)
            gain, bias = normalization(torch.cat([chosen, rejected]))
            setattr(model.config, NORMALIZATION_KEY, {"gain": gain, "bias": bias})
            extra["normalization"] = {"gain": gain, "bias": bias, "responses": 2 * len(eval_pairs)}
        model.config.pad_token_id = self.pad_id  # transformers' own forward finds the last token with it
        return model, extra


def normalization(scores: Tensor) -> tuple[float, float]:
    """(gain, bias) with gain * scores + bias of mean 0 and std 1 (gain 1 when the std is ~0)."""
    std = float(scores.std()) if len(scores) > 1 else 0.0
    gain = 1.0 / std if std > 1e-6 else 1.0
    return gain, -float(scores.mean()) * gain


class RMTrainer(OfflineTrainer):
    """`tether rm`: the offline trainer with the reward-model task."""

    def __init__(self, config: RMConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False):
        def make_task(tokenizer: PreTrainedTokenizerBase) -> RewardModelTask:
            return RewardModelTask(config, int(tokenizer.pad_token_id))

        super().__init__("rm", config, make_task, run_dir, resume, overwrite)
