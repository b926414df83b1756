"""Log-probs and entropy (tether/core/logprobs.py) against brute-force sums over the vocabulary.

Tier: hand-computed math. Offline, CPU, milliseconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from tether.core import logprobs_and_entropy, logprobs_from_logits

B, T, V = 2, 3, 7
TIGHT = {"rtol": 1e-5, "atol": 1e-5}


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=gen) * 4.0
    tokens = torch.randint(0, V, (B, T), generator=gen)
    return logits, tokens


def _brute_force_log_softmax(row: list[float], temperature: float) -> list[float]:
    """log softmax(row / temperature) with plain math.exp / sum over the vocabulary."""
    scaled = [x / temperature for x in row]
    # Shift by the max so exp cannot overflow at small temperatures; the shift cancels exactly.
    top = max(scaled)
    log_norm = top + math.log(sum(math.exp(z - top) for z in scaled))
    return [z - log_norm for z in scaled]


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 2.5])
def test_logprobs_equal_brute_force_tempered_softmax(temperature):
    logits, tokens = _batch()
    out = logprobs_from_logits(logits, tokens, temperature)
    for b in range(B):
        for t in range(T):
            logp = _brute_force_log_softmax(logits[b, t].tolist(), temperature)
            torch.testing.assert_close(out[b, t].item(), logp[tokens[b, t].item()], **TIGHT)


def test_temperature_changes_the_logprobs():
    # Guards the brute-force test above against a temperature that is silently ignored.
    logits, tokens = _batch()
    assert not torch.allclose(logprobs_from_logits(logits, tokens, 0.7), logprobs_from_logits(logits, tokens, 1.0))


def test_temperature_one_equals_log_softmax_gather():
    logits, tokens = _batch(1)
    expected = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, tokens, 1.0), expected, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_entropy_equals_hand_computation(temperature):
    logits, tokens = _batch(2)
    token_logp, entropy = logprobs_and_entropy(logits, tokens, temperature)
    for b in range(B):
        for t in range(T):
            logp = _brute_force_log_softmax(logits[b, t].tolist(), temperature)
            expected = -sum(math.exp(lp) * lp for lp in logp)
            torch.testing.assert_close(entropy[b, t].item(), expected, **TIGHT)
    # The token log-probs are the same ones logprobs_from_logits gives.
    torch.testing.assert_close(token_logp, logprobs_from_logits(logits, tokens, temperature), rtol=0.0, atol=0.0)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_uniform_distribution_has_entropy_log_vocab_and_logprob_minus_log_vocab(temperature):
    logits = torch.full((B, T, V), 3.0)
    tokens = torch.zeros(B, T, dtype=torch.long)
    token_logp, entropy = logprobs_and_entropy(logits, tokens, temperature)
    torch.testing.assert_close(entropy, torch.full((B, T), math.log(V)), **TIGHT)
    torch.testing.assert_close(token_logp, torch.full((B, T), -math.log(V)), **TIGHT)


def test_entropy_is_finite_when_some_logits_are_minus_inf():
    # A banned / padded vocabulary entry has probability 0 and contributes 0 * log 0 = 0 to the entropy.
    logits = torch.tensor([[[0.0, 1.0, -float("inf")]]])
    _, entropy = logprobs_and_entropy(logits, torch.tensor([[0]]), 1.0)
    p = [1.0 / (1.0 + math.e), math.e / (1.0 + math.e)]
    torch.testing.assert_close(entropy.item(), -sum(x * math.log(x) for x in p), **TIGHT)


@pytest.mark.parametrize("temperature", [0.0, -0.5])
def test_non_positive_temperature_raises(temperature):
    logits, tokens = _batch()
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, tokens, temperature)
    with pytest.raises(ValueError, match="temperature"):
        logprobs_and_entropy(logits, tokens, temperature)


def test_bf16_logits_are_upcast_before_the_log_softmax():
    logits, tokens = _batch(3)
    logits_bf16 = logits.to(torch.bfloat16)
    token_logp, entropy = logprobs_and_entropy(logits_bf16, tokens, 0.7)
    assert logprobs_from_logits(logits_bf16, tokens, 0.7).dtype == torch.float32
    assert token_logp.dtype == torch.float32
    assert entropy.dtype == torch.float32
    # Equal (to float32 rounding) to the float32 computation on the same (bf16-representable) logits:
    # a log-softmax done in bf16 would be off by ~1e-2, far outside this tolerance.
    upcast = logits_bf16.float()
    torch.testing.assert_close(token_logp, logprobs_from_logits(upcast, tokens, 0.7), rtol=0.0, atol=0.0)
    bf16_math = torch.log_softmax(logits_bf16 / 0.7, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert not torch.allclose(token_logp, bf16_math.float(), rtol=0.0, atol=1e-4)


def test_int32_token_ids_are_accepted():
    logits, tokens = _batch(4)
    torch.testing.assert_close(
        logprobs_from_logits(logits, tokens.int(), 1.0),
        logprobs_from_logits(logits, tokens, 1.0),
        rtol=0.0,
        atol=0.0,
    )
