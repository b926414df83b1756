"""Environments of multi-turn episodes: the protocol tether drives, and the calculator environment it ships.

An environment is any object with two methods (`Environment`); `rollout.environment` names a
class or factory, 'path/to/file.py:Name' or 'package.module:Name', called with
`rollout.environment_kwargs` to make one environment per episode:

    env.reset(prompt)      # a new episode: the prompt's text (a chat prompt's last message)
    env.step(turn) -> Step  # the model's turn as text; the tool's output, whether it ended, a reward

tether/episodes.py runs the episodes: the model's turns are sampled, each `Step.observation` is
appended as a tool message, and the episode's reward is the sum of every step's `Step.reward`.

The calculator task (`Calculator`) is the shipped arithmetic task with a tool: the model may
write `<calc>EXPRESSION</calc>` (integers, + - * / and parentheses) and reads back
`<result>VALUE</result>`; a turn without a call is its answer, scored 1 or 0 by the same exact
checker as `tether.reward_functions:arithmetic`.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tether.reward_functions import ARITHMETIC_QUESTION, arithmetic_answer_score, arithmetic_question


@dataclass(frozen=True)
class Step:
    """What an environment answers to one model turn."""

    observation: str | None = None  # the tool's output (or the environment's next message); read when not done
    done: bool = False  # the episode ended with this turn
    reward: float = 0.0  # this turn's reward; the episode's is the sum


@runtime_checkable
class Environment(Protocol):
    def reset(self, prompt: str) -> None: ...

    def step(self, turn: str) -> Step: ...


# --------------------------------------------------------------------------------------------
# The calculator task
# --------------------------------------------------------------------------------------------

CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
# The calculator task's prompts (tether/assets/arithmetic_tool_*.jsonl, scripts/make_arithmetic.py).
TOOL_PROMPT = re.compile(
    ARITHMETIC_QUESTION
    + r" You have a calculator: write <calc>EXPRESSION</calc>, for example <calc>3 \* 4</calc>, and its result "
    r"comes back\. Then reply with the number only\."
)
MAX_EXPRESSION_CHARS = 64
MAX_MAGNITUDE = 10**12  # larger intermediate results are an error, not a slow huge number


class CalculatorError(ValueError):
    pass


class Calculator:
    """The arithmetic question of the prompt, with a calculator tool.

    A turn holding `<calc>EXPRESSION</calc>` is a call (the first one counts): the observation is
    `<result>VALUE</result>`, or `<result>error: WHY</result>` for an expression it cannot compute,
    and the episode goes on with reward 0. A turn without a call is the answer: the episode ends
    with `arithmetic`'s score of it. An episode cut by rollout.max_turns before an answer gets 0.
    """

    def __init__(self) -> None:
        self.question: tuple[int, str, int, int] | None = None

    def reset(self, prompt: str) -> None:
        self.question = arithmetic_question(prompt, TOOL_PROMPT)

    def step(self, turn: str) -> Step:
        assert self.question is not None, "reset() starts an episode"
        call = CALL.search(turn)
        if call is None:
            return Step(done=True, reward=arithmetic_answer_score(self.question, turn))
        try:
            value = f"{calculate(call[1])}"
        except CalculatorError as err:
            value = f"error: {err}"
        return Step(observation=f"<result>{value}</result>")


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression: integers, + - * /, unary minus and parentheses; an
    integral quotient is an int, any other rounded to 6 digits. CalculatorError for anything else."""
    text = expression.strip()
    if not text or len(text) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expected an expression of 1 to {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise CalculatorError("not an arithmetic expression") from None
    value = _evaluate(tree.body)
    if isinstance(value, float):
        return int(value) if value.is_integer() else round(value, 6)
    return value


def _evaluate(node: ast.expr) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div):
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Add):
            return _bounded(left + right)
        if isinstance(node.op, ast.Sub):
            return _bounded(left - right)
        if isinstance(node.op, ast.Mult):
            return _bounded(left * right)
        if right == 0:
            raise CalculatorError("division by zero")
        quotient = left / right
        return _bounded(int(quotient) if math.isfinite(quotient) and quotient.is_integer() else quotient)
    raise CalculatorError("only integers, + - * / and parentheses")


def _bounded(value: int | float) -> int | float:
    if abs(value) > MAX_MAGNITUDE:
        raise CalculatorError("number too large")
    return value
