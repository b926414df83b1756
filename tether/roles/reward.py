"""The reward: a frozen reward model, a Python reward function, or a weighted mix of both.

A reward function is `name(prompts: list[str], responses: list[str], **kw) -> list[float]`, loaded
from "path/to/file.py:name" or "package.module:name". It receives keyword arguments `finished`
(list[bool]: the response ended with EOS) plus everything in `reward.function_kwargs`. Whatever it
returns is checked: one finite number per response, or a RewardError naming the sample.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from tether.config import RewardConfig, SpeedConfig
from tether.core.advantages import last_true_index
from tether.errors import RewardError, TetherError
from tether.remote_reward import RemoteReward
from tether.roles.forward import in_chunks
from tether.roles.value import backbone_hidden, scalar_head
from tether.runtime import autocast
from tether.trajectory import Trajectory

RewardFunction = Callable[..., Sequence[float]]


def call_function(
    function: RewardFunction, spec: str, prompts: list[str], responses: list[str], **kwargs: Any
) -> Tensor:
    """Call a reward function and check what it returns: (B,) float32."""
    accepted = inspect.signature(function).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    kwargs = {k: v for k, v in kwargs.items() if takes_any or k in accepted}
    try:
        values = list(function(prompts, responses, **kwargs))
    except TetherError:
        raise  # a reward service's own error (load_scorer) names its URL and sample already
    except (Exception, SystemExit, KeyboardInterrupt) as err:
        # User code ends nothing: sys.exit() or a KeyboardInterrupt raised inside it is its failure,
        # never the run's clean end.
        raise RewardError(f"reward function {spec!r} raised {err!r}; it must return one score per response") from err
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
# g * raw + b (docs/concepts/details.md item 8). Plain transformers ignores the key and returns the raw score.
NORMALIZATION_KEY = "tether_score_normalization"


def last_token_scores(model: Any, input_ids: Tensor, attention_mask: Tensor, speed: SpeedConfig) -> Tensor:
    """A scalar model's raw output read at the last real token of each sequence
    (docs/concepts/details.md items 5, 6).

    The last real token is found from the attention mask, never from the pad id, so it is right
    for left, right or both-sided padding. Differentiable (reward-model training uses it).
    (B, L) -> (B,) float32.
    """
    last = last_true_index(attention_mask)  # (B,)
    end = int(last.max()) + 1
    hidden = backbone_hidden(model, input_ids[:, :end], attention_mask[:, :end], speed)  # (B, end, H)
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
def sequence_scores(model: Any, input_ids: Tensor, attention_mask: Tensor, speed: SpeedConfig) -> Tensor:
    """A reward model's score of each sequence: read at the last real token, then normalised
    with the gain and bias saved with the model. (B, L) -> (B,) float32."""
    gain, bias = score_normalization(model)
    return last_token_scores(model, input_ids, attention_mask, speed) * gain + bias


class RewardSources:
    """Every configured reward source, scored together: a weighted sum, plus each one's raw scores.

    Receives what loading/roles.py loaded: the frozen reward model (and its own tokenizer when its
    vocabulary differs from the policy's: it then reads the same text in its own tokens), the
    reward function, the client of a reward service (remote_reward.py) and the gold judge.
    `adapted_reward_model`: the reward model is the base of a LoRA model (ppo's value model, which
    starts from it) and scores with the adapter off, so the same weights are held once.
    """

    def __init__(
        self,
        config: RewardConfig,
        policy_tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        *,
        speed: SpeedConfig,
        model: Any = None,
        model_tokenizer: PreTrainedTokenizerBase | None = None,
        adapted_reward_model: bool = False,
        function: RewardFunction | None = None,
        remote: RemoteReward | None = None,
        gold: RewardFunction | None = None,
        pass_rows: int | None = None,
        missing_eos_penalty: float | None = None,
        dtype: str = "float32",
    ) -> None:
        self.config = config
        self.policy_tokenizer = policy_tokenizer
        self.device = device
        self.speed = speed
        self.model = model
        self.model_tokenizer = model_tokenizer
        self.adapted_reward_model = adapted_reward_model
        self.function = function
        self.remote = remote
        self.gold = gold
        self.pass_rows = pass_rows
        self.missing_eos_penalty = missing_eos_penalty
        self.dtype = dtype

    @contextmanager
    def _reward_model(self) -> Iterator[Any]:
        if not self.adapted_reward_model:
            yield self.model
            return
        # Adapter off: the LoRA layers are bypassed and the score head is the original one
        # (peft keeps it as the unadapted module beside the trained copy).
        with self.model.disable_adapter():
            yield self.model

    @torch.no_grad()
    def score_trajectory(self, trajectory: Trajectory) -> tuple[Tensor, dict[str, Tensor]]:
        """The score PPO trains on: the reward sources (an episode's environment reward among them),
        plus the missing-EOS penalty for responses that did not end (docs/concepts/details.md item 5).
        returns (scores (B,) on the device, raw per-source scores)."""
        with autocast(self.device, self.dtype):
            scores, parts = self.score(
                trajectory.input_ids.to(self.device),
                trajectory.attention_mask.to(self.device),
                list(trajectory.prompts),
                list(trajectory.responses),
                trajectory.finished.tolist(),
            )
        if trajectory.environment_scores.numel():  # a multi-turn episode's reward from its environment
            parts["environment"] = trajectory.environment_scores.float().cpu()
            scores = scores + self.config.environment_weight * parts["environment"].to(scores.device)
        finished = trajectory.finished
        if self.missing_eos_penalty is not None:
            scores = torch.where(finished, scores, scores + self.missing_eos_penalty)
        return scores.to(self.device), parts

    def score(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        prompts: list[str],
        responses: list[str],
        finished: list[bool],
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total score (B,) and the raw per-source scores keyed 'model', 'function', 'url', 'gold'."""
        parts: dict[str, Tensor] = {}
        total = torch.zeros(len(responses))
        if self.model is not None:
            ids, mask = self._reward_model_inputs(input_ids, attention_mask)
            with self._reward_model() as model:
                parts["model"] = in_chunks(
                    lambda i, m: (sequence_scores(model, i, m, self.speed),), ids, mask, self.pass_rows
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
        if self.remote is not None:
            parts["url"] = self.remote.score(prompts, responses, finished, **self.config.function_kwargs)
            total += self.config.url_weight * parts["url"]
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
