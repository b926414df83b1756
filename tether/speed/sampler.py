"""Drawing each sampled token with one uniform number per row (`core.logprobs.sample_tokens`) inside
transformers' `generate`, instead of its multinomial sampling.

HF's sampling (softmax, then torch.multinomial) draws an exponential random number for every
vocabulary entry: 12-14 ms per step for 8 rows of 49k on a 2-core CPU, against 2 ms here
(benchmarks/sampling.py). The distribution is the same: softmax(logits / temperature), in full.
"""

from __future__ import annotations

from torch import Tensor
from transformers import LogitsProcessor

from tether.core.logprobs import sample_tokens


class SampleTokens(LogitsProcessor):
    """Draws each step's tokens inside generate's greedy decoding: the scores it returns are -inf
    except at the drawn token, so the argmax is the sample. Keeps the drawn tokens' log-probs (one
    (B,) tensor per step) for `generate(return_logprobs=True)`."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.logprobs: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        tokens, logprobs = sample_tokens(scores, self.temperature)
        self.logprobs.append(logprobs)
        # In place: generate hands every step a fresh copy of the logits (and keeps none, as
        # tether never asks for output_logits).
        return scores.fill_(float("-inf")).scatter_(1, tokens[:, None], 0.0)
