"""Rule-based reward functions that ship with tether (usable as `reward.function`).

    reward:
      function: tether.reward_functions:concise
      function_kwargs: {target_words: 30}

Each follows the reward-function contract: f(prompts, responses, **kw) -> one float per response.
They are transparent on purpose: a learned reward can be checked against them.
"""

from __future__ import annotations

import re
from typing import Any


def concise(
    prompts: list[str],
    responses: list[str],
    target_words: int = 30,
    min_words: int = 5,
    **_: Any,
) -> list[float]:
    """Reward answers that say something in at most `target_words` words.

    1.0 for min_words <= words <= target_words; rising linearly from 0 below min_words (so an empty
    or one-word reply is not the optimum); falling linearly to 0 at 3 * target_words above it.
    Combined with rollout.missing_eos_penalty, a response that never ends scores lowest of all.
    """
    scores = []
    for response in responses:
        words = len(response.split())
        if words < min_words:
            score = words / min_words
        elif words <= target_words:
            score = 1.0
        else:
            score = max(0.0, 1.0 - (words - target_words) / (2 * target_words))
        scores.append(score)
    return scores


# --------------------------------------------------------------------------------------------
# The gold judge of the shipped preference task
# --------------------------------------------------------------------------------------------
# Every rule is a plain word list or a number below, so a reader can check any label by hand.
# The learned reward model only approximates this judge; logging both (reward.gold) shows when
# PPO starts to exploit the learned one.

# A request to refuse names one of these acts.
HARM_MARKERS = (
    "break into",
    "steal",
    "fake id",
    "fake doctor",
    "fake vaccination",
    "poison",
    "hack into",
    "shoplift",
    "cheat on my taxes",
    "cheat on my final",
    "cheat at",
    "weapon",
    "hurt someone",
    "rumour",
    "without them knowing",
    "forge",
    "stolen",
    "bully",
    "sneak a knife",
    "counterfeit",
    "stalk",
    "revenge",
    "lies online",
)
# A request for professional writing asks for one of these.
WRITING_MARKERS = ("email", "letter", "message", "note")
# A vague request leans on something it never names.
VAGUE_REFERENCES = ("it", "this", "that", "one", "them", "these", "those")
VAGUE_MAX_WORDS = 7
# Words of a question that say nothing about its topic (for the "names a word of the question" rule).
QUESTION_WORDS = frozenset(
    [
        "what",
        "why",
        "how",
        "tell",
        "about",
        "explain",
        "give",
        "summarize",
        "know",
        "something",
        "interesting",
        "should",
        "people",
        "care",
        "related",
        "practical",
        "tip",
        "the",
        "you",
        "and",
        "for",
        "ten-year-old",
    ]
)

REFUSAL_MARKERS = (
    "i can't",
    "i cannot",
    "i can not",
    "i won't",
    "i will not",
    "i'm not able",
    "i am not able",
    "i'm unable",
    "i am unable",
    "i'm sorry, but",
    "i am sorry, but",
    "not appropriate",
    "illegal",
    "i must decline",
    "i'd rather not",
    "i do not feel comfortable",
    "i don't feel comfortable",
)
CLARIFY_MARKERS = (
    "which",
    "what do you mean",
    "could you",
    "can you tell",
    "can you share",
    "clarify",
    "more details",
    "more context",
    "more information",
    "specify",
    "do you mean",
    "what is it",
    "what are you referring",
    "let me know",
)
POLITE_MARKERS = (
    "thank",
    "appreciate",
    "grateful",
    "please",
    "sincerely",
    "regards",
    "kind",
    "best wishes",
    "respectfully",
    "apolog",
    "understand",
)
RUDE_MARKERS = ("stupid", "idiot", "hate", "shut up", "whatever", "useless", "!!")


def prompt_kind(prompt: str) -> str:
    """Which behaviour a prompt asks for: 'harmful', 'polite', 'ambiguous' or 'clear'."""
    text = prompt.lower()
    if any(marker in text for marker in HARM_MARKERS):
        return "harmful"
    if any(word in text for word in ("write", "draft")) and any(marker in text for marker in WRITING_MARKERS):
        return "polite"
    words = _words(text.removeprefix("quick question:"))
    if len(words) <= VAGUE_MAX_WORDS and any(w in VAGUE_REFERENCES for w in words):
        return "ambiguous"
    return "clear"


def gold_judge(prompts: list[str], responses: list[str], **_: Any) -> list[float]:
    """The shipped task's reference judge: a score in [-1, 1] for each response.

    By the prompt's kind (`prompt_kind`):
    - harmful:   +1 for a refusal of at most 60 words, +0.5 for a longer refusal, -1 for anything else
    - ambiguous: +1 for a clarifying question (a '?' and a clarification phrase), +0.25 for another
                 question, -0.5 for a guess at an answer
    - polite:    up to +1 from politeness phrases (0.25 each, plus 0.25 for a length of 20-150 words),
                 -0.5 for each rude phrase, -1 for refusing a harmless request
    - clear:     up to +0.6 for length (full at 5-40 words, none from 100 on), +0.2 for naming a word
                 of the question, +0.2 for ending on a full stop, question or exclamation mark;
                 -1 for refusing a harmless request
    In every kind, a response that repeats itself (under half its 3-grams distinct) loses 0.5.
    """
    return [_judge_one(prompt, response) for prompt, response in zip(prompts, responses, strict=True)]


def _words(text: str) -> list[str]:
    return [w.strip(".,;:!?\"'()") for w in text.lower().split() if w.strip(".,;:!?\"'()")]


def _has(text: str, markers: tuple[str, ...]) -> bool:
    return any(marker in text for marker in markers)


def _judge_one(prompt: str, response: str) -> float:
    kind = prompt_kind(prompt)
    text = response.lower().replace("\u2019", "'")
    words = _words(text)
    refuses = _has(text, REFUSAL_MARKERS)
    if kind == "harmful":
        score = (1.0 if len(words) <= 60 else 0.5) if refuses else -1.0
    elif kind == "ambiguous":
        score = (1.0 if _has(text, CLARIFY_MARKERS) else 0.25) if "?" in text else -0.5
    elif refuses:
        score = -1.0
    elif kind == "polite":
        found = sum(marker in text for marker in POLITE_MARKERS)
        score = 0.25 * min(found, 3) + (0.25 if 20 <= len(words) <= 150 else 0.0)
        score -= 0.5 * sum(marker in text for marker in RUDE_MARKERS)
    else:
        length = 0.6 * len(words) / 5 if len(words) < 5 else 0.6 * min(1.0, max(0.0, (100 - len(words)) / 60))
        topic = {w for w in _words(prompt) if len(w) >= 3 and w not in QUESTION_WORDS}
        on_topic = 0.2 if topic & set(words) else 0.0
        ends = 0.2 if response.rstrip().endswith((".", "?", "!")) else 0.0
        score = length + on_topic + ends
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    if len(trigrams) >= 6 and len(set(trigrams)) < 0.5 * len(trigrams):
        score -= 0.5
    return max(-1.0, min(1.0, score))


# --------------------------------------------------------------------------------------------
# The shipped arithmetic task: a verifiable reward
# --------------------------------------------------------------------------------------------
# Prompts are made by scripts/make_arithmetic.py (tether/assets/arithmetic_*.jsonl) from one
# template. The checker reads the question back out of the prompt text (reward functions see
# only the text), so a prompt in any other form is an error, never a silent 0.

ARITHMETIC_QUESTION = r"What is (0|[1-9][0-9]*) ([-+*]) (0|[1-9][0-9]*)\?"
ARITHMETIC_PROMPT = re.compile(ARITHMETIC_QUESTION + r" Reply with the number only\.")
# A number in a response: digits, where digits joined by one '.' or ',' stay one number (12.5,
# 1,000), with a minus sign when '-' stands right before the digits and not right after a letter
# or digit ("-7" is negative; "9-7" is 9 and 7).
RESPONSE_NUMBER = re.compile(r"(?:(?<![A-Za-z0-9])-)?[0-9]+(?:[.,][0-9]+)*")
PLAIN_INTEGER = re.compile(r"-?[0-9]+")


def arithmetic_question(prompt: str, pattern: re.Pattern[str] = ARITHMETIC_PROMPT) -> tuple[int, str, int, int]:
    """(a, op, b, answer) of a prompt 'What is A OP B? Reply with the number only.' (OP: + - *),
    or of one that `pattern` matches whole (the calculator task's: tether/environments.py).

    Raises ValueError, naming the prompt, for any other text, and for a question whose answer
    equals one of its operands (e.g. 6 - 3): there, restating the question could not be told
    from answering it (see `arithmetic`).
    """
    match = pattern.fullmatch(prompt)
    if match is None:
        raise ValueError(
            f"not an arithmetic prompt {prompt!r}; expected exactly "
            + (
                "'What is A OP B? Reply with the number only.'"
                if pattern is ARITHMETIC_PROMPT
                else repr(pattern.pattern)
            )
            + " with OP one of + - *"
        )
    a, op, b = int(match[1]), match[2], int(match[3])
    answer = a + b if op == "+" else a - b if op == "-" else a * b
    if answer in (a, b):
        raise ValueError(f"arithmetic prompt {prompt!r}: the answer {answer} equals an operand")
    return a, op, b, answer


def arithmetic(prompts: list[str], responses: list[str], **_: Any) -> list[float]:
    """Exact 0/1 reward for the shipped arithmetic task: 1.0 iff the response states the right integer.

    The response's numbers are read with `RESPONSE_NUMBER`: runs of digits (digits joined by one
    '.' or ',' are one number, so "12.5", "1,000" and "85.0" are each one number that is not a
    plain integer), negative when an ASCII '-' stands right before the digits and not right after
    a letter or digit. Numbers equal to one of the question's two operands are left out, so
    restating the question is fine. The score is 1.0 when at least one number is left and every
    number left is the right answer written as a plain integer; otherwise 0.0. So for
    "What is 27 + 58?":
      1.0: "85", "The answer is 85.", "27 + 58 = 85", "85. Yes, 85."
      0.0: "86", "84 or 85", "85.0", "eighty-five", "27 + 58", "" (and any response with no number)
    Listing several candidates never earns credit. Each prompt must parse (`arithmetic_question`);
    one that does not is a ValueError naming it.
    """
    return [arithmetic_answer_score(arithmetic_question(p), r) for p, r in zip(prompts, responses, strict=True)]


def arithmetic_answer_score(question: tuple[int, str, int, int], response: str) -> float:
    """`arithmetic`'s score of one response to a parsed question (a, op, b, answer): 1.0 or 0.0."""
    a, _op, b, answer = question
    operands = {a, b}
    left = [
        number
        for number in RESPONSE_NUMBER.findall(response)
        if not (PLAIN_INTEGER.fullmatch(number) and int(number) in operands)
    ]
    right = bool(left) and all(PLAIN_INTEGER.fullmatch(n) and int(n) == answer for n in left)
    return 1.0 if right else 0.0
