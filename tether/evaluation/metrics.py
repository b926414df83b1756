"""Metrics on generated texts and per-prompt scores: diversity, repeated openings, win rate, spread.

Pure standard-library functions (no torch, no transformers), so they can be tested by hand and run
on any saved samples file. RLHF policies that over-optimise a reward tend to collapse onto one
style ("Sure! Here's ..."); these metrics make that visible next to the reward:

  distinct_n          unique n-grams / all n-grams, pooled over texts (Li et al. 2016)
  self_similarity     mean pairwise Jaccard of n-gram sets, a cheap Self-BLEU (Zhu et al. 2018)
  top_openings        the first k words that several responses share, with counts
  top_opening_share   the share of responses that start with the single most common opening
  win_rate            per-prompt wins / ties / losses against a baseline's scores
  spread              mean, population std, min and max of a list of numbers
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from dataclasses import dataclass
from itertools import combinations

# Lowercase letters and digits, with inner apostrophes kept so "don't" and "I'd" stay one word.
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


def words(text: str) -> list[str]:
    """Lowercase word tokens of `text`, punctuation dropped: "Sure, I'd!" -> ["sure", "i'd"].

    A deliberately simple tokenizer (not the model's): diversity should not depend on which
    tokenizer the policy happens to use, and case or punctuation changes are not new content.
    ASCII only: letters outside a-z (é, ß, CJK) are dropped like punctuation.
    """
    return _WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    """All contiguous n-grams of `tokens`, in order; [] when there are fewer than n tokens."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n: unique n-grams / total n-grams, pooled over all texts; 0.0 when there are none.

    N-grams are taken within each text (never across a boundary) and then pooled, so repetition
    across responses counts as well as repetition inside one. Li et al. 2016, "A Diversity-Promoting
    Objective Function for Neural Conversation Models", https://arxiv.org/abs/1510.03055.
    """
    pooled = [gram for text in texts for gram in ngrams(words(text), n)]
    if not pooled:
        return 0.0
    return len(set(pooled)) / len(pooled)


def _jaccard(a: set[tuple[str, ...]], b: set[tuple[str, ...]]) -> float:
    """|a & b| / |a | b|, with two empty sets counting as identical (1.0)."""
    union = a | b
    if not union:
        return 1.0
    return len(a & b) / len(union)


def self_similarity(texts: list[str], n: int = 2) -> float:
    """Mean pairwise Jaccard similarity of the texts' n-gram sets over all pairs i < j.

    1.0 means every response is the same, near 0 means they share nothing; 0.0 for fewer than two
    texts. Two texts with no n-grams count as identical (1.0); one empty and one not share nothing
    (0.0).

    Why not Self-BLEU (Zhu et al. 2018, "Texygen: A Benchmarking Platform for Text Generation
    Models", https://arxiv.org/abs/1802.01886)? Self-BLEU scores each text against all the others
    with BLEU's clipped counts over several n and a brevity penalty; it needs a BLEU implementation
    and is not symmetric. Set overlap measures the same thing (how much of one response's phrasing
    reappears in another's), is symmetric, has no dependency and is easy to check by hand.
    """
    if len(texts) < 2:
        return 0.0
    sets = [set(ngrams(words(text), n)) for text in texts]
    pairs = [_jaccard(a, b) for a, b in combinations(sets, 2)]
    return sum(pairs) / len(pairs)


def opening(text: str, k: int = 3) -> str:
    """The first k words of `text` (via `words`) joined by a space; "" for a text with no words."""
    return " ".join(words(text)[:k])


def top_openings(texts: list[str], k: int = 3, most: int = 5) -> list[tuple[str, int]]:
    """The `most` most common non-empty openings that occur at least twice, with their counts.

    Most common first; ties keep the order of first appearance in `texts`. Openings seen once are
    left out: a repeated opening is the signal of mode collapse, unique ones are noise.
    """
    counts = Counter(o for o in (opening(text, k) for text in texts) if o)
    # Counter.most_common orders equal counts by first insertion, i.e. first appearance in texts.
    return [(o, c) for o, c in counts.most_common() if c >= 2][:most]


def top_opening_share(texts: list[str], k: int = 3) -> float:
    """Share of texts whose (non-empty) opening is the single most common one; 0.0 for no texts.

    The count of the most common opening divided by len(texts), so texts with no words count in
    the denominator but never as an opening.
    """
    counts = Counter(o for o in (opening(text, k) for text in texts) if o)
    if not counts:
        return 0.0
    return max(counts.values()) / len(texts)


@dataclass(frozen=True)
class WinRate:
    """Per-prompt comparison counts against a baseline; a tie counts as half a win."""

    wins: int
    ties: int
    losses: int

    @property
    def total(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def rate(self) -> float:
        """(wins + 0.5 * ties) / total; 0.0 when nothing was compared."""
        if self.total == 0:
            return 0.0
        return (self.wins + 0.5 * self.ties) / self.total

    def as_dict(self) -> dict[str, float]:
        return {"wins": self.wins, "ties": self.ties, "losses": self.losses, "rate": self.rate}


def win_rate(scores: list[float], baseline_scores: list[float], tie_margin: float = 0.0) -> WinRate:
    """Compare `scores[i]` with `baseline_scores[i]` for each prompt i.

    A win when score > baseline + tie_margin, a loss when score < baseline - tie_margin, else a tie:
    with tie_margin 0 only exact equality ties. A margin > 0 keeps reward-model noise from counting
    as a win.
    """
    if len(scores) != len(baseline_scores):
        raise ValueError(f"scores and baseline_scores differ in length: {len(scores)} vs {len(baseline_scores)}")
    if tie_margin < 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    wins = sum(1 for s, b in zip(scores, baseline_scores, strict=True) if s > b + tie_margin)
    losses = sum(1 for s, b in zip(scores, baseline_scores, strict=True) if s < b - tie_margin)
    return WinRate(wins=wins, ties=len(scores) - wins - losses, losses=losses)


def spread(values: list[float]) -> dict[str, float]:
    """{"mean", "std", "min", "max"} of `values`; std is the population std (0.0 for one value).

    An empty list gives 0.0 for all four rather than NaN, so a metrics line stays valid JSON and
    comparable across runs; check the count separately where an empty eval set matters.
    """
    if not values:
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values),
        "min": min(values),
        "max": max(values),
    }
