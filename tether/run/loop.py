"""The one run loop every stage goes through: the run directory, resume, the loop over steps with
logging, evaluation, alarms, checkpoints, the non-finite guard and stopping, then the final model.

A stage brings its step and the state it owns (the `Stage` protocol); adding a stage means
writing its step, not a loop. A stage's constructor reads, in order:

    self.run = Run("ppo", config, run_dir, resume, overwrite)  # 1. inputs checked, nothing changed yet
    ... load models, data, the optimizer (on self.run.device, from self.run.resume_from)
    self.run.start(self.stateful_parts())                       # 2. state restored, run directory ready
and `train()` is `self.run.loop(self)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import yaml

from tether import console as term
from tether.config import ConfigError, StageConfig, config_to_dict
from tether.errors import NumericalError
from tether.optim import UpdateGuard
from tether.run.checkpoints import Stateful, restore_trainer_state, write_checkpoint
from tether.run.directory import RunDirectory, RunDirError
from tether.run.log import RunLog, read_jsonl
from tether.runtime import StopRequest, is_main, prepare_process
from tether.speed import heap

# Keys a resumed run may change: they decide how long it runs, what it writes and how, never what
# it trains. Every other key must be the run's own (config.yaml), or the resume is refused.
RESUMABLE = (
    "train.steps",
    "train.save_every",
    "train.keep_last",
    "train.sample_every",
    "train.eval_every",
    "train.num_threads",
    "train.device",
    "eval.",
    "alarms.",
    "speed.",
)


class Stage(Protocol):
    """What the loop needs of a stage."""

    run: Run
    guard: UpdateGuard  # its optimizer steps' non-finite guard
    tokenizer: Any  # saved beside every model
    total_steps: int
    eval_every: int  # evaluate every this many steps (0: never during the run)
    eval_at_last_step: bool  # False where finish() evaluates the final model on the same data anyway
    sample_every: int  # log and print samples every this many steps, and at step 1 (0: never)
    status_keys: term.StatusKeys  # (label, metric, format) shown after each step

    def iteration(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """One step at `run.step`: its metrics and its samples (none for the offline stages)."""

    def evaluate(self) -> dict[str, float]:
        """The periodic evaluation (main process only), as eval/* metrics."""

    def watch(self, metrics: dict[str, float], console: Any) -> dict[str, float]:
        """Alarms active after this step, as alarm/<key> metrics (the history holds the earlier rows)."""

    def stateful_parts(self) -> dict[str, Stateful]:
        """Everything a step checkpoint restores: optimizer, scheduler, data position, guard, ..."""

    def checkpoint_models(self) -> dict[str, tuple[Any, str]]:
        """subfolder -> (model, the base name a LoRA adapter points at): what a checkpoint holds."""

    def finish(self) -> Path:
        """The final model (checkpoints/final) and the final evaluation; returns its folder."""

    def nonfinite_diagnosis(self, checkpoint: Path) -> str:
        """Why the run stopped after too many non-finite gradients in a row, and what to do."""


class Run:
    """One stage's training run in one run directory."""

    def __init__(self, stage: str, config: StageConfig, run_dir: str | Path, resume: bool, overwrite: bool) -> None:
        self.stage = stage
        self.config = config
        self.run_dir = Path(run_dir)
        self.checkpoints = self.run_dir / "checkpoints"
        train = config.train
        self.device = prepare_process(train.num_threads, train.seed, train.device)
        # Checked first, changed last: a mistake found while loading leaves an old run untouched.
        self.directory = RunDirectory(self.run_dir, stage, resume, overwrite)
        self.resume_from = self.directory.resume_from
        self.changed = self._resume_changes() if self.resumed else {}
        if config.speed.keep_freed_memory:
            heap.keep_freed_memory()
        refuse_unbuilt_engines(config, self.device.type)
        self.step = 0
        self.history: list[dict[str, Any]] = []  # every metric row so far (a resumed run's earlier ones too)
        self.runlog: RunLog | None = None

    @property
    def resumed(self) -> bool:
        return self.resume_from is not None

    def require_for_resume(self, names: tuple[str, ...]) -> None:
        """A resume reads these files of the run directory back: refuse it now if one is missing."""
        missing = [name for name in names if self.resumed and not (self.run_dir / name).is_file()]
        if missing:
            raise RunDirError(
                f"--resume: {self.run_dir} lacks {', '.join(missing)}, which this run wrote at its start and a resume "
                "reads back (it cannot be made again from the trained weights); nothing was changed. Start the run "
                "again with --overwrite."
            )

    def start(self, parts: dict[str, Stateful]) -> None:
        """Once the stage has loaded: its state restored from the checkpoint when resuming, the run
        directory prepared, the log opened."""
        if self.resume_from is not None:
            self.step = restore_trainer_state(self.resume_from, parts, self.config.train.seed)
            for key, (old, new) in self.changed.items():
                term.console.print(f"resuming with {key}={new!r} (the run had {old!r}); recorded in the run's manifest")
        self.directory.prepare(self.config, self.resumed, self.changed)
        self.runlog = RunLog(self.run_dir, resume_step=self.step if self.resumed else None)
        self.history = read_jsonl(self.runlog.metrics_path) if self.resumed else []

    def save_checkpoint(self, stage: Stage, final: bool = False) -> Path:
        """checkpoints/step-NNNNNN of the current step (or checkpoints/final, models only)."""
        parts = None if final else stage.stateful_parts()
        return write_checkpoint(
            self.checkpoints, self.step, stage.checkpoint_models(), stage.tokenizer, parts, self.config.train.keep_last
        )

    def loop(self, stage: Stage) -> Path:
        """Run the stage's remaining steps, then its finish; returns the final model's folder. A
        signal stops it after the current step, with a checkpoint."""
        assert self.runlog is not None, "Run.start() comes before the loop"
        train = self.config.train
        try:
            with StopRequest() as stop, term.step_progress(self.stage, stage.total_steps, self.step) as progress:
                while self.step < stage.total_steps:
                    self.step += 1
                    step = self.step
                    metrics, samples = stage.iteration()
                    last = step == stage.total_steps
                    evaluate_now = stage.eval_every and step % stage.eval_every == 0
                    if evaluate_now and (stage.eval_at_last_step or not last) and is_main():
                        metrics.update(stage.evaluate())
                    metrics.update(stage.watch(metrics, progress.console))
                    self.history.append({"step": step, **metrics})
                    self.runlog.metrics(step, metrics)
                    progress.update(step, term.status_line(metrics, stage.status_keys))
                    if samples and stage.sample_every and (step % stage.sample_every == 0 or step == 1):
                        self.runlog.samples(step, samples)
                        progress.console.print(term.sample_table(step, samples))
                    saved = None
                    if train.save_every and (step % train.save_every == 0 or last):
                        saved = self.save_checkpoint(stage)  # the last step too, so a finished run can be extended
                    if stage.guard.nonfinite_streak >= train.max_nonfinite_in_a_row:
                        raise NumericalError(stage.nonfinite_diagnosis(saved or self.save_checkpoint(stage)))
                    if stop.requested():
                        checkpoint = saved or self.save_checkpoint(stage)
                        raise stop.interruption(self.stage, step, checkpoint, self.run_dir)
            return stage.finish()
        finally:
            self.runlog.close()
            self.directory.release()

    def _resume_changes(self) -> dict[str, list[Any]]:
        """The keys this config changes from the run's own: refused unless RESUMABLE."""
        try:
            saved = _dotted(yaml.safe_load((self.run_dir / "config.yaml").read_text()) or {})
        except (OSError, yaml.YAMLError) as err:
            raise RunDirError(
                f"--resume: cannot read {self.run_dir / 'config.yaml'} ({err}), so the resume cannot be checked"
            ) from err
        current = _dotted(config_to_dict(self.config))
        changed = {
            key: [saved.get(key), current.get(key)]
            for key in sorted(saved.keys() | current.keys())
            if saved.get(key) != current.get(key)
        }
        refused = {k: v for k, v in changed.items() if not k.startswith(RESUMABLE)}
        if refused:
            listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in refused.items())
            may = ", ".join(key + "*" if key.endswith(".") else key for key in RESUMABLE)
            raise RunDirError(
                f"--resume: this config changes what {self.run_dir} trains ({listed}), so the resumed run would not "
                "continue the same run. Resume with the run's own config (leave out --config), or start a new run. "
                f"Keys that may change on resume: {may}."
            )
        return changed


def refuse_unbuilt_engines(config: StageConfig, device_type: str) -> None:
    """model.fsdp and rollout.engine=vllm: the reason each cannot run here, as a ConfigError."""
    if config.model.fsdp:
        if device_type != "cuda":
            raise ConfigError(
                f"model.fsdp=true shards the trained models with FSDP2 over the GPUs of a torchrun job, but this "
                f"process runs on {device_type} (no CUDA GPU here). On CPUs use plain data parallelism "
                "(torchrun --nproc_per_node N -m tether ..., no model.fsdp), or LoRA to make a large policy fit."
            )
        raise ConfigError(
            "model.fsdp=true is not built in this version of tether: sharding has not been proven on a GPU "
            "yet. Use plain data parallelism (torchrun without model.fsdp), LoRA, or model.dtype=bfloat16."
        )
    if getattr(getattr(config, "rollout", None), "engine", "hf") == "vllm":
        if device_type != "cuda":
            raise ConfigError(
                f"rollout.engine=vllm generates with vLLM, which needs a CUDA GPU, but this process runs on "
                f"{device_type}. Use rollout.engine=hf (transformers generate with the KV cache)."
            )
        raise ConfigError(
            "rollout.engine=vllm is not built in this version of tether: the weight sync and the check of "
            "vLLM's log-probs against the trainer's have not been proven on a GPU yet. Use rollout.engine=hf."
        )


def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "function_kwargs" and key != "url_headers":
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat
