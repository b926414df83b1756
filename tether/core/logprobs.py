"""Log-probabilities and entropy from logits: the ONE place the sampling temperature is applied.

Rollout, reference, old-policy and training forwards all call `logprobs_from_logits` with the
rollout temperature, and sampling draws its tokens with `sample_tokens` under the same one.
Dividing by the temperature anywhere else (or forgetting it somewhere) makes the PPO ratio and the
KL to the reference wrong from the first step: the classic RLHF temperature bug (see "The N
Implementation Details of RLHF with PPO", detail on temperature).

Memory: the logits are the largest activation of an RLHF forward pass ((B, T, V), V ~ 50k-150k).
The plain autograd chain (upcast, divide, log-softmax, gather) allocates several more tensors of
that size and keeps the log-softmax for the backward; the entropy adds three more, and the backward
another three. Here a custom autograd function walks the positions in chunks: it keeps only the
logits it was given, and every vocabulary-sized temporary is one chunk's (a few MiB). The results
are the same numbers (the same log-softmax, row by row); the backward is the closed form
d log p(token) / d logit_v = (1[v = token] - p_v) / temperature.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Vocabulary entries per chunk (x 4 bytes in float32). On the CPU 2^20 keeps each temporary at
# 4 MiB, small enough to stay in cache and to reuse the same heap memory chunk after chunk. On a GPU
# every chunk is a few kernel launches, so chunks are larger there.
CPU_CHUNK_ELEMENTS = 2**20
ACCELERATOR_CHUNK_ELEMENTS = 2**26


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    """log pi(token | prefix) under the tempered distribution softmax(logits / temperature).

    logits: (B, T, V) — the logits that *predict* `tokens` (already shifted by one).
    tokens: (B, T) token ids.
    returns (B, T) float32 (float64 for float64 logits), differentiable with respect to `logits`.
    """
    return _tempered_token_logprobs(logits, tokens, temperature, with_entropy=False)[0]


def logprobs_and_entropy(logits: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Like `logprobs_from_logits`, plus the entropy (nats) of the tempered distribution.

    The entropy is a measurement, never a loss term: it carries no gradient.
    returns ((B, T), (B, T)) float32.
    """
    token_logp, entropy = _tempered_token_logprobs(logits, tokens, temperature, with_entropy=True)
    return token_logp, entropy


def sample_tokens(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """One token per row from softmax(logits / temperature), and its log-prob. (B, V) -> (B,), (B,).

    The inverse of each row's cumulative distribution at one uniform number: token i is drawn when
    u falls in [cdf[i-1], cdf[i]), an interval as wide as its probability. The sums run in float64
    and u has 53 random bits, so a token's chance is its float32 probability, however small (and a
    token of probability 0 has an empty interval: never drawn). HF's sampling (softmax, then
    torch.multinomial) draws an exponential number for every vocabulary entry instead: 12-14 ms per
    step for 8 rows of 49k on a 2-core CPU, against 2 ms here.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to sample, got {temperature} (0 means greedy: argmax)")
    logprobs = torch.log_softmax(logits.to(_math_dtype(logits)) / temperature, dim=-1)
    cdf = torch.cumsum(logprobs.exp(), dim=-1, dtype=torch.float64)
    total = cdf[:, -1:]
    if not torch.isfinite(total).all():
        raise ValueError("sampling: the logits of a row are NaN or infinite everywhere")
    u = torch.rand(total.shape, dtype=torch.float64, device=logits.device) * total  # [0, total)
    tokens = torch.searchsorted(cdf, u, right=True).clamp_(max=logits.shape[-1] - 1)  # first cdf > u
    return tokens.squeeze(1), logprobs.gather(1, tokens).squeeze(1)


def _tempered_token_logprobs(
    logits: Tensor, tokens: Tensor, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor]:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to define log-probs, got {temperature}")
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}")
    elements = CPU_CHUNK_ELEMENTS if logits.device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    rows_per_chunk = max(1, elements // max(1, logits.shape[-1]))
    token_logp, entropy = _TemperedTokenLogprobs.apply(logits, tokens, temperature, with_entropy, rows_per_chunk)
    return token_logp, entropy


def _math_dtype(logits: Tensor) -> torch.dtype:
    # Upcast: a bf16 log-softmax over a 50k vocabulary loses the small differences PPO's ratio needs.
    return torch.promote_types(logits.dtype, torch.float32)


class _TemperedTokenLogprobs(torch.autograd.Function):
    """(logits (B, T, V), tokens (B, T)) -> (log-probs (B, T), entropy (B, T) or an empty tensor),
    computed `rows_per_chunk` positions at a time."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        logits: Tensor,
        tokens: Tensor,
        temperature: float,
        with_entropy: bool,
        rows_per_chunk: int,
    ) -> tuple[Tensor, Tensor]:
        dtype = _math_dtype(logits)
        flat_logits = logits.reshape(-1, logits.shape[-1])
        flat_tokens = tokens.reshape(-1, 1).long()
        n = flat_logits.shape[0]
        token_logp = torch.empty(tokens.shape, dtype=dtype, device=logits.device)
        entropy = torch.empty(tokens.shape if with_entropy else (0,), dtype=dtype, device=logits.device)
        flat_logp, flat_entropy = token_logp.view(-1), entropy.view(-1)
        for start in range(0, n, rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            logp = torch.log_softmax(flat_logits[rows].to(dtype) / temperature, dim=-1)
            flat_logp[rows] = logp.gather(-1, flat_tokens[rows]).squeeze(-1)
            if with_entropy:
                probs = logp.exp()
                # 0 * log 0 is 0 here, not NaN: logits masked to -inf must not poison the entropy.
                flat_entropy[rows] = -torch.where(probs > 0, probs * logp, torch.zeros_like(logp)).sum(-1)
        ctx.save_for_backward(logits, flat_tokens)
        ctx.temperature = temperature  # type: ignore[attr-defined]
        ctx.rows_per_chunk = rows_per_chunk  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(entropy)
        return token_logp, entropy

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_logp: Tensor, _grad_entropy: Tensor
    ) -> tuple[Tensor | None, None, None, None, None]:
        logits, flat_tokens = ctx.saved_tensors  # type: ignore[attr-defined]
        temperature: float = ctx.temperature  # type: ignore[attr-defined]
        rows_per_chunk: int = ctx.rows_per_chunk  # type: ignore[attr-defined]
        dtype = _math_dtype(logits)
        flat_logits = logits.reshape(-1, logits.shape[-1])
        # d/dz_v of log softmax(z)_token is 1[v = token] - softmax(z)_v, and z = logits / temperature.
        scale = grad_logp.reshape(-1, 1).to(dtype) / temperature
        grad = torch.empty_like(flat_logits)
        for start in range(0, flat_logits.shape[0], rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            probs = torch.softmax(flat_logits[rows].to(dtype) / temperature, dim=-1)
            chunk_grad = probs.mul_(-scale[rows]).scatter_add_(-1, flat_tokens[rows], scale[rows])
            grad[rows] = chunk_grad
        return grad.view_as(logits), None, None, None, None
