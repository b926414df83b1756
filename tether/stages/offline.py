"""The offline stages (`tether sft`, `tether rm`, `tether dpo`): fixed examples, no sampling.

    RMTrainer(load_config(RMConfig, "configs/demo-rm.yaml"), "runs/rm").train()

One step (`OfflineTrainer.iteration`):
  1. draw a batch of examples (seeded, resumable order; a fresh shuffle each epoch)
  2. micro-batches: forward, the stage's loss normalised by the whole batch (so micro-batching
     is exact), backward
  3. clip the gradient; skip the update if it is not finite (optim.take_step)
At the end the final model goes to checkpoints/final/ and the held-out result to eval/eval.json.

What differs between stages (data format, model kind, loss, held-out metrics, what is saved with
the final model) is a `Task` (stages/sft.py, rm.py, dpo.py); the run around the step (checkpoints,
resume, evaluation every train.eval_every steps, stopping) is the one loop of every stage
(run/loop.py).

Under torchrun every process draws the same batch and takes its share of it (runtime.shard); the
loss is still divided by the whole batch's count and the gradients are summed over the processes,
so each step is the one a single process would take. Only the main process evaluates and writes.
With model.fsdp the model is sharded over the processes (engines/fsdp.py) and the final model is
written from its plain copy.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from tether import console as term
from tether.config import OfflineConfig
from tether.console import StatusKeys
from tether.data import DataError, PromptSampler, encode_prompt, encode_response, uses_chat_template
from tether.engines import fsdp
from tether.files import atomic_write_text
from tether.loading.models import ModelKind, eos_token_ids, load_tokenizer, load_trainable
from tether.optim import UpdateGuard, make_optimizer, take_step
from tether.run.checkpoints import Stateful
from tether.run.loop import Run
from tether.runtime import broadcast_trainable, is_main, shard
from tether.sampling import left_pad

log = logging.getLogger(__name__)


class Task(Protocol):
    """What a stage adds to the shared loop."""

    name: str  # the stage: 'sft', 'rm' or 'dpo'
    kind: ModelKind  # the model it trains
    resume_needs: tuple[str, ...]  # files of the run directory a resume reads (dpo: the reference log-probs)
    status_keys: StatusKeys  # (label, metric, format) shown after each step

    def load(self, path: str | None, split: str) -> list[Any]:
        """Examples of a data file (None: the shipped file of the split 'train' or 'eval')."""

    def encode(self, example: Any, encoder: Encoder) -> Any | None:
        """Token ids of one example; None when it is longer than data.max_length."""

    def count(self, batch: list[Any]) -> float:
        """What the batch's loss is averaged over (tokens for sft, pairs for rm)."""

    def loss(self, model: Any, batch: list[Any], count: float) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of a micro-batch, divided by the whole batch's `count`."""

    def evaluate(self, model: Any, examples: list[Any], batch_size: int) -> dict[str, float]:
        """Held-out metrics, keyed eval/<name>."""

    def prepare(self, model: Any, splits: dict[str, list[Any]], run_dir: Path, resumed: bool) -> None:
        """Once the model and the run directory are ready, before the first step (dpo: the
        reference log-probs, computed with the starting weights or read back on resume)."""

    def finish(self, model: Any, eval_examples: list[Any], batch_size: int) -> tuple[Any, dict[str, Any]]:
        """The model to save as final (for rm: merged, with its normalisation) and what to report."""


class Encoder:
    """Turns prompts and responses into the token ids the model sees, with the data settings."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: OfflineConfig, eos_id: int) -> None:
        self.tokenizer = tokenizer
        self.data = config.data
        self.chat = uses_chat_template(tokenizer, config.data.apply_chat_template)
        self.eos_id = eos_id

    def prompt(self, prompt: Any) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.chat, self.data.max_prompt_length)

    def response(self, text: str) -> list[int]:
        return encode_response(self.tokenizer, text, self.eos_id)

    def fits(self, prompt_ids: list[int], response_ids: list[int]) -> bool:
        return len(prompt_ids) + len(response_ids) <= self.data.max_length


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """[left-padded prompt | right-padded response] rows, the layout every role's forward expects.

    returns input_ids (B, P + R), attention_mask (B, P + R), response_mask (B, R), P.
    """
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)  # (B, P)
    width = max(len(r) for r in responses)
    response_ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), width), dtype=torch.bool)
    for row, ids in enumerate(responses):
        response_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        response_mask[row, : len(ids)] = True
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask.bool(), response_mask], dim=1)
    return input_ids, attention_mask, response_mask, prompt_ids.shape[1]


class OfflineTrainer:
    """The model, its optimizer and the run of one offline stage; `.train()` runs the loop."""

    eval_at_last_step = False  # finish() evaluates the final model on the same held-out file
    sample_every = 0  # no sampling

    def __init__(
        self,
        stage: str,
        config: OfflineConfig,
        make_task: Callable[[PreTrainedTokenizerBase], Task],
        run_dir: str | Path,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.config = config
        cfg = config.train
        self.run = Run(stage, config, run_dir, resume, overwrite)
        self.device = self.run.device
        self.tokenizer = load_tokenizer(config.model.name, config.model.trust_remote_code)
        self.task = task = make_task(self.tokenizer)
        self.run.require_for_resume(task.resume_needs)
        self.status_keys = task.status_keys
        self.encoder = Encoder(self.tokenizer, config, eos_token_ids(self.tokenizer)[0])

        # Data first: a malformed file is found before any model is loaded.
        self.train_examples = self._encoded(config.data.train, "train")
        self.eval_examples = self._encoded(config.data.eval, "eval")

        fsdp_on = config.model.fsdp  # a sharded checkpoint's weights are restored with the optimizer (run.start)
        self.model = load_trainable(
            task.kind,
            config.model.name,
            config.model.lora,
            self.tokenizer,
            checkpoint=None if fsdp_on else self.run.resume_from,
            trust_remote_code=config.model.trust_remote_code,
            new_head="reward",  # a reward model's new head starts random (docs/concepts/details.md item 7)
        ).to(self.device)
        broadcast_trainable(self.model)  # the random head (or LoRA) of rank 0 in every process
        if fsdp_on:
            self.model = fsdp.shard(self.model, "model", dtype=config.model.dtype)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.total_steps = config.total_steps(len(self.train_examples))
        self.eval_every = cfg.eval_every
        self.optimizer, self.scheduler = make_optimizer(
            [{"params": self.params, "lr": cfg.lr}],
            cfg.adam_eps,
            cfg.weight_decay,
            cfg.lr_schedule,
            cfg.warmup_steps,
            self.total_steps,
            fused=config.speed.fused_adamw,
        )
        self.sampler = PromptSampler(len(self.train_examples), cfg.batch_size, cfg.seed)
        self.guard = UpdateGuard()
        self.run.start(self.stateful_parts())
        task.prepare(
            self.model, {"train": self.train_examples, "eval": self.eval_examples}, self.run.run_dir, self.run.resumed
        )

    def _encoded(self, path: str | None, split: str) -> list[Any]:
        examples = self.task.load(path, split)
        encoded = [self.task.encode(e, self.encoder) for e in examples]
        kept = [e for e in encoded if e is not None]
        where = path or f"the shipped {split} file"
        if len(kept) < len(encoded):
            log.warning(
                "%s: %d of %d examples are longer than data.max_length=%d tokens and are left out",
                where,
                len(encoded) - len(kept),
                len(encoded),
                self.config.data.max_length,
            )
        if not kept:
            raise DataError(f"{where}: no example fits in data.max_length={self.config.data.max_length} tokens")
        return kept

    def train(self) -> Path:
        """Run the remaining steps; returns the final model's folder."""
        return self.run.loop(self)

    def iteration(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """One optimizer step over a batch, in micro-batches; returns the step's metrics."""
        cfg = self.config.train
        started = time.perf_counter()
        batch = [self.train_examples[i] for i in self.sampler.next_batch()]  # 1. a batch
        count = self.task.count(batch)  # of the whole batch, in every process
        mine = shard(batch)
        micro = self.config.micro_batch
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.zero_grad(set_to_none=True)
        stats: dict[str, float] = defaultdict(float)
        for i in range(0, len(mine), micro):  # 2. micro-batches, losses normalised by the batch
            loss, micro_stats = self.task.loss(self.model, mine[i : i + micro], count)
            loss.backward()
            for key, value in micro_stats.items():
                stats[key] += float(value)
        clipped = {"train/grad_norm": self.params}  # 3. clip, step
        stats = take_step(self.optimizer, self.scheduler, self.guard, clipped, stats, cfg.max_grad_norm, self.run.step)
        metrics = {
            **stats,
            "train/epoch": self.sampler.epoch + self.sampler.offset / len(self.train_examples),
            "train/skipped_updates": float(self.guard.skipped_updates),
            "lr": lr,
            "time/step_s": time.perf_counter() - started,
        }
        return metrics, []

    # ----------------------------------------------------------------------------------------
    # What the run loop asks of a stage
    # ----------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        with torch.no_grad():
            return self.task.evaluate(self.model, self.eval_examples, self.config.micro_batch)

    def watch(self, metrics: dict[str, float], console: Any) -> dict[str, float]:
        return {}  # the alarms watch sampled responses; an offline stage samples none

    def stateful_parts(self) -> dict[str, Stateful]:
        return {"optimizer": self.optimizer, "scheduler": self.scheduler, "sampler": self.sampler, "guard": self.guard}

    def checkpoint_models(self) -> dict[str, tuple[Any, str]]:
        return {"": (self.model, self.config.model.name)}

    def finish(self) -> Path:
        """Evaluate on the held-out file, save checkpoints/final (for rm: merged, with its
        normalisation), write eval/eval.json (the main process; the others wait for it)."""
        model: Any = self.model
        metrics: dict[str, float] = {}
        extra: dict[str, Any] = {}
        if is_main():
            metrics = self.evaluate()  # model.fsdp: the loop holds the sharded model gathered meanwhile
        if fsdp.is_sharded(self.model):
            model = fsdp.plain_copy(self.model)  # every process; the main one gets the plain model on its CPU
        if is_main():
            model, extra = self.task.finish(model, self.eval_examples, self.config.micro_batch)
        if not fsdp.is_sharded(self.model):
            self.model = model
        final = self.run.save_checkpoint(self, final=True, models={"": (model, self.config.model.name)})
        if is_main():
            document = {
                "stage": self.task.name,
                "step": self.run.step,
                "model": str(final),
                "eval_examples": len(self.eval_examples),
                "metrics": metrics,
                **extra,
            }
            atomic_write_text(self.run.run_dir / "eval" / "eval.json", json.dumps(document, indent=2))
            for key, value in metrics.items():
                term.console.print(f"{key}: {value:.4f}")
            term.console.print(f"final model: {final}\nheld-out results: {self.run.run_dir / 'eval' / 'eval.json'}")
        return final

    def nonfinite_diagnosis(self, checkpoint: Path) -> str:
        cfg = self.config.train
        return (
            f"stopped at step {self.run.step}: the last {self.guard.nonfinite_streak} optimizer steps had a "
            f"non-finite gradient, so none was applied; the last finite weights are in {checkpoint}. "
            f"Lower train.lr (now {cfg.lr}) or keep train.max_grad_norm set, then continue with: "
            f"tether {self.task.name} --resume --output {self.run.run_dir}"
        )
