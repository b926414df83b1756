"""The critic: a value for every response position, from its own model or from a head on the policy.

`model.critic: model` (the default) is a sequence classifier with its own backbone (`response_values`).
`model.critic: head` is a `ValueHead`: one linear layer reading the policy's last hidden state, which
the policy's forward pass computes anyway (roles/policy.py `response_logprobs(value_head=...)`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from tether.config import SpeedConfig
from tether.roles.forward import forward_trimmed, model_forward
from tether.speed.shared_prefix import expand_to_columns


def backbone_hidden(model: Any, input_ids: Tensor, attention_mask: Tensor, speed: SpeedConfig) -> Tensor:
    """Last hidden states of a sequence classifier's body. (B, L) -> (B, L, H).

    HF sequence classifiers return the score at one pooled position only, found from the pad id;
    tether needs every response position (values) or a position it picks itself (rewards), so it
    runs the body and applies the head (`models.scalar_head`) where it wants.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    out, prefix, split = model_forward(inner.base_model, input_ids, attention_mask, speed)
    if split is None:
        return out.last_hidden_state
    return expand_to_columns(prefix.last_hidden_state, out.last_hidden_state, split)


def response_values(
    model: Any, input_ids: Tensor, attention_mask: Tensor, response_start: int, speed: SpeedConfig
) -> Tensor:
    """V(state before response token t) for every response position t.

    Read at the position that predicts token t (the one before it), the same convention as the
    log-probs. input_ids, attention_mask: (B, P + R); returns (B, R) float32.
    """

    def forward(ids: Tensor, mask: Tensor, response_len: int) -> tuple[Tensor]:
        hidden = backbone_hidden(model, ids, mask, speed)[:, -response_len - 1 : -1]
        return (scalar_head(model)(hidden).squeeze(-1).float(),)

    return forward_trimmed(forward, input_ids, attention_mask, response_start)[0]


class ValueHead(torch.nn.Module):
    """V(s) = w . rms_normalise(h) + b, with h the policy's last hidden state, detached.

    Detached: the value loss trains this layer only, never the policy, so the policy's update is
    PPO's clipped objective alone (no value gradient competing for the shared weights). The
    features are RMS-normalised without a learned scale, so one learning rate suits any model's
    hidden-state scale. w and b start at 0: the first values are 0, as a fresh critic's should be
    before it has seen a return.
    """

    FILE = "value_head.safetensors"

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """(B, T, H) -> (B, T) float32."""
        features = hidden.detach().float()
        features = features * torch.rsqrt(features.pow(2).mean(-1, keepdim=True) + 1e-6)
        with torch.autocast(features.device.type, enabled=False):  # float32 even under model.dtype=bfloat16
            return self.linear(features).squeeze(-1)

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, folder / self.FILE)
        info = {"tether_value_head": {"hidden_size": self.linear.in_features, "reads": "policy last hidden state"}}
        (folder / "config.json").write_text(json.dumps(info, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ValueHead:
        path = Path(folder) / cls.FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no value head (a checkpoint of a run with model.critic=head has one)")
        state = load_file(str(path))
        head = cls(int(state["linear.weight"].shape[1]))
        head.load_state_dict(state)
        return head


def scalar_head(model: Any) -> torch.nn.Module:
    """The one-output linear head of a sequence classifier (`score` in decoder-only models)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head: torch.nn.Module | None = getattr(inner, "score", None)
    if head is None:
        raise ValueError(
            f"{type(inner).__name__} has no `score` head; tether's reward and value models are "
            "decoder-only sequence classifiers (LlamaForSequenceClassification and the like)"
        )
    return head
