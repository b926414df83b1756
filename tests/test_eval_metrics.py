"""Text and score metrics for evaluation (tether/evaluation/metrics.py).

Tier: hand-computed numbers on small fixed texts, the arithmetic written out beside each check.
Pure Python, offline, milliseconds.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest

from tether.evaluation.metrics import (
    WinRate,
    distinct_n,
    ngrams,
    opening,
    self_similarity,
    spread,
    top_opening_share,
    top_openings,
    win_rate,
    words,
)

# words()


def test_words_lowercases_and_drops_punctuation():
    assert words("Sure, I'd LOVE to!") == ["sure", "i'd", "love", "to"]
    assert words("Hello\nWORLD...\tagain") == ["hello", "world", "again"]


def test_words_keeps_inner_apostrophes_only():
    assert words("Don't stop -- it's fine") == ["don't", "stop", "it's", "fine"]
    # Leading/trailing apostrophes are quotes, not part of a word: 'n' -> n, dogs' -> dogs.
    assert words("rock 'n' roll, the dogs' bowls") == ["rock", "n", "roll", "the", "dogs", "bowls"]


def test_words_keeps_digits_and_splits_on_symbols():
    # "-", "$" and "." separate tokens: GPT|4o, 3|50.
    assert words("GPT-4o costs $3.50 in 2024") == ["gpt", "4o", "costs", "3", "50", "in", "2024"]


def test_words_of_text_without_words_is_empty():
    assert words("") == []
    assert words("?! -- ...") == []


# ngrams()


def test_ngrams_in_order():
    tokens = ["a", "b", "c"]
    assert ngrams(tokens, 1) == [("a",), ("b",), ("c",)]
    assert ngrams(tokens, 2) == [("a", "b"), ("b", "c")]
    assert ngrams(tokens, 3) == [("a", "b", "c")]


def test_ngrams_shorter_than_n_is_empty_and_n_below_one_is_an_error():
    assert ngrams(["a", "b"], 3) == []
    assert ngrams([], 1) == []
    with pytest.raises(ValueError, match="n must be >= 1"):
        ngrams(["a"], 0)


# distinct_n()


def test_distinct_2_pooled_over_texts():
    # bigrams (a,b),(b,a),(a,b) + (a,b),(b,c) -> unique {(a,b),(b,a),(b,c)} = 3 of 5 -> 0.6
    assert distinct_n(["a b a b", "a b c"], 2) == pytest.approx(0.6)


def test_distinct_1_pooled_over_texts():
    # unigrams a,b,a,b + a,b,c -> unique {a,b,c} = 3 of 7
    assert distinct_n(["a b a b", "a b c"], 1) == pytest.approx(3 / 7)


def test_distinct_n_never_crosses_text_boundaries():
    # Within texts: (a,b),(b,a) + (b,c) -> 3 unique of 3 -> 1.0.
    # Joined as "a b a b c" it would be (a,b),(b,a),(a,b),(b,c) -> 3 of 4 = 0.75.
    assert distinct_n(["a b a", "b c"], 2) == pytest.approx(1.0)


def test_distinct_n_ignores_case_and_punctuation():
    # "Hi, hi!" -> hi, hi -> 1 unique of 2
    assert distinct_n(["Hi, hi!"], 1) == pytest.approx(0.5)


def test_distinct_n_without_ngrams_is_zero():
    assert distinct_n([], 2) == 0.0
    assert distinct_n(["one"], 2) == 0.0  # one word, no bigram
    assert distinct_n(["", "!!"], 1) == 0.0


# self_similarity()


def test_self_similarity_of_identical_texts_is_one():
    assert self_similarity(["a b c", "A, b c!"]) == pytest.approx(1.0)


def test_self_similarity_one_pair_by_hand():
    # {(a,b),(b,c)} vs {(a,b),(b,d)}: intersection {(a,b)} = 1, union 3 -> 1/3
    assert self_similarity(["a b c", "a b d"]) == pytest.approx(1 / 3)


def test_self_similarity_averages_over_all_pairs():
    # pairs: (0,1) = 1/3 as above; (0,2) and (1,2) share nothing with {(x,y)} -> 0
    # mean = (1/3 + 0 + 0) / 3 = 1/9
    assert self_similarity(["a b c", "a b d", "x y"]) == pytest.approx(1 / 9)


def test_self_similarity_uses_sets_not_counts():
    # "a b a b" -> {(a,b),(b,a)} (the repeated (a,b) counts once); "a b" -> {(a,b)} -> 1/2
    assert self_similarity(["a b a b", "a b"]) == pytest.approx(0.5)


def test_self_similarity_with_unigrams():
    # {a,b} vs {b,c}: 1 / 3
    assert self_similarity(["a b", "b c"], n=1) == pytest.approx(1 / 3)


def test_self_similarity_empty_text_rules():
    # Neither "" nor "one" has a bigram: both empty sets -> identical -> 1.0.
    assert self_similarity(["", "one"]) == pytest.approx(1.0)
    # One empty, one not: nothing shared -> 0.0.
    assert self_similarity(["", "a b"]) == pytest.approx(0.0)
    # pairs ("", "hi") = 1.0, ("", "a b") = 0.0, ("hi", "a b") = 0.0 -> 1/3
    assert self_similarity(["", "hi", "a b"]) == pytest.approx(1 / 3)


def test_self_similarity_of_fewer_than_two_texts_is_zero():
    assert self_similarity([]) == 0.0
    assert self_similarity(["a b c"]) == 0.0


# opening()


def test_opening_takes_first_k_words():
    assert opening("Sure, I'd be happy to help.") == "sure i'd be"
    assert opening("Sure, I'd be happy to help.", k=2) == "sure i'd"
    assert opening("Hi!") == "hi"  # fewer than k words: all of them


def test_opening_of_text_without_words_is_empty():
    assert opening("") == ""
    assert opening("...!") == ""


def test_opening_ignores_case_and_punctuation():
    assert opening("Sure, I'd", k=2) == opening("sure i'd", k=2) == "sure i'd"


# top_openings() and top_opening_share()

# k=2 openings, index: opening
TEXTS = [
    "Okay then, let's go.",  # 0: okay then
    "Sure, I'd love to.",  # 1: sure i'd
    "Great question! Here",  # 2: great question
    "Yes indeed.",  # 3: yes indeed
    "sure i'd say no",  # 4: sure i'd
    "YES, INDEED!",  # 5: yes indeed
    "No.",  # 6: no (once)
    "great question, truly",  # 7: great question
    "Sure I'd",  # 8: sure i'd
    "okay then",  # 9: okay then
    "",  # 10: no opening
    "?!",  # 11: no opening
]


def test_top_openings_counts_and_tie_order():
    # sure i'd = 3 (texts 1, 4, 8); okay then, great question, yes indeed = 2 each; no = 1 (left out).
    # The three ties keep first appearance (0, 2, 3): okay then, great question, yes indeed,
    # which differs from alphabetical (great, okay, yes) and from last appearance (yes 5, great 7, okay 9).
    assert top_openings(TEXTS, k=2) == [
        ("sure i'd", 3),
        ("okay then", 2),
        ("great question", 2),
        ("yes indeed", 2),
    ]


def test_top_openings_keeps_only_most():
    assert top_openings(TEXTS, k=2, most=2) == [("sure i'd", 3), ("okay then", 2)]


def test_top_openings_default_k_is_three_words():
    # "sure i'd be" x2, "sure i'd love" x1 (left out)
    texts = ["Sure, I'd be glad", "sure i'd be happy", "Sure I'd love"]
    assert top_openings(texts) == [("sure i'd be", 2)]


def test_top_openings_drops_unique_and_empty_openings():
    assert top_openings(["a b c", "d e f"]) == []
    # "" three times is the most repeated, but an empty opening is not an opening.
    assert top_openings(["", "", "!"]) == []


def test_top_opening_share_by_hand():
    # most common opening "sure i'd" in 3 of 12 texts (the 2 empty ones count in the denominator)
    assert top_opening_share(TEXTS, k=2) == pytest.approx(3 / 12)


def test_top_opening_share_ignores_empty_openings():
    # "" occurs 3 times, "hi there" 2 times: the share is 2 of 5 texts.
    assert top_opening_share(["", "", "", "Hi there", "hi, there"], k=2) == pytest.approx(2 / 5)
    assert top_opening_share(["", "!!"]) == 0.0


def test_top_opening_share_when_all_unique_and_when_empty():
    # every opening once: the most common covers 1 of 4
    assert top_opening_share(["a", "b", "c", "d"], k=1) == pytest.approx(1 / 4)
    assert top_opening_share([]) == 0.0


# WinRate and win_rate()


def test_win_rate_record_counts_ties_as_half():
    record = WinRate(wins=3, ties=2, losses=1)
    # (3 + 0.5 * 2) / 6 = 4 / 6
    assert record.total == 6
    assert record.rate == pytest.approx(2 / 3)
    assert record.as_dict() == {"wins": 3, "ties": 2, "losses": 1, "rate": pytest.approx(2 / 3)}


def test_empty_win_rate_record_is_zero_and_frozen():
    record = WinRate(wins=0, ties=0, losses=0)
    assert record.total == 0
    assert record.rate == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.wins = 1  # type: ignore[misc]


SCORES = [1.0, 2.0, 3.0, 0.5, 2.0, 1.0]
BASELINE = [0.5, 2.0, 1.0, 1.5, 1.95, 1.05]
# differences:  +0.5, 0, +2.0, -1.0, +0.05, -0.05


def test_win_rate_with_zero_margin_only_exact_equality_ties():
    # wins: +0.5, +2.0, +0.05 = 3; tie: 0 = 1; losses: -1.0, -0.05 = 2
    result = win_rate(SCORES, BASELINE)
    assert result == WinRate(wins=3, ties=1, losses=2)
    assert result.rate == pytest.approx((3 + 0.5) / 6)


def test_win_rate_margin_turns_narrow_wins_and_losses_into_ties():
    # margin 0.1: +0.05 and -0.05 become ties -> wins 2 (+0.5, +2.0), ties 3, losses 1 (-1.0)
    result = win_rate(SCORES, BASELINE, tie_margin=0.1)
    assert result == WinRate(wins=2, ties=3, losses=1)
    assert result.rate == pytest.approx((2 + 0.5 * 3) / 6)


def test_win_rate_first_five_by_hand():
    # +0.5 W, 0 T, +2.0 W, -1.0 L, +0.05 W -> (3 + 0.5) / 5 = 0.7; margin 0.1: +0.05 T -> (2 + 1) / 5 = 0.6
    assert win_rate(SCORES[:5], BASELINE[:5]).rate == pytest.approx(0.7)
    assert win_rate(SCORES[:5], BASELINE[:5], tie_margin=0.1).rate == pytest.approx(0.6)


def test_win_rate_difference_equal_to_margin_is_a_tie():
    # 1.5 > 1.0 + 0.5 is false and 1.5 < 1.0 - 0.5 is false (all exact in binary floating point)
    assert win_rate([1.5, 0.5], [1.0, 1.0], tie_margin=0.5) == WinRate(wins=0, ties=2, losses=0)


def test_win_rate_swapping_sides_swaps_wins_and_losses():
    forward = win_rate(SCORES, BASELINE, tie_margin=0.1)
    backward = win_rate(BASELINE, SCORES, tie_margin=0.1)
    assert (backward.wins, backward.ties, backward.losses) == (forward.losses, forward.ties, forward.wins)
    assert forward.rate + backward.rate == pytest.approx(1.0)


def test_win_rate_on_no_prompts_is_zero():
    assert win_rate([], []) == WinRate(wins=0, ties=0, losses=0)


def test_win_rate_rejects_mismatched_lengths_and_negative_margin():
    with pytest.raises(ValueError, match="3 vs 2"):
        win_rate([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="tie_margin"):
        win_rate([1.0], [1.0], tie_margin=-0.1)


# spread()


def test_spread_uses_population_std():
    # mean 40 / 8 = 5; deviations -3,-1,-1,-1,0,0,2,4; squares sum 9+1+1+1+0+0+4+16 = 32
    # population variance 32 / 8 = 4 -> std 2 (the sample std would be sqrt(32 / 7) = 2.138)
    stats = spread([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])
    assert stats == {"mean": pytest.approx(5.0), "std": pytest.approx(2.0), "min": 2.0, "max": 9.0}


def test_spread_of_one_and_of_signed_values():
    assert spread([3.5]) == {"mean": 3.5, "std": 0.0, "min": 3.5, "max": 3.5}
    # mean 0; deviations -1, +1 -> variance 1 -> std 1
    assert spread([-1.0, 1.0]) == {"mean": 0.0, "std": pytest.approx(1.0), "min": -1.0, "max": 1.0}


def test_spread_of_nothing_is_zeros_not_nan():
    stats = spread([])
    assert stats == {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
    assert all(math.isfinite(v) for v in stats.values())


# Dependencies


def test_metrics_import_without_torch():
    # A fresh interpreter: pytest's own process may already hold torch from other test modules.
    code = "import sys, tether.evaluation.metrics; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
