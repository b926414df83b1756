"""Judge models on the fixed eval set with fixed, seeded generation settings.

    tether eval runs/demo                                  # its final model and its starting model
    tether eval runs/demo/checkpoints/step-000006 smollm2-135m-instruct --config configs/demo.yaml --output out/

Every target answers the same prompts with the same settings and the same seed; its responses
are scored by every reward source, and its KL to the reference is estimated on its own samples.
Win rates compare each target with the baseline (the starting model) prompt by prompt.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tether.config import ConfigError, EvalConfig, OnlineConfig, RemoteRewardConfig, SpeedConfig
from tether.core import kl_per_token
from tether.data import Prompt, encode_prompts, load_prompts, shipped_data
from tether.engines.vllm import VLLMEngine
from tether.episodes import Episodes
from tether.evaluation.batch import episode_fields
from tether.evaluation.metrics import (
    distinct_n,
    self_similarity,
    spread,
    top_opening_share,
    top_openings,
    win_rate,
)
from tether.loading.functions import load_scorer
from tether.loading.models import (
    ModelNotFoundError,
    eos_token_ids,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)
from tether.loading.roles import load_episodes, load_rewards
from tether.passes import hold_weights
from tether.roles.policy import response_logprobs
from tether.roles.reference import Reference
from tether.roles.reward import RewardSources, call_function
from tether.runtime import autocast, pick_device
from tether.sampling import decode_responses, turn_sampler
from tether.trajectory import Trajectory

SHIPPED_EVAL_PROMPTS = "eval_prompts.jsonl"
START = "start"  # the name the starting model (the reference) gets in every evaluation


class Evaluator:
    """The eval prompts, the reference, the reward sources and the judge, ready to judge models."""

    def __init__(
        self,
        settings: EvalConfig,
        tokenizer: Any,
        reference: Reference | None,
        rewards: RewardSources,
        prompts: list[Prompt],
        prompt_ids: list[list[int]],
        max_new_tokens: int,
        eos_ids: list[int],
        device: torch.device,
        dtype: str,
        speed: SpeedConfig,
        engine: VLLMEngine | None = None,
        episodes: Episodes | None = None,
    ) -> None:
        self.settings = settings
        self.episodes = episodes  # rollout.environment: every eval prompt is a whole episode
        self.speed = speed
        self.engine = engine  # rollout.engine=vllm: the eval set is sampled where the rollouts are
        self.tokenizer = tokenizer
        self.reference = reference
        self.rewards = rewards
        self.prompts = prompts
        self.prompt_ids = prompt_ids
        self.max_new_tokens = settings.max_new_tokens or max_new_tokens
        self.device = device
        self.dtype = dtype
        self.eos_ids = eos_ids
        self.judge_name = _judge_name(settings.judge, rewards)
        service = RemoteRewardConfig.from_section(rewards.config)  # a judge URL is asked as reward.url is
        self.judge_function = load_scorer(self.judge_name, service) if ":" in self.judge_name else None

    @torch.no_grad()
    def evaluate(self, model: Any, name: str) -> dict[str, Any]:
        """Generate, score and measure one model. returns a JSON-ready result with per-prompt samples."""
        started = time.perf_counter()
        temperature = self.settings.temperature
        if self.engine is not None:  # seeded by eval.seed: every model draws the same numbers there too
            hold_weights(self.engine, model, name, self.prompt_ids[0], self.dtype, self.speed)
            rollout, _ = self.engine.generate(self.prompt_ids, 1, self.max_new_tokens, temperature, self.settings.seed)
        else:
            # A private RNG stream: the same outputs for the same seed, and the caller's (training) RNG
            # is left exactly where it was, so evaluating inside a run does not change the run.
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(self.settings.seed)
                with autocast(self.device, self.dtype):
                    rollout = self._sample(model, temperature)
        prompt_texts = [p.text for p in self.prompts]
        rollout = dataclasses.replace(
            rollout,
            prompts=tuple(prompt_texts),
            responses=rollout.responses or decode_responses(self.tokenizer, rollout, self.eos_ids),
        )
        texts = list(rollout.responses)
        scores, parts = self.rewards.score_trajectory(rollout)
        judge = self._judge_scores(scores, parts, prompt_texts, texts, rollout.finished.tolist())
        kl = self._sequence_kl(model, rollout) if temperature > 0 and self.reference is not None else None

        lengths = rollout.response_lengths.tolist()
        result: dict[str, Any] = {
            "name": name,
            "scores": {"reward": spread(scores.tolist()), **{k: spread(v.tolist()) for k, v in parts.items()}},
            "judge": {"name": self.judge_name, **spread(judge.tolist())},
            "kl": spread(kl.tolist()) if kl is not None else None,
            "length": spread([float(x) for x in lengths]),
            "eos_rate": float(rollout.finished.float().mean()),
            "distinct_1": distinct_n(texts, 1),
            "distinct_2": distinct_n(texts, 2),
            "self_similarity": self_similarity(texts),
            "top_opening_share": top_opening_share(texts),
            "top_openings": top_openings(texts),
            "seconds": time.perf_counter() - started,
            "samples": [
                {
                    "prompt": prompt_texts[i],
                    **episode_fields(rollout, i),
                    "score": float(scores[i]),
                    **{f"{k}_score": float(v[i]) for k, v in parts.items()},
                    "judge": float(judge[i]),
                    "finished": bool(rollout.finished[i]),
                    "length": int(lengths[i]),
                    **({"kl": float(kl[i])} if kl is not None else {}),
                }
                for i in range(len(texts))
            ],
        }
        return result

    def _sample(self, model: Any, temperature: float) -> Trajectory:
        """One response (or episode) per eval prompt from transformers' generate."""

        pad_id = int(self.tokenizer.pad_token_id)
        turn = turn_sampler(model, pad_id, self.eos_ids, self.max_new_tokens, temperature, self.speed)
        if self.episodes is not None:
            return self.episodes.run(turn, [p.text for p in self.prompts], self.prompt_ids, 1)
        return turn(self.prompt_ids, 1)[0]

    def check_judge(self, trajectory: Trajectory) -> None:
        """Call a judge function once (a run's pre-flight probe): a failure or an unusable result is
        a RewardError naming it, before training, not after it."""
        if self.judge_function is not None:
            prompts, texts = list(trajectory.prompts), list(trajectory.responses)
            call_function(self.judge_function, self.judge_name, prompts, texts, finished=trajectory.finished.tolist())

    def _judge_scores(
        self, scores: Tensor, parts: dict[str, Tensor], prompts: list[str], texts: list[str], finished: list[bool]
    ) -> Tensor:
        if self.judge_name == "reward":
            return scores.cpu()
        if self.judge_name == "gold":
            return parts["gold"]
        assert self.judge_function is not None
        return call_function(self.judge_function, self.judge_name, prompts, texts, finished=finished)

    def _sequence_kl(self, model: Any, rollout: Trajectory) -> Tensor:
        """Per response: sum over its tokens of the k3 estimate of KL(model || reference), in nats,
        under the eval temperature. k3 is unbiased and never negative per token, so a small eval set
        gives a usable number. (B,)"""
        ids, attn = rollout.input_ids.to(self.device), rollout.attention_mask.to(self.device)
        start, temperature = rollout.response_start, self.settings.temperature
        with autocast(self.device, self.dtype):
            (logprobs,) = response_logprobs(model, ids, attn, start, temperature, speed=self.speed)
            assert self.reference is not None
            ref_logprobs = self.reference.logprobs(ids, attn, start, temperature, self.speed)
        kl = kl_per_token(logprobs, ref_logprobs, "k3")
        mask = rollout.mask.to(self.device)  # the model's tokens: an episode's tool output is not its choice
        return torch.where(mask, kl, torch.zeros_like(kl)).sum(dim=1).cpu()


def add_win_rates(results: dict[str, dict[str, Any]], baseline: str, tie_margin: float) -> None:
    """Each result gets `win_rate` against the baseline's responses to the same prompts."""
    baseline_judge = [s["judge"] for s in results[baseline]["samples"]]
    for result in results.values():
        judge = [s["judge"] for s in result["samples"]]
        result["win_rate"] = {"vs": baseline, **win_rate(judge, baseline_judge, tie_margin).as_dict()}


def eval_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of one eval result, as eval/* metrics for metrics.jsonl."""
    metrics = {
        "eval/score": result["scores"]["reward"]["mean"],
        "eval/win_rate": result["win_rate"]["rate"],
        "eval/length_mean": result["length"]["mean"],
        "eval/eos_frac": result["eos_rate"],
        "eval/distinct_2": result["distinct_2"],
        "eval/self_similarity": result["self_similarity"],
        "eval/top_opening_share": result["top_opening_share"],
    }
    if "gold" in result["scores"]:
        metrics["eval/gold_score"] = result["scores"]["gold"]["mean"]
    if result["kl"] is not None:
        metrics["eval/kl"] = result["kl"]["mean"]
    return metrics


def _judge_name(setting: str, rewards: RewardSources) -> str:
    """eval.judge 'auto': the gold judge when one is configured, else the training reward."""
    if setting == "auto":
        return "gold" if rewards.gold is not None else "reward"
    if setting == "gold" and rewards.gold is None:
        raise ConfigError("eval.judge is 'gold' but reward.gold is not set")
    return setting


# --------------------------------------------------------------------------------------------
# `tether eval`: models named on the command line
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str  # how it is shown: the run folder's name, or the checkpoint / model as given
    model: str  # what load_causal_lm loads
    run_dir: Path | None  # set when the target is a run directory (its training curves exist)


def resolve_target(spec: str) -> Target:
    """A run directory means its final model; anything else is a checkpoint folder or model name."""
    path = Path(spec)
    if (path / "metrics.jsonl").is_file() or (path / "checkpoints").is_dir():
        final = path / "checkpoints" / "final"
        if not final.is_dir():
            raise ModelNotFoundError(f"run {spec!r} has no checkpoints/final yet; name a step checkpoint instead")
        return Target(path.resolve().name, str(final), path)
    if path.parent.name == "checkpoints" and path.parent.parent.is_dir():  # RUN/checkpoints/step-N
        return Target(f"{path.parent.parent.name}/{path.name}", spec, None)
    return Target(spec, spec, None)


def resolve_targets(specs: list[str]) -> list[Target]:
    """Targets for the command line, each with a distinct name (and never the name 'start')."""
    targets = []
    taken = {START}
    for spec in specs:
        target = resolve_target(spec)
        name, n = target.name, 2
        while name in taken:
            name, n = f"{target.name} ({n})", n + 1
        taken.add(name)
        targets.append(Target(name, target.model, target.run_dir))
    return targets


def build_evaluator(config: OnlineConfig, device: torch.device | None = None) -> Evaluator:
    """An evaluator for a config: its tokenizer, starting model as reference, rewards and eval prompts."""
    device = device or pick_device(config.train.device)
    tokenizer = load_tokenizer(config.model.name, config.model.trust_remote_code)
    reference_model: Any = load_causal_lm(
        config.model.ref_model or config.model.name, tokenizer, config.model.trust_remote_code
    )
    reference = Reference(model=reference_model.to(device))
    rewards = load_rewards(config, tokenizer, device)
    eos_ids = eos_token_ids(tokenizer, reference_model)
    episodes = load_episodes(config, tokenizer, eos_ids)
    return evaluator_for(config, tokenizer, reference, rewards, eos_ids, device, episodes=episodes)


def evaluator_for(
    config: OnlineConfig,
    tokenizer: Any,
    reference: Reference | None,
    rewards: RewardSources,
    eos_ids: list[int],
    device: torch.device,
    engine: VLLMEngine | None = None,
    episodes: Episodes | None = None,
) -> Evaluator:
    """An evaluator over the config's eval prompts, judging with roles the caller already holds."""
    prompts = load_prompts(config.data.eval or shipped_data(SHIPPED_EVAL_PROMPTS))[: config.eval.num_prompts]
    return Evaluator(
        config.eval,
        tokenizer,
        reference,
        rewards,
        prompts,
        encode_prompts(tokenizer, prompts, config.data),
        config.rollout.max_new_tokens,
        eos_ids,
        device,
        config.model.dtype,
        config.speed,
        engine,
        episodes,
    )


def evaluate_targets(config: OnlineConfig, targets: list[Target]) -> dict[str, Any]:
    """The starting model and every target on the same eval set; JSON-ready, win rates included."""
    for target in targets:  # every target is found before the first is evaluated
        resolve_model_path(target.model)
    evaluator = build_evaluator(config)
    results: dict[str, dict[str, Any]] = {}
    assert evaluator.reference is not None  # build_evaluator always loads the starting model
    with evaluator.reference.as_model() as start:
        results[START] = evaluator.evaluate(start, START)
    for target in targets:
        model: Any = load_causal_lm(target.model, evaluator.tokenizer, config.model.trust_remote_code)
        results[target.name] = evaluator.evaluate(model.to(evaluator.device), target.name)
        del model
    add_win_rates(results, START, config.eval.tie_margin)
    return eval_document(config.eval, evaluator, results, {t.name: t.model for t in targets})


def eval_document(
    settings: EvalConfig, evaluator: Evaluator, results: dict[str, Any], models: dict[str, str]
) -> dict[str, Any]:
    return {
        "settings": {
            "prompts": len(evaluator.prompts),
            "temperature": settings.temperature,
            "max_new_tokens": evaluator.max_new_tokens,
            "seed": settings.seed,
            "judge": evaluator.judge_name,
            "tie_margin": settings.tie_margin,
            "baseline": START,
        },
        "models": {START: "the starting model (the reference)", **models},
        "results": results,
    }
