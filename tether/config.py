"""Typed configuration: nested dataclasses are the schema, YAML plus dotted overrides fill them.

    cfg = load_config(PPOConfig, "configs/demo.yaml", ["ppo.kl_coef=0.1", "train.steps=20"])

Every field has a default and a `help` string (README.md's config table is checked against them by
a test). Unknown keys are errors that name the closest valid key; values are checked against the
field's type and range, and the error names the field, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tether.errors import TetherError


class ConfigError(TetherError, ValueError):
    """A config file, override or value that cannot be used; the message says which and why."""


def _doc(default: Any, help: str) -> Any:
    """A dataclass field with its documentation attached."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    r: int = _doc(16, "LoRA rank.")
    alpha: int = _doc(32, "LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = _doc(0.0, "LoRA dropout. PPO runs every model in eval mode, so it is off there.")
    target_modules: str | list[str] = _doc(
        "all-linear", "Modules that get adapters: 'all-linear' or a list of module names."
    )


@dataclass
class ModelConfig:
    name: str = _doc(
        "smollm2-135m-instruct",
        "Policy to train: a local Hugging Face folder, a hub id, a .gguf file, a LoRA adapter folder "
        "(merged into its base), or the built-in embedded 'smollm2-135m-instruct'.",
    )
    lora: LoraConfig | None = _doc(
        None, "null for full fine-tuning, or LoRA settings {r, alpha, dropout, target_modules}."
    )
    dtype: Literal["float32", "bfloat16"] = _doc(
        "float32",
        "Compute dtype of generation and forward passes: 'bfloat16' runs them under autocast; every weight "
        "stays float32 (so the reference matches the policy exactly at the start).",
    )
    ref_model: str | None = _doc(
        None,
        "Reference model. null: the policy's own starting weights (for LoRA: the same weights with the "
        "adapter disabled, no second copy).",
    )
    value_model: str | None = _doc(
        None, "Value model to start from. null: reward.model when that is set, else model.name."
    )
    critic: Literal["model", "head"] = _doc(
        "model",
        "ppo's critic. 'model': its own network (model.value_model). 'head': one linear layer on the "
        "policy's last hidden state, detached, so the value loss never moves the policy: no value model, and "
        "the old log-probs and values come from one forward pass (train.value_lr: its learning rate).",
    )
    trust_remote_code: bool = _doc(False, "Passed to transformers when loading models and tokenizers.")
    fsdp: bool = _doc(
        False,
        "Shard the trained models with FSDP2 over the GPUs of a torchrun job. Not in this version: refused "
        "with the reason (README 'Scaling out'); plain data parallelism needs no setting.",
    )


@dataclass
class DataConfig:
    prompts: str | None = _doc(
        None,
        "Prompt file for ppo (JSON Lines, Parquet or a datasets folder). null: tether's shipped prompt set.",
    )
    train: str | None = _doc(None, "Training file for sft, rm and dpo.")
    eval: str | None = _doc(
        None, "Held-out prompts for the fixed before/after comparison. null: the shipped eval prompt set."
    )
    max_prompt_length: int = _doc(256, "Longest prompt in tokens, chat template included.")
    prompt_overflow: Literal["truncate", "error"] = _doc(
        "truncate", "A longer prompt is cut from the left with a warning ('truncate') or refused ('error')."
    )
    apply_chat_template: bool | None = _doc(
        None, "Wrap prompts in the tokenizer's chat template. null: when the tokenizer has one."
    )


@dataclass
class RewardConfig:
    model: str | None = _doc(None, "Reward model folder (a sequence classifier with one output).")
    function: str | None = _doc(
        None,
        "Reward function 'path/file.py:name' or 'package.module:name', called as name(prompts, responses, **kw).",
    )
    function_kwargs: dict[str, Any] = _doc({}, "Extra keyword arguments passed to reward.function and reward.gold.")
    model_weight: float = _doc(1.0, "Weight of the reward model's score in the total score.")
    function_weight: float = _doc(1.0, "Weight of the reward function's score in the total score.")
    gold: str | None = _doc(
        None,
        "A judge function logged as objective/gold_scores and never trained on (same format as function).",
    )


@dataclass
class RolloutConfig:
    max_new_tokens: int = _doc(64, "Longest response in tokens.")
    temperature: float = _doc(
        0.7, "Sampling temperature; every log-prob (rollout, reference, training) is taken under it."
    )
    samples_per_prompt: int = _doc(1, "Responses sampled per prompt.")
    missing_eos_penalty: float | None = _doc(
        -1.0, "Added to the score of a response that hits max_new_tokens without EOS. null: no penalty."
    )
    engine: Literal["hf", "vllm"] = _doc(
        "hf",
        "What samples: 'hf' is transformers generate with the KV cache. 'vllm' is not in this version: "
        "refused with the reason (README 'Scaling out').",
    )


@dataclass
class TrainConfig:
    steps: int = _doc(100, "Iterations (PPO: rollout + update) to run.")
    batch_size: int = _doc(
        8,
        "Prompts per iteration (PPO: each sampled samples_per_prompt times), over all processes of a torchrun "
        "job (a multiple of their number).",
    )
    lr: float = _doc(3.0e-6, "Policy learning rate (AdamW).")
    value_lr: float | None = _doc(
        None, "Learning rate of ppo's critic. null: train.lr for a value model, 1e-3 for a value head."
    )
    lr_schedule: Literal["constant", "linear", "cosine"] = _doc(
        "linear", "Learning-rate schedule over all optimizer steps (after warmup)."
    )
    warmup_steps: int = _doc(0, "Optimizer steps of linear warmup.")
    adam_eps: float = _doc(1.0e-5, "AdamW epsilon (1e-5 as in the RLHF references, not PyTorch's 1e-8).")
    weight_decay: float = _doc(0.0, "AdamW weight decay.")
    max_grad_norm: float | None = _doc(1.0, "Clip the gradient norm of each trained model to this. null: no clipping.")
    micro_batch_size: int | None = _doc(
        None, "Sequences per forward/backward pass (gradient accumulation). null: a whole minibatch at once."
    )
    max_nonfinite_in_a_row: int = _doc(
        3,
        "Optimizer steps in a row with a non-finite gradient (each one skipped) after which the run stops "
        "with a checkpoint and a diagnosis.",
    )
    seed: int = _doc(0, "Seed of every random generator (process k uses seed + k * 100003).")
    save_every: int = _doc(50, "Write a checkpoint every this many iterations (0: only the final model).")
    keep_last: int = _doc(3, "Step checkpoints to keep; older ones are deleted after a newer one is complete.")
    sample_every: int = _doc(10, "Append samples to samples.jsonl and print a sample table every this many iterations.")
    device: str = _doc("auto", "'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    num_threads: int | None = _doc(None, "CPU threads for torch. null: torch's default (one per core).")


@dataclass
class PPOParams:
    epochs: int = _doc(4, "PPO epochs over each rollout batch.")
    minibatch_size: int = _doc(8, "Sequences per optimizer step; must divide batch_size * samples_per_prompt.")
    clip_coef: float = _doc(0.2, "Policy ratio clip range epsilon.")
    value_clip: float | None = _doc(0.2, "Value clip range around the rollout values. null: no value clipping.")
    vf_coef: float = _doc(0.1, "Weight of the value loss in the total loss.")
    gamma: float = _doc(1.0, "Discount.")
    lam: float = _doc(0.95, "GAE lambda.")
    kl_coef: float = _doc(0.05, "KL penalty coefficient (initial value when kl_target is set).")
    kl_estimator: Literal["k1", "k2", "k3"] = _doc("k1", "Per-token KL estimator folded into the reward.")
    kl_target: float | None = _doc(
        None, "Per-sequence KL target (nats) of the adaptive controller. null: fixed kl_coef."
    )
    kl_horizon: float = _doc(10000.0, "Adaptive controller horizon, in sequences.")
    whiten_rewards: bool = _doc(False, "Whiten per-token rewards (scale only, mean kept) before GAE.")
    whiten_advantages: bool = _doc(True, "Whiten advantages (mean removed) per rollout batch.")


@dataclass
class EvalConfig:
    num_prompts: int = _doc(32, "Prompts of the fixed eval set (data.eval) used; 0 turns evaluation off.")
    temperature: float = _doc(
        0.7, "Sampling temperature of eval responses (0: greedy, and no KL estimate); every model gets the same."
    )
    max_new_tokens: int | None = _doc(None, "Eval response length. null: rollout.max_new_tokens.")
    seed: int = _doc(1234, "Seed of eval sampling: every model and every evaluation draws the same random numbers.")
    every: int = _doc(0, "Evaluate the policy every this many PPO iterations (logged as eval/*); 0: only at the end.")
    judge: str = _doc(
        "auto",
        "What decides a win against the baseline: 'reward' (the training score), 'gold' (reward.gold), a "
        "function 'file.py:name' scoring responses, or 'auto' (gold when set, else reward).",
    )
    tie_margin: float = _doc(0.0, "Judge scores closer than this count as a tie.")


@dataclass
class AlarmsConfig:
    enabled: bool = _doc(
        True, "Watch the metrics for reward hacking and collapse; alarms go to the console and metrics."
    )
    window: int = _doc(5, "Iterations a trend is measured over.")
    kl_factor: float = _doc(3.0, "With ppo.kl_target: alarm when the recent KL exceeds kl_factor x target.")
    kl_max: float = _doc(30.0, "Without ppo.kl_target: alarm when the recent KL (nats per response) exceeds this.")
    entropy_drop: float = _doc(0.5, "Alarm when the recent entropy falls below this fraction of the starting entropy.")
    length_rise: float = _doc(
        0.2, "Length-hacking alarm: length up by this fraction over the window, while the score rises and ..."
    )
    diversity_drop: float = _doc(0.1, "... distinct-2 of the responses falls by this fraction.")
    opening_share: float = _doc(0.5, "Alarm when more than this share of a batch's responses share one opening.")


@dataclass
class PPOConfig:
    """Everything `tether ppo` reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ppo: PPOParams = field(default_factory=PPOParams)
    eval: EvalConfig = field(default_factory=EvalConfig)
    alarms: AlarmsConfig = field(default_factory=AlarmsConfig)

    def validate(self) -> None:
        """Range and cross-field checks; raises ConfigError naming the field."""
        _validate_online(self, "ppo")
        _positive(self, "ppo.kl_horizon")
        _non_negative(self, "ppo.vf_coef")
        for key in ("train.value_lr", "ppo.value_clip", "ppo.kl_target"):
            if get_path(self, key) is not None:
                _positive(self, key)
        if self.model.critic == "head" and self.model.value_model is not None:
            raise ConfigError(
                f"model.value_model={self.model.value_model!r} is a value model to start from, but "
                "model.critic='head' puts the critic on the policy: set one of them"
            )
        for key in ("ppo.gamma", "ppo.lam"):
            if not 0.0 <= get_path(self, key) <= 1.0:
                raise ConfigError(f"{key} must be in [0, 1], got {get_path(self, key)}")


@dataclass
class GRPOParams:
    epochs: int = _doc(1, "Epochs over each rollout batch (TRL calls it num_iterations).")
    minibatch_size: int = _doc(8, "Sequences per optimizer step; must divide batch_size * samples_per_prompt.")
    clip_coef: float = _doc(0.2, "Policy ratio clip range epsilon.")
    kl_coef: float = _doc(0.04, "Weight of the KL to the reference (0: no KL term; objective/kl is logged still).")
    kl_in: Literal["loss", "reward"] = _doc(
        "loss",
        "'loss': k3 KL to the reference added to the loss per token (DeepSeekMath). "
        "'reward': the response's summed k1 KL subtracted from its score before the group statistics.",
    )
    scale_rewards: bool = _doc(
        True, "Divide by the group's standard deviation after removing its mean (false: mean only, Dr. GRPO)."
    )


@dataclass
class GRPOConfig:
    """Everything `tether grpo` reads: ppo's sections, with `grpo` in place of `ppo` (no value model)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grpo: GRPOParams = field(default_factory=GRPOParams)
    eval: EvalConfig = field(default_factory=EvalConfig)
    alarms: AlarmsConfig = field(default_factory=AlarmsConfig)

    def validate(self) -> None:
        if self.rollout.samples_per_prompt < 2:
            raise ConfigError(
                f"rollout.samples_per_prompt={self.rollout.samples_per_prompt}: grpo compares the responses "
                "to one prompt with each other, so it needs at least 2 (4 to 16 is usual)"
            )
        _validate_online(self, "grpo")
        for key in ("model.value_model", "train.value_lr"):
            if get_path(self, key) is not None:
                raise ConfigError(f"{key} is a ppo setting; grpo has no value model")
        if self.model.critic != "model":
            raise ConfigError(f"model.critic={self.model.critic!r} is a ppo setting; grpo has no critic")


OnlineConfig = PPOConfig | GRPOConfig


def _validate_online(config: OnlineConfig, section: str) -> None:
    """The checks ppo and grpo share; `section` names the algorithm's own section."""
    _positive(
        config,
        "train.steps",
        "train.batch_size",
        "train.lr",
        "rollout.max_new_tokens",
        "rollout.temperature",
        "rollout.samples_per_prompt",
        f"{section}.epochs",
        f"{section}.minibatch_size",
        f"{section}.clip_coef",
        "data.max_prompt_length",
        "train.adam_eps",
        "train.max_nonfinite_in_a_row",
        "alarms.window",
        "alarms.kl_factor",
        "alarms.kl_max",
        "alarms.entropy_drop",
    )
    _non_negative(
        config,
        "train.save_every",
        "train.keep_last",
        "train.warmup_steps",
        f"{section}.kl_coef",
        "train.weight_decay",
        "eval.num_prompts",
        "eval.temperature",
        "eval.every",
        "eval.tie_margin",
    )
    for key in ("train.max_grad_norm", "train.micro_batch_size", "train.num_threads", "eval.max_new_tokens"):
        if get_path(config, key) is not None:
            _positive(config, key)
    if config.eval.judge not in ("auto", "reward", "gold") and ":" not in config.eval.judge:
        raise ConfigError(
            f"eval.judge must be 'auto', 'reward', 'gold' or a function 'file.py:name', got {config.eval.judge!r}"
        )
    if config.alarms.window < 2:
        raise ConfigError(f"alarms.window must be at least 2 (a trend needs two halves), got {config.alarms.window}")
    if config.train.keep_last < 1 and config.train.save_every > 0:
        raise ConfigError("train.keep_last must be at least 1 when train.save_every > 0")
    rollout_size = config.train.batch_size * config.rollout.samples_per_prompt
    minibatch = get_path(config, f"{section}.minibatch_size")
    if rollout_size % minibatch:
        raise ConfigError(
            f"{section}.minibatch_size={minibatch} must divide train.batch_size * "
            f"rollout.samples_per_prompt = {rollout_size}"
        )
    micro = config.train.micro_batch_size
    if micro is not None and minibatch % micro:
        raise ConfigError(f"train.micro_batch_size={micro} must divide {section}.minibatch_size={minibatch}")
    if config.reward.model is None and config.reward.function is None:
        raise ConfigError("no reward source: set reward.model (a reward model folder) or reward.function")
    if config.model.lora is not None:
        _positive(config, "model.lora.r", "model.lora.alpha")


# --------------------------------------------------------------------------------------------
# The stages before PPO: reward-model training and SFT
# --------------------------------------------------------------------------------------------


@dataclass
class SupervisedData:
    train: str | None = _doc(
        None, "Training file (JSON Lines, Parquet or a datasets folder). null: the shipped file of the stage."
    )
    eval: str | None = _doc(
        None, "Held-out file in the training file's format. null: the shipped held-out file of the stage."
    )
    max_prompt_length: int = _doc(
        256, "Longest prompt in tokens, chat template included (longer ones are cut from the left)."
    )
    max_length: int = _doc(
        512, "Longest prompt + response in tokens; a longer example is left out of training with a warning."
    )
    apply_chat_template: bool | None = _doc(
        None, "Wrap prompts in the tokenizer's chat template. null: when the tokenizer has one."
    )


@dataclass
class SupervisedTrain:
    epochs: float = _doc(1.0, "Passes over the training data (ignored when train.steps is set).")
    steps: int | None = _doc(None, "Optimizer steps. null: train.epochs passes over the training data.")
    batch_size: int = _doc(
        8, "Examples (rm: preference pairs) per optimizer step, over all processes of a torchrun job."
    )
    lr: float = _doc(1.0e-5, "Learning rate (AdamW); LoRA usually wants about 10x more.")
    lr_schedule: Literal["constant", "linear", "cosine"] = _doc("linear", "Learning-rate schedule (after warmup).")
    warmup_steps: int = _doc(0, "Optimizer steps of linear warmup.")
    adam_eps: float = _doc(1.0e-8, "AdamW epsilon.")
    weight_decay: float = _doc(0.0, "AdamW weight decay.")
    max_grad_norm: float | None = _doc(1.0, "Clip the gradient norm to this. null: no clipping.")
    micro_batch_size: int | None = _doc(
        None, "Examples per forward/backward pass (gradient accumulation). null: a whole batch at once."
    )
    max_nonfinite_in_a_row: int = _doc(
        3, "Optimizer steps in a row with a non-finite gradient (each skipped) after which the run stops."
    )
    eval_every: int = _doc(0, "Evaluate on data.eval every this many steps (logged as eval/*); 0: only at the end.")
    seed: int = _doc(0, "Seed of every random generator (process k uses seed + k * 100003).")
    save_every: int = _doc(50, "Write a checkpoint every this many steps (0: only the final model).")
    keep_last: int = _doc(3, "Step checkpoints to keep; older ones are deleted after a newer one is complete.")
    device: str = _doc("auto", "'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    num_threads: int | None = _doc(None, "CPU threads for torch. null: torch's default (one per core).")


@dataclass
class RMParams:
    margin: bool = _doc(
        False, "Use each pair's 'margin' field in the loss -log sigmoid(r_chosen - r_rejected - margin)."
    )
    normalize: bool = _doc(
        True,
        "Store a gain and bias with the model so that its scores on the held-out responses (chosen and "
        "rejected, samples of the starting model) have mean 0 and std 1.",
    )


@dataclass
class RMConfig:
    """Everything `tether rm` reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: SupervisedData = field(default_factory=SupervisedData)
    train: SupervisedTrain = field(default_factory=SupervisedTrain)
    rm: RMParams = field(default_factory=RMParams)

    def validate(self) -> None:
        _validate_supervised(self)


@dataclass
class SFTConfig:
    """Everything `tether sft` reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: SupervisedData = field(default_factory=SupervisedData)
    train: SupervisedTrain = field(default_factory=SupervisedTrain)

    def validate(self) -> None:
        _validate_supervised(self)


@dataclass
class DPOParams:
    beta: float = _doc(
        0.1, "DPO beta: the strength of the implicit KL tie to the reference (rewards are beta x log-ratio)."
    )
    loss_type: Literal["sigmoid", "ipo"] = _doc(
        "sigmoid", "'sigmoid' (DPO) or 'ipo' (IPO: squared loss on per-token mean log-ratios, target 1 / (2 beta))."
    )


@dataclass
class DPOConfig:
    """Everything `tether dpo` reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: SupervisedData = field(default_factory=SupervisedData)
    train: SupervisedTrain = field(default_factory=SupervisedTrain)
    dpo: DPOParams = field(default_factory=DPOParams)

    def validate(self) -> None:
        _validate_supervised(self)
        _positive(self, "dpo.beta")


def _validate_supervised(config: RMConfig | SFTConfig | DPOConfig) -> None:
    _positive(
        config,
        "train.epochs",
        "train.batch_size",
        "train.lr",
        "train.adam_eps",
        "train.max_nonfinite_in_a_row",
        "data.max_prompt_length",
        "data.max_length",
    )
    _non_negative(
        config, "train.warmup_steps", "train.weight_decay", "train.eval_every", "train.save_every", "train.keep_last"
    )
    for key in ("train.steps", "train.max_grad_norm", "train.micro_batch_size", "train.num_threads"):
        if get_path(config, key) is not None:
            _positive(config, key)
    if config.data.max_prompt_length >= config.data.max_length:
        raise ConfigError(
            f"data.max_prompt_length={config.data.max_prompt_length} must be below data.max_length="
            f"{config.data.max_length}, or no response fits"
        )
    micro = config.train.micro_batch_size
    if micro is not None and config.train.batch_size % micro:
        raise ConfigError(f"train.micro_batch_size={micro} must divide train.batch_size={config.train.batch_size}")
    if config.train.keep_last < 1 and config.train.save_every > 0:
        raise ConfigError("train.keep_last must be at least 1 when train.save_every > 0")
    if config.model.lora is not None:
        _positive(config, "model.lora.r", "model.lora.alpha")
    for key in ("model.ref_model", "model.value_model"):
        if get_path(config, key) is not None:
            raise ConfigError(f"{key} is a ppo setting; this stage trains model.name alone")
    if config.model.critic != "model":
        raise ConfigError(f"model.critic={config.model.critic!r} is a ppo setting; this stage has no critic")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def get_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _positive(cfg: Any, *keys: str) -> None:
    for key in keys:
        value = get_path(cfg, key)
        if not 0 < value < math.inf:
            raise ConfigError(f"{key} must be a finite number > 0, got {value!r}")


def _non_negative(cfg: Any, *keys: str) -> None:
    for key in keys:
        value = get_path(cfg, key)
        if not 0 <= value < math.inf:
            raise ConfigError(f"{key} must be a finite number >= 0, got {value!r}")


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config class, nested sections expanded (LoRA included)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        section = _dataclass_in(hints[f.name])
        if section is not None:
            keys.extend(all_keys(section, f"{prefix}{f.name}."))
        else:
            keys.append(prefix + f.name)
    return keys


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass inside `tp` (a dataclass or an Optional of one), else None."""
    for candidate in (tp, *typing.get_args(tp)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, root: type) -> Any:
    """`value` as type `tp`, or ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        section = _dataclass_in(tp)
        if section is not None and isinstance(value, dict):  # let the section's own error through
            return _coerce(value, section, key, root)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, root)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {', '.join(all_keys(tp))}, got {value!r}")
        return _build(tp, value, key + ".", root)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", root) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")  # a schema bug, not user input


def _build(cls: type, values: dict[str, Any], prefix: str, root: type) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(_unknown_key_message(cls, prefix, str(key), root))
        kwargs[key] = _coerce(value, hints[key], prefix + key, root)
    return cls(**kwargs)


def _unknown_key_message(cls: type, prefix: str, key: str, root: type) -> str:
    here = [f.name for f in dataclasses.fields(cls)]
    close = [prefix + c for c in difflib.get_close_matches(key, here, n=1, cutoff=0.5)]
    if not close:  # maybe it belongs in another section: look through every dotted key
        close = difflib.get_close_matches(prefix + key, all_keys(root), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys here: {', '.join(here)}"
    return f"unknown config key {prefix + key!r}{hint}"


def parse_override(text: str) -> tuple[str, Any]:
    """'ppo.kl_coef=0.1' -> ('ppo.kl_coef', 0.1); the value is read as YAML ('null', lists, ...)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({err})") from err
    return key.strip(), value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Build config class `cls` from a YAML file (optional) and dotted overrides, then validate it."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from err
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(loaded).__name__}")
        tree = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    config = _build(cls, tree, "", cls)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: Path) -> None:
    from tether.checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


def field_help(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every field, for the README table and `--help`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        section = _dataclass_in(hints[f.name])
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if section is not None and default is not None:
            rows.extend(field_help(section, f"{prefix}{f.name}."))
        else:
            rows.append((prefix + f.name, default, f.metadata.get("help", "")))
            if section is not None:  # an optional section (model.lora): document its keys too
                rows.extend(field_help(section, f"{prefix}{f.name}."))
    return rows
