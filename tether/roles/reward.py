"""The reward: a frozen reward model, a Python reward function, or a weighted mix of both.

A reward function is `name(prompts: list[str], responses: list[str], **kw) -> list[float]`, loaded
from "path/to/file.py:name" or "package.module:name". It receives keyword arguments `finished`
(list[bool]: the response ended with EOS) plus everything in `reward.function_kwargs`. Whatever it
returns is checked: one finite number per response, or a RewardError naming the sample.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from tether.config import OnlineConfig, RewardConfig
from tether.core.advantages import last_true_index
from tether.errors import TetherError
from tether.models import load_scalar_model, load_tokenizer, scalar_head
from tether.roles.batching import in_chunks
from tether.roles.value import backbone_hidden
from tether.rollout import Rollout
from tether.runtime import autocast

RewardFunction = Callable[..., Sequence[float]]


class RewardError(TetherError, RuntimeError):
    """A reward source that cannot be loaded or returned something unusable."""


def load_function(spec: str) -> RewardFunction:
    """'path/to/file.py:name' or 'package.module:name' -> the callable."""
    if ":" not in spec:
        raise RewardError(f"reward function {spec!r} must be 'path/to/file.py:name' or 'package.module:name'")
    source, name = spec.rsplit(":", 1)
    if source.endswith(".py"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise RewardError(f"reward function file {source!r} does not exist")
        module_name = f"tether_reward_{abs(hash(str(path.resolve())))}"
        spec_obj = importlib.util.spec_from_file_location(module_name, path)
        assert spec_obj is not None and spec_obj.loader is not None
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[module_name] = module
        try:
            spec_obj.loader.exec_module(module)
        except Exception as err:
            raise RewardError(f"importing reward function file {source!r} failed: {err!r}") from err
    else:
        try:
            module = importlib.import_module(source)
        except Exception as err:
            raise RewardError(f"cannot import module {source!r} for reward function {spec!r}: {err!r}") from err
    function = getattr(module, name, None)
    if not callable(function):
        raise RewardError(f"{source!r} has no callable named {name!r} (from reward function {spec!r})")
    return function


def call_function(
    function: RewardFunction, spec: str, prompts: list[str], responses: list[str], **kwargs: Any
) -> Tensor:
    """Call a reward function and check what it returns: (B,) float32."""
    accepted = inspect.signature(function).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    kwargs = {k: v for k, v in kwargs.items() if takes_any or k in accepted}
    try:
        values = list(function(prompts, responses, **kwargs))
    except Exception as err:
        raise RewardError(f"reward function {spec!r} raised {err!r}") from err
    if len(values) != len(responses):
        raise RewardError(f"reward function {spec!r} returned {len(values)} values for {len(responses)} responses")
    checked = []
    for i, value in enumerate(values):
        is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)  # NumPy scalars too
        if not is_number and not (isinstance(value, Tensor) and value.numel() == 1):
            raise RewardError(f"reward function {spec!r} returned {value!r} for sample {i}; expected a number")
        number = float(value)
        if not math.isfinite(number):
            raise RewardError(
                f"reward function {spec!r} returned {number} for sample {i} "
                f"(prompt {prompts[i][:60]!r}, response {responses[i][:60]!r}); rewards must be finite"
            )
        checked.append(number)
    return torch.tensor(checked, dtype=torch.float32)


# config.json key of a reward model's normalisation {"gain": g, "bias": b}: tether scores it as
# g * raw + b (RLHF-DETAILS 8). Plain transformers ignores the key and returns the raw score.
NORMALIZATION_KEY = "tether_score_normalization"


def last_token_scores(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """A scalar model's raw output read at the last real token of each sequence (RLHF-DETAILS 5, 6).

    The last real token is found from the attention mask, never from the pad id, so it is right
    for left, right or both-sided padding. Differentiable (reward-model training uses it).
    (B, L) -> (B,) float32.
    """
    last = last_true_index(attention_mask)  # (B,)
    end = int(last.max()) + 1
    hidden = backbone_hidden(model, input_ids[:, :end], attention_mask[:, :end])  # (B, end, H)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    return scalar_head(model)(picked).squeeze(-1).float()


def score_normalization(model: Any) -> tuple[float, float]:
    """(gain, bias) saved with a reward model by `tether rm`; (1, 0) for any other model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = getattr(inner.config, NORMALIZATION_KEY, None)
    if not saved:
        return 1.0, 0.0
    return float(saved["gain"]), float(saved["bias"])


@torch.no_grad()
def sequence_scores(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """A reward model's score of each sequence: read at the last real token, then normalised
    with the gain and bias saved with the model. (B, L) -> (B,) float32."""
    gain, bias = score_normalization(model)
    return last_token_scores(model, input_ids, attention_mask) * gain + bias


class RewardSources:
    """Every configured reward source, scored together: a weighted sum, plus each one's raw mean."""

    def __init__(
        self,
        config: RewardConfig,
        policy_tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        trust_remote_code: bool = False,
        micro_batch_size: int | None = None,
        missing_eos_penalty: float | None = None,
        dtype: str = "float32",
    ) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self.micro_batch_size = micro_batch_size
        self.missing_eos_penalty = missing_eos_penalty
        self.policy_tokenizer = policy_tokenizer
        self.model: Any = None
        self.model_tokenizer: PreTrainedTokenizerBase | None = None
        if config.model is not None:
            tokenizer = load_tokenizer(config.model, trust_remote_code)
            self.model = load_scalar_model(config.model, tokenizer, trust_remote_code)
            self.model.to(device).requires_grad_(False)
            # Same vocabulary: score the policy's token ids directly. Otherwise re-tokenize text.
            if tokenizer.get_vocab() != policy_tokenizer.get_vocab():
                self.model_tokenizer = tokenizer
        self.function = load_function(config.function) if config.function else None
        self.gold = load_function(config.gold) if config.gold else None
        self._adapted: Any = None  # a LoRA model on the reward model's weights; scored adapter-off

    def shares_weights_with(self, model_name: str) -> bool:
        """Whether a model loaded from `model_name` reads this reward model's weights and tokens."""
        return self.model is not None and self.model_tokenizer is None and model_name == self.config.model

    def score_with_base_of(self, adapted: Any) -> None:
        """Score with the base of `adapted`, a LoRA model built on this very reward model, with its
        adapter off, and drop the separate copy: the same weights held once (PPO's LoRA value model,
        which starts from the reward model; the reference does the same with the policy)."""
        if not self.shares_weights_with(self.config.model or "") or not hasattr(adapted, "disable_adapter"):
            raise ValueError("score_with_base_of needs a LoRA model on this reward model's weights")
        self.model = None
        self._adapted = adapted

    @contextmanager
    def _reward_model(self) -> Iterator[Any]:
        if self._adapted is None:
            yield self.model
            return
        # Adapter off: the LoRA layers are bypassed and the score head is the original one
        # (peft keeps it as the unadapted module beside the trained copy).
        with self._adapted.disable_adapter():
            yield self._adapted

    @torch.no_grad()
    def score_rollout(
        self, rollout: Rollout, prompts: list[str], responses: list[str]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The score PPO trains on: the reward sources, plus the missing-EOS penalty for responses
        that did not end (RLHF-DETAILS 5). returns (scores (B,) on the device, raw per-source scores)."""
        with autocast(self.device, self.dtype):
            scores, parts = self.score(
                rollout.input_ids.to(self.device),
                rollout.attention_mask.to(self.device),
                prompts,
                responses,
                rollout.finished.tolist(),
            )
        if self.missing_eos_penalty is not None:
            scores = torch.where(rollout.finished, scores, scores + self.missing_eos_penalty)
        return scores.to(self.device), parts

    def score(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        prompts: list[str],
        responses: list[str],
        finished: list[bool],
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total score (B,) and the raw per-source scores keyed 'model', 'function', 'gold'."""
        parts: dict[str, Tensor] = {}
        total = torch.zeros(len(responses))
        if self.config.model is not None:
            ids, mask = self._reward_model_inputs(input_ids, attention_mask)
            with self._reward_model() as model:
                parts["model"] = in_chunks(
                    lambda i, m: (sequence_scores(model, i, m),), ids, mask, self.micro_batch_size
                )[0].cpu()
            bad = (~torch.isfinite(parts["model"])).nonzero().flatten().tolist()
            if bad:
                raise RewardError(
                    f"reward model {self.config.model!r} gave {parts['model'][bad[0]].item()} for sample {bad[0]} "
                    f"(response {responses[bad[0]][:60]!r}); rewards must be finite"
                )
            total += self.config.model_weight * parts["model"]
        kwargs = {"finished": finished, **self.config.function_kwargs}
        if self.function is not None:
            assert self.config.function is not None
            parts["function"] = call_function(self.function, self.config.function, prompts, responses, **kwargs)
            total += self.config.function_weight * parts["function"]
        if self.gold is not None:
            assert self.config.gold is not None
            parts["gold"] = call_function(self.gold, self.config.gold, prompts, responses, **kwargs)
        return total, parts

    def _reward_model_inputs(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        if self.model_tokenizer is None:
            return input_ids, attention_mask
        # A reward model with another vocabulary reads the same text in its own tokens.
        texts = [
            self.policy_tokenizer.decode(ids[mask.bool()], skip_special_tokens=False)
            for ids, mask in zip(input_ids, attention_mask, strict=True)
        ]
        tokenizer = self.model_tokenizer
        tokenizer.padding_side = "right"
        encoded = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        device = input_ids.device
        return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


def reward_sources(config: OnlineConfig, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> RewardSources:
    """The reward sources a config asks for, with its EOS penalty, batch size and dtype."""
    return RewardSources(
        config.reward,
        tokenizer,
        device,
        config.model.trust_remote_code,
        config.train.micro_batch_size,
        config.rollout.missing_eos_penalty,
        config.model.dtype,
    )
