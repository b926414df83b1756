"""What the two rollout stages, ppo and grpo, do the same way. Each stage calls these; none is a base
class. The stages keep their own advantages, losses and updates (stages/ppo.py, stages/grpo.py).

  load_policy_roles   the policy, its reference, the reward sources and the tokenizer
  training_prompts    the prompt file, encoded once
  sample_and_score    steps 1-4 of an iteration: prompts, sampling, old/reference log-probs, scores
  gather_batch        every process's scored rows as the one global batch (torchrun)
  batch_metrics       the per-iteration metrics both stages log under the same names
  UpdateGuard         an optimizer step that never applies a non-finite gradient
  Watcher             the fixed eval set, the alarms and the final report
  open_run / run_loop / write_checkpoint / restore_trainer_state: the run directory and the loop
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from tether import console as term
from tether.alarms import AlarmSettings, check_alarms
from tether.checkpoint import (
    atomic_dir,
    atomic_write_text,
    clear_run_dir,
    load_trainer_state,
    prune_step_checkpoints,
    remove_partial_checkpoints,
    save_trainer_state,
    step_dir_name,
)
from tether.config import OnlineConfig, save_config
from tether.core import masked_mean
from tether.data import Prompt, encode_prompts, load_prompts, shipped_data
from tether.errors import NumericalError
from tether.evaluation.metrics import distinct_n, top_opening_share
from tether.evaluation.runner import START, Evaluator, add_win_rates, eval_document, eval_metrics, evaluator_for
from tether.models import eos_token_ids, load_causal_lm, load_tokenizer
from tether.roles.batching import in_chunks
from tether.roles.policy import response_logprobs
from tether.roles.reference import Reference
from tether.roles.reward import RewardSources, reward_sources
from tether.rollout import Rollout, concat_rollouts, decode_responses, generate, pad_columns
from tether.runlog import RunLog, read_jsonl
from tether.runtime import (
    StopRequest,
    autocast,
    barrier,
    broadcast_trainable,
    gather_objects,
    is_main,
    restore_rng_states,
    rng_states_of_all_ranks,
    shared_generator,
    world,
)
from tether.stages.common import load_trainable, save_model

log = logging.getLogger(__name__)

SHIPPED_PROMPTS = "prompts.jsonl"


# --------------------------------------------------------------------------------------------
# Roles and one sampled, scored batch
# --------------------------------------------------------------------------------------------


@dataclass
class PolicyRoles:
    """The roles every rollout stage holds: the trained policy, the frozen reference, the scorers."""

    tokenizer: Any
    policy: Any
    reference: Reference
    rewards: RewardSources
    eos_ids: list[int]

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)


def load_policy_roles(config: OnlineConfig, resume_from: Path | None, device: torch.device) -> PolicyRoles:
    """The policy from the newest checkpoint when resuming, else from model.name. A LoRA policy's
    reference is the same weights with the adapter off (RLHF-DETAILS 17), else its own frozen copy."""
    cfg = config.model
    tokenizer = load_tokenizer(cfg.name, cfg.trust_remote_code)
    policy = load_trainable("causal", cfg.name, cfg.lora, tokenizer, resume_from, cfg.trust_remote_code).to(device)
    broadcast_trainable(policy)
    if cfg.lora is not None and cfg.ref_model is None:
        reference = Reference(lora_policy=policy)
    else:
        ref_model: Any = load_causal_lm(cfg.ref_model or cfg.name, tokenizer, cfg.trust_remote_code)
        reference = Reference(model=ref_model.to(device))
    return PolicyRoles(
        tokenizer, policy, reference, reward_sources(config, tokenizer, device), eos_token_ids(tokenizer, policy)
    )


def training_prompts(config: OnlineConfig, tokenizer: Any) -> tuple[list[Prompt], list[list[int]]]:
    """data.prompts (else the shipped preference-task prompts), and their token ids, encoded once."""
    prompts = load_prompts(config.data.prompts or shipped_data(SHIPPED_PROMPTS))
    return prompts, encode_prompts(tokenizer, prompts, config.data)


def first_step_reuses_old_pass(config: OnlineConfig, minibatch_size: int) -> bool:
    """Whether the first optimizer step's policy forward pass is the old log-probs' pass.

    It is when that step takes the whole rollout in one micro-batch in one process: same weights,
    same rows in the same order, same function. The old log-probs are then that pass's output
    detached, its graph is kept (`sample_and_score(keep_graph=True)`), and the first step
    backpropagates through it instead of running the policy again: one forward pass fewer per
    iteration, and the first step's ratio is exactly 1 by construction.
    """
    rollout_size = config.train.batch_size * config.rollout.samples_per_prompt
    micro = config.train.micro_batch_size or minibatch_size
    return world().size == 1 and minibatch_size == rollout_size and micro == rollout_size


def epoch_order(n: int, reuses_old_pass: bool, seed: int, step: int, epoch: int) -> Tensor:
    """The row order of an epoch: a fresh shuffle, the same in every process, except the first
    epoch of an update that reuses the old pass, whose one minibatch takes the rows in that pass's
    order (the same rows: only the order of a sum changes)."""
    if reuses_old_pass and epoch == 0:
        return torch.arange(n)
    return torch.randperm(n, generator=shared_generator(seed, step, epoch))


def step_logprobs(
    policy: Any,
    ids: Tensor,
    attn: Tensor,
    response_start: int,
    idx: Tensor,
    config: OnlineConfig,
    device: torch.device,
    reused: tuple[Tensor, ...] | None,
    value_head: Any = None,
) -> tuple[Tensor, ...]:
    """The policy's (len(idx), R) log-probs of rows `idx` for an update's loss, with grad, and the
    value head's (len(idx), R) values when there is one: `reused`, the old log-probs' pass itself,
    when the step reuses it (then idx is every row in order), else a fresh forward pass under the
    rollout temperature."""
    if reused is not None:
        return reused
    with autocast(device, config.model.dtype):
        return response_logprobs(
            policy, ids[idx], attn[idx], response_start, config.rollout.temperature, value_head=value_head
        )


@dataclass(frozen=True)
class ScoredBatch:
    """Steps 1-4 of an iteration, before any advantage: what was sampled and what it scored."""

    rollout: Rollout
    prompt_texts: list[str]  # (B,) the prompt each sequence answers
    responses: list[str]  # (B,) decoded, up to the first EOS
    old_logprobs: Tensor  # (B, R) policy log-probs at sampling time, under the rollout temperature
    entropy: Tensor  # (B, R) policy entropy at each response position
    ref_logprobs: Tensor  # (B, R) reference log-probs, same temperature
    scores: Tensor  # (B,) reward sources plus the missing-EOS penalty
    parts: dict[str, Tensor]  # each reward source's (B,) share, "gold" included
    values: Tensor | None = None  # (B, R) the value head's, when sample_and_score was given one
    # The old log-probs (and values) still attached to their autograd graph, when the caller asked
    # for it (`keep_graph`): the first update step (ppo, grpo) reuses that pass instead of repeating it.
    attached: tuple[Tensor, ...] | None = None

    @property
    def mask(self) -> Tensor:
        return self.rollout.response_mask  # (B, R) True on real response tokens


def sample_and_score(
    roles: PolicyRoles,
    config: OnlineConfig,
    prompts: list[Prompt],
    prompt_ids: list[list[int]],
    batch: list[int],
    device: torch.device,
    timer: Timer,
    keep_graph: bool = False,
    value_head: Any = None,
) -> ScoredBatch:
    """Sample `samples_per_prompt` responses to each prompt of `batch`, then score them.

    2. sample with the KV cache; each response is truncated after its first EOS
    3. old log-probs (+ entropy, + the values of `value_head`) and reference log-probs, without
       grad, at the sampling temperature (with `keep_graph` the old log-probs' pass records the
       graph: `attached`)
    4. scores: the reward sources on the decoded text (or token ids), plus the missing-EOS penalty
    """
    temperature = config.rollout.temperature
    micro = config.train.micro_batch_size
    with timer("rollout"), autocast(device, config.model.dtype):
        rollout, _ = generate(
            roles.policy,
            [prompt_ids[i] for i in batch],
            config.rollout.samples_per_prompt,
            config.rollout.max_new_tokens,
            temperature,
            roles.pad_id,
            roles.eos_ids,
        )
    rollout = dataclasses.replace(
        rollout, **{f.name: getattr(rollout, f.name).to(device) for f in dataclasses.fields(rollout)}
    )
    ids, attn, start = rollout.input_ids, rollout.attention_mask, rollout.response_start
    with torch.set_grad_enabled(keep_graph), autocast(device, config.model.dtype), timer("logprobs"):
        policy_logprobs, entropy, *head_values = in_chunks(
            lambda i, m: response_logprobs(roles.policy, i, m, start, temperature, True, value_head),
            ids,
            attn,
            micro,
        )
    old_logprobs = policy_logprobs.detach()
    values = head_values[0].detach() if head_values else None
    with torch.no_grad(), autocast(device, config.model.dtype), timer("ref"):
        (ref_logprobs,) = in_chunks(
            lambda i, m: (roles.reference.logprobs(i, m, start, temperature),), ids, attn, micro
        )
    prompt_texts = [prompts[batch[int(i)]].text for i in rollout.prompt_index]
    responses = decode_responses(roles.tokenizer, rollout, roles.eos_ids)
    with timer("score"):
        scores, parts = roles.rewards.score_rollout(rollout, prompt_texts, responses)
    attached = (policy_logprobs, *head_values) if keep_graph else None
    return ScoredBatch(
        rollout, prompt_texts, responses, old_logprobs, entropy, ref_logprobs, scores, parts, values, attached
    )


def gather_batch(scored: ScoredBatch, pad_id: int, *per_token: Tensor) -> tuple[ScoredBatch, list[Tensor]]:
    """Every process's scored rows, and any other (B, R) tensors of them (the values), as the one
    global batch in rank order. Each process then computes the same advantages, whitening and KL
    statistics from it as a single process would; only the forward and backward passes of the
    update are split. A single process gets its batch back unchanged."""
    if world().size == 1:
        return scored, list(per_token)
    device = scored.scores.device
    parts = gather_objects((_to_device(scored, torch.device("cpu")), [t.cpu() for t in per_token]))
    batches = [batch for batch, _ in parts]
    rollout = concat_rollouts([b.rollout for b in batches], pad_id)
    width = rollout.response_ids.shape[1]

    def rows(tensors: list[Tensor]) -> Tensor:
        return torch.cat([pad_columns(t, width, 0.0) for t in tensors])

    merged = ScoredBatch(
        rollout=rollout,
        prompt_texts=[text for b in batches for text in b.prompt_texts],
        responses=[text for b in batches for text in b.responses],
        old_logprobs=rows([b.old_logprobs for b in batches]),
        entropy=rows([b.entropy for b in batches]),
        ref_logprobs=rows([b.ref_logprobs for b in batches]),
        scores=torch.cat([b.scores for b in batches]),
        parts={name: torch.cat([b.parts[name] for b in batches]) for name in batches[0].parts},
    )
    extras = [rows([extra[i] for _, extra in parts]).to(device) for i in range(len(per_token))]
    return _to_device(merged, device), extras


def _to_device(scored: ScoredBatch, device: torch.device) -> ScoredBatch:
    rollout = dataclasses.replace(
        scored.rollout, **{f.name: getattr(scored.rollout, f.name).to(device) for f in dataclasses.fields(Rollout)}
    )
    tensors = {name: getattr(scored, name).to(device) for name in ("old_logprobs", "entropy", "ref_logprobs", "scores")}
    parts = {name: value.to(device) for name, value in scored.parts.items()}
    return dataclasses.replace(scored, rollout=rollout, parts=parts, **tensors)


def batch_metrics(scored: ScoredBatch, sequence_kl: Tensor, timer: Timer, device: torch.device) -> dict[str, float]:
    """What both stages log about a batch, under the same names (CONTRACT.md)."""
    rollout, scores = scored.rollout, scored.scores
    lengths = rollout.response_lengths.float()
    step_seconds = timer.total()
    metrics = {
        "objective/scores": float(scores.mean()),
        "objective/scores_std": float(scores.std()) if len(scores) > 1 else 0.0,
        "objective/kl": float(sequence_kl.mean()),
        "objective/entropy": float(masked_mean(scored.entropy, scored.mask)),
        "response/length_mean": float(lengths.mean()),
        "response/eos_frac": float(rollout.finished.float().mean()),
        "response/distinct_2": distinct_n(scored.responses, 2),
        "response/top_opening_share": top_opening_share(scored.responses),
        **{f"time/{name}_s": seconds for name, seconds in timer.seconds.items()},
        "time/step_s": step_seconds,
        "throughput/tokens_per_s": float(lengths.sum()) / step_seconds,
        "memory/peak_gb": peak_memory_gb(device),
    }
    for name, values_of_source in scored.parts.items():
        key = "objective/gold_scores" if name == "gold" else f"objective/{name}_scores"
        metrics[key] = float(values_of_source.mean())
    return metrics


def batch_samples(scored: ScoredBatch, sequence_kl: Tensor) -> list[dict[str, Any]]:
    """One row per response for samples.jsonl and the sample table."""
    lengths = scored.rollout.response_lengths.tolist()
    finished = scored.rollout.finished.tolist()
    return [
        {
            "prompt": scored.prompt_texts[i],
            "response": scored.responses[i],
            "score": float(scored.scores[i]),
            **{f"{name}_score": float(v[i]) for name, v in scored.parts.items()},
            "finished": bool(finished[i]),
            "length": int(lengths[i]),
            "kl": float(sequence_kl[i]),
        }
        for i in range(len(scored.rollout))
    ]


# --------------------------------------------------------------------------------------------
# Optimizer steps
# --------------------------------------------------------------------------------------------


class UpdateGuard:
    """Takes an optimizer step only when every clipped gradient norm is finite, and counts the rest."""

    def __init__(self) -> None:
        self.skipped_updates = 0  # optimizer steps skipped for a non-finite gradient, in all
        self.nonfinite_streak = 0  # ... and in a row, up to now
        self.last_nonfinite: dict[str, float] = {}

    def step(self, optimizer: torch.optim.Optimizer, stats: dict[str, float], step: int) -> None:
        """`stats` holds the minibatch's losses and `*/grad_norm` entries (already clipped)."""
        if all(math.isfinite(v) for k, v in stats.items() if k.endswith("grad_norm")):
            optimizer.step()
            self.nonfinite_streak = 0
        else:  # a non-finite gradient never reaches the weights
            self.skipped_updates += 1
            self.nonfinite_streak += 1
            self.last_nonfinite = dict(stats)
            log.warning("step %d: non-finite gradient, update skipped (%s)", step, describe_update(stats))

    def state_dict(self) -> dict[str, int]:
        return {"skipped_updates": self.skipped_updates, "nonfinite_streak": self.nonfinite_streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_updates = int(state["skipped_updates"])
        self.nonfinite_streak = int(state["nonfinite_streak"])


def clip_gradients(params: list[Tensor], max_norm: float | None) -> float:
    """Clip in place; the norm before clipping (inf or nan when the gradient is not finite)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    return float(norm)


def describe_update(stats: dict[str, float]) -> str:
    keys = ("loss/policy", "loss/value", "loss/kl", "policy/grad_norm", "val/grad_norm")
    return ", ".join(f"{k} {stats[k]:.4g}" for k in keys if k in stats)


# --------------------------------------------------------------------------------------------
# Watching the run: periodic evaluation, alarms, the final report
# --------------------------------------------------------------------------------------------


class Watcher:
    """The fixed eval set, the alarms and the report of one run."""

    @classmethod
    def for_run(
        cls, config: OnlineConfig, run_dir: Path, roles: PolicyRoles, device: torch.device, kl_target: float | None
    ) -> Watcher:
        """The watcher of a stage's run; eval.num_prompts=0 turns the eval set off."""
        evaluator = None
        if config.eval.num_prompts > 0:
            evaluator = evaluator_for(config, roles.tokenizer, roles.reference, roles.rewards, roles.eos_ids, device)
        return cls(config, run_dir, evaluator, roles.reference, kl_target)

    def __init__(
        self,
        config: OnlineConfig,
        run_dir: Path,
        evaluator: Evaluator | None,
        reference: Reference,
        kl_target: float | None,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.evaluator = evaluator
        self.reference = reference
        self.kl_target = kl_target  # the KL controller's target, which the KL alarm measures against
        self.active_alarms: set[str] = set()
        self._start_eval: dict[str, Any] | None = None  # the starting model's eval result, computed once

    def start_eval(self) -> dict[str, Any]:
        """The starting model (the reference) on the eval set; deterministic, so computed once."""
        assert self.evaluator is not None
        if self._start_eval is None:
            with self.reference.as_model() as start:
                self._start_eval = self.evaluator.evaluate(start, START)
        return self._start_eval

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
        cfg = self.config.alarms
        if not cfg.enabled:
            return {}
        settings = AlarmSettings(**{k: v for k, v in dataclasses.asdict(cfg).items() if k != "enabled"})
        alarms = check_alarms([*history, metrics], settings, self.kl_target)
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


# --------------------------------------------------------------------------------------------
# The run directory and the loop
# --------------------------------------------------------------------------------------------


def open_run(run_dir: Path, config: OnlineConfig, resumed_step: int | None) -> tuple[RunLog, list[dict[str, Any]]]:
    """Prepare the run directory once the models and state have loaded (so a mistake found while
    loading leaves an old run untouched). Returns the run log and every metric row so far."""
    barrier()  # every process has checked the run directory before the main one changes it
    if is_main():
        if resumed_step is None:
            clear_run_dir(run_dir)  # --overwrite, or --resume of a run with no checkpoint yet
        remove_partial_checkpoints(run_dir / "checkpoints")  # left by a process killed while saving
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    barrier()
    runlog = RunLog(run_dir, resume_step=resumed_step)
    history = read_jsonl(runlog.metrics_path) if resumed_step is not None else []
    return runlog, history


def write_checkpoint(
    checkpoints: Path,
    step: int,
    final: bool,
    models: dict[str, tuple[Any, str]],
    tokenizer: Any,
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """checkpoints/step-NNNNNN (or final/), written atomically; older step checkpoints pruned.

    models: subfolder ("" for the policy itself) -> (model, the base name a LoRA adapter points at).
    trainer_state is written to step checkpoints only (a final one is for using, not resuming).
    Every process calls this; the main one writes (the others' weights and state are the same),
    with every process's random-generator state.
    """
    target = checkpoints / ("final" if final else step_dir_name(step))
    rng = None if final else rng_states_of_all_ranks()
    if is_main():
        with atomic_dir(target) as tmp:
            for subfolder, (model, base_name) in models.items():
                save_model(model, tmp / subfolder if subfolder else tmp, tokenizer, base_name)
            if not final:
                save_trainer_state(tmp, {**trainer_state, "step": step, "rng": rng})
        if not final:
            prune_step_checkpoints(checkpoints, keep_last)
    barrier()  # nobody reads or resumes from a checkpoint before it is whole
    return target


def restore_trainer_state(folder: Path, parts: dict[str, Any], seed: int) -> dict[str, Any]:
    """Load each stateful part (optimizer, scheduler, sampler, guard, ...) from a checkpoint's
    trainer state, then the random generators; returns the whole state (its "step" included).
    The parts are the same in every process, so a checkpoint written by N processes resumes on M."""
    state = load_trainer_state(folder)
    for key, part in parts.items():
        part.load_state_dict(state[key])
    restore_rng_states(state["rng"], seed, int(state["step"]))  # last: loading models draws random numbers
    term.console.print(f"resuming from {folder} (step {state['step']})")
    return state


class OnlineStage(Protocol):
    """What run_loop needs of a stage: its state and one iteration."""

    run_dir: Path
    step: int
    policy: Any
    runlog: RunLog
    history: list[dict[str, Any]]
    watcher: Watcher
    guard: UpdateGuard

    @property
    def config(self) -> OnlineConfig: ...

    def iteration(self) -> tuple[dict[str, float], list[dict[str, Any]]]: ...

    def save_checkpoint(self, final: bool = False) -> Path: ...

    def nonfinite_diagnosis(self, checkpoint: Path) -> str: ...


def run_loop(name: str, stage: OnlineStage) -> Path:
    """Run the stage's remaining iterations, logging, evaluating, watching and checkpointing after
    each; returns the final checkpoint folder. A signal stops it after the current iteration."""
    cfg, cfg_eval = stage.config.train, stage.config.eval
    watcher = stage.watcher
    try:
        with StopRequest() as stop, term.progress_bar() as progress:
            task = progress.add_task(name, total=cfg.steps, completed=stage.step, status="")
            while stage.step < cfg.steps:
                stage.step += 1
                metrics, samples = stage.iteration()
                evaluate_now = cfg_eval.every and stage.step % cfg_eval.every == 0
                if watcher.evaluator is not None and evaluate_now and is_main():
                    metrics.update(watcher.periodic_eval(stage.policy, stage.step))
                metrics.update(watcher.watch(stage.history, metrics, stage.step, progress.console))
                stage.history.append({"step": stage.step, **metrics})
                stage.runlog.metrics(stage.step, metrics)
                progress.update(task, completed=stage.step, status=term.status_line(metrics))
                if cfg.sample_every and (stage.step % cfg.sample_every == 0 or stage.step == 1):
                    stage.runlog.samples(stage.step, samples)
                    progress.console.print(term.sample_table(stage.step, samples))
                saved = None
                if cfg.save_every and (stage.step % cfg.save_every == 0 or stage.step == cfg.steps):
                    saved = stage.save_checkpoint()  # the last step too, so a finished run can be extended
                if stage.guard.nonfinite_streak >= cfg.max_nonfinite_in_a_row:
                    raise NumericalError(stage.nonfinite_diagnosis(saved or stage.save_checkpoint()))
                if stop.requested():
                    raise stop.interruption(name, stage.step, saved or stage.save_checkpoint(), stage.run_dir)
        final = stage.save_checkpoint(final=True)
        if is_main():
            watcher.write_report(name, stage.policy, final, stage.history)
    finally:
        stage.runlog.close()
    return final


# --------------------------------------------------------------------------------------------


class Timer:
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


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


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
