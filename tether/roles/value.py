"""The value model: its own backbone with a scalar head, a value for every response position."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from tether.models import scalar_head
from tether.roles.batching import forward_trimmed, position_ids_from_mask


def backbone_hidden(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Last hidden states of a sequence classifier's body. (B, L) -> (B, L, H).

    HF sequence classifiers return the score at one pooled position only, found from the pad id;
    tether needs every response position (values) or a position it picks itself (rewards), so it
    runs the body and applies the head (`models.scalar_head`) where it wants.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state


def response_values(model: Any, input_ids: Tensor, attention_mask: Tensor, response_start: int) -> Tensor:
    """V(state before response token t) for every response position t.

    Read at the position that predicts token t (the one before it), the same convention as the
    log-probs. input_ids, attention_mask: (B, P + R); returns (B, R) float32.
    """

    def forward(ids: Tensor, mask: Tensor, response_len: int) -> tuple[Tensor]:
        hidden = backbone_hidden(model, ids, mask)[:, -response_len - 1 : -1]
        return (scalar_head(model)(hidden).squeeze(-1).float(),)

    return forward_trimmed(forward, input_ids, attention_mask, response_start)[0]
