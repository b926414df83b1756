"""Each stage's whole configuration: the sections it reads (config/sections.py), the checks that
relate sections, and the sizes derived from them, computed in one place.

    cfg = load_config(PPOConfig, "configs/demo.yaml", ["ppo.kl_coef=0.1", "train.steps=20"])
    sizes = cfg.sizes()   # rollout, minibatch, micro-batch, optimizer steps
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from tether.config.schema import ConfigError
from tether.config.sections import (
    AlarmsConfig,
    DPOParams,
    EvalConfig,
    ExampleData,
    GroupRolloutConfig,
    GRPOParams,
    ModelConfig,
    OfflineTrainConfig,
    PolicyModelConfig,
    PPOModelConfig,
    PPOParams,
    PPOTrainConfig,
    PromptData,
    RewardConfig,
    RMParams,
    RolloutConfig,
    RolloutTrainConfig,
    SpeedConfig,
)

_PPO_ONLY = "is a ppo setting; grpo has no value model"


@dataclass(frozen=True)
class RolloutSizes:
    """The batch arithmetic of a rollout stage (every count over all processes of a job)."""

    prompts: int  # prompts per iteration (train.batch_size)
    rollout: int  # sequences per iteration: prompts x samples_per_prompt
    minibatch: int  # sequences per optimizer step
    micro: int  # sequences per forward/backward pass of the update
    pass_rows: int | None  # sequences per forward pass without grad (old, reference, values, scores); None: all
    minibatches_per_epoch: int
    optimizer_steps: int  # over the whole run: the learning-rate schedule's length


@dataclass
class RolloutStageConfig:
    """The sections ppo and grpo share; each adds its algorithm's own section."""

    ALGORITHM: ClassVar[str]  # the name of the algorithm's section
    REFUSED_KEYS: ClassVar[dict[str, str]] = {}  # keys of other stages, with why they mean nothing here

    model: PolicyModelConfig = field(default_factory=PolicyModelConfig)
    data: PromptData = field(default_factory=PromptData)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: RolloutTrainConfig = field(default_factory=RolloutTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    alarms: AlarmsConfig = field(default_factory=AlarmsConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    @property
    def algorithm(self) -> Any:
        """The algorithm's section (ppo or grpo): epochs, minibatch_size, clip_coef, kl_coef, ..."""
        return getattr(self, self.ALGORITHM)

    def sizes(self) -> RolloutSizes:
        rollout = self.train.batch_size * self.rollout.samples_per_prompt
        minibatch = self.algorithm.minibatch_size
        per_epoch = rollout // minibatch
        return RolloutSizes(
            prompts=self.train.batch_size,
            rollout=rollout,
            minibatch=minibatch,
            micro=self.train.micro_batch_size or minibatch,
            pass_rows=self.train.micro_batch_size,
            minibatches_per_epoch=per_epoch,
            optimizer_steps=self.train.steps * self.algorithm.epochs * per_epoch,
        )

    def check(self, prefix: str = "") -> None:
        section = self.ALGORITHM
        rollout_size = self.train.batch_size * self.rollout.samples_per_prompt
        minibatch = self.algorithm.minibatch_size
        if rollout_size % minibatch:
            raise ConfigError(
                f"{section}.minibatch_size={minibatch} must divide train.batch_size * "
                f"rollout.samples_per_prompt = {rollout_size}"
            )
        micro = self.train.micro_batch_size
        if micro is not None and minibatch % micro:
            raise ConfigError(f"train.micro_batch_size={micro} must divide {section}.minibatch_size={minibatch}")
        if self.rollout.is_correction and self.rollout.engine == "hf" and not self.speed.inverse_cdf_sampler:
            raise ConfigError(
                "rollout.is_correction weights each token by the sampler's own log-prob, which transformers' "
                "multinomial sampling does not report: use rollout.engine=vllm, or speed.inverse_cdf_sampler=true"
            )

    def missing(self) -> list[str]:
        """Settings that have no usable default and must be given (an environment's reward is a source)."""
        return [] if self.rollout.environment is not None else self.reward.missing("reward.")


@dataclass
class PPOConfig(RolloutStageConfig):
    """Everything `tether ppo` reads."""

    ALGORITHM: ClassVar[str] = "ppo"

    model: PPOModelConfig = field(default_factory=PPOModelConfig)
    train: PPOTrainConfig = field(default_factory=PPOTrainConfig)
    ppo: PPOParams = field(default_factory=PPOParams)


@dataclass
class GRPOConfig(RolloutStageConfig):
    """Everything `tether grpo` reads: ppo's sections with `grpo` in place of `ppo`, and no critic."""

    ALGORITHM: ClassVar[str] = "grpo"
    REFUSED_KEYS: ClassVar[dict[str, str]] = {
        "model.value_model": _PPO_ONLY,
        "train.value_lr": _PPO_ONLY,
        "model.critic": "is a ppo setting; grpo has no critic",
    }

    rollout: GroupRolloutConfig = field(default_factory=GroupRolloutConfig)
    grpo: GRPOParams = field(default_factory=GRPOParams)

    def check(self, prefix: str = "") -> None:
        grpo, samples = self.grpo, self.rollout.samples_per_prompt
        grouped = grpo.estimator != "reinforce_pp" or grpo.dynamic_sampling
        if grouped and samples < 2:
            why = (
                "dynamic sampling drops groups whose scores are all equal"
                if grpo.dynamic_sampling
                else (f"grpo.estimator={grpo.estimator!r} compares the responses to one prompt with each other")
            )
            raise ConfigError(
                f"rollout.samples_per_prompt={samples}: {why}, so it needs at least 2 (4 to 16 is usual; "
                "grpo.estimator='reinforce_pp' takes 1)"
            )
        if grpo.overlong_buffer is not None and self.rollout.max_turns > 1:
            raise ConfigError(
                f"grpo.overlong_buffer with rollout.max_turns={self.rollout.max_turns}: the length limit is per turn "
                "and an episode has several, so there is no one limit to ramp the penalty towards"
            )
        if grpo.overlong_buffer is not None and grpo.overlong_buffer >= self.rollout.max_new_tokens:
            raise ConfigError(
                f"grpo.overlong_buffer={grpo.overlong_buffer} must be below rollout.max_new_tokens="
                f"{self.rollout.max_new_tokens}: the penalty ramps over the last tokens before the limit"
            )
        if grpo.policy_loss == "gspo" and grpo.loss_aggregation == "seq_sum_constant":
            raise ConfigError(
                "grpo.policy_loss='gspo' with grpo.loss_aggregation='seq_sum_constant': GSPO's ratio is already a "
                "per-response mean, and summing it over tokens weights long responses by their length, which the "
                "length normalisation exists to avoid; use 'seq_mean_token_mean' (GSPO's own) or 'token_mean'"
            )
        super().check(prefix)


OnlineConfig = PPOConfig | GRPOConfig


# --------------------------------------------------------------------------------------------
# The offline stages: fixed examples, no sampling
# --------------------------------------------------------------------------------------------

_ALONE = "is a ppo setting; this stage trains model.name alone"


@dataclass
class OfflineStageConfig:
    """The sections sft, rm and dpo share."""

    REFUSED_KEYS: ClassVar[dict[str, str]] = {
        "model.ref_model": _ALONE,
        "model.value_model": _ALONE,
        "model.critic": "is a ppo setting; this stage has no critic",
    }

    model: ModelConfig = field(default_factory=ModelConfig)
    data: ExampleData = field(default_factory=ExampleData)
    train: OfflineTrainConfig = field(default_factory=OfflineTrainConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    @property
    def micro_batch(self) -> int:
        """Examples per forward/backward pass (and per held-out forward pass)."""
        return self.train.micro_batch_size or self.train.batch_size

    def total_steps(self, num_examples: int) -> int:
        """Optimizer steps of the run: train.steps, else train.epochs passes over the examples."""
        batches_per_epoch = -(-num_examples // self.train.batch_size)
        return self.train.steps or max(1, round(self.train.epochs * batches_per_epoch))

    def missing(self) -> list[str]:
        return []


@dataclass
class SFTConfig(OfflineStageConfig):
    """Everything `tether sft` reads."""


@dataclass
class RMConfig(OfflineStageConfig):
    """Everything `tether rm` reads."""

    rm: RMParams = field(default_factory=RMParams)


@dataclass
class DPOConfig(OfflineStageConfig):
    """Everything `tether dpo` reads."""

    dpo: DPOParams = field(default_factory=DPOParams)


OfflineConfig = SFTConfig | RMConfig | DPOConfig
StageConfig = OnlineConfig | OfflineConfig
