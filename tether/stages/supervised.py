"""The loop of the offline stages (`tether sft`, `tether rm`, `tether dpo`): fixed examples, no sampling.

    RMTrainer(load_config(RMConfig, "configs/demo-rm.yaml"), "runs/rm").train()

One step (`SupervisedTrainer.train`):
  1. draw a batch of examples (seeded, resumable order; a fresh shuffle each epoch)
  2. micro-batches: forward, the stage's loss normalised by the whole batch (so micro-batching
     is exact), backward
  3. clip the gradient; skip the update if it is not finite
  4. log; every train.eval_every steps evaluate on the held-out file; checkpoint
At the end the final model goes to checkpoints/final/ and the held-out result to eval/eval.json.

What differs between stages (data format, model kind, loss, held-out metrics, what is saved with
the final model) is a `Task`; the loop, checkpoints and resume are written once, here.

Under torchrun every process draws the same batch and takes its share of it (runtime.shard); the
loss is still divided by the whole batch's count and the gradients are summed over the processes,
so each step is the one a single process would take. Only the main process evaluates and writes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from tether import console as term
from tether.checkpoint import (
    atomic_dir,
    atomic_write_text,
    check_run_dir,
    clear_run_dir,
    load_trainer_state,
    prune_step_checkpoints,
    remove_partial_checkpoints,
    save_trainer_state,
    step_dir_name,
)
from tether.config import DPOConfig, RMConfig, SFTConfig, save_config
from tether.data import DataError, PromptSampler, encode_prompt, encode_response, uses_chat_template
from tether.errors import NumericalError
from tether.models import eos_token_ids, load_tokenizer
from tether.rollout import left_pad
from tether.runlog import RunLog
from tether.runtime import (
    StopRequest,
    barrier,
    broadcast_trainable,
    is_main,
    prepare_process,
    refuse_unbuilt_engines,
    restore_rng_states,
    rng_states_of_all_ranks,
    shard,
    sum_across_ranks,
    sum_gradients,
)
from tether.stages.common import ModelKind, load_trainable, make_optimizer, save_model

log = logging.getLogger(__name__)

OfflineConfig = RMConfig | SFTConfig | DPOConfig


class Task(Protocol):
    """What a stage adds to the shared loop."""

    name: str  # the stage: 'sft', 'rm' or 'dpo'
    kind: ModelKind  # the model it trains

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

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, config: RMConfig | SFTConfig | DPOConfig, eos_id: int
    ) -> None:
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


class SupervisedTrainer:
    """The model, its optimizer and the run directory of one offline stage; `.train()` runs it."""

    def __init__(
        self,
        config: OfflineConfig,
        make_task: Callable[[PreTrainedTokenizerBase], Task],
        run_dir: str | Path,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.checkpoints = self.run_dir / "checkpoints"
        resume_from = check_run_dir(self.run_dir, resume, overwrite)  # changes nothing yet
        cfg = config.train

        self.device = prepare_process(cfg.num_threads, cfg.seed, cfg.device)
        refuse_unbuilt_engines(config.model.fsdp, "hf", self.device)
        self.tokenizer = load_tokenizer(config.model.name, config.model.trust_remote_code)
        self.task = task = make_task(self.tokenizer)
        self.encoder = Encoder(self.tokenizer, config, eos_token_ids(self.tokenizer)[0])

        # Data first: a malformed file is found before any model is loaded.
        self.train_examples = self._encoded(config.data.train, "train")
        self.eval_examples = self._encoded(config.data.eval, "eval")

        self.model = load_trainable(
            task.kind,
            config.model.name,
            config.model.lora,
            self.tokenizer,
            checkpoint=resume_from,
            trust_remote_code=config.model.trust_remote_code,
            new_head="reward",  # a reward model's new head starts random (RLHF-DETAILS 7)
        ).to(self.device)
        broadcast_trainable(self.model)  # the random head (or LoRA) of rank 0 in every process
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        batches_per_epoch = math.ceil(len(self.train_examples) / cfg.batch_size)
        self.total_steps = cfg.steps or max(1, round(cfg.epochs * batches_per_epoch))
        self.optimizer, self.scheduler = make_optimizer(
            [{"params": self.params, "lr": cfg.lr}],
            cfg.adam_eps,
            cfg.weight_decay,
            cfg.lr_schedule,
            cfg.warmup_steps,
            self.total_steps,
        )
        self.sampler = PromptSampler(len(self.train_examples), cfg.batch_size, cfg.seed)
        self.step = 0
        self.skipped_updates = 0
        self.nonfinite_streak = 0

        if resume_from is not None:
            self._load_trainer_state(resume_from)
        barrier()  # every process has checked the run directory before the main one changes it
        if is_main():
            if resume_from is None:
                clear_run_dir(self.run_dir)
            remove_partial_checkpoints(self.checkpoints)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.run_dir / "config.yaml")
        barrier()
        self.runlog = RunLog(self.run_dir, resume_step=self.step if resume_from is not None else None)
        task.prepare(
            self.model,
            {"train": self.train_examples, "eval": self.eval_examples},
            self.run_dir,
            resumed=resume_from is not None,
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

    # ----------------------------------------------------------------------------------------

    def train(self) -> Path:
        """Run the remaining steps; returns the final model's folder."""
        cfg = self.config.train
        try:
            with StopRequest() as stop, term.progress_bar() as progress:
                task = progress.add_task(self.task.name, total=self.total_steps, completed=self.step, status="")
                while self.step < self.total_steps:
                    self.step += 1
                    metrics = self.train_step()
                    evaluate_now = cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps
                    if evaluate_now and is_main():
                        metrics.update(self.evaluate())
                    self.runlog.metrics(self.step, metrics)
                    progress.update(task, completed=self.step, status=_status(self.task.name, metrics))
                    saved = None
                    if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == self.total_steps):
                        saved = self.save_checkpoint()
                    if self.nonfinite_streak >= cfg.max_nonfinite_in_a_row:
                        saved = saved or self.save_checkpoint()
                        raise NumericalError(
                            f"stopped at step {self.step}: the last {self.nonfinite_streak} optimizer steps had a "
                            f"non-finite gradient, so none was applied; the last finite weights are in {saved}. "
                            f"Lower train.lr (now {cfg.lr}) or keep train.max_grad_norm set, then continue with: "
                            f"tether {self.task.name} --resume --output {self.run_dir}"
                        )
                    if stop.requested():
                        checkpoint = saved or self.save_checkpoint()
                        raise stop.interruption(self.task.name, self.step, checkpoint, self.run_dir)
            final = self.finish()
        finally:
            self.runlog.close()
        return final

    def train_step(self) -> dict[str, float]:
        """One optimizer step over a batch, in micro-batches; returns the step's metrics."""
        cfg = self.config.train
        started = time.perf_counter()
        batch = [self.train_examples[i] for i in self.sampler.next_batch()]  # 1. a batch
        count = self.task.count(batch)  # of the whole batch, in every process
        mine = shard(batch)
        micro = cfg.micro_batch_size or cfg.batch_size
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.zero_grad(set_to_none=True)
        stats: dict[str, float] = defaultdict(float)
        for i in range(0, len(mine), micro):  # 2. micro-batches, losses normalised by the batch
            loss, micro_stats = self.task.loss(self.model, mine[i : i + micro], count)
            loss.backward()
            for key, value in micro_stats.items():
                stats[key] += float(value)
        sum_gradients(self.params)
        stats = sum_across_ranks(stats)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))  # 3. clip, step
        if math.isfinite(grad_norm):
            self.optimizer.step()
            self.nonfinite_streak = 0
        else:
            self.skipped_updates += 1
            self.nonfinite_streak += 1
            log.warning("step %d: non-finite gradient, update skipped", self.step)
        self.scheduler.step()
        seconds = time.perf_counter() - started
        return {
            **stats,
            "train/grad_norm": grad_norm,
            "train/epoch": self.sampler.epoch + self.sampler.offset / len(self.train_examples),
            "train/skipped_updates": float(self.skipped_updates),
            "lr": lr,
            "time/step_s": seconds,
        }

    def evaluate(self) -> dict[str, float]:
        with torch.no_grad():
            return self.task.evaluate(self.model, self.eval_examples, self.eval_batch_size)

    @property
    def eval_batch_size(self) -> int:
        return self.config.train.micro_batch_size or self.config.train.batch_size

    def finish(self) -> Path:
        """Evaluate on the held-out file, save checkpoints/final, write eval/eval.json (the main
        process; the others only learn where the final model is)."""
        final = self.checkpoints / "final"
        if not is_main():
            return final
        metrics = self.evaluate()
        model, extra = self.task.finish(self.model, self.eval_examples, self.eval_batch_size)
        with atomic_dir(final) as tmp:
            save_model(model, tmp, self.tokenizer, self.config.model.name)
        document = {
            "stage": self.task.name,
            "step": self.step,
            "model": str(final),
            "eval_examples": len(self.eval_examples),
            "metrics": metrics,
            **extra,
        }
        atomic_write_text(self.run_dir / "eval" / "eval.json", json.dumps(document, indent=2))
        for key, value in metrics.items():
            term.console.print(f"{key}: {value:.4f}")
        term.console.print(f"final model: {final}\nheld-out results: {self.run_dir / 'eval' / 'eval.json'}")
        return final

    # ----------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """checkpoints/step-NNNNNN, written by the main process with every process's RNG state."""
        target = self.checkpoints / step_dir_name(self.step)
        rng = rng_states_of_all_ranks()
        if is_main():
            with atomic_dir(target) as tmp:
                save_model(self.model, tmp, self.tokenizer, self.config.model.name)
                save_trainer_state(
                    tmp,
                    {
                        "step": self.step,
                        "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(),
                        "sampler": self.sampler.state_dict(),
                        "skipped_updates": self.skipped_updates,
                        "nonfinite_streak": self.nonfinite_streak,
                        "rng": rng,
                    },
                )
            prune_step_checkpoints(self.checkpoints, self.config.train.keep_last)
        barrier()
        return target

    def _load_trainer_state(self, folder: Path) -> None:
        state = load_trainer_state(folder)
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.skipped_updates = int(state["skipped_updates"])
        self.nonfinite_streak = int(state["nonfinite_streak"])
        restore_rng_states(state["rng"], self.config.train.seed, self.step)
        term.console.print(f"resuming from {folder} (step {self.step})")


def _status(stage: str, metrics: dict[str, float]) -> str:
    shown = {
        "rm": ("loss/rm", "rm/accuracy"),
        "sft": ("loss/sft",),
        "dpo": ("loss/dpo", "rewards/accuracies", "rewards/margins"),
    }.get(stage, ())
    parts = [f"{key.split('/')[-1]} {metrics[key]:.3f}" for key in shown if key in metrics]
    return "  ".join(parts + [f"{metrics['time/step_s']:.1f}s/step"])
