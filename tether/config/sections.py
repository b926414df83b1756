"""The sections of tether's configuration, each declared once and shared by the stages that read it.

Each field carries its default, its documentation and its range (`setting`); a section checks what
relates its own fields in `check(prefix)`. The stages compose these sections (config/stages.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any, Literal
from urllib.parse import urlsplit

from tether.config.schema import (
    ConfigError,
    check_section,
    non_negative,
    positive,
    redefault,
    setting,
    unit_interval,
)


def _at_least_two(value: Any, key: str) -> None:
    if value < 2:
        raise ConfigError(f"{key} must be at least 2 (a trend needs two halves), got {value}")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    r: int = setting(16, "LoRA rank.", positive)
    alpha: int = setting(32, "LoRA scaling numerator (the update is scaled by alpha / r).", positive)
    dropout: float = setting(0.0, "LoRA dropout. PPO runs every model in eval mode, so it is off there.")
    target_modules: str | list[str] = setting(
        "all-linear", "Modules that get adapters: 'all-linear' or a list of module names."
    )

    def check(self, prefix: str) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{prefix}dropout must be in [0, 1), got {self.dropout}")


@dataclass
class ModelConfig:
    """The trained model of every stage."""

    name: str = setting(
        "smollm2-135m-instruct",
        "Model to train: a local Hugging Face folder, a hub id, a .gguf file, a LoRA adapter folder "
        "(merged into its base), or the built-in embedded 'smollm2-135m-instruct'.",
    )
    lora: LoraConfig | None = setting(
        None, "null for full fine-tuning, or LoRA settings {r, alpha, dropout, target_modules}."
    )
    dtype: Literal["float32", "bfloat16"] = setting(
        "float32",
        "Compute dtype of generation and forward passes: 'bfloat16' runs them under autocast; every weight "
        "stays float32 (so the reference matches the policy exactly at the start).",
    )
    trust_remote_code: bool = setting(False, "Passed to transformers when loading models and tokenizers.")
    fsdp: bool = setting(
        False,
        "Shard the trained models (policy, value model) with FSDP2 over the processes of a torchrun job, per "
        "decoder layer and at the root: each process holds 1/N of their weights, gradients and optimizer state. "
        "model.dtype=bfloat16 becomes FSDP's mixed precision; step checkpoints are sharded (DCP), the final model "
        "a plain Hugging Face folder (docs: scaling out). Plain data parallelism needs no setting.",
    )


@dataclass
class PolicyModelConfig(ModelConfig):
    """The policy of a rollout stage, and the reference it is tethered to."""

    ref_model: str | None = setting(
        None,
        "Reference model. null: the policy's own starting weights (for LoRA: the same weights with the "
        "adapter disabled, no second copy).",
    )
    fsdp_frozen: Literal["shard", "replicate"] = setting(
        "shard",
        "model.fsdp=true: the frozen models (the reference, the reward model) sharded like the trained ones "
        "('shard': 1/N of their weights per process, gathered layer by layer in each pass) or whole in every "
        "process ('replicate': no gathers, faster when they fit).",
    )


@dataclass
class PPOModelConfig(PolicyModelConfig):
    """The policy, its reference, and ppo's critic."""

    value_model: str | None = setting(
        None, "Value model to start from. null: reward.model when that is set, else model.name."
    )
    critic: Literal["model", "head"] = setting(
        "model",
        "ppo's critic. 'model': its own network (model.value_model). 'head': one linear layer on the "
        "policy's last hidden state, detached, so the value loss never moves the policy: no value model, and "
        "the old log-probs and values come from one forward pass (train.value_lr: its learning rate).",
    )

    def check(self, prefix: str) -> None:
        if self.critic == "head" and self.value_model is not None:
            raise ConfigError(
                f"{prefix}value_model={self.value_model!r} is a value model to start from, but "
                f"{prefix}critic='head' puts the critic on the policy: set one of them"
            )


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class PromptEncoding:
    """How prompts become token ids, in every stage."""

    max_prompt_length: int = setting(256, "Longest prompt in tokens, chat template included.", positive)
    apply_chat_template: bool | None = setting(
        None, "Wrap prompts in the tokenizer's chat template. null: when the tokenizer has one."
    )


@dataclass
class PromptData(PromptEncoding):
    """The prompts a rollout stage samples from, and its fixed eval set."""

    prompts: str | None = setting(
        None,
        "Prompt file for ppo and grpo (JSON Lines, Parquet or a datasets folder). null: tether's shipped prompt set.",
    )
    eval: str | None = setting(
        None, "Held-out prompts for the fixed before/after comparison. null: the shipped eval prompt set."
    )
    prompt_overflow: Literal["truncate", "error"] = setting(
        "truncate", "A longer prompt is cut from the left with a warning ('truncate') or refused ('error')."
    )


@dataclass
class ExampleData(PromptEncoding):
    """The fixed examples of an offline stage (sft, rm, dpo)."""

    train: str | None = setting(
        None, "Training file (JSON Lines, Parquet or a datasets folder). null: the shipped file of the stage."
    )
    eval: str | None = setting(
        None, "Held-out file in the training file's format. null: the shipped held-out file of the stage."
    )
    max_length: int = setting(
        512, "Longest prompt + response in tokens; a longer example is left out of training with a warning.", positive
    )

    def check(self, prefix: str) -> None:
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"{prefix}max_prompt_length={self.max_prompt_length} must be below {prefix}max_length="
                f"{self.max_length}, or no response fits"
            )


# --------------------------------------------------------------------------------------------
# Rewards and sampling
# --------------------------------------------------------------------------------------------


# Headers that carry credentials: their value must come from the environment ("${NAME}").
SECRET_HEADER = re.compile(r"auth|cookie|token|secret|key|password|credential", re.IGNORECASE)
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _whole(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be a whole number, got {value!r}")


def _positive_whole(value: Any, key: str) -> None:
    _whole(value, key)
    positive(value, key)


def _non_negative_whole(value: Any, key: str) -> None:
    _whole(value, key)
    non_negative(value, key)


def _finite(value: Any, key: str) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")


def _service_url(value: Any, key: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key} must be an http:// or https:// URL with a host, got {value!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"{key} must not hold credentials (user:password@): the config is saved with the run; send them "
            "in a header read from an environment variable, e.g. Authorization: 'Bearer ${REWARD_TOKEN}'"
        )


def _secret_free_headers(value: Any, key: str) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must map header names to strings, got {value!r}")
    for header, text in value.items():
        if not isinstance(header, str) or not isinstance(text, str):
            raise ConfigError(f"{key} must map header names to strings, got {header!r}: {text!r}")
        if SECRET_HEADER.search(header) and not ENV_REFERENCE.search(text):
            raise ConfigError(
                f"{key}[{header!r}] looks like a credential written into the config, which is saved with the run: "
                f"put the secret in an environment variable and write its name, e.g. "
                f"{header}: 'Bearer ${{REWARD_TOKEN}}'"
            )


@dataclass
class RemoteRewardConfig:
    """The settings of a reward service, named as the `reward.url*` config keys they become."""

    url: str | None = setting(
        None,
        "Reward service: an http(s) URL that scores a batch POSTed as JSON (docs/remote-rewards.md). null: none.",
        _service_url,
    )
    url_timeout: float = setting(
        30.0, "Seconds one request to reward.url may take (to connect, to send, for each read).", positive
    )
    url_retries: int = setting(
        3,
        "Retries of a request to reward.url after a connection error, timeout, HTTP 5xx or 429 (0: none).",
        _non_negative_whole,
    )
    url_backoff: float = setting(
        1.0,
        "Seconds before the first retry; each further retry waits twice as long, up to reward.url_backoff_max.",
        non_negative,
    )
    url_backoff_max: float = setting(30.0, "Longest wait between two retries, in seconds.", non_negative)
    url_batch_size: int = setting(
        64, "Most samples in one request to reward.url (a batch is split into requests).", _positive_whole
    )
    url_concurrency: int = setting(4, "Requests to reward.url in flight at once.", _positive_whole)
    url_headers: dict[str, str] = setting(
        {},
        "HTTP headers of every request to reward.url; '${NAME}' in a value is replaced by the environment "
        "variable NAME (Authorization: 'Bearer ${REWARD_TOKEN}'), so no secret is written into the config.",
        _secret_free_headers,
    )
    url_weight: float = setting(1.0, "Weight of the reward service's score in the total score.", _finite)

    @classmethod
    def from_section(cls, section: Any) -> RemoteRewardConfig:
        """The settings read from any object with attributes of the same names (a config section)."""
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls) if hasattr(section, f.name)})

    def check(self, prefix: str = "reward.") -> None:
        """What relates the fields (each field's own range is checked by `validate`)."""
        if self.url_backoff_max < self.url_backoff:
            raise ConfigError(
                f"{prefix}url_backoff_max={self.url_backoff_max} must be at least "
                f"{prefix}url_backoff={self.url_backoff}"
            )

    def validate(self, prefix: str = "reward.") -> None:
        """Every field's own check, then `check`; ConfigError names the key `prefix + field`."""
        check_section(self, prefix)


@dataclass
class RewardConfig:
    model: str | None = setting(None, "Reward model folder (a sequence classifier with one output).")
    function: str | None = setting(
        None,
        "Reward function 'path/file.py:name' or 'package.module:name', called as name(prompts, responses, **kw).",
    )
    function_kwargs: dict[str, Any] = setting({}, "Extra keyword arguments passed to reward.function and reward.gold.")
    model_weight: float = setting(1.0, "Weight of the reward model's score in the total score.")
    function_weight: float = setting(1.0, "Weight of the reward function's score in the total score.")
    environment_weight: float = setting(
        1.0,
        "Weight of an episode's reward from rollout.environment (the sum of its steps' rewards) in the total score.",
    )
    gold: str | None = setting(
        None,
        "A judge logged as objective/gold_scores and never trained on: a function (same format as function) or "
        "the http(s) URL of a reward service, asked with the reward.url_* settings.",
    )
    # A reward service (remote_reward.py): its settings, declared once there.
    url: str | None = redefault(RemoteRewardConfig, "url", None)
    url_weight: float = redefault(RemoteRewardConfig, "url_weight", 1.0)
    url_timeout: float = redefault(RemoteRewardConfig, "url_timeout", 30.0)
    url_retries: int = redefault(RemoteRewardConfig, "url_retries", 3)
    url_backoff: float = redefault(RemoteRewardConfig, "url_backoff", 1.0)
    url_backoff_max: float = redefault(RemoteRewardConfig, "url_backoff_max", 30.0)
    url_batch_size: int = redefault(RemoteRewardConfig, "url_batch_size", 64)
    url_concurrency: int = redefault(RemoteRewardConfig, "url_concurrency", 4)
    url_headers: dict[str, str] = redefault(RemoteRewardConfig, "url_headers", {})

    def check(self, prefix: str) -> None:
        RemoteRewardConfig.from_section(self).check(prefix)

    def missing(self, prefix: str) -> list[str]:
        if self.model is None and self.function is None and self.url is None:
            return [
                f"no reward source: set {prefix}model (a reward model folder), {prefix}function or {prefix}url "
                "(a reward service)"
            ]
        return []


@dataclass
class RolloutConfig:
    max_new_tokens: int = setting(64, "Longest response in tokens.", positive)
    temperature: float = setting(
        0.7, "Sampling temperature; every log-prob (rollout, reference, training) is taken under it.", positive
    )
    samples_per_prompt: int = setting(1, "Responses sampled per prompt.", positive)
    missing_eos_penalty: float | None = setting(
        -1.0, "Added to the score of a response that hits max_new_tokens without EOS. null: no penalty."
    )
    engine: Literal["hf", "vllm"] = setting(
        "hf",
        "What samples: 'hf' is transformers generate with the KV cache; 'vllm' a vLLM engine in the training "
        "process, given the policy's weights after every update and checked (docs/vllm.md).",
    )
    vllm_kv_cache_gb: float = setting(
        1.0,
        "rollout.engine=vllm: memory for its KV cache, in GiB (vLLM's own default takes 92% of the machine).",
        positive,
    )
    is_correction: bool = setting(
        False,
        "Truncated importance sampling: weight each token's policy loss by min(pi_train / pi_sample, is_cap), "
        "correcting for the gap between the sampler's and the trainer's log-probs (rollout/logprob_gap_*).",
    )
    is_cap: float = setting(2.0, "The cap C of rollout.is_correction's weights.", positive)
    environment: str | None = setting(
        None,
        "Multi-turn episodes: an environment class or factory 'path/file.py:Name' or 'package.module:Name', "
        "one per episode (reset(prompt), step(turn) -> Step: docs/environments.md); the shipped calculator task "
        "is tether.environments:Calculator. null: every episode is one response.",
    )
    environment_kwargs: dict[str, Any] = setting({}, "Keyword arguments rollout.environment is called with.")
    max_turns: int = setting(
        1, "Model turns per episode (rollout.environment); each turn is up to rollout.max_new_tokens long.", positive
    )
    max_tool_tokens: int = setting(
        64, "Longest tool output in tokens: an environment's longer observation is cut to this.", positive
    )

    # The tokens a chat template's frame puts around one tool output, at most (tether plan's bound).
    TOOL_FRAME_TOKENS = 16

    @property
    def longest_response(self) -> int:
        """The most tokens a response can have: an episode's every turn and tool output included."""
        tools = (self.max_turns - 1) * (self.max_tool_tokens + self.TOOL_FRAME_TOKENS)
        return self.max_turns * self.max_new_tokens + tools

    def check(self, prefix: str) -> None:
        if self.max_turns > 1 and self.environment is None:
            raise ConfigError(
                f"{prefix}max_turns={self.max_turns} needs {prefix}environment: it is the environment that answers "
                "each turn (e.g. tether.environments:Calculator)"
            )
        if self.environment is not None and self.engine == "vllm":
            raise ConfigError(
                f"{prefix}environment with {prefix}engine='vllm': multi-turn episodes sample with transformers' "
                f"generate only for now; set {prefix}engine='hf'"
            )


@dataclass
class GroupRolloutConfig(RolloutConfig):
    """grpo's sampling: a group of responses to each prompt (TRL's GRPO samples 8 by default)."""

    samples_per_prompt: int = redefault(RolloutConfig, "samples_per_prompt", 8)


# --------------------------------------------------------------------------------------------
# Optimisation and the run
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """What every stage's training run reads: batches, the optimizer, checkpoints, the process."""

    batch_size: int = setting(
        8,
        "Prompts per iteration (ppo, grpo: each sampled samples_per_prompt times) or examples per optimizer "
        "step (sft, rm, dpo: rm and dpo count preference pairs), over all processes of a torchrun job.",
        positive,
    )
    lr: float = setting(3.0e-6, "Learning rate (AdamW); LoRA usually wants about 10x more.", positive)
    lr_schedule: Literal["constant", "linear", "cosine"] = setting(
        "linear", "Learning-rate schedule over all optimizer steps (after warmup)."
    )
    warmup_steps: int = setting(0, "Optimizer steps of linear warmup.", non_negative)
    adam_eps: float = setting(
        1.0e-5,
        "AdamW epsilon (ppo and grpo: 1e-5 as in the RLHF references; sft, rm and dpo: PyTorch's 1e-8).",
        positive,
    )
    weight_decay: float = setting(0.0, "AdamW weight decay.", non_negative)
    max_grad_norm: float | None = setting(
        1.0, "Clip the gradient norm of each trained model to this. null: no clipping.", positive
    )
    micro_batch_size: int | None = setting(
        None,
        "Rows per forward/backward pass (gradient accumulation), and per forward pass without grad. null: a "
        "whole minibatch (sft, rm, dpo: a whole batch) at once.",
        positive,
    )
    max_nonfinite_in_a_row: int = setting(
        3,
        "Optimizer steps in a row with a non-finite gradient (each one skipped) after which the run stops "
        "with a checkpoint and a diagnosis.",
        positive,
    )
    seed: int = setting(0, "Seed of every random generator (process k uses seed + k * 100003).")
    save_every: int = setting(50, "Write a checkpoint every this many steps (0: only the final model).", non_negative)
    keep_last: int = setting(
        3, "Step checkpoints to keep; older ones are deleted after a newer one is complete.", non_negative
    )
    device: str = setting("auto", "'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    num_threads: int | None = setting(None, "CPU threads for torch. null: torch's default (one per core).", positive)

    def check(self, prefix: str) -> None:
        if self.keep_last < 1 and self.save_every > 0:
            raise ConfigError(f"{prefix}keep_last must be at least 1 when {prefix}save_every > 0")


@dataclass
class RolloutTrainConfig(TrainConfig):
    """ppo and grpo: a number of iterations, each one rollout and its update."""

    steps: int = setting(100, "Iterations (rollout + update) to run.", positive)
    sample_every: int = setting(
        10, "Append samples to samples.jsonl and print a sample table every this many iterations.", non_negative
    )


@dataclass
class PPOTrainConfig(RolloutTrainConfig):
    value_lr: float | None = setting(
        None, "Learning rate of ppo's critic. null: train.lr for a value model, 1e-3 for a value head.", positive
    )


@dataclass
class OfflineTrainConfig(TrainConfig):
    """sft, rm and dpo: passes over fixed examples."""

    lr: float = redefault(TrainConfig, "lr", 1.0e-5)
    adam_eps: float = redefault(TrainConfig, "adam_eps", 1.0e-8)
    epochs: float = setting(1.0, "Passes over the training data (ignored when train.steps is set).", positive)
    steps: int | None = setting(None, "Optimizer steps. null: train.epochs passes over the training data.", positive)
    eval_every: int = setting(
        0, "Evaluate on data.eval every this many steps (logged as eval/*); 0: only at the end.", non_negative
    )

    def check(self, prefix: str) -> None:
        super().check(prefix)
        micro = self.micro_batch_size
        if micro is not None and self.batch_size % micro:
            raise ConfigError(f"{prefix}micro_batch_size={micro} must divide {prefix}batch_size={self.batch_size}")


@dataclass
class SpeedConfig:
    """Speed tricks: each on by default where it is proven, each switchable, none changing the
    numbers beyond float rounding (tests compare every switch's plain and fast paths)."""

    shared_prefix: bool = setting(
        True,
        "Compute the prompt prefix every row shares (a chat template's system message) once per batch, its KV "
        "cache repeated over the rows, in every forward pass and in sampling. Architectures it cannot serve get "
        "the plain pass (said at start).",
    )
    prepared_linears: bool = setting(
        True,
        "While sampling, run linear layers on weights prepared once per generate call: LoRA folded into "
        "W + dW, and on the CPU every weight in oneDNN's blocked layout. float32 only.",
    )
    inverse_cdf_sampler: bool = setting(
        True,
        "Draw each sampled token by inverting its distribution's CDF at one uniform number (false: "
        "transformers' multinomial sampling, one random number per vocabulary entry).",
    )
    reuse_old_pass: bool = setting(
        True,
        "ppo, grpo: when one micro-batch is the whole rollout in one process, the first update step "
        "backpropagates through the old log-probs' pass instead of running the policy again.",
    )
    keep_freed_memory: bool = setting(
        True,
        "glibc only: keep freed heap memory for the next tensors instead of returning it to the OS, so an "
        "iteration does not page-fault its working set in again (off when a MALLOC_* variable is set).",
    )
    fused_adamw: bool = setting(True, "AdamW's fused kernel where torch has one (float parameters on CPU or CUDA).")


# --------------------------------------------------------------------------------------------
# The algorithms
# --------------------------------------------------------------------------------------------


@dataclass
class PPOParams:
    epochs: int = setting(4, "PPO epochs over each rollout batch.", positive)
    minibatch_size: int = setting(
        8, "Sequences per optimizer step; must divide batch_size * samples_per_prompt.", positive
    )
    clip_coef: float = setting(0.2, "Policy ratio clip range epsilon.", positive)
    value_clip: float | None = setting(
        0.2, "Value clip range around the rollout values. null: no value clipping.", positive
    )
    vf_coef: float = setting(0.1, "Weight of the value loss in the total loss.", non_negative)
    gamma: float = setting(1.0, "Discount.", unit_interval)
    lam: float = setting(0.95, "GAE lambda.", unit_interval)
    kl_coef: float = setting(0.05, "KL penalty coefficient (initial value when kl_target is set).", non_negative)
    kl_estimator: Literal["k1", "k2", "k3"] = setting("k1", "Per-token KL estimator folded into the reward.")
    kl_target: float | None = setting(
        None, "Per-sequence KL target (nats) of the adaptive controller. null: fixed kl_coef.", positive
    )
    kl_horizon: float = setting(10000.0, "Adaptive controller horizon, in sequences.", positive)
    whiten_rewards: bool = setting(False, "Whiten per-token rewards (scale only, mean kept) before GAE.")
    whiten_advantages: bool = setting(True, "Whiten advantages (mean removed) per rollout batch.")


@dataclass
class GRPOParams:
    """The critic-free family on one stage: an advantage estimator, a policy loss, how the loss is
    aggregated, where the KL goes, and DAPO's sampling rules; each choice is one key
    (docs/stages/grpo.md has the recipes: GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO, GSPO)."""

    estimator: Literal["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = setting(
        "grpo",
        "Advantage estimator. 'grpo': the score minus its group's mean, divided by the group's std when "
        "scale_rewards (Shao et al. 2024). 'rloo': minus the mean of the other samples of its prompt (Ahmadian et "
        "al. 2024). 'reinforce_pp': per-token KL in the reward, reward-to-go, whitened over the whole batch (Hu "
        "2025). 'reinforce_pp_baseline': the group mean subtracted first, then as reinforce_pp.",
    )
    epochs: int = setting(1, "Epochs over each rollout batch (TRL calls it num_iterations).", positive)
    minibatch_size: int = setting(
        8, "Sequences per optimizer step; must divide batch_size * samples_per_prompt.", positive
    )
    policy_loss: Literal["clip", "gspo"] = setting(
        "clip",
        "'clip': PPO's clipped token ratio, range [1 - clip_coef, 1 + clip_high]. 'gspo': GSPO's sequence-level, "
        "length-normalised ratio, clipped the same way (Zheng et al. 2025; it wants epsilons near 3e-4 / 4e-4).",
    )
    clip_coef: float = setting(0.2, "Policy ratio clip range below 1 (and above it unless clip_high is set).", positive)
    clip_high: float | None = setting(
        None, "Clip range above 1 (DAPO's clip-higher, e.g. 0.28). null: clip_coef.", positive
    )
    dual_clip: float | None = setting(
        None,
        "Dual-clip constant c > 1 (Ye et al. 2020): for negative advantages the loss is bounded by -c * A. null: off.",
    )
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_sum_constant"] = setting(
        "token_mean",
        "How a minibatch's token losses become one: 'token_mean' (over all its tokens), 'seq_mean_token_mean' "
        "(the mean of each response's token mean, GRPO's paper), 'seq_mean_token_sum', 'seq_sum_constant' "
        "(token sums divided by responses x rollout.max_new_tokens: Dr. GRPO). Exact for any micro-batch split.",
    )
    kl_coef: float = setting(
        0.04, "Weight of the KL to the reference (0: no KL term; objective/kl is logged still).", non_negative
    )
    kl_in: Literal["loss", "reward", "none"] = setting(
        "loss",
        "'loss': k3 KL to the reference added to the loss per token (DeepSeekMath). 'reward': the KL "
        "(kl_estimator) subtracted from the score (reinforce_pp: per token). 'none': no KL, no reference pass, "
        "and for full fine-tuning no reference model (objective/kl is then not logged).",
    )
    kl_estimator: Literal["k1", "k2", "k3"] = setting("k1", "The KL estimator of kl_in='reward'.")
    scale_rewards: bool = setting(
        True,
        "estimator 'grpo': divide by the group's standard deviation after removing its mean (false: mean only, "
        "Dr. GRPO).",
    )
    dynamic_sampling: bool = setting(
        False,
        "DAPO's dynamic sampling: drop the groups whose scores are all equal (no signal) and sample more prompts "
        "until train.batch_size groups carry one, up to max_sampling_rounds (logged: grpo/dropped_groups).",
    )
    max_sampling_rounds: int = setting(
        4, "Most sampling rounds an iteration takes with dynamic_sampling; then it trains on what it has.", positive
    )
    overlong_buffer: int | None = setting(
        None,
        "DAPO's overlong reward shaping: a penalty growing linearly over the last this many tokens before "
        "rollout.max_new_tokens, reaching -overlong_penalty at the limit. null: off.",
        positive,
    )
    overlong_penalty: float = setting(1.0, "The overlong shaping's largest penalty.", non_negative)

    def check(self, prefix: str) -> None:
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ConfigError(f"{prefix}dual_clip must be > 1 (it bounds the loss at -c * A), got {self.dual_clip}")


@dataclass
class RMParams:
    margin: bool = setting(
        False, "Use each pair's 'margin' field in the loss -log sigmoid(r_chosen - r_rejected - margin)."
    )
    normalize: bool = setting(
        True,
        "Store a gain and bias with the model so that its scores on the held-out responses (chosen and "
        "rejected, samples of the starting model) have mean 0 and std 1.",
    )


@dataclass
class DPOParams:
    beta: float = setting(
        0.1,
        "DPO beta: the strength of the implicit KL tie to the reference (rewards are beta x log-ratio).",
        positive,
    )
    loss_type: Literal["sigmoid", "ipo"] = setting(
        "sigmoid", "'sigmoid' (DPO) or 'ipo' (IPO: squared loss on per-token mean log-ratios, target 1 / (2 beta))."
    )


# --------------------------------------------------------------------------------------------
# Watching a rollout run
# --------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    num_prompts: int = setting(
        32, "Prompts of the fixed eval set (data.eval) used; 0 turns evaluation off.", non_negative
    )
    temperature: float = setting(
        0.7,
        "Sampling temperature of eval responses (0: greedy, and no KL estimate); every model gets the same.",
        non_negative,
    )
    max_new_tokens: int | None = setting(None, "Eval response length. null: rollout.max_new_tokens.", positive)
    seed: int = setting(1234, "Seed of eval sampling: every model and every evaluation draws the same random numbers.")
    every: int = setting(
        0, "Evaluate the policy every this many iterations (logged as eval/*); 0: only at the end.", non_negative
    )
    judge: str = setting(
        "auto",
        "What decides a win against the baseline: 'reward' (the training score), 'gold' (reward.gold), a "
        "function 'file.py:name' scoring responses, the http(s) URL of a reward service (asked with the "
        "reward.url_* settings), or 'auto' (gold when set, else reward).",
    )
    tie_margin: float = setting(0.0, "Judge scores closer than this count as a tie.", non_negative)

    def check(self, prefix: str) -> None:
        if self.judge not in ("auto", "reward", "gold") and ":" not in self.judge:
            raise ConfigError(
                f"{prefix}judge must be 'auto', 'reward', 'gold', a function 'file.py:name' or a reward service's "
                f"http(s) URL, got {self.judge!r}"
            )


@dataclass
class AlarmsConfig:
    enabled: bool = setting(
        True, "Watch the metrics for reward hacking and collapse; alarms go to the console and metrics."
    )
    window: int = setting(5, "Iterations a trend is measured over (at least 2).", _at_least_two)
    kl_factor: float = setting(
        3.0, "With ppo.kl_target: alarm when the recent KL exceeds kl_factor x target.", positive
    )
    kl_max: float = setting(
        30.0, "Without a KL target: alarm when the recent KL (nats per response) exceeds this.", positive
    )
    entropy_drop: float = setting(
        0.5, "Alarm when the recent entropy falls below this fraction of the starting entropy.", positive
    )
    length_rise: float = setting(
        0.2,
        "Length-hacking alarm: length up by this fraction over the window, while the score rises and ...",
        non_negative,
    )
    diversity_drop: float = setting(0.1, "... distinct-2 of the responses falls by this fraction.", non_negative)
    opening_share: float = setting(
        0.5, "Alarm when more than this share of a batch's responses share one opening.", non_negative
    )
    sampler_gap: float = setting(
        0.02,
        "Alarm when the sampler's log-probs differ from the trainer's by more than this, mean nats per token "
        "(rollout/logprob_gap_mean; the engines agree to ~1e-5 in float32).",
        positive,
    )
