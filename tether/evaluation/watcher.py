"""Watching a rollout run: the fixed eval set now and then, the alarms after every iteration, the
final report (eval/eval.json and report.md) at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tether import console as term
from tether.config import OnlineConfig
from tether.engines.vllm import VLLMEngine
from tether.evaluation.alarms import check_alarms
from tether.evaluation.runner import START, Evaluator, add_win_rates, eval_document, eval_metrics, evaluator_for
from tether.files import atomic_write_text
from tether.loading.roles import RolloutRoles
from tether.roles.reference import Reference
from tether.run.checkpoints import step_dir_name
from tether.run.directory import RunDirError
from tether.runtime import is_main

START_FILE = "start.json"  # eval/start.json: the starting model's eval result, when no reference model is held


class Watcher:
    """The fixed eval set, the alarms and the report of one run."""

    @classmethod
    def for_run(
        cls,
        config: OnlineConfig,
        run_dir: Path,
        roles: RolloutRoles,
        device: torch.device,
        kl_target: float | None,
        engine: VLLMEngine | None = None,
    ) -> Watcher:
        """The watcher of a stage's run; eval.num_prompts=0 turns the eval set off. With a vLLM
        engine the eval set is sampled there too, so the start and the policy share a sampler."""
        evaluator = None
        if config.eval.num_prompts > 0:
            evaluator = evaluator_for(
                config, roles.tokenizer, roles.reference, roles.rewards, roles.eos_ids, device, engine, roles.episodes
            )
        return cls(config, run_dir, evaluator, roles.reference, kl_target)

    def __init__(
        self,
        config: OnlineConfig,
        run_dir: Path,
        evaluator: Evaluator | None,
        reference: Reference | None,
        kl_target: float | None,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.evaluator = evaluator
        self.reference = reference
        self.kl_target = kl_target  # the KL controller's target, which the KL alarm measures against
        self.active_alarms: set[str] = set()
        self._start_eval: dict[str, Any] | None = None  # the starting model's eval result, computed once

    @property
    def eval_every(self) -> int:
        return self.config.eval.every if self.evaluator is not None else 0

    def start_eval(self) -> dict[str, Any]:
        """The starting model (the reference) on the eval set; deterministic, so computed once."""
        assert self.evaluator is not None
        if self._start_eval is None:
            assert self.reference is not None, "keep_start() evaluates the start of a run without a reference"
            with self.reference.as_model() as start:
                self._start_eval = self.evaluator.evaluate(start, START)
        return self._start_eval

    def keep_start(self, policy: Any, resumed: bool) -> None:
        """A run with no reference model (grpo.kl_in=none, full fine-tuning) judges against its start
        still: the policy before its first update is the starting model, evaluated now and kept in
        eval/start.json, which a resumed run reads back."""
        if self.evaluator is None or self.reference is not None:
            return
        path = self.run_dir / "eval" / START_FILE
        if resumed:
            if not path.is_file():
                raise RunDirError(f"--resume: {path} is missing: the starting model's eval result cannot be made again")
            self._start_eval = json.loads(path.read_text())
            return
        self._start_eval = self.evaluator.evaluate(policy, START)
        if is_main():
            atomic_write_text(path, json.dumps(self._start_eval, indent=2))

    def periodic_eval(self, policy: Any, step: int) -> dict[str, float]:
        """The policy on the fixed eval set now: eval/* metrics, and the full result in eval/step-N.json."""
        assert self.evaluator is not None
        results = {START: self.start_eval(), "policy": self.evaluator.evaluate(policy, f"step-{step}")}
        add_win_rates(results, START, self.config.eval.tie_margin)
        document = eval_document(self.config.eval, self.evaluator, results, {"policy": f"step {step}"})
        atomic_write_text(self.run_dir / "eval" / f"{step_dir_name(step)}.json", json.dumps(document, indent=2))
        return eval_metrics(results["policy"])

    def watch(
        self, history: list[dict[str, Any]], metrics: dict[str, float], step: int, console: Any
    ) -> dict[str, float]:
        """Alarms active after this step, as alarm/<key> = 1 metrics; new ones are printed once."""
        if not self.config.alarms.enabled:
            return {}
        alarms = check_alarms([*history, metrics], self.config.alarms, self.kl_target, self.config.ALGORITHM)
        for alarm in alarms:
            if alarm.key not in self.active_alarms:
                console.print(term.alarm_panel(step, alarm))
        self.active_alarms = {a.key for a in alarms}
        return {f"alarm/{a.key}": 1.0 for a in alarms}

    def write_report(self, stage: str, policy: Any, final_dir: Path, history: list[dict[str, Any]]) -> None:
        """The starting model and the trained policy on the eval set (eval/eval.json), the run's
        first-vs-last metrics, and the per-prompt outputs side by side (report.md and the console)."""
        summary = first_last_summary(history)
        results: dict[str, dict[str, Any]] = {}
        if self.evaluator is not None:
            results = {START: self.start_eval(), "final": self.evaluator.evaluate(policy, "final")}
            add_win_rates(results, START, self.config.eval.tie_margin)
            document = eval_document(self.config.eval, self.evaluator, results, {"final": str(final_dir)})
            atomic_write_text(self.run_dir / "eval" / "eval.json", json.dumps(document, indent=2))
        atomic_write_text(self.run_dir / "report.md", term.report_markdown(stage, self.run_dir, summary, results))
        if results:
            term.console.print(term.before_after_table(results[START]["samples"][:4], results["final"]["samples"][:4]))
            term.console.print(term.eval_table(results))
        for key, value in summary.items():
            term.console.print(f"{key}: {value['first']:+.4f} (first steps) -> {value['last']:+.4f} (last steps)")
        term.console.print(f"report: {self.run_dir / 'report.md'}")


def first_last_summary(
    metrics: list[dict[str, Any]],
    keys: tuple[str, ...] = (
        "objective/scores",
        "objective/gold_scores",
        "objective/kl",
        "response/length_mean",
        "response/eos_frac",
    ),
) -> dict[str, dict[str, float]]:
    """Mean of each key over the first and the last fifth of the run (at least one step each)."""
    if not metrics:
        return {}
    window = max(1, len(metrics) // 5)
    summary = {}
    for key in keys:
        values = [m[key] for m in metrics if m.get(key) is not None]
        if values:
            summary[key] = {
                "first": sum(values[:window]) / len(values[:window]),
                "last": sum(values[-window:]) / len(values[-window:]),
            }
    return summary
