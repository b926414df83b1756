"""The critic-free family: PPO's clipped update with no value model, the baseline taken from the other
responses to the same prompt (GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline, DAPO, GSPO) or from the
whole batch (REINFORCE++). Every choice is a key of the `grpo` section.

    tether grpo --config configs/grpo-arithmetic.yaml --output runs/grpo
    GRPOTrainer(load_config(GRPOConfig, "configs/grpo-arithmetic.yaml"), "runs/grpo").train()

One iteration (`GRPOTrainer.iteration`):
  1. draw a batch of prompts (seeded, resumable order)
  2. sample rollout.samples_per_prompt responses to each (a group), truncate each after its first EOS;
     with grpo.dynamic_sampling, score them now, keep the groups whose scores differ and sample more
     prompts until the batch is full (DAPO)
  3. forward passes without grad: old log-probs and entropy (policy), reference log-probs (none with
     grpo.kl_in=none); the policy's keeps its graph when the first update step reuses it, as in ppo
  4. score the responses (reward sources, the missing-EOS penalty, DAPO's overlong shaping)
  5. grpo.kl_in=reward only: the KL to the reference into the score (per token for reinforce_pp)
  6. advantages by grpo.estimator
  7. epochs of shuffled minibatches: the policy loss (clipped token ratio or GSPO's sequence ratio),
     plus kl_coef * k3 KL to the reference when grpo.kl_in=loss, aggregated by grpo.loss_aggregation
  8. log
The run around it is the one loop of every stage (run/loop.py).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tether.config import GRPOConfig
from tether.console import StatusKeys
from tether.core import (
    aggregate,
    clipped_policy_loss,
    group_advantages,
    gspo_policy_loss,
    informative_groups,
    kl_per_token,
    loss_normaliser,
    overlong_penalty,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    spread_over_tokens,
)
from tether.data import PromptSampler, encode_prompts, load_prompts, shipped_data
from tether.evaluation.batch import batch_metrics, batch_samples
from tether.evaluation.watcher import Watcher
from tether.loading.roles import load_rollout_roles
from tether.optim import UpdateGuard, describe_update, make_optimizer, minibatches, take_step
from tether.passes import (
    OldPass,
    hold_weights,
    importance_weights,
    policy_pass,
    probe_scorers,
    reference_pass,
    sample_batch,
    score_batch,
    start_engine,
    update_logprobs,
)
from tether.run.checkpoints import Stateful
from tether.run.log import Timer
from tether.run.loop import Run
from tether.runtime import is_main, require_divisible, shard
from tether.speed.old_pass import reuses_old_pass
from tether.stages.ppo import SHIPPED_PROMPTS
from tether.trajectory import Trajectory, concat_trajectories, gather_trajectory, select_rows


class GRPOTrainer:
    """Policy, reference (unless grpo.kl_in=none) and reward sources, no critic; the optimizer and the run."""

    status_keys: StatusKeys = (
        ("score", "objective/scores", "+.3f"),
        ("kl", "objective/kl", ".3f"),
        ("len", "response/length_mean", ".0f"),
    )
    eval_at_last_step = True

    def __init__(self, config: GRPOConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False):
        self.config = cfg = config
        self.sizes = cfg.sizes()
        self.run = Run("grpo", cfg, run_dir, resume, overwrite)
        self.device = self.run.device
        require_divisible(cfg.train.batch_size, "train.batch_size")  # a group never spans processes

        self.with_reference = cfg.grpo.kl_in != "none"
        self.roles = load_rollout_roles(cfg, self.run.resume_from, self.device)
        self.tokenizer, self.policy, self.reference = self.roles.tokenizer, self.roles.policy, self.roles.reference
        self.prompts = load_prompts(cfg.data.prompts or shipped_data(SHIPPED_PROMPTS))
        self.prompt_ids = encode_prompts(self.tokenizer, self.prompts, cfg.data)
        self.sampler = PromptSampler(len(self.prompts), cfg.train.batch_size, cfg.train.seed)
        self.engine = start_engine(cfg, self.roles)  # rollout.engine=vllm; None for transformers' generate
        self.watcher = Watcher.for_run(cfg, self.run.run_dir, self.roles, self.device, None, self.engine)

        self.policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = make_optimizer(
            [{"params": self.policy_params, "lr": cfg.train.lr}],
            cfg.train.adam_eps,
            cfg.train.weight_decay,
            cfg.train.lr_schedule,
            cfg.train.warmup_steps,
            self.sizes.optimizer_steps,
            fused=cfg.speed.fused_adamw,
        )
        self.guard = UpdateGuard()
        self.total_steps, self.sample_every = cfg.train.steps, cfg.train.sample_every
        self.eval_every = self.watcher.eval_every
        # Every scorer once on a small real batch, before the run directory is changed.
        judge = self.watcher.evaluator.check_judge if self.watcher.evaluator is not None else None
        probe_scorers(self.roles, cfg, [p.text for p in self.prompts], self.prompt_ids, judge)
        self.run.start(self.stateful_parts())
        self.watcher.keep_start(self.policy, self.run.resumed)

    def train(self) -> Path:
        """Run the remaining iterations; returns the final checkpoint folder."""
        return self.run.loop(self)

    def iteration(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """One iteration: rollout, scoring, advantages, update. Returns (metrics, samples)."""
        cfg, roles = self.config, self.roles
        grpo = cfg.grpo
        timer = Timer()

        # 1.-2. A batch of prompts (this process's share) and a group of responses to each; with
        # dynamic sampling, only groups whose scores differ, sampled until the batch is full.
        if self.engine is not None:  # a vLLM engine first gets the weights of the last update, checked
            with timer("sync"):
                hold_weights(self.engine, self.policy, self.run.step, self.prompt_ids[0], cfg.model.dtype, cfg.speed)
        with timer("rollout"):
            trajectory = self.sample(shard(self.sampler.next_batch()))
        sampling: dict[str, float] = {}
        if grpo.dynamic_sampling:
            trajectory, sampling = self.keep_informative_groups(trajectory, timer)

        # 3. Old log-probs and entropy (with the graph when the first step reuses them), reference log-probs.
        reuse = reuses_old_pass(cfg.speed, self.sizes) and not grpo.dynamic_sampling
        with timer("logprobs"):
            trajectory, old_pass = policy_pass(roles, cfg, trajectory, keep_graph=reuse)
        if self.with_reference:
            with timer("ref"):
                trajectory = reference_pass(roles, cfg, trajectory)

        # 4. Scores (already there with dynamic sampling), then the whole batch in every process.
        if not grpo.dynamic_sampling:
            with timer("score"):
                trajectory = score_batch(roles, trajectory)
        trajectory = gather_trajectory(trajectory, roles.pad_id)
        mask = trajectory.mask  # (B, R)
        scores = trajectory.scores  # (B,)
        if grpo.overlong_buffer is not None:  # DAPO: a soft penalty over the last tokens before the limit
            shaping = overlong_penalty(
                trajectory.response_lengths, cfg.rollout.max_new_tokens, grpo.overlong_buffer, grpo.overlong_penalty
            )
            scores = scores + shaping.to(scores.device)
            sampling["grpo/overlong_penalty_mean"] = float(shaping.mean())

        # 5. The KL to the reference: logged (k1), in the score only when kl_in=reward.
        sequence_kl = torch.zeros(len(trajectory), device=mask.device)
        reward_kl = None
        if self.with_reference:
            kl = kl_per_token(trajectory.old_logprobs, trajectory.ref_logprobs, "k1")  # (B, R)
            sequence_kl = torch.where(mask, kl, torch.zeros_like(kl)).sum(dim=1)  # (B,)
            if grpo.kl_in == "reward":
                reward_kl = kl_per_token(trajectory.old_logprobs, trajectory.ref_logprobs, grpo.kl_estimator)
                reward_kl = torch.where(mask, reward_kl, torch.zeros_like(reward_kl))
        group = trajectory.prompt_index  # (B,) responses to the same prompt share it

        # 6. Advantages, (B, R).
        if grpo.estimator in ("grpo", "rloo"):
            if reward_kl is not None:  # outcome estimators: the response's summed KL leaves its score
                scores = scores - grpo.kl_coef * reward_kl.sum(dim=1)
            outcome = (
                group_advantages(scores, group, grpo.scale_rewards)
                if grpo.estimator == "grpo"
                else rloo_advantages(scores, group)
            )
            advantages = spread_over_tokens(outcome, mask)
        elif grpo.estimator == "reinforce_pp":
            advantages = reinforce_pp_advantages(scores, mask, reward_kl, grpo.kl_coef)
        else:
            advantages = reinforce_pp_baseline_advantages(scores, group, mask, reward_kl, grpo.kl_coef)

        # 7. Epochs over minibatches (each token's loss weighted for the sampler's gap with
        # rollout.is_correction).
        is_weights, is_stats = importance_weights(cfg, trajectory)
        lr = self.scheduler.get_last_lr()[0]
        with timer("train"):
            update_stats = self.update(trajectory, advantages, old_pass, is_weights)

        metrics = {
            **batch_metrics(trajectory, sequence_kl, timer, self.device),
            "objective/kl_coef": grpo.kl_coef,
            "objective/rlhf_reward": float((trajectory.scores - grpo.kl_coef * sequence_kl).mean()),
            **(group_stats(scores, group) if cfg.rollout.samples_per_prompt > 1 else {}),
            **sampling,
            **update_stats,
            **is_stats,
            "lr": lr,
            "train/skipped_updates": float(self.guard.skipped_updates),
        }
        if not self.with_reference:
            del metrics["objective/kl"]  # no reference to measure it against
        return metrics, batch_samples(trajectory, sequence_kl)

    def sample(self, batch: list[int]) -> Trajectory:
        texts, ids = [self.prompts[i].text for i in batch], [self.prompt_ids[i] for i in batch]
        return sample_batch(self.roles, self.config, texts, ids, self.engine)

    def keep_informative_groups(self, trajectory: Trajectory, timer: Timer) -> tuple[Trajectory, dict[str, float]]:
        """DAPO's dynamic sampling (Yu et al. 2025, section 3.2): score the groups, keep those whose
        scores are not all equal (the others have zero advantage: no signal), and sample further
        batches of prompts until train.batch_size groups are kept or grpo.max_sampling_rounds is
        reached. Decided on the whole batch of every process; returns this process's share of the
        kept rows, scored, and the counts to log."""
        cfg, roles = self.config, self.roles
        kept: Trajectory | None = None
        groups = dropped = rounds = 0
        while True:
            rounds += 1
            with timer("score"):
                whole = gather_trajectory(score_batch(roles, trajectory), roles.pad_id)
            signal = informative_groups(whole.scores, whole.prompt_index)
            dropped += int(torch.unique(whole.prompt_index[~signal]).numel())
            rows = signal.nonzero().flatten()
            if rows.numel():
                chosen = select_rows(whole, rows)
                kept = chosen if kept is None else concat_trajectories([kept, chosen], roles.pad_id)
                groups = int(torch.unique(kept.prompt_index).numel())
            if groups >= cfg.train.batch_size or rounds >= cfg.grpo.max_sampling_rounds:
                break
            with timer("rollout"):
                trajectory = self.sample(shard(self.sampler.next_batch()))
        stats = {"grpo/sampling_rounds": float(rounds), "grpo/dropped_groups": float(dropped)}
        if kept is None:  # every group of every round had equal scores: train on the last round as it is
            kept = whole
        labels = torch.unique_consecutive(kept.prompt_index)[: cfg.train.batch_size]
        kept = select_rows(kept, torch.isin(kept.prompt_index, labels).nonzero().flatten())
        stats["grpo/kept_groups"] = float(len(labels))
        return select_rows(kept, shard(torch.arange(len(kept)))), stats

    def update(
        self, trajectory: Trajectory, advantages: Tensor, old_pass: OldPass | None, is_weights: Tensor | None = None
    ) -> dict[str, float]:
        """grpo.epochs of shuffled minibatches; every minibatch is one optimizer step, its loss
        aggregated over the whole minibatch (grpo.loss_aggregation) however it is split into
        micro-batches. The first step backpropagates through the old log-probs' pass when it kept
        its graph (`old_pass`)."""
        cfg, roles = self.config, self.roles
        grpo = cfg.grpo
        mask = trajectory.mask
        kl_in_loss = grpo.kl_in == "loss" and grpo.kl_coef > 0
        totals: dict[str, float] = defaultdict(float)
        steps = 0
        for minibatch in minibatches(
            len(trajectory), self.sizes, grpo.epochs, cfg.train.seed, self.run.step, self.device
        ):
            token_count = mask[minibatch.rows].sum()
            # seq_sum_constant's constant: the most tokens the model can write in an episode.
            longest = cfg.rollout.max_new_tokens * cfg.rollout.max_turns
            normaliser = loss_normaliser(mask[minibatch.rows], grpo.loss_aggregation, longest)
            self.optimizer.zero_grad(set_to_none=True)
            stats: dict[str, float] = defaultdict(float)
            for rows in minibatch.micro_batches:
                reused = old_pass if minibatch.first else None
                new_logprobs = update_logprobs(roles, cfg, trajectory, rows, reused)[0]
                policy_loss = gspo_policy_loss if grpo.policy_loss == "gspo" else clipped_policy_loss
                loss, loss_stats = policy_loss(
                    new_logprobs,
                    trajectory.old_logprobs[rows],
                    advantages[rows],
                    mask[rows],
                    grpo.clip_coef,
                    grpo.clip_high if grpo.clip_high is not None else grpo.clip_coef,
                    grpo.dual_clip,
                    grpo.loss_aggregation,
                    normaliser,
                    token_count,
                    is_weights[rows] if is_weights is not None else None,
                )
                stats["loss/policy"] += float(loss.detach())
                if kl_in_loss:
                    k3 = kl_per_token(new_logprobs, trajectory.ref_logprobs[rows], "k3")
                    kl_term = aggregate(k3, mask[rows], grpo.loss_aggregation, normaliser)
                    loss = loss + grpo.kl_coef * kl_term
                    stats["loss/kl"] += float(kl_term.detach())
                    loss_stats = {**loss_stats, "policy/ref_kl": kl_term.detach()}
                loss.backward()
                for key, value in loss_stats.items():
                    stats[key] += float(value)
            clipped = {"policy/grad_norm": self.policy_params}
            stats = take_step(
                self.optimizer, self.scheduler, self.guard, clipped, stats, cfg.train.max_grad_norm, self.run.step
            )
            for key, number in stats.items():
                totals[key] += number
            steps += 1
        return {key: value / steps for key, value in totals.items()}

    # ----------------------------------------------------------------------------------------
    # What the run loop asks of a stage
    # ----------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        return self.watcher.periodic_eval(self.policy, self.run.step)

    def watch(self, metrics: dict[str, float], console: Any) -> dict[str, float]:
        return self.watcher.watch(self.run.history, metrics, self.run.step, console)

    def stateful_parts(self) -> dict[str, Stateful]:
        return {"optimizer": self.optimizer, "scheduler": self.scheduler, "sampler": self.sampler, "guard": self.guard}

    def checkpoint_models(self) -> dict[str, tuple[Any, str]]:
        return {"": (self.policy, self.config.model.name)}

    def save_checkpoint(self, final: bool = False) -> Path:
        return self.run.save_checkpoint(self, final)

    def finish(self) -> Path:
        final = self.save_checkpoint(final=True)
        if is_main():
            self.watcher.write_report("grpo", self.policy, final, self.run.history)
        return final

    def nonfinite_diagnosis(self, checkpoint: Path) -> str:
        return (
            f"stopped at step {self.run.step}: the last {self.guard.nonfinite_streak} optimizer steps had a "
            f"non-finite gradient in the policy ({describe_update(self.guard.last_nonfinite)}), so none was applied "
            f"and the weights are the last finite ones, saved to {checkpoint}. This usually means a learning rate "
            f"that is too high (train.lr={self.config.train.lr}) or train.max_grad_norm=null. Fix the cause and "
            f"continue with: tether grpo --resume --output {self.run.run_dir}"
        )


def group_stats(scores: Tensor, group: Tensor) -> dict[str, float]:
    """How much signal the groups carried: the mean within-group std of the scores, and the share
    of groups whose responses all scored the same (their advantages are 0: nothing to learn)."""
    stds = []
    for label in torch.unique(group):
        members = scores[group == label].float()
        stds.append(float(members.std()) if len(members) > 1 else 0.0)
    return {
        "grpo/group_std_mean": sum(stds) / len(stds),
        "grpo/zero_std_frac": sum(1.0 for s in stds if s == 0.0) / len(stds),
    }
