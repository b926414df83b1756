"""PPO for language models: the four-role loop, read top to bottom.

    tether ppo --config configs/demo.yaml --output runs/demo
    PPOTrainer(load_config(PPOConfig, "configs/demo.yaml"), "runs/demo").train()

One iteration (`PPOTrainer.iteration`):
  1. draw a batch of prompts (seeded, resumable order)
  2. sample responses with the policy (KV cache), truncate each after its first EOS
  3. forward passes without grad: old log-probs and entropy (policy), reference log-probs, values
     (a value model's own pass, or a value head's read off the policy's)
  4. score the responses (reward model / function), add the missing-EOS penalty
  5. per-token rewards: -kl_coef * KL_t on every token, plus the score on the last one
  6. GAE advantages and returns (rewards whitened first if asked), advantages whitened
  7. PPO epochs: fresh shuffle, minibatches, micro-batches, clipped losses, gradient clipping
  8. adapt the KL coefficient, log
The run around it (checkpoints, resume, evaluation, alarms, stopping) is the one loop of every
stage (run/loop.py).

Under torchrun each process samples and scores its share of the prompts (steps 2-4); the rows are
then gathered, so steps 5, 6 and 8 see the whole batch in every process, and step 7 splits each
minibatch's forward and backward passes, summing the gradients (optim.py).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tether.config import PPOConfig
from tether.console import StatusKeys
from tether.core import (
    clipped_value_loss,
    compute_gae,
    explained_variance,
    kl_per_token,
    make_kl_controller,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
)
from tether.data import PromptSampler, encode_prompts, load_prompts, shipped_data
from tether.evaluation.batch import batch_metrics, batch_samples
from tether.evaluation.watcher import Watcher
from tether.loading.roles import load_rollout_roles, value_source
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
    update_values,
    value_pass,
)
from tether.run.checkpoints import Stateful
from tether.run.log import Timer
from tether.run.loop import Run
from tether.runtime import is_main, require_divisible, shard
from tether.speed.old_pass import reuses_old_pass
from tether.trajectory import Trajectory, gather_trajectory

VALUE_HEAD_LR = 1e-3  # train.value_lr's default for model.critic=head
SHIPPED_PROMPTS = "prompts.jsonl"


class PPOTrainer:
    """The four roles, their optimizer and the run; `.train()` runs the loop."""

    status_keys: StatusKeys = (
        ("score", "objective/scores", "+.3f"),
        ("kl", "objective/kl", ".3f"),
        ("len", "response/length_mean", ".0f"),
    )
    eval_at_last_step = True

    def __init__(self, config: PPOConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False):
        self.config = cfg = config
        self.sizes = cfg.sizes()
        self.run = Run("ppo", cfg, run_dir, resume, overwrite)
        self.device = self.run.device
        require_divisible(cfg.train.batch_size, "train.batch_size")

        # Roles: the policy, its reference, the reward sources, the critic (loading/roles.py). Weights
        # come from the newest checkpoint when resuming, else from the config.
        self.roles = load_rollout_roles(cfg, self.run.resume_from, self.device)
        self.tokenizer, self.policy, self.reference = self.roles.tokenizer, self.roles.policy, self.roles.reference

        # Prompts, tokenized once, and the fixed eval set, the alarms and the report.
        self.prompts = load_prompts(cfg.data.prompts or shipped_data(SHIPPED_PROMPTS))
        self.prompt_ids = encode_prompts(self.tokenizer, self.prompts, cfg.data)
        self.sampler = PromptSampler(len(self.prompts), cfg.train.batch_size, cfg.train.seed)
        self.engine = start_engine(cfg, self.roles)  # rollout.engine=vllm; None for transformers' generate
        self.watcher = Watcher.for_run(cfg, self.run.run_dir, self.roles, self.device, cfg.ppo.kl_target, self.engine)

        # Optimisation: one AdamW, a parameter group per trained model (each clipped on its own).
        self.policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        self.value_params = [p for p in self.roles.critic.parameters() if p.requires_grad]
        # A value head is one linear layer: at a policy's learning rate it would hardly move.
        head = self.roles.value_head is not None
        value_lr = cfg.train.value_lr or (VALUE_HEAD_LR if head else cfg.train.lr)
        self.optimizer, self.scheduler = make_optimizer(
            [{"params": self.policy_params, "lr": cfg.train.lr}, {"params": self.value_params, "lr": value_lr}],
            cfg.train.adam_eps,
            cfg.train.weight_decay,
            cfg.train.lr_schedule,
            cfg.train.warmup_steps,
            self.sizes.optimizer_steps,
            fused=cfg.speed.fused_adamw,
        )
        self.kl_ctl = make_kl_controller(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
        self.guard = UpdateGuard()
        self.total_steps, self.sample_every = cfg.train.steps, cfg.train.sample_every
        self.eval_every = self.watcher.eval_every
        # Every scorer once on a small real batch, before the run directory is changed.
        judge = self.watcher.evaluator.check_judge if self.watcher.evaluator is not None else None
        probe_scorers(self.roles, cfg, [p.text for p in self.prompts], self.prompt_ids, judge)
        self.run.start(self.stateful_parts())

    @property
    def value_model(self) -> Any:
        return self.roles.value_model

    def train(self) -> Path:
        """Run the remaining iterations; returns the final checkpoint folder."""
        return self.run.loop(self)

    # ----------------------------------------------------------------------------------------
    # One iteration
    # ----------------------------------------------------------------------------------------

    def iteration(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """One PPO iteration: rollout, scoring, advantages, update. Returns (metrics, samples)."""
        cfg, roles = self.config, self.roles
        timer = Timer()

        # 1. A batch of prompts (this process's share).
        batch = shard(self.sampler.next_batch())

        # 2. Sample responses, each truncated after its first EOS (a vLLM engine first gets the
        # weights of the last update, checked).
        if self.engine is not None:
            with timer("sync"):
                hold_weights(self.engine, self.policy, self.run.step, self.prompt_ids[0], cfg.model.dtype, cfg.speed)
        with timer("rollout"):
            texts, ids = [self.prompts[i].text for i in batch], [self.prompt_ids[i] for i in batch]
            trajectory = sample_batch(roles, cfg, texts, ids, self.engine)

        # 3. Old log-probs and entropy (a value head's values from the same pass), reference
        # log-probs, a value model's values; without grad, except the policy's when the first
        # update step reuses its pass (speed.reuse_old_pass).
        reuse = reuses_old_pass(cfg.speed, self.sizes)
        with timer("logprobs"):
            trajectory, old_pass = policy_pass(roles, cfg, trajectory, keep_graph=reuse)
        with timer("ref"):
            trajectory = reference_pass(roles, cfg, trajectory)
        if roles.value_model is not None:
            with timer("value"):
                trajectory = value_pass(roles, cfg, trajectory)

        # 4. Scores, then the whole batch in every process.
        with timer("score"):
            trajectory = score_batch(roles, trajectory)
        trajectory = gather_trajectory(trajectory, roles.pad_id)
        mask = trajectory.mask  # (B, R)
        assert trajectory.values is not None
        values = trajectory.values  # (B, R)

        # 5. Per-token rewards: the KL penalty on every token, the score on the last real one.
        kl = kl_per_token(trajectory.old_logprobs, trajectory.ref_logprobs, cfg.ppo.kl_estimator)  # (B, R)
        kl = torch.where(mask, kl, torch.zeros_like(kl))
        kl_coef = self.kl_ctl.value
        rewards = per_token_rewards(trajectory.scores, kl, mask, kl_coef)

        # 6. Advantages. Rewards whitened without the mean shift, advantages with it
        # (docs/concepts/details.md item 11).
        if cfg.ppo.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = compute_gae(rewards, values, mask, cfg.ppo.gamma, cfg.ppo.lam)
        if cfg.ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        # 7. PPO epochs over minibatches (each token's loss weighted for the sampler's gap with
        # rollout.is_correction).
        is_weights, is_stats = importance_weights(cfg, trajectory)
        lr = self.scheduler.get_last_lr()[0]
        with timer("train"):
            update_stats = self.update(trajectory, advantages, returns, old_pass, is_weights)

        # 8. Adapt the KL coefficient to the per-sequence KL this batch showed.
        sequence_kl = kl.sum(dim=1)  # (B,)
        self.kl_ctl.update(float(sequence_kl.mean()), n_steps=len(trajectory))

        metrics = {
            **batch_metrics(trajectory, sequence_kl, timer, self.device),
            "objective/kl_coef": kl_coef,
            "objective/rlhf_reward": float((trajectory.scores - kl_coef * sequence_kl).mean()),
            **update_stats,
            **is_stats,
            "val/explained_variance": float(explained_variance(values, returns, mask)),
            "val/mean": float(masked_mean(values, mask)),
            "lr": lr,
            "train/skipped_updates": float(self.guard.skipped_updates),
        }
        return metrics, batch_samples(trajectory, sequence_kl)

    def update(
        self,
        trajectory: Trajectory,
        advantages: Tensor,
        returns: Tensor,
        old_pass: OldPass | None,
        is_weights: Tensor | None = None,
    ) -> dict[str, float]:
        """PPO epochs of shuffled minibatches; every minibatch is one optimizer step.

        A minibatch is processed in micro-batches whose losses are normalised by the minibatch's
        token count, so the accumulated gradient equals the whole minibatch's (docs/concepts/details.md
        item 13). `old_pass`: the old log-probs (and a value head's values) still attached to their
        graph, the first step's forward pass over every row in rollout order (speed/old_pass.py).
        """
        cfg, roles = self.config, self.roles
        mask = trajectory.mask
        assert trajectory.values is not None
        totals: dict[str, float] = defaultdict(float)
        steps = 0
        for minibatch in minibatches(
            len(trajectory), self.sizes, cfg.ppo.epochs, cfg.train.seed, self.run.step, self.device
        ):
            token_count = mask[minibatch.rows].sum()
            self.optimizer.zero_grad(set_to_none=True)
            stats: dict[str, float] = defaultdict(float)
            for rows in minibatch.micro_batches:
                reused = old_pass if minibatch.first else None
                new_logprobs, *head_values = update_logprobs(roles, cfg, trajectory, rows, reused)
                pg_loss, pg_stats = ppo_policy_loss(
                    new_logprobs,
                    trajectory.old_logprobs[rows],
                    advantages[rows],
                    mask[rows],
                    cfg.ppo.clip_coef,
                    token_count,
                    token_weights=is_weights[rows] if is_weights is not None else None,
                )
                # Policy and critic have no parameter in common (a value head reads detached
                # features), so each loss is backpropagated on its own: the gradients are those
                # of pg_loss + vf_coef * vf_loss, and only one model's activations are held at a
                # time (the peak memory of the update).
                pg_loss.backward()
                new_values = head_values[0] if head_values else update_values(roles, cfg, trajectory, rows)
                vf_loss, vf_stats = clipped_value_loss(
                    new_values, trajectory.values[rows], returns[rows], mask[rows], cfg.ppo.value_clip, token_count
                )
                (cfg.ppo.vf_coef * vf_loss).backward()
                stats["loss/policy"] += float(pg_loss.detach())
                stats["loss/value"] += float(vf_loss.detach())
                for key, value in {**pg_stats, **vf_stats}.items():
                    stats[key] += float(value)
            clipped = {"policy/grad_norm": self.policy_params, "val/grad_norm": self.value_params}
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
        return {
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "kl_controller": self.kl_ctl,
            "sampler": self.sampler,
            "guard": self.guard,
        }

    def checkpoint_models(self) -> dict[str, tuple[Any, str]]:
        """The policy, and the critic in value/."""
        return {"": (self.policy, self.config.model.name), "value": (self.roles.critic, value_source(self.config))}

    def save_checkpoint(self, final: bool = False) -> Path:
        return self.run.save_checkpoint(self, final)

    def finish(self) -> Path:
        final = self.save_checkpoint(final=True)
        if is_main():
            self.watcher.write_report("ppo", self.policy, final, self.run.history)
        return final

    def nonfinite_diagnosis(self, checkpoint: Path) -> str:
        cfg = self.config.train
        last = self.guard.last_nonfinite
        bad = [name for name in ("policy", "val") if not math.isfinite(last.get(f"{name}/grad_norm", 0))]
        which = " and ".join({"policy": "the policy", "val": "the critic"}[n] for n in bad) or "a model"
        return (
            f"stopped at step {self.run.step}: the last {self.guard.nonfinite_streak} optimizer steps had a non-finite "
            f"gradient in {which} ({describe_update(last)}), so none was applied and the weights are "
            f"the last finite ones, saved to {checkpoint}. This usually means a learning rate that is too high "
            f"(train.lr={cfg.lr}, train.value_lr={cfg.value_lr}), a reward on a much larger scale than the "
            "value model can follow (try ppo.whiten_rewards=true), or train.max_grad_norm=null. Fix the "
            f"cause and continue with: tether ppo --resume --output {self.run.run_dir}"
        )
