"""Every role a stage needs, loaded from its config: the one place models come from.

    roles = load_rollout_roles(config, checkpoint, device)   # ppo, grpo: policy, reference, rewards, critic
    model = load_trainable("scalar", ...)                     # sft, rm, dpo load their one model directly

The roles themselves (roles/) receive models and never load one. The order of the loads is fixed:
a fresh head or LoRA adapter draws from the random generator, so the same config loads the same
weights and a run samples the same numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from tether.config import OnlineConfig, PPOConfig, SpeedConfig
from tether.data import uses_chat_template
from tether.engines import fsdp
from tether.episodes import Episodes
from tether.loading.functions import load_callable, load_function, load_scorer
from tether.loading.models import eos_token_ids, load_causal_lm, load_scalar_model, load_tokenizer, load_trainable
from tether.remote_reward import RemoteReward, RemoteRewardConfig
from tether.roles.reference import Reference
from tether.roles.reward import RewardSources
from tether.roles.value import ValueHead
from tether.runtime import broadcast_trainable
from tether.speed import refusals

log = logging.getLogger(__name__)


@dataclass
class RolloutRoles:
    """The roles of a rollout stage: the trained policy, the frozen reference, the scorers and,
    for ppo, the critic (its own value model, or a value head on the policy)."""

    tokenizer: Any
    policy: Any
    reference: Reference | None  # None: grpo.kl_in=none with full fine-tuning (no reference model at all)
    rewards: RewardSources
    eos_ids: list[int]
    value_model: Any = None
    value_head: ValueHead | None = None
    episodes: Episodes | None = None  # rollout.environment: multi-turn episodes

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def critic(self) -> Any:
        """The trained critic: the value head, or the value model (None in grpo)."""
        return self.value_head if self.value_head is not None else self.value_model


def load_rollout_roles(config: OnlineConfig, checkpoint: Path | None, device: torch.device) -> RolloutRoles:
    """The policy from `checkpoint` when resuming (the critic from its value/ folder), else from the
    config. A LoRA policy's reference is the same weights with the adapter off
    (docs/concepts/details.md item 17), else its own frozen copy."""
    cfg = config.model
    trust = cfg.trust_remote_code
    tokenizer = load_tokenizer(cfg.name, trust)
    if cfg.fsdp:  # a sharded checkpoint holds no model folder: its weights are restored with the optimizer
        checkpoint = None
    policy = load_trainable("causal", cfg.name, cfg.lora, tokenizer, checkpoint, trust).to(device)
    broadcast_trainable(policy)
    say_refusals(config.speed, policy, "the policy")
    reference: Reference | None = None
    ref_model: Any = None
    if cfg.lora is not None and cfg.ref_model is None:
        reference = Reference(lora_policy=policy)  # costs nothing: the same weights, adapter off
    elif getattr(getattr(config, "grpo", None), "kl_in", "loss") != "none":  # kl_in=none: no KL, no reference
        ref_model = load_causal_lm(cfg.ref_model or cfg.name, tokenizer, trust)
        ref_model = ref_model.to(device)
        reference = Reference(model=ref_model)
    rewards = load_rewards(config, tokenizer, device)
    eos_ids = eos_token_ids(tokenizer, policy)
    roles = RolloutRoles(
        tokenizer, policy, reference, rewards, eos_ids, episodes=load_episodes(config, tokenizer, eos_ids)
    )
    if isinstance(config, PPOConfig):
        saved = checkpoint / "value" if checkpoint is not None else None
        if config.model.critic == "head":
            roles.value_head = _value_head(policy, saved, device)
        else:
            roles.value_model = _value_model(config, tokenizer, saved, device)
            if cfg.lora is not None and _shares_weights(rewards, value_source(config)):
                # A LoRA value model starting from the reward model is the reward model's weights
                # plus an adapter: the reward model scores through it with the adapter off.
                rewards.model = roles.value_model
                rewards.adapted_reward_model = True
    if cfg.fsdp:
        shard_roles(roles, config, ref_model)
    return roles


def load_episodes(config: OnlineConfig, tokenizer: PreTrainedTokenizerBase, eos_ids: list[int]) -> Episodes | None:
    """rollout.environment's episodes (environments.py, episodes.py); None for one-turn responses."""
    rollout = config.rollout
    if rollout.environment is None:
        return None
    return Episodes(
        load_callable(rollout.environment, "environment"),
        rollout.environment,
        rollout.environment_kwargs,
        rollout.max_turns,
        rollout.max_tool_tokens,
        tokenizer,
        eos_ids,
        uses_chat_template(tokenizer, config.data.apply_chat_template),
    )


def shard_roles(roles: RolloutRoles, config: OnlineConfig, ref_model: Any) -> None:
    """model.fsdp: the trained models sharded (the policy, the value model; a value head stays whole
    in every process), the frozen ones (the reference's own model, the reward model) as
    model.fsdp_frozen says. After every load and broadcast, so each process shards the same weights."""
    cfg = config.model
    roles.policy = fsdp.shard(roles.policy, "policy", dtype=cfg.dtype)
    if roles.value_model is not None:
        roles.value_model = fsdp.shard(roles.value_model, "value", dtype=cfg.dtype)
    if roles.value_head is not None:
        fsdp.register_trained("value", roles.value_head)
    if ref_model is not None:  # a LoRA policy's reference is the policy itself
        fsdp.hold_frozen(ref_model, "reference", cfg.fsdp_frozen, cfg.dtype)
    if roles.rewards.model is not None and not roles.rewards.adapted_reward_model:
        fsdp.hold_frozen(roles.rewards.model, "reward", cfg.fsdp_frozen, cfg.dtype)


def value_source(config: PPOConfig) -> str:
    """What ppo's value model starts from: model.value_model, else the reward model, else the policy."""
    return config.model.value_model or config.reward.model or config.model.name


def _value_head(policy: Any, saved: Path | None, device: torch.device) -> ValueHead:
    if saved is not None:
        head = ValueHead.from_pretrained(saved)
    else:
        head = ValueHead(policy.get_output_embeddings().weight.shape[1])
    head = head.to(device)
    broadcast_trainable(head)
    return head


def _value_model(
    config: PPOConfig, tokenizer: PreTrainedTokenizerBase, saved: Path | None, device: torch.device
) -> Any:
    cfg = config.model
    value = load_trainable("scalar", value_source(config), cfg.lora, tokenizer, saved, cfg.trust_remote_code)
    value = value.to(device)
    broadcast_trainable(value)
    say_refusals(config.speed, value, "the value model")
    return value


def _shares_weights(rewards: RewardSources, model_name: str) -> bool:
    """Whether a model loaded from `model_name` reads the reward model's weights and tokens."""
    return rewards.model is not None and rewards.model_tokenizer is None and model_name == rewards.config.model


def load_rewards(config: OnlineConfig, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> RewardSources:
    """The reward sources a config asks for: the frozen reward model (with its own tokenizer when
    its vocabulary differs from the policy's), the reward function, the client of a reward service
    (its header secrets read from the environment now) and the gold judge."""
    reward = config.reward
    trust = config.model.trust_remote_code
    model: Any = None
    model_tokenizer = None
    if reward.model is not None:
        own_tokenizer = load_tokenizer(reward.model, trust)
        model = load_scalar_model(reward.model, own_tokenizer, trust, role="reward")
        model = model.to(device).requires_grad_(False)
        say_refusals(config.speed, model, "the reward model")
        # Same vocabulary: score the policy's token ids directly. Otherwise re-tokenize text.
        if own_tokenizer.get_vocab() != tokenizer.get_vocab():
            model_tokenizer = own_tokenizer
    return RewardSources(
        reward,
        tokenizer,
        device,
        speed=config.speed,
        model=model,
        model_tokenizer=model_tokenizer,
        function=load_function(reward.function) if reward.function else None,
        remote=RemoteReward(RemoteRewardConfig.from_section(reward)) if reward.url else None,
        gold=load_scorer(reward.gold, RemoteRewardConfig.from_section(reward)) if reward.gold else None,
        pass_rows=config.sizes().pass_rows,
        missing_eos_penalty=config.rollout.missing_eos_penalty,
        dtype=config.model.dtype,
    )


def say_refusals(speed: SpeedConfig, model: Any, role: str) -> None:
    """Log, once per model, the speed tricks its architecture does not take."""
    for line in refusals(speed, model):
        log.warning("%s: %s", role, line)
