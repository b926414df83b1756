"""What every rollout stage logs about its sampled batch, under the same names (docs/run-directory.md)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tether.core import masked_mean
from tether.episodes import ASSISTANT, TOOL, transcript
from tether.evaluation.metrics import distinct_n, top_opening_share
from tether.run.log import Timer, peak_memory_gb
from tether.trajectory import Trajectory


def batch_metrics(trajectory: Trajectory, sequence_kl: Tensor, timer: Timer, device: torch.device) -> dict[str, float]:
    scores = trajectory.scores
    lengths = trajectory.response_lengths.float()
    step_seconds = timer.total()
    metrics = {
        "objective/scores": float(scores.mean()),
        "objective/scores_std": float(scores.std()) if len(scores) > 1 else 0.0,
        "objective/kl": float(sequence_kl.mean()),
        "objective/entropy": float(masked_mean(trajectory.entropy, trajectory.mask)),
        "response/length_mean": float(lengths.mean()),
        "response/eos_frac": float(trajectory.finished.float().mean()),
        "response/distinct_2": distinct_n(list(trajectory.responses), 2),
        "response/top_opening_share": top_opening_share(list(trajectory.responses)),
        **{f"time/{name}_s": seconds for name, seconds in timer.seconds.items()},
        "time/step_s": step_seconds,
        "throughput/tokens_per_s": float(lengths.sum()) / step_seconds,
        "memory/peak_gb": peak_memory_gb(device),
    }
    for name, values_of_source in trajectory.score_parts.items():
        key = "objective/gold_scores" if name == "gold" else f"objective/{name}_scores"
        metrics[key] = float(values_of_source.mean())
    if trajectory.episodes:
        metrics.update(episode_metrics(trajectory))
    if trajectory.sample_logprobs.numel() and trajectory.old_logprobs.numel():
        metrics.update(sampler_gap(trajectory.sample_logprobs, trajectory.old_logprobs, trajectory.mask))
    return metrics


def sampler_gap(sampled: Tensor, trained: Tensor, mask: Tensor) -> dict[str, float]:
    """How far the sampler's log-probs are from the trainer's at the same weights, over the sampled
    tokens: the mean and largest absolute gap, and the k3 estimate of KL(sampler || trainer) (the
    tokens are the sampler's draws; k3 = r - 1 - log r with r = pi_train / pi_sample)."""
    if not mask.any():
        return {}
    gap = (sampled.float() - trained.float())[mask]
    log_ratio = -gap  # log pi_train - log pi_sample
    return {
        "rollout/logprob_gap_mean": float(gap.abs().mean()),
        "rollout/logprob_gap_max": float(gap.abs().max()),
        "rollout/sampler_kl": float((torch.expm1(log_ratio) - log_ratio).mean()),
    }


def episode_metrics(trajectory: Trajectory) -> dict[str, float]:
    """What multi-turn episodes did: model turns, tool outputs read and their tokens, per episode."""
    turns = [sum(role == ASSISTANT for role, _ in episode) for episode in trajectory.episodes]
    tools = [sum(role == TOOL for role, _ in episode) for episode in trajectory.episodes]
    return {
        "episode/turns_mean": sum(turns) / len(turns),
        "episode/tool_results_mean": sum(tools) / len(tools),
        "episode/tool_tokens_mean": float(trajectory.tool_mask.sum(dim=1).float().mean()),
        "episode/model_tokens_mean": float(trajectory.mask.sum(dim=1).float().mean()),
    }


def episode_fields(trajectory: Trajectory, row: int) -> dict[str, Any]:
    """A sample's text for people: the response, or a whole episode with each of its turns."""
    if not trajectory.episodes:
        return {"response": trajectory.responses[row]}
    turns = trajectory.episodes[row]
    return {"response": transcript(turns), "episode": [{"role": role, "content": text} for role, text in turns]}


def batch_samples(trajectory: Trajectory, sequence_kl: Tensor) -> list[dict[str, Any]]:
    """One row per response (or whole episode) for samples.jsonl and the sample table."""
    lengths = trajectory.response_lengths.tolist()
    finished = trajectory.finished.tolist()
    return [
        {
            "prompt": trajectory.prompts[i],
            **episode_fields(trajectory, i),
            "score": float(trajectory.scores[i]),
            **{f"{name}_score": float(v[i]) for name, v in trajectory.score_parts.items()},
            "finished": bool(finished[i]),
            "length": int(lengths[i]),
            "kl": float(sequence_kl[i]),
        }
        for i in range(len(trajectory))
    ]
