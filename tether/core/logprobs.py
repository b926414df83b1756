"""Log-probabilities and entropy from logits: the ONE place the sampling temperature is applied.

Rollout, reference, old-policy and training forwards all call `logprobs_from_logits` with the
rollout temperature. Dividing by the temperature anywhere else (or forgetting it somewhere) makes
the PPO ratio and the KL to the reference wrong from the first step: the classic RLHF temperature
bug (see "The N Implementation Details of RLHF with PPO", detail on temperature).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _tempered_log_softmax(logits: Tensor, temperature: float) -> Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to define log-probs, got {temperature}")
    # Upcast: bf16 log-softmax over a 50k vocabulary loses the small differences PPO's ratio needs.
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    """log pi(token | prefix) under the tempered distribution softmax(logits / temperature).

    logits: (B, T, V) — the logits that *predict* `tokens` (already shifted by one).
    tokens: (B, T) token ids.
    returns (B, T) float32.
    """
    logp = _tempered_log_softmax(logits, temperature)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def logprobs_and_entropy(logits: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Like `logprobs_from_logits`, plus the entropy (nats) of the tempered distribution.

    Shares one log-softmax so the entropy costs one extra (B, T, V) product, not a second softmax.
    returns ((B, T), (B, T)) float32.
    """
    logp = _tempered_log_softmax(logits, temperature)
    token_logp = logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    # A measurement, never a loss term: no graph (it would hold two more (B, T, V) tensors).
    with torch.no_grad():
        probs = logp.exp()
        # 0 * log 0 is 0 here, not NaN: logits masked to -inf must not poison the entropy.
        entropy = -torch.where(probs > 0, probs * logp, torch.zeros_like(logp)).sum(-1)
    return token_logp, entropy
