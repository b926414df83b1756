"""PPO for language models: the four-role loop, read top to bottom.

    tether ppo --config configs/demo.yaml --output runs/demo
    PPOTrainer(load_config(PPOConfig, "configs/demo.yaml"), "runs/demo").train()

One iteration (`PPOTrainer.iteration`):
  1. draw a batch of prompts (seeded, resumable order)
  2. sample responses with the policy (KV cache), truncate each after its first EOS
  3. forward passes without grad: old log-probs and entropy (policy), reference log-probs, values
  4. score the responses (reward model / function), add the missing-EOS penalty
  5. per-token rewards: -kl_coef * KL_t on every token, plus the score on the last one
  6. GAE advantages and returns (rewards whitened first if asked), advantages whitened
  7. PPO epochs: fresh shuffle, minibatches, micro-batches, clipped losses, gradient clipping
  8. adapt the KL coefficient, log, checkpoint
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import resource
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tether import console as term
from tether.alarms import AlarmSettings, check_alarms
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
from tether.config import PPOConfig, save_config
from tether.core import (
    compute_gae,
    explained_variance,
    kl_per_token,
    make_kl_controller,
    masked_mean,
    masked_whiten,
    per_token_rewards,
)
from tether.core.losses import clipped_value_loss, ppo_policy_loss
from tether.data import PromptSampler, encode_prompts, load_prompts, shipped_data
from tether.errors import NumericalError
from tether.evaluation.metrics import distinct_n, top_opening_share
from tether.evaluation.runner import START, Evaluator, add_win_rates, eval_document, eval_metrics, evaluator_for
from tether.models import (
    eos_token_ids,
    load_causal_lm,
    load_tokenizer,
)
from tether.roles.batching import in_chunks
from tether.roles.policy import response_logprobs
from tether.roles.reference import Reference
from tether.roles.reward import reward_sources
from tether.roles.value import response_values
from tether.rollout import Rollout, decode_responses, generate
from tether.runlog import RunLog, read_jsonl
from tether.runtime import (
    StopRequest,
    autocast,
    pick_device,
    rng_state,
    seed_everything,
    set_rng_state,
    set_threads,
)
from tether.stages.common import load_trainable, make_optimizer, save_model

log = logging.getLogger(__name__)

SHIPPED_PROMPTS = "prompts.jsonl"


@dataclass(frozen=True)
class Experience:
    """What one rollout batch trains on. Computed from a Rollout; the Rollout itself is not changed."""

    rollout: Rollout
    old_logprobs: Tensor  # (B, R) policy log-probs at sampling time, under the rollout temperature
    values: Tensor  # (B, R) value estimates at sampling time
    advantages: Tensor  # (B, R) whitened GAE advantages (0 at padding)
    returns: Tensor  # (B, R) advantages + values before whitening (value targets)


class PPOTrainer:
    """The four roles, their optimizer and the run directory; `.train()` runs the loop."""

    def __init__(self, config: PPOConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False):
        self.config = config
        self.run_dir = Path(run_dir)
        self.checkpoints = self.run_dir / "checkpoints"
        # Checked first, changed last: a mistake found while loading leaves an old run untouched.
        resume_from = check_run_dir(self.run_dir, resume, overwrite)
        cfg = config

        set_threads(cfg.train.num_threads)
        seed_everything(cfg.train.seed)
        self.device = pick_device(cfg.train.device)

        # Roles. Weights come from the newest checkpoint when resuming, else from the config.
        self.tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.policy = self._load_policy(resume_from)
        self.eos_ids = eos_token_ids(self.tokenizer, self.policy)
        if cfg.model.lora is not None and cfg.model.ref_model is None:
            self.reference = Reference(lora_policy=self.policy)
        else:
            ref_model: Any = load_causal_lm(
                cfg.model.ref_model or cfg.model.name, self.tokenizer, cfg.model.trust_remote_code
            )
            self.reference = Reference(model=ref_model.to(self.device))
        self.value_model = self._load_value_model(resume_from)
        self.rewards = reward_sources(cfg, self.tokenizer, self.device)

        # Prompts, tokenized once.
        self.prompts = load_prompts(cfg.data.prompts or shipped_data(SHIPPED_PROMPTS))
        self.prompt_ids = encode_prompts(self.tokenizer, self.prompts, cfg.data)
        self.evaluator: Evaluator | None = None
        if cfg.eval.num_prompts > 0:
            self.evaluator = evaluator_for(cfg, self.tokenizer, self.reference, self.rewards, self.eos_ids, self.device)
        self._start_eval: dict[str, Any] | None = None  # the starting model's eval result, computed once
        self.sampler = PromptSampler(len(self.prompts), cfg.train.batch_size, cfg.train.seed)

        # Optimisation: one AdamW, a parameter group per trained model (each clipped on its own).
        self.policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        self.value_params = [p for p in self.value_model.parameters() if p.requires_grad]
        rollout_size = cfg.train.batch_size * cfg.rollout.samples_per_prompt
        self.optimizer, self.scheduler = make_optimizer(
            [
                {"params": self.policy_params, "lr": cfg.train.lr},
                {"params": self.value_params, "lr": cfg.train.value_lr or cfg.train.lr},
            ],
            cfg.train.adam_eps,
            cfg.train.weight_decay,
            cfg.train.lr_schedule,
            cfg.train.warmup_steps,
            cfg.train.steps * cfg.ppo.epochs * (rollout_size // cfg.ppo.minibatch_size),
        )
        self.kl_ctl = make_kl_controller(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
        self.step = 0
        self.skipped_updates = 0  # optimizer steps skipped for a non-finite gradient, in all
        self.nonfinite_streak = 0  # ... and in a row, up to now
        self.last_nonfinite: dict[str, float] = {}

        self.active_alarms: set[str] = set()
        if resume_from is not None:
            self._load_trainer_state(resume_from)
        else:
            clear_run_dir(self.run_dir)  # --overwrite, or --resume of a run with no checkpoint yet
        remove_partial_checkpoints(self.checkpoints)  # left by a process killed while saving
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")
        self.runlog = RunLog(self.run_dir, resume_step=self.step if resume_from is not None else None)
        # Every metric row so far: the alarms judge trends over it.
        self.history = read_jsonl(self.runlog.metrics_path) if resume_from is not None else []

    # ----------------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------------

    def train(self) -> Path:
        """Run the remaining iterations; returns the final checkpoint folder."""
        cfg, cfg_eval = self.config.train, self.config.eval
        try:
            with StopRequest() as stop, term.progress_bar() as progress:
                task = progress.add_task("ppo", total=cfg.steps, completed=self.step, status="")
                while self.step < cfg.steps:
                    self.step += 1
                    metrics, samples = self.iteration()
                    if self.evaluator is not None and cfg_eval.every and self.step % cfg_eval.every == 0:
                        metrics.update(self.periodic_eval())
                    metrics.update(self.watch(metrics, progress.console))
                    self.history.append({"step": self.step, **metrics})
                    self.runlog.metrics(self.step, metrics)
                    progress.update(task, completed=self.step, status=term.status_line(metrics))
                    if cfg.sample_every and (self.step % cfg.sample_every == 0 or self.step == 1):
                        self.runlog.samples(self.step, samples)
                        progress.console.print(term.sample_table(self.step, samples))
                    saved = None
                    if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == cfg.steps):
                        saved = self.save_checkpoint()  # the last step too, so a finished run can be extended
                    if self.nonfinite_streak >= cfg.max_nonfinite_in_a_row:
                        raise NumericalError(self._nonfinite_diagnosis(saved or self.save_checkpoint()))
                    if stop.signal_number is not None:
                        raise stop.interruption("ppo", self.step, saved or self.save_checkpoint(), self.run_dir)
            final = self.save_checkpoint(final=True)
            self.write_report(final)
        finally:
            self.runlog.close()
        return final

    def iteration(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """One PPO iteration: rollout, scoring, advantages, update. Returns (metrics, samples)."""
        cfg = self.config
        temperature = cfg.rollout.temperature
        timer = _Timer()

        # 1. A batch of prompts.
        batch = self.sampler.next_batch()

        # 2. Sample responses; each is truncated after its first EOS.
        with timer("rollout"), autocast(self.device, cfg.model.dtype):
            rollout, _ = generate(
                self.policy,
                [self.prompt_ids[i] for i in batch],
                cfg.rollout.samples_per_prompt,
                cfg.rollout.max_new_tokens,
                temperature,
                self.pad_id,
                self.eos_ids,
            )
        ids, attn, start = (
            rollout.input_ids.to(self.device),
            rollout.attention_mask.to(self.device),
            rollout.response_start,
        )
        mask = rollout.response_mask.to(self.device)  # (B, R)

        # 3. Old log-probs (+ entropy), reference log-probs and values: no grad, same temperature.
        with torch.no_grad(), autocast(self.device, cfg.model.dtype):
            with timer("logprobs"):
                old_logprobs, entropy = self._chunked(
                    lambda i, m: response_logprobs(self.policy, i, m, start, temperature, with_entropy=True),
                    ids,
                    attn,
                )
            with timer("ref"):
                (ref_logprobs,) = self._chunked(
                    lambda i, m: (self.reference.logprobs(i, m, start, temperature),), ids, attn
                )
            with timer("value"):
                (values,) = self._chunked(lambda i, m: (response_values(self.value_model, i, m, start),), ids, attn)

        # 4. Scores: the reward sources on the decoded text (or token ids), plus the EOS penalty.
        prompt_texts = [self.prompts[batch[int(i)]].text for i in rollout.prompt_index]
        responses = decode_responses(self.tokenizer, rollout, self.eos_ids)
        with timer("score"):
            scores, parts = self.rewards.score_rollout(rollout, prompt_texts, responses)
        finished = rollout.finished.tolist()

        # 5. Per-token rewards: the KL penalty on every token, the score on the last real one.
        kl = kl_per_token(old_logprobs, ref_logprobs, cfg.ppo.kl_estimator)  # (B, R)
        kl = torch.where(mask, kl, torch.zeros_like(kl))
        kl_coef = self.kl_ctl.value
        rewards = per_token_rewards(scores, kl, mask, kl_coef)

        # 6. Advantages. Rewards whitened without the mean shift, advantages with it (RLHF-DETAILS 11).
        if cfg.ppo.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = compute_gae(rewards, values, mask, cfg.ppo.gamma, cfg.ppo.lam)
        if cfg.ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        experience = Experience(rollout, old_logprobs, values, advantages, returns)

        # 7. PPO epochs over minibatches.
        lr = self.scheduler.get_last_lr()[0]
        with timer("train"):
            update_stats = self._update(experience)

        # 8. Adapt the KL coefficient to the per-sequence KL this batch showed.
        sequence_kl = kl.sum(dim=1)  # (B,)
        self.kl_ctl.update(float(sequence_kl.mean()), n_steps=len(rollout))

        lengths = rollout.response_lengths.float()
        step_seconds = timer.total()
        metrics = {
            "objective/scores": float(scores.mean()),
            "objective/scores_std": float(scores.std()) if len(scores) > 1 else 0.0,
            "objective/kl": float(sequence_kl.mean()),
            "objective/kl_coef": kl_coef,
            "objective/rlhf_reward": float((scores - kl_coef * sequence_kl).mean()),
            "objective/entropy": float(masked_mean(entropy, mask)),
            **update_stats,
            "val/explained_variance": float(explained_variance(values, returns, mask)),
            "val/mean": float(masked_mean(values, mask)),
            "response/length_mean": float(lengths.mean()),
            "response/eos_frac": float(rollout.finished.float().mean()),
            "response/distinct_2": distinct_n(responses, 2),
            "response/top_opening_share": top_opening_share(responses),
            "lr": lr,
            **{f"time/{name}_s": seconds for name, seconds in timer.seconds.items()},
            "time/step_s": step_seconds,
            "throughput/tokens_per_s": float(lengths.sum()) / step_seconds,
            "memory/peak_gb": _peak_memory_gb(self.device),
            "train/skipped_updates": float(self.skipped_updates),
        }
        for name, values_of_source in parts.items():
            key = "objective/gold_scores" if name == "gold" else f"objective/{name}_scores"
            metrics[key] = float(values_of_source.mean())

        samples = [
            {
                "prompt": prompt_texts[i],
                "response": responses[i],
                "score": float(scores[i]),
                **{f"{name}_score": float(v[i]) for name, v in parts.items()},
                "finished": bool(finished[i]),
                "length": int(lengths[i]),
                "kl": float(sequence_kl[i]),
            }
            for i in range(len(rollout))
        ]
        return metrics, samples

    def _update(self, exp: Experience) -> dict[str, float]:
        """PPO epochs of shuffled minibatches; every minibatch is one optimizer step.

        A minibatch is processed in micro-batches whose losses are normalised by the minibatch's
        token count, so the accumulated gradient equals the whole minibatch's (RLHF-DETAILS 13).
        """
        cfg = self.config
        rollout = exp.rollout
        ids = rollout.input_ids.to(self.device)
        attn = rollout.attention_mask.to(self.device)
        mask = rollout.response_mask.to(self.device)
        start = rollout.response_start
        n = len(rollout)
        micro = cfg.train.micro_batch_size or cfg.ppo.minibatch_size
        totals: dict[str, float] = defaultdict(float)
        num_minibatches = 0
        for _epoch in range(cfg.ppo.epochs):
            order = torch.randperm(n)  # a fresh shuffle per epoch
            for mb_start in range(0, n, cfg.ppo.minibatch_size):
                minibatch = order[mb_start : mb_start + cfg.ppo.minibatch_size].to(self.device)
                token_count = mask[minibatch].sum()
                self.optimizer.zero_grad(set_to_none=True)
                stats: dict[str, float] = defaultdict(float)
                for micro_start in range(0, len(minibatch), micro):
                    idx = minibatch[micro_start : micro_start + micro]
                    with autocast(self.device, cfg.model.dtype):
                        (new_logprobs,) = response_logprobs(
                            self.policy, ids[idx], attn[idx], start, cfg.rollout.temperature
                        )
                        new_values = response_values(self.value_model, ids[idx], attn[idx], start)
                    pg_loss, pg_stats = ppo_policy_loss(
                        new_logprobs,
                        exp.old_logprobs[idx],
                        exp.advantages[idx],
                        mask[idx],
                        cfg.ppo.clip_coef,
                        token_count,
                    )
                    vf_loss, vf_stats = clipped_value_loss(
                        new_values,
                        exp.values[idx],
                        exp.returns[idx],
                        mask[idx],
                        cfg.ppo.value_clip,
                        token_count,
                    )
                    (pg_loss + cfg.ppo.vf_coef * vf_loss).backward()
                    stats["loss/policy"] += float(pg_loss.detach())
                    stats["loss/value"] += float(vf_loss.detach())
                    for key, value in {**pg_stats, **vf_stats}.items():
                        stats[key] += float(value)
                stats["policy/grad_norm"] = self._clip(self.policy_params)
                stats["val/grad_norm"] = self._clip(self.value_params)
                if math.isfinite(stats["policy/grad_norm"]) and math.isfinite(stats["val/grad_norm"]):
                    self.optimizer.step()
                    self.nonfinite_streak = 0
                else:  # a non-finite gradient never reaches the weights
                    self.skipped_updates += 1
                    self.nonfinite_streak += 1
                    self.last_nonfinite = dict(stats)
                    log.warning("step %d: non-finite gradient, update skipped (%s)", self.step, _describe(stats))
                self.scheduler.step()  # the schedule counts step slots, skipped ones included
                for key, number in stats.items():
                    totals[key] += number
                num_minibatches += 1
        return {key: value / num_minibatches for key, value in totals.items()}

    # ----------------------------------------------------------------------------------------
    # Helpers
    # ----------------------------------------------------------------------------------------

    def _nonfinite_diagnosis(self, checkpoint: Path) -> str:
        cfg = self.config.train
        bad = [name for name in ("policy", "val") if not math.isfinite(self.last_nonfinite.get(f"{name}/grad_norm", 0))]
        which = " and ".join({"policy": "the policy", "val": "the value model"}[n] for n in bad) or "a model"
        return (
            f"stopped at step {self.step}: the last {self.nonfinite_streak} optimizer steps had a non-finite "
            f"gradient in {which} ({_describe(self.last_nonfinite)}), so none was applied and the weights are "
            f"the last finite ones, saved to {checkpoint}. This usually means a learning rate that is too high "
            f"(train.lr={cfg.lr}, train.value_lr={cfg.value_lr}), a reward on a much larger scale than the "
            "value model can follow (try ppo.whiten_rewards=true), or train.max_grad_norm=null. Fix the "
            f"cause and continue with: tether ppo --resume --output {self.run_dir}"
        )

    def _chunked(self, fn: Any, ids: Tensor, attn: Tensor) -> tuple[Tensor, ...]:
        return in_chunks(fn, ids, attn, self.config.train.micro_batch_size)

    def _clip(self, params: list[Tensor]) -> float:
        max_norm = self.config.train.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        return float(norm)

    def _load_policy(self, resume_from: Path | None) -> Any:
        cfg = self.config.model
        policy = load_trainable("causal", cfg.name, cfg.lora, self.tokenizer, resume_from, cfg.trust_remote_code)
        return policy.to(self.device)

    def _value_source(self) -> str:
        return self.config.model.value_model or self.config.reward.model or self.config.model.name

    def _load_value_model(self, resume_from: Path | None) -> Any:
        cfg = self.config.model
        saved = resume_from / "value" if resume_from else None
        value = load_trainable("scalar", self._value_source(), cfg.lora, self.tokenizer, saved, cfg.trust_remote_code)
        return value.to(self.device)

    # ----------------------------------------------------------------------------------------
    # Checkpoints and the report
    # ----------------------------------------------------------------------------------------

    def save_checkpoint(self, final: bool = False) -> Path:
        """Write checkpoints/step-NNNNNN (or final/) atomically; prune old step checkpoints."""
        target = self.checkpoints / ("final" if final else step_dir_name(self.step))
        with atomic_dir(target) as tmp:
            save_model(self.policy, tmp, self.tokenizer, self.config.model.name)
            save_model(self.value_model, tmp / "value", self.tokenizer, self._value_source())
            if not final:
                save_trainer_state(
                    tmp,
                    {
                        "step": self.step,
                        "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(),
                        "kl_controller": self.kl_ctl.state_dict(),
                        "sampler": self.sampler.state_dict(),
                        "skipped_updates": self.skipped_updates,
                        "nonfinite_streak": self.nonfinite_streak,
                        "rng": rng_state(),
                    },
                )
        if not final:
            prune_step_checkpoints(self.checkpoints, self.config.train.keep_last)
        return target

    def _load_trainer_state(self, folder: Path) -> None:
        state = load_trainer_state(folder)
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.sampler.load_state_dict(state["sampler"])
        self.skipped_updates = int(state["skipped_updates"])
        self.nonfinite_streak = int(state["nonfinite_streak"])
        set_rng_state(state["rng"])  # last: loading models above may draw random numbers
        term.console.print(f"resuming from {folder} (step {self.step})")

    # ----------------------------------------------------------------------------------------
    # Watching the run: periodic evaluation, alarms, the final report
    # ----------------------------------------------------------------------------------------

    def start_eval(self) -> dict[str, Any]:
        """The starting model (the reference) on the eval set; deterministic, so computed once."""
        assert self.evaluator is not None
        if self._start_eval is None:
            with self.reference.as_model() as start:
                self._start_eval = self.evaluator.evaluate(start, START)
        return self._start_eval

    def periodic_eval(self) -> dict[str, float]:
        """The policy on the fixed eval set now: eval/* metrics, and the full result in eval/step-N.json."""
        assert self.evaluator is not None
        results = {START: self.start_eval(), "policy": self.evaluator.evaluate(self.policy, f"step-{self.step}")}
        add_win_rates(results, START, self.config.eval.tie_margin)
        document = eval_document(self.config.eval, self.evaluator, results, {"policy": f"step {self.step}"})
        atomic_write_text(self.run_dir / "eval" / f"{step_dir_name(self.step)}.json", json.dumps(document, indent=2))
        return eval_metrics(results["policy"])

    def watch(self, metrics: dict[str, float], console: Any) -> dict[str, float]:
        """Alarms active after this step, as alarm/<key> = 1 metrics; new ones are printed once."""
        cfg = self.config.alarms
        if not cfg.enabled:
            return {}
        settings = AlarmSettings(**{k: v for k, v in dataclasses.asdict(cfg).items() if k != "enabled"})
        alarms = check_alarms([*self.history, metrics], settings, self.config.ppo.kl_target)
        for alarm in alarms:
            if alarm.key not in self.active_alarms:
                console.print(term.alarm_panel(self.step, alarm))
        self.active_alarms = {a.key for a in alarms}
        return {f"alarm/{a.key}": 1.0 for a in alarms}

    def write_report(self, final_dir: Path) -> None:
        """The starting model and the trained policy on the eval set (eval/eval.json), the run's
        first-vs-last metrics, and the per-prompt outputs side by side (report.md and the console)."""
        summary = _first_last_summary(self.history)
        results: dict[str, dict[str, Any]] = {}
        if self.evaluator is not None:
            results = {START: self.start_eval(), "final": self.evaluator.evaluate(self.policy, "final")}
            add_win_rates(results, START, self.config.eval.tie_margin)
            document = eval_document(self.config.eval, self.evaluator, results, {"final": str(final_dir)})
            atomic_write_text(self.run_dir / "eval" / "eval.json", json.dumps(document, indent=2))
        atomic_write_text(self.run_dir / "report.md", term.report_markdown(self.run_dir, summary, results))
        if results:
            term.console.print(term.before_after_table(results[START]["samples"][:4], results["final"]["samples"][:4]))
            term.console.print(term.eval_table(results))
        for key, value in summary.items():
            term.console.print(f"{key}: {value['first']:+.4f} (first steps) -> {value['last']:+.4f} (last steps)")
        term.console.print(f"report: {self.run_dir / 'report.md'}")


# --------------------------------------------------------------------------------------------


class _Timer:
    """Wall-clock seconds per named phase of an iteration."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def total(self) -> float:
        return time.perf_counter() - self._start


def _describe(stats: dict[str, float]) -> str:
    keys = ("loss/policy", "loss/value", "policy/grad_norm", "val/grad_norm")
    return ", ".join(f"{k} {stats[k]:.4g}" for k in keys if k in stats)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _first_last_summary(
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
