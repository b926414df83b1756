"""Multi-turn episodes: the model's turns sampled in batches, each answered by its own environment
(environments.py), kept as one Trajectory whose response is the whole episode.

    turn 1: every episode's prompt -> the model's turn (up to max_new_tokens, truncated after EOS)
            -> env.step(text): done, or a tool output appended as a tool message
    turn 2: [prompt | turn 1 | tool output] -> the model's next turn ... up to rollout.max_turns

Everything is kept as token ids, never re-tokenized from text: the model's tokens are the ones
it sampled, and the tool output is tokenized once, wrapped in the chat template's frame of a tool
message. So the forward pass of training reads exactly the context each turn was sampled from, and
the log-probs it recomputes for the model's tokens are the sampler's (tested). `tool_mask` marks
the tool's tokens: they are context, and the loss, the KL and GAE leave them out
(Trajectory.mask). The episode's reward is the sum of its steps' rewards (`environment_scores`);
`responses` holds each episode's last model turn (what reward functions read), `episodes` every
turn as (role, text).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from tether.environments import Environment, Step
from tether.errors import RewardError
from tether.sampling import SampleTurn, decode_tokens, right_pad
from tether.trajectory import Trajectory

TOOL = "tool"
ASSISTANT = "assistant"


class EpisodeError(RewardError):
    """An environment that failed or answered something unusable: user code, like a reward function."""


class Episodes:
    """rollout.environment's episodes: a factory of environments and how tool output is written."""

    def __init__(
        self,
        factory: Callable[..., Any],
        spec: str,
        kwargs: dict[str, Any],
        max_turns: int,
        max_tool_tokens: int,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: list[int],
        chat_template: bool,
    ) -> None:
        self.factory, self.spec, self.kwargs = factory, spec, kwargs
        self.max_turns, self.max_tool_tokens = max_turns, max_tool_tokens
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        before, after = tool_message_frame(tokenizer, eos_ids, chat_template)
        self.before_ids, self.after_ids = _encode(tokenizer, before), _encode(tokenizer, after)

    def new_environment(self) -> Environment:
        try:
            environment = self.factory(**self.kwargs)
        except (Exception, SystemExit, KeyboardInterrupt) as err:  # user code ends nothing
            raise EpisodeError(f"environment {self.spec!r} could not be made: {err!r}") from err
        if not isinstance(environment, Environment):
            raise EpisodeError(
                f"environment {self.spec!r} made {type(environment).__name__!r}, which has no reset(prompt) and "
                "step(turn) methods (docs/environments.md)"
            )
        return environment

    def tool_ids(self, observation: str, turn_finished: bool) -> tuple[list[int], str]:
        """The tokens a tool output adds to the context, and its text as kept (cut to max_tool_tokens).
        A turn cut by max_new_tokens gets its end-of-turn token first, as part of the frame."""
        content = _encode(self.tokenizer, observation)[: self.max_tool_tokens]
        ids = ([] if turn_finished else self.eos_ids[:1]) + self.before_ids + content + self.after_ids
        return ids, decode_tokens(self.tokenizer, content, [])

    def run(
        self, sample_turn: SampleTurn, prompt_texts: list[str], prompt_ids: list[list[int]], samples_per_prompt: int
    ) -> Trajectory:
        """`samples_per_prompt` episodes of each prompt (rows in repeat_interleave order), played out."""
        rows = len(prompt_ids) * samples_per_prompt
        texts = [prompt_texts[i // samples_per_prompt] for i in range(rows)]
        contexts = [prompt_ids[i // samples_per_prompt] for i in range(rows)]
        environments = [self.new_environment() for _ in range(rows)]
        for row, environment in enumerate(environments):
            self._call(partial(environment.reset, texts[row]), row, texts, "reset")
        tokens: list[list[int]] = [[] for _ in range(rows)]
        from_tool: list[list[bool]] = [[] for _ in range(rows)]
        logprobs: list[list[float]] | None = [[] for _ in range(rows)]
        turns: list[list[tuple[str, str]]] = [[] for _ in range(rows)]
        rewards, finished = [0.0] * rows, [False] * rows
        first: Trajectory | None = None
        live = list(range(rows))
        for turn in range(self.max_turns):
            if turn == 0:
                sampled, sampled_logprobs = sample_turn(prompt_ids, samples_per_prompt)
                first = sampled
            else:
                sampled, sampled_logprobs = sample_turn([contexts[i] + tokens[i] for i in live], 1)
            if sampled_logprobs is None:
                logprobs = None
            still_live = []
            for k, row in enumerate(live):
                ids = [int(t) for t in sampled.response_ids[k][sampled.response_mask[k]]]
                text = decode_tokens(self.tokenizer, ids, self.eos_ids)
                tokens[row] += ids
                from_tool[row] += [False] * len(ids)
                if logprobs is not None and sampled_logprobs is not None:
                    logprobs[row] += sampled_logprobs[k, : len(ids)].tolist()
                finished[row] = bool(sampled.finished[k])
                turns[row].append((ASSISTANT, text))
                step = self._step(environments[row], text, row, texts)
                rewards[row] += step.reward
                if step.done or turn == self.max_turns - 1:
                    continue
                assert step.observation is not None
                ids, kept = self.tool_ids(step.observation, finished[row])
                tokens[row] += ids
                from_tool[row] += [True] * len(ids)
                if logprobs is not None:
                    logprobs[row] += [0.0] * len(ids)
                turns[row].append((TOOL, kept))
                still_live.append(row)
            live = still_live
            if not live:
                break
        assert first is not None
        return self._trajectory(first, tokens, from_tool, logprobs, turns, rewards, finished)

    def _trajectory(
        self,
        first: Trajectory,
        tokens: list[list[int]],
        from_tool: list[list[bool]],
        logprobs: list[list[float]] | None,
        turns: list[list[tuple[str, str]]],
        rewards: list[float],
        finished: list[bool],
    ) -> Trajectory:
        response_ids = right_pad(tokens, int(self.tokenizer.pad_token_id), torch.long)
        response_mask = right_pad([[True] * len(t) for t in tokens], False, torch.bool)
        tool_mask = right_pad(from_tool, False, torch.bool)
        sample_logprobs = right_pad(logprobs, 0.0, torch.float32) if logprobs is not None else torch.empty(0)
        return Trajectory(
            prompt_ids=first.prompt_ids,
            prompt_mask=first.prompt_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            finished=torch.tensor(finished, dtype=torch.bool),
            prompt_index=first.prompt_index,
            responses=tuple(next(text for role, text in reversed(t) if role == ASSISTANT) for t in turns),
            sample_logprobs=sample_logprobs,
            tool_mask=tool_mask,
            episodes=tuple(tuple(t) for t in turns),
            environment_scores=torch.tensor(rewards, dtype=torch.float32),
        )

    def _step(self, environment: Environment, text: str, row: int, prompts: list[str]) -> Step:
        step = self._call(partial(environment.step, text), row, prompts, "step")
        where = f"environment {self.spec!r} (sample {row}, prompt {prompts[row][:60]!r}, turn {text[:60]!r})"
        if not all(hasattr(step, name) for name in ("observation", "done", "reward")):
            raise EpisodeError(f"{where}: step() returned {step!r}; expected a tether.environments.Step")
        reward = step.reward
        if not isinstance(reward, numbers.Real) or isinstance(reward, bool) or not math.isfinite(float(reward)):
            raise EpisodeError(f"{where}: step() gave the reward {reward!r}; rewards must be finite numbers")
        if not step.done and not isinstance(step.observation, str):
            raise EpisodeError(
                f"{where}: step() did not end the episode and gave the observation {step.observation!r}; a going "
                "episode needs the tool's output as a string"
            )
        return Step(observation=step.observation, done=bool(step.done), reward=float(reward))

    def _call(self, call: Callable[[], Any], row: int, prompts: list[str], method: str) -> Any:
        try:
            return call()
        except (Exception, SystemExit, KeyboardInterrupt) as err:
            raise EpisodeError(
                f"environment {self.spec!r} raised {err!r} in {method}() (sample {row}, prompt {prompts[row][:60]!r})"
            ) from err


def transcript(turns: tuple[tuple[str, str], ...]) -> str:
    """An episode as one text for people: the model's turns as they are, each tool output marked."""
    return "\n".join(f"[tool] {text}" if role == TOOL else text for role, text in turns)


def tool_message_frame(tokenizer: PreTrainedTokenizerBase, eos_ids: list[int], chat_template: bool) -> tuple[str, str]:
    """(before, after): the text around a tool output that follows a model turn ending in its EOS,
    as the chat template writes it (a 'tool' message, or a 'user' one where the template refuses
    the role), then the next assistant turn's opening. Read off the template: the conversation
    rendered with and without the tool message, minus the end-of-turn token the model itself
    wrote. Without a chat template, the tool output stands on its own line."""
    if not chat_template:
        return "\n", "\n"
    answer, marker = "TETHERANSWER", "TETHERTOOLOUTPUT"
    conversation = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": answer}]
    for role in (TOOL, "user"):
        try:
            base = _render(tokenizer, conversation, False)
            full = _render(tokenizer, [*conversation, {"role": role, "content": marker}], True)
        except Exception:  # a template that raises on the role: try the next one
            continue
        if base is not None and full is not None and full.startswith(base) and full.count(marker) == 1:
            before, after = full[len(base) :].split(marker)
            tail = base[base.rindex(answer) + len(answer) :]
            for eos in tokenizer.convert_ids_to_tokens(eos_ids):
                if tail.startswith(eos):  # the model's turn ended with this token already
                    tail = tail[len(eos) :]
                    break
            return tail + before, after
    return "\n", "\n"


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> str | None:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return text if isinstance(text, str) else None


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]] if text else []
