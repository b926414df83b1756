"""The shipped arithmetic task: its exact 0/1 checker, and the data files scripts/make_arithmetic.py writes.

The checker (tether.reward_functions:arithmetic) is pinned with hand cases; the shipped files
are checked against it (the generator and the checker compute every answer independently), and
against a fresh run of the generator, byte for byte.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tether.data import load_prompts, shipped_data
from tether.loading.functions import load_function
from tether.reward_functions import arithmetic, arithmetic_question
from tether.roles.reward import call_function

ROOT = Path(__file__).resolve().parent.parent
FILES = ("arithmetic_train.jsonl", "arithmetic_eval.jsonl")
ADD = "What is 27 + 58? Reply with the number only."
SUB = "What is 4 - 9? Reply with the number only."


def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in open(shipped_data(name), encoding="utf-8") if line.strip()]


@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        (ADD, "85", 1.0),
        (ADD, "86", 0.0),
        # extra words, a restated question, the answer repeated: still the one answer 85
        (ADD, "The answer is 85.", 1.0),
        (ADD, "Sure! 27 + 58 = 85. Let me know if you need anything else.", 1.0),
        (ADD, "27+58=85", 1.0),
        (ADD, "85. Yes, 85.", 1.0),
        # several different candidates never earn credit, wherever the right one stands
        (ADD, "84 or 85", 0.0),
        (ADD, "85, 86", 0.0),
        (ADD, "The answer is 85, not 86.", 0.0),
        (ADD, "27 + 58 = 86, so 85", 0.0),
        # no integer answer: the question alone, words, a decimal, digits joined by a comma
        (ADD, "27 + 58", 0.0),
        (ADD, "eighty-five", 0.0),
        (ADD, "85.0", 0.0),
        (ADD, "8,5", 0.0),
        (ADD, "", 0.0),
        (ADD, "   ", 0.0),
        # negative results: '-' right before the digits, and not right after a letter or digit
        (SUB, "-5", 1.0),
        (SUB, "4 - 9 = -5", 1.0),
        (SUB, "4-9=-5", 1.0),
        (SUB, "5", 0.0),
        (SUB, "9 - 4 = 5", 0.0),
        (SUB, "x-5", 0.0),
        (SUB, "\u22125", 0.0),  # a Unicode minus sign is not a sign
        ("What is 7 * 8? Reply with the number only.", "7 * 8 = 56", 1.0),
    ],
)
def test_arithmetic_by_hand(prompt, response, expected):
    assert arithmetic([prompt], [response]) == [expected]


def test_arithmetic_scores_a_batch_through_the_reward_function_contract():
    spec = "tether.reward_functions:arithmetic"
    scores = call_function(load_function(spec), spec, [ADD, SUB, ADD], ["85", "-5", ""], finished=[True] * 3)
    assert scores.tolist() == [1.0, 1.0, 0.0]


def test_arithmetic_question_reads_the_template():
    assert arithmetic_question(ADD) == (27, "+", 58, 85)
    assert arithmetic_question(SUB) == (4, "-", 9, -5)
    assert arithmetic_question("What is 13 * 7? Reply with the number only.") == (13, "*", 7, 91)


@pytest.mark.parametrize(
    "prompt",
    [
        "What is 27 + 58?",  # the instruction is part of the template
        "What is 27 plus 58? Reply with the number only.",
        "What is 27 / 3? Reply with the number only.",
        "What is 27+58? Reply with the number only.",
        " What is 27 + 58? Reply with the number only.",
        "What is 027 + 58? Reply with the number only.",
        "What is -2 + 58? Reply with the number only.",
        "What is 6 - 3? Reply with the number only.",  # answer = operand: an echo would score
        "What is 1 * 9? Reply with the number only.",
        "",
    ],
)
def test_a_prompt_outside_the_template_is_an_error_naming_it(prompt):
    with pytest.raises(ValueError, match="arithmetic prompt") as error:
        arithmetic([prompt], ["85"])
    assert repr(prompt) in str(error.value)


def test_shipped_answers_agree_with_the_checker_and_eval_is_held_out():
    questions = {}
    for name in FILES:
        records = _records(name)
        for record in records:
            a, op, b, answer = arithmetic_question(record["prompt"])
            assert answer == record["answer"] and type(record["answer"]) is int, record
            assert record["category"] == {"+": "add", "-": "sub", "*": "mul"}[op], record
            assert arithmetic([record["prompt"]], [str(answer)]) == [1.0]
        prompts = [r["prompt"] for r in records]
        assert len(set(prompts)) == len(prompts), f"{name} repeats a question"
        questions[name] = set(prompts)
    train, evaluation = (questions[name] for name in FILES)
    assert (len(train), len(evaluation)) == (400, 100)
    assert not train & evaluation
    # eval.num_prompts takes a prefix of the eval file: even a short one holds every operation,
    # and some negative answers
    head = _records("arithmetic_eval.jsonl")[:32]
    assert {r["category"] for r in head} == {"add", "sub", "mul"}
    assert any(r["answer"] < 0 for r in _records("arithmetic_eval.jsonl"))


def test_tether_loads_the_shipped_files_as_prompts():
    for name in FILES:
        prompts = load_prompts(shipped_data(name))
        assert [p.text for p in prompts] == [r["prompt"] for r in _records(name)]
        assert prompts[0].messages == ({"role": "user", "content": prompts[0].text},)


def test_shipped_files_are_what_the_generator_writes(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_arithmetic.py"), str(tmp_path)], check=True)
    for name in (*FILES, "arithmetic_tool_train.jsonl", "arithmetic_tool_eval.jsonl"):
        assert (tmp_path / name).read_bytes() == Path(shipped_data(name)).read_bytes(), name
