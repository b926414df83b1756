"""Log-probs and entropy (tether/core/logprobs.py) against brute-force sums over the vocabulary.

Tier: hand-computed math. Offline, CPU, milliseconds.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


# --- the chunked autograd function: gradients, chunking, memory -----------------------------------


def _plain_chain(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """The textbook autograd chain the chunked function replaces."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("temperature", [0.4, 1.0, 2.0])
def test_gradient_equals_autograd_of_the_plain_chain(temperature):
    logits, tokens = _batch(5)
    weights = torch.randn(B, T, generator=torch.Generator().manual_seed(6))
    ours = logits.double().requires_grad_()
    plain = logits.double().requires_grad_()
    (logprobs_from_logits(ours, tokens, temperature) * weights).sum().backward()
    (_plain_chain(plain, tokens, temperature) * weights).sum().backward()
    torch.testing.assert_close(ours.grad, plain.grad, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64():
    logits, tokens = _batch(7)
    x = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: logprobs_from_logits(z, tokens, 0.7), (x,))
    assert torch.autograd.gradcheck(lambda z: logprobs_and_entropy(z, tokens, 0.7)[0], (x,))


def test_entropy_carries_no_gradient():
    logits, tokens = _batch(8)
    x = logits.requires_grad_()
    token_logp, entropy = logprobs_and_entropy(x, tokens, 1.0)
    assert token_logp.requires_grad
    assert not entropy.requires_grad


@pytest.mark.parametrize("chunk_elements", [1, V, 2 * V + 3, 10**9])
def test_chunk_size_changes_nothing(monkeypatch, chunk_elements):
    # One position per chunk, exactly one, a ragged last chunk, everything at once: the same bits.
    import tether.core.logprobs as module

    logits, tokens = _batch(9)
    expected_logp, expected_entropy = logprobs_and_entropy(logits, tokens, 0.7)
    x = logits.clone().requires_grad_()
    logprobs_from_logits(x, tokens, 0.7).sum().backward()
    expected_grad = x.grad

    monkeypatch.setattr(module, "CPU_CHUNK_ELEMENTS", chunk_elements)
    token_logp, entropy = logprobs_and_entropy(logits, tokens, 0.7)
    x = logits.clone().requires_grad_()
    logprobs_from_logits(x, tokens, 0.7).sum().backward()
    torch.testing.assert_close(token_logp, expected_logp, rtol=0.0, atol=0.0)
    torch.testing.assert_close(entropy, expected_entropy, rtol=0.0, atol=0.0)
    torch.testing.assert_close(x.grad, expected_grad, rtol=0.0, atol=0.0)


def test_gradient_is_zero_on_minus_inf_logits_and_finite_elsewhere():
    logits = torch.tensor([[[0.0, 1.0, -float("inf")]]], requires_grad=True)
    logprobs_from_logits(logits, torch.tensor([[0]]), 1.0).backward()
    p0 = 1.0 / (1.0 + math.e)
    torch.testing.assert_close(logits.grad, torch.tensor([[[1.0 - p0, -(1.0 - p0), 0.0]]]), **TIGHT)


def test_bf16_logits_get_a_bf16_gradient_from_float32_math():
    logits, tokens = _batch(10)
    x = logits.to(torch.bfloat16).requires_grad_()
    logprobs_from_logits(x, tokens, 0.7).sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    reference = x.detach().float().requires_grad_()
    _plain_chain(reference, tokens, 0.7).sum().backward()
    torch.testing.assert_close(x.grad.float(), reference.grad.float(), rtol=1e-2, atol=1e-2)


class _VocabSizedOutputs(TorchDispatchMode):
    """Counts the ops whose output has at least `threshold` elements: the (B, T, V)-sized tensors."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold = threshold
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            # A view or a detach shares its input's storage; only new storage is an allocation.
            if t.numel() >= self.threshold and t.untyped_storage().data_ptr() not in given:
                self.count += 1
        return out


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, tuple | list):
        return [t for item in tree for t in _tensors(item)]
    return []


def _vocab_sized_allocations(fn, threshold: int) -> tuple[int, int]:
    """(forward, backward) counts of new vocabulary-sized tensors made by fn()'s forward and the
    backward of its sum."""
    with _VocabSizedOutputs(threshold) as forward:
        out = fn()
    with _VocabSizedOutputs(threshold) as backward:
        out.sum().backward()
    return forward.count, backward.count


def test_allocates_one_vocabulary_sized_tensor_the_gradient():
    # The memory claim: forward makes no (B, T, V) tensor at all (only chunks of a few MiB), the
    # backward makes exactly one, the gradient it returns. The textbook chain makes several.
    logits = torch.randn(4, 64, 2**15, requires_grad=True)  # 32 positions per 2^20-element chunk
    tokens = torch.randint(0, 2**15, (4, 64))
    full = logits.numel()

    def ours():
        token_logp, _ = logprobs_and_entropy(logits, tokens, 0.7)
        return token_logp

    def plain():
        logp = torch.log_softmax(logits / 0.7, dim=-1)
        with torch.no_grad():
            probs = logp.exp()
            _ = -torch.where(probs > 0, probs * logp, torch.zeros_like(logp)).sum(-1)
        return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    assert _vocab_sized_allocations(ours, full) == (0, 1)
    plain_forward, plain_backward = _vocab_sized_allocations(plain, full)
    assert plain_forward >= 5 and plain_backward >= 3  # the counter sees them when they are there


def test_logits_and_tokens_of_different_shapes_are_refused():
    logits, tokens = _batch()
    with pytest.raises(ValueError, match="do not match tokens"):
        logprobs_from_logits(logits, tokens[:, :-1], 1.0)
