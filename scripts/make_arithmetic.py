"""Write the arithmetic task that ships with tether: tether/assets/arithmetic_train.jsonl and arithmetic_eval.jsonl,
and the same questions for the calculator environment (tether/environments.py), arithmetic_tool_{train,eval}.jsonl.

    python scripts/make_arithmetic.py            # writes tether/assets/arithmetic_{,tool_}{train,eval}.jsonl
    python scripts/make_arithmetic.py OUT_DIR    # the same four files under OUT_DIR

A task with a verifiable reward, for trying GRPO and PPO without downloads: each prompt is one
question in a fixed template, "What is A OP B? Reply with the number only.", and
`tether.reward_functions:arithmetic` reads the question back out of that text and scores a
response 1 or 0. One JSON object a line: {"prompt": str, "answer": int, "category": "add" | "sub" | "mul"}.

The questions come from the pools in MIX, chosen so the embedded SmolLM2-135M-Instruct solves
some but far from all of them (accuracy 0.34 greedy, 0.14 sampled at temperature 1.0; docs/LOG.md,
2026-11-23): 200 with single-digit operands (some with negative results), 300 with one two-digit
operand. No question's answer equals one of its operands (e.g. 6 - 3), where restating the
question would read as an answer. Every pool is split 4 : 1 between train and eval, so the two
files are disjoint and equally hard; the order within each file is shuffled, so any prefix of the
eval file (what eval.num_prompts takes) is a fair sample. Standard library only; a fixed seed
makes the output the same, byte for byte, on every run.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 20261123
TEMPLATE = "What is {a} {op} {b}? Reply with the number only."
# The calculator task asks the same question and says how to call the tool (tether.environments:TOOL_PROMPT).
TOOL_TEMPLATE = (
    "What is {a} {op} {b}? You have a calculator: write <calc>EXPRESSION</calc>, for example <calc>3 * 4</calc>, "
    "and its result comes back. Then reply with the number only."
)
CATEGORY = {"+": "add", "-": "sub", "*": "mul"}
EVAL_SHARE = 5  # every fifth question of each pool goes to the eval file

ONE_DIGIT = range(1, 10)
TWO_DIGIT = range(10, 100)


def answer(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def pool(op: str, firsts: range, seconds: range, both_orders: bool = False) -> list[tuple[int, str, int]]:
    """Every question a OP b with a from `firsts` and b from `seconds` (and b OP a with both_orders)."""
    pairs = [(a, b) for a in firsts for b in seconds]
    if both_orders:
        pairs += [(b, a) for a, b in pairs]
    return sorted({(a, op, b) for a, b in pairs if answer(a, op, b) not in (a, b)})


# (pool, questions drawn from it): 500 in all, 400 for train and 100 for eval.
MIX = [
    (pool("+", ONE_DIGIT, ONE_DIGIT), 70),  # 3 + 4
    (pool("+", TWO_DIGIT, ONE_DIGIT, both_orders=True), 90),  # 27 + 5, 5 + 27
    ([q for q in pool("-", ONE_DIGIT, ONE_DIGIT) if answer(*q) >= 0], 40),  # 9 - 4
    ([q for q in pool("-", ONE_DIGIT, ONE_DIGIT) if answer(*q) < 0], 30),  # 4 - 9
    (pool("-", TWO_DIGIT, ONE_DIGIT), 90),  # 27 - 5
    (pool("*", range(2, 10), range(2, 10)), 60),  # 7 * 8
    (pool("*", range(10, 20), range(2, 10), both_orders=True), 120),  # 13 * 4, 4 * 13
]


def make(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train records, eval records)."""
    rng = random.Random(seed)
    train: list[dict] = []
    evaluation: list[dict] = []
    for questions, count in MIX:
        drawn = rng.sample(questions, count)
        for i, (a, op, b) in enumerate(drawn):
            record = {"prompt": TEMPLATE.format(a=a, op=op, b=b), "answer": answer(a, op, b), "category": CATEGORY[op]}
            (evaluation if i % EVAL_SHARE == 0 else train).append(record)
    rng.shuffle(train)
    rng.shuffle(evaluation)
    return train, evaluation


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8", newline="\n")


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "tether" / "assets"
    out.mkdir(parents=True, exist_ok=True)
    train, evaluation = make()
    write_jsonl(out / "arithmetic_train.jsonl", train)
    write_jsonl(out / "arithmetic_eval.jsonl", evaluation)
    for name, records in (("train", train), ("eval", evaluation)):
        write_jsonl(out / f"arithmetic_tool_{name}.jsonl", [with_tool(record) for record in records])
    print(f"wrote {len(train)} training and {len(evaluation)} eval prompts (and their calculator versions) to {out}")


def with_tool(record: dict) -> dict:
    """The record of the calculator task: the same question, the tool's call format in the prompt."""
    a, op, b = record["prompt"].removeprefix("What is ").split("?")[0].split(" ")
    return {**record, "prompt": TOOL_TEMPLATE.format(a=a, op=op, b=b)}


if __name__ == "__main__":
    main()
