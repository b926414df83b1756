"""Rule-based reward functions that ship with tether (usable as `reward.function`).

    reward:
      function: tether.reward_functions:concise
      function_kwargs: {target_words: 30}

Each follows the reward-function contract: f(prompts, responses, **kw) -> one float per response.
They are transparent on purpose: a learned reward can be checked against them.
"""

from __future__ import annotations

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
