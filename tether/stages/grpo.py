"""GRPO: PPO's clipped policy update with no critic; the baseline is the other responses to the same
prompt (Shao et al. 2024, DeepSeekMath, section 4.1).

    tether grpo --config configs/grpo-arithmetic.yaml --output runs/grpo
    GRPOTrainer(load_config(GRPOConfig, "configs/grpo-arithmetic.yaml"), "runs/grpo").train()

One iteration (`GRPOTrainer.iteration`):
  1. draw a batch of prompts (seeded, resumable order)
  2. sample rollout.samples_per_prompt responses to each (a group), truncate each after its first EOS
  3. forward passes without grad: old log-probs and entropy (policy), reference log-probs (the
     policy's keeps its graph when the first update step can reuse it, as in ppo)
  4. score the responses (reward model / function), add the missing-EOS penalty
  5. grpo.kl_in=reward only: subtract kl_coef * (the response's summed KL) from its score
  6. group-relative advantages: the score minus its group's mean (divided by the group's std when
     grpo.scale_rewards), the same advantage for every token of the response
  7. epochs of shuffled minibatches: clipped policy loss, plus kl_coef * k3 KL to the reference
     when grpo.kl_in=loss; gradient clipping
  8. log, checkpoint
Steps 1-4, the loop, the eval set and the run directory are shared with ppo (stages/online.py).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tether.checkpoint import check_run_dir
from tether.config import GRPOConfig
from tether.core import group_advantages, kl_loss, kl_per_token, ppo_policy_loss
from tether.data import PromptSampler
from tether.runtime import (
    prepare_process,
    refuse_unbuilt_engines,
    require_divisible,
    shard,
    sum_across_ranks,
    sum_gradients,
)
from tether.stages.common import make_optimizer
from tether.stages.online import (
    ScoredBatch,
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


class GRPOTrainer:
    """Policy, reference and reward sources (no value model), the optimizer and the run directory."""

    def __init__(self, config: GRPOConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False):
        self.config = config
        self.run_dir = Path(run_dir)
        self.checkpoints = self.run_dir / "checkpoints"
        # Checked first, changed last: a mistake found while loading leaves an old run untouched.
        resume_from = check_run_dir(self.run_dir, resume, overwrite)
        cfg = config

        self.device = prepare_process(cfg.train.num_threads, cfg.train.seed, cfg.train.device)
        refuse_unbuilt_engines(cfg.model.fsdp, cfg.rollout.engine, self.device)
        require_divisible(cfg.train.batch_size, "train.batch_size")  # a group never spans processes

        self.roles = load_policy_roles(cfg, resume_from, self.device)
        self.tokenizer, self.policy = self.roles.tokenizer, self.roles.policy
        self.prompts, self.prompt_ids = training_prompts(cfg, self.tokenizer)
        self.sampler = PromptSampler(len(self.prompts), cfg.train.batch_size, cfg.train.seed)
        self.watcher = Watcher.for_run(cfg, self.run_dir, self.roles, self.device, kl_target=None)

        self.policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        rollout_size = cfg.train.batch_size * cfg.rollout.samples_per_prompt
        self.optimizer, self.scheduler = make_optimizer(
            [{"params": self.policy_params, "lr": cfg.train.lr}],
            cfg.train.adam_eps,
            cfg.train.weight_decay,
            cfg.train.lr_schedule,
            cfg.train.warmup_steps,
            cfg.train.steps * cfg.grpo.epochs * (rollout_size // cfg.grpo.minibatch_size),
        )
        self.guard = UpdateGuard()
        self.step = 0
        if resume_from is not None:
            self.step = int(restore_trainer_state(resume_from, self._stateful_parts(), cfg.train.seed)["step"])
        self.runlog, self.history = open_run(self.run_dir, cfg, self.step if resume_from is not None else None)

    def train(self) -> Path:
        """Run the remaining iterations; returns the final checkpoint folder."""
        return run_loop("grpo", self)

    def iteration(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """One GRPO iteration: rollout, scoring, group advantages, update. Returns (metrics, samples)."""
        cfg = self.config
        grpo = cfg.grpo
        timer = Timer()

        # 1. A batch of prompts (this process's share). 2.-4. Sample the groups, old and reference
        # log-probs, scores; then the whole batch in every process.
        batch = shard(self.sampler.next_batch())
        reuse = first_step_reuses_old_pass(cfg, grpo.minibatch_size)
        scored = sample_and_score(
            self.roles, cfg, self.prompts, self.prompt_ids, batch, self.device, timer, keep_graph=reuse
        )
        scored, _ = gather_batch(scored, self.roles.pad_id)
        mask = scored.mask  # (B, R)

        # 5. The KL to the reference: logged always, in the score only when kl_in=reward.
        kl = kl_per_token(scored.old_logprobs, scored.ref_logprobs, "k1")  # (B, R)
        sequence_kl = torch.where(mask, kl, torch.zeros_like(kl)).sum(dim=1)  # (B,)
        scores = scored.scores
        if grpo.kl_in == "reward":
            scores = scores - grpo.kl_coef * sequence_kl

        # 6. Group-relative advantages: one number per response, spread over its tokens.
        group = scored.rollout.prompt_index  # (B,) responses to the same prompt share it
        advantages = group_advantages(scores, group, grpo.scale_rewards)  # (B,)
        token_advantages = advantages[:, None] * mask  # (B, R)

        # 7. Epochs over minibatches.
        lr = self.scheduler.get_last_lr()[0]
        with timer("train"):
            update_stats = self._update(scored, token_advantages)

        metrics = {
            **batch_metrics(scored, sequence_kl, timer, self.device),
            "objective/kl_coef": grpo.kl_coef,
            "objective/rlhf_reward": float((scored.scores - grpo.kl_coef * sequence_kl).mean()),
            **group_stats(scores, group),
            **update_stats,
            "lr": lr,
            "train/skipped_updates": float(self.guard.skipped_updates),
        }
        return metrics, batch_samples(scored, sequence_kl)

    def _update(self, scored: ScoredBatch, advantages: Tensor) -> dict[str, float]:
        """grpo.epochs of shuffled minibatches; every minibatch is one optimizer step, its loss a
        token mean over the whole minibatch however it is split into micro-batches. The first step
        backpropagates through the old log-probs' pass when it kept its graph (`attached`)."""
        cfg = self.config
        grpo = cfg.grpo
        rollout = scored.rollout
        ids, attn, mask = rollout.input_ids, rollout.attention_mask, rollout.response_mask
        start = rollout.response_start
        kl_in_loss = grpo.kl_in == "loss" and grpo.kl_coef > 0
        n = len(rollout)
        micro = cfg.train.micro_batch_size or grpo.minibatch_size
        totals: dict[str, float] = defaultdict(float)
        num_minibatches = 0
        for epoch in range(grpo.epochs):
            # A fresh shuffle per epoch, the same in every process; each takes its share of a minibatch.
            order = epoch_order(n, scored.attached is not None, cfg.train.seed, self.step, epoch)
            reused = scored.attached if epoch == 0 else None
            for mb_start in range(0, n, grpo.minibatch_size):
                minibatch = order[mb_start : mb_start + grpo.minibatch_size].to(self.device)
                token_count = mask[minibatch].sum()
                mine = shard(minibatch)
                self.optimizer.zero_grad(set_to_none=True)
                stats: dict[str, float] = defaultdict(float)
                for micro_start in range(0, len(mine), micro):
                    idx = mine[micro_start : micro_start + micro]
                    new_logprobs = step_logprobs(self.policy, ids, attn, start, idx, cfg, self.device, reused)[0]
                    loss, loss_stats = ppo_policy_loss(
                        new_logprobs, scored.old_logprobs[idx], advantages[idx], mask[idx], grpo.clip_coef, token_count
                    )
                    stats["loss/policy"] += float(loss.detach())
                    if kl_in_loss:
                        kl_term, kl_stats = kl_loss(new_logprobs, scored.ref_logprobs[idx], mask[idx], token_count)
                        loss = loss + grpo.kl_coef * kl_term
                        stats["loss/kl"] += float(kl_term.detach())
                        loss_stats = {**loss_stats, **kl_stats}
                    loss.backward()
                    for key, value in loss_stats.items():
                        stats[key] += float(value)
                sum_gradients(self.policy_params)
                stats = sum_across_ranks(stats)
                stats["policy/grad_norm"] = clip_gradients(self.policy_params, cfg.train.max_grad_norm)
                self.guard.step(self.optimizer, stats, self.step)
                self.scheduler.step()  # the schedule counts step slots, skipped ones included
                for key, number in stats.items():
                    totals[key] += number
                num_minibatches += 1
        return {key: value / num_minibatches for key, value in totals.items()}

    # ----------------------------------------------------------------------------------------
    # Checkpoints, diagnosis
    # ----------------------------------------------------------------------------------------

    def _stateful_parts(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "scheduler": self.scheduler, "sampler": self.sampler, "guard": self.guard}

    def save_checkpoint(self, final: bool = False) -> Path:
        """checkpoints/step-NNNNNN (or final/): the policy and the trainer state."""
        state = {key: part.state_dict() for key, part in self._stateful_parts().items()}
        models = {"": (self.policy, self.config.model.name)}
        return write_checkpoint(
            self.checkpoints, self.step, final, models, self.tokenizer, state, self.config.train.keep_last
        )

    def nonfinite_diagnosis(self, checkpoint: Path) -> str:
        return (
            f"stopped at step {self.step}: the last {self.guard.nonfinite_streak} optimizer steps had a non-finite "
            f"gradient in the policy ({describe_update(self.guard.last_nonfinite)}), so none was applied and the "
            f"weights are the last finite ones, saved to {checkpoint}. This usually means a learning rate that is "
            f"too high (train.lr={self.config.train.lr}) or train.max_grad_norm=null. Fix the cause and continue "
            f"with: tether grpo --resume --output {self.run_dir}"
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
