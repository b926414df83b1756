"""PPO for language models: the four-role loop, read top to bottom.

    tether ppo --config configs/demo.yaml --output runs/demo
    PPOTrainer(load_config(PPOConfig, "configs/demo.yaml"), "runs/demo").train()

One iteration (`PPOTrainer.iteration`):
  1. draw a batch of prompts (seeded, resumable order)
  2. sample responses with the policy (KV cache), truncate each after its first EOS
  3. forward passes: old log-probs and entropy (policy), reference log-probs, values (a value
     model's own pass, or a value head's read off the policy's); without grad, except the policy's
     when the first update step can reuse it (one minibatch, one micro-batch)
  4. score the responses (reward model / function), add the missing-EOS penalty
  5. per-token rewards: -kl_coef * KL_t on every token, plus the score on the last one
  6. GAE advantages and returns (rewards whitened first if asked), advantages whitened
  7. PPO epochs: fresh shuffle, minibatches, micro-batches, clipped losses, gradient clipping
  8. adapt the KL coefficient, log, checkpoint
Steps 1-4, the loop, the eval set and the run directory are shared with grpo (stages/online.py).

Under torchrun each process samples and scores its share of the prompts (steps 2-4) and computes
their values; the rows are then gathered, so steps 5, 6 and 8 see the whole batch in every process,
and step 7 splits each minibatch's forward and backward passes, summing the gradients (runtime.py).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tether.checkpoint import check_run_dir
from tether.config import PPOConfig
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
from tether.data import PromptSampler
from tether.roles.batching import in_chunks
from tether.roles.value import ValueHead, response_values
from tether.rollout import Rollout
from tether.runtime import (
    autocast,
    broadcast_trainable,
    prepare_process,
    refuse_unbuilt_engines,
    require_divisible,
    shard,
    sum_across_ranks,
    sum_gradients,
)
from tether.stages.common import load_trainable, make_optimizer
from tether.stages.online import (
    Timer,
    UpdateGuard,
    Watcher,
    batch_metrics,
    batch_samples,
    clip_gradients,
    describe_update,
    epoch_order,
    first_step_reuses_old_pass,
    gather_batch,
    load_policy_roles,
    open_run,
    restore_trainer_state,
    run_loop,
    sample_and_score,
    step_logprobs,
    training_prompts,
    write_checkpoint,
)

VALUE_HEAD_LR = 1e-3  # train.value_lr's default for model.critic=head (config.py)


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

        self.device = prepare_process(cfg.train.num_threads, cfg.train.seed, cfg.train.device)
        refuse_unbuilt_engines(cfg.model.fsdp, cfg.rollout.engine, self.device)
        require_divisible(cfg.train.batch_size, "train.batch_size")

        # Roles. Weights come from the newest checkpoint when resuming, else from the config.
        self.roles = load_policy_roles(cfg, resume_from, self.device)
        self.tokenizer, self.policy = self.roles.tokenizer, self.roles.policy
        self.reference, self.rewards = self.roles.reference, self.roles.rewards
        # The critic: its own value model, or a head on the policy (model.critic).
        self.value_head = self._load_value_head(resume_from) if cfg.model.critic == "head" else None
        self.value_model = self._load_value_model(resume_from) if self.value_head is None else None
        if (
            self.value_model is not None
            and cfg.model.lora is not None
            and self.rewards.shares_weights_with(self._value_source())
        ):
            # A LoRA value model starting from the reward model is the reward model's weights plus
            # an adapter: the reward model scores through it with the adapter off (one copy, not two).
            self.rewards.score_with_base_of(self.value_model)

        # Prompts, tokenized once.
        self.prompts, self.prompt_ids = training_prompts(cfg, self.tokenizer)
        self.sampler = PromptSampler(len(self.prompts), cfg.train.batch_size, cfg.train.seed)
        self.watcher = Watcher.for_run(cfg, self.run_dir, self.roles, self.device, cfg.ppo.kl_target)

        # Optimisation: one AdamW, a parameter group per trained model (each clipped on its own).
        self.policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        self.value_params = [p for p in self._critic().parameters() if p.requires_grad]
        # A value head is one linear layer: at a policy's learning rate it would hardly move.
        value_lr = cfg.train.value_lr or (VALUE_HEAD_LR if self.value_head is not None else cfg.train.lr)
        rollout_size = cfg.train.batch_size * cfg.rollout.samples_per_prompt
        self.optimizer, self.scheduler = make_optimizer(
            [
                {"params": self.policy_params, "lr": cfg.train.lr},
                {"params": self.value_params, "lr": value_lr},
            ],
            cfg.train.adam_eps,
            cfg.train.weight_decay,
            cfg.train.lr_schedule,
            cfg.train.warmup_steps,
            cfg.train.steps * cfg.ppo.epochs * (rollout_size // cfg.ppo.minibatch_size),
        )
        self.kl_ctl = make_kl_controller(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
        self.guard = UpdateGuard()
        self.step = 0
        if resume_from is not None:
            self.step = int(restore_trainer_state(resume_from, self._stateful_parts(), cfg.train.seed)["step"])
        self.runlog, self.history = open_run(self.run_dir, cfg, self.step if resume_from is not None else None)

    def train(self) -> Path:
        """Run the remaining iterations; returns the final checkpoint folder."""
        return run_loop("ppo", self)

    # ----------------------------------------------------------------------------------------
    # One iteration
    # ----------------------------------------------------------------------------------------

    def iteration(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """One PPO iteration: rollout, scoring, advantages, update. Returns (metrics, samples)."""
        cfg = self.config
        timer = Timer()

        # 1. A batch of prompts (this process's share). 2.-4. Sample, old and reference log-probs,
        # scores (online.py).
        batch = shard(self.sampler.next_batch())
        reuse = first_step_reuses_old_pass(cfg, cfg.ppo.minibatch_size)
        scored = sample_and_score(
            self.roles, cfg, self.prompts, self.prompt_ids, batch, self.device, timer, reuse, self.value_head
        )

        # 3. (continued) Values of the sampled sequences, without grad: the value head's came with
        # the old log-probs, a value model needs its own pass.
        values = scored.values
        if values is None:
            with torch.no_grad(), autocast(self.device, cfg.model.dtype), timer("value"):
                sampled = scored.rollout
                (values,) = in_chunks(
                    lambda i, m: (response_values(self.value_model, i, m, sampled.response_start),),
                    sampled.input_ids,
                    sampled.attention_mask,
                    cfg.train.micro_batch_size,
                )
        scored, (values,) = gather_batch(scored, self.roles.pad_id, values)  # the whole batch, in every process
        rollout, mask = scored.rollout, scored.mask  # mask: (B, R)

        # 5. Per-token rewards: the KL penalty on every token, the score on the last real one.
        kl = kl_per_token(scored.old_logprobs, scored.ref_logprobs, cfg.ppo.kl_estimator)  # (B, R)
        kl = torch.where(mask, kl, torch.zeros_like(kl))
        kl_coef = self.kl_ctl.value
        rewards = per_token_rewards(scored.scores, kl, mask, kl_coef)

        # 6. Advantages. Rewards whitened without the mean shift, advantages with it (RLHF-DETAILS 11).
        if cfg.ppo.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = compute_gae(rewards, values, mask, cfg.ppo.gamma, cfg.ppo.lam)
        if cfg.ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        experience = Experience(rollout, scored.old_logprobs, values, advantages, returns)

        # 7. PPO epochs over minibatches.
        lr = self.scheduler.get_last_lr()[0]
        with timer("train"):
            update_stats = self._update(experience, scored.attached)

        # 8. Adapt the KL coefficient to the per-sequence KL this batch showed.
        sequence_kl = kl.sum(dim=1)  # (B,)
        self.kl_ctl.update(float(sequence_kl.mean()), n_steps=len(rollout))

        metrics = {
            **batch_metrics(scored, sequence_kl, timer, self.device),
            "objective/kl_coef": kl_coef,
            "objective/rlhf_reward": float((scored.scores - kl_coef * sequence_kl).mean()),
            **update_stats,
            "val/explained_variance": float(explained_variance(values, returns, mask)),
            "val/mean": float(masked_mean(values, mask)),
            "lr": lr,
            "train/skipped_updates": float(self.guard.skipped_updates),
        }
        return metrics, batch_samples(scored, sequence_kl)

    def _update(self, exp: Experience, old_pass: tuple[Tensor, ...] | None = None) -> dict[str, float]:
        """PPO epochs of shuffled minibatches; every minibatch is one optimizer step.

        A minibatch is processed in micro-batches whose losses are normalised by the minibatch's
        token count, so the accumulated gradient equals the whole minibatch's (RLHF-DETAILS 13).
        Under torchrun each process takes its share of every minibatch and the gradients are
        summed, so the step is the same for any number of processes. `old_pass`: the old
        log-probs (and a value head's values) still attached to their graph, the first step's
        forward pass over every row in rollout order (see online.first_step_reuses_old_pass).
        """
        cfg = self.config
        rollout = exp.rollout
        ids, attn, mask = rollout.input_ids, rollout.attention_mask, rollout.response_mask
        start = rollout.response_start
        n = len(rollout)
        micro = cfg.train.micro_batch_size or cfg.ppo.minibatch_size
        totals: dict[str, float] = defaultdict(float)
        num_minibatches = 0
        for epoch in range(cfg.ppo.epochs):
            order = epoch_order(n, old_pass is not None, cfg.train.seed, self.step, epoch)
            reused = old_pass if epoch == 0 else None
            for mb_start in range(0, n, cfg.ppo.minibatch_size):
                minibatch = order[mb_start : mb_start + cfg.ppo.minibatch_size].to(self.device)
                token_count = mask[minibatch].sum()
                mine = shard(minibatch)
                self.optimizer.zero_grad(set_to_none=True)
                stats: dict[str, float] = defaultdict(float)
                for micro_start in range(0, len(mine), micro):
                    idx = mine[micro_start : micro_start + micro]
                    new_logprobs, *head_values = step_logprobs(
                        self.policy, ids, attn, start, idx, cfg, self.device, reused, self.value_head
                    )
                    pg_loss, pg_stats = ppo_policy_loss(
                        new_logprobs,
                        exp.old_logprobs[idx],
                        exp.advantages[idx],
                        mask[idx],
                        cfg.ppo.clip_coef,
                        token_count,
                    )
                    # Policy and critic have no parameter in common (a value head reads detached
                    # features), so each loss is backpropagated on its own: the gradients are those
                    # of pg_loss + vf_coef * vf_loss, and only one model's activations are held at a
                    # time (the peak memory of the update).
                    pg_loss.backward()
                    if head_values:
                        new_values = head_values[0]
                    else:
                        with autocast(self.device, cfg.model.dtype):
                            new_values = response_values(self.value_model, ids[idx], attn[idx], start)
                    vf_loss, vf_stats = clipped_value_loss(
                        new_values,
                        exp.values[idx],
                        exp.returns[idx],
                        mask[idx],
                        cfg.ppo.value_clip,
                        token_count,
                    )
                    (cfg.ppo.vf_coef * vf_loss).backward()
                    stats["loss/policy"] += float(pg_loss.detach())
                    stats["loss/value"] += float(vf_loss.detach())
                    for key, value in {**pg_stats, **vf_stats}.items():
                        stats[key] += float(value)
                sum_gradients(self.policy_params + self.value_params)
                stats = sum_across_ranks(stats)
                stats["policy/grad_norm"] = clip_gradients(self.policy_params, cfg.train.max_grad_norm)
                stats["val/grad_norm"] = clip_gradients(self.value_params, cfg.train.max_grad_norm)
                self.guard.step(self.optimizer, stats, self.step)
                self.scheduler.step()  # the schedule counts step slots, skipped ones included
                for key, number in stats.items():
                    totals[key] += number
                num_minibatches += 1
        return {key: value / num_minibatches for key, value in totals.items()}

    # ----------------------------------------------------------------------------------------
    # Models, checkpoints, diagnosis
    # ----------------------------------------------------------------------------------------

    def _critic(self) -> Any:
        """The trained critic: the value head, or the value model."""
        return self.value_head if self.value_head is not None else self.value_model

    def _value_source(self) -> str:
        return self.config.model.value_model or self.config.reward.model or self.config.model.name

    def _load_value_head(self, resume_from: Path | None) -> ValueHead:
        if resume_from is not None:
            head = ValueHead.from_pretrained(resume_from / "value")
        else:
            head = ValueHead(self.policy.get_output_embeddings().weight.shape[1])
        head = head.to(self.device)
        broadcast_trainable(head)
        return head

    def _load_value_model(self, resume_from: Path | None) -> Any:
        cfg = self.config.model
        saved = resume_from / "value" if resume_from else None
        value = load_trainable("scalar", self._value_source(), cfg.lora, self.tokenizer, saved, cfg.trust_remote_code)
        value = value.to(self.device)
        broadcast_trainable(value)
        return value

    def _stateful_parts(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "kl_controller": self.kl_ctl,
            "sampler": self.sampler,
            "guard": self.guard,
        }

    def save_checkpoint(self, final: bool = False) -> Path:
        """checkpoints/step-NNNNNN (or final/): the policy, the critic in value/, trainer state."""
        models = {"": (self.policy, self.config.model.name), "value": (self._critic(), self._value_source())}
        state = {key: part.state_dict() for key, part in self._stateful_parts().items()}
        return write_checkpoint(
            self.checkpoints, self.step, final, models, self.tokenizer, state, self.config.train.keep_last
        )

    def nonfinite_diagnosis(self, checkpoint: Path) -> str:
        cfg = self.config.train
        last = self.guard.last_nonfinite
        bad = [name for name in ("policy", "val") if not math.isfinite(last.get(f"{name}/grad_norm", 0))]
        which = " and ".join({"policy": "the policy", "val": "the critic"}[n] for n in bad) or "a model"
        return (
            f"stopped at step {self.step}: the last {self.guard.nonfinite_streak} optimizer steps had a non-finite "
            f"gradient in {which} ({describe_update(last)}), so none was applied and the weights are "
            f"the last finite ones, saved to {checkpoint}. This usually means a learning rate that is too high "
            f"(train.lr={cfg.lr}, train.value_lr={cfg.value_lr}), a reward on a much larger scale than the "
            "value model can follow (try ppo.whiten_rewards=true), or train.max_grad_norm=null. Fix the "
            f"cause and continue with: tether ppo --resume --output {self.run_dir}"
        )
