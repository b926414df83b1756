"""A reward or value model for any causal LM: its body and a one-output linear head.

transformers has a `*ForSequenceClassification` class for most decoder architectures, and tether
uses it where there is one (a checkpoint of it loads in plain transformers too). For an
architecture without one (Cohere, Granite, OLMoE, GraniteMoE, Cohere 2, LFM2, Mamba, ... in
transformers 5.23) a reward or value model is built the same way by hand: the causal LM's body
(`AutoModel`, the model without its LM head) and `score`, a linear layer from the hidden size to one
output with no bias, named as in the library's classifiers so the roles read both alike
(roles/value.py `backbone_hidden`, `scalar_head`).

Saved form (docs/models.md): the body as transformers saves it (`AutoModel.from_pretrained` loads
it), the head in `score.safetensors` (one tensor, `weight`, of shape (1, hidden)), and the key
`"tether_score_head": "score.safetensors"` in config.json. `load_score_model` reads both back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel

HEAD_FILE = "score.safetensors"
MARKER = "tether_score_head"  # config.json key of the saved form


def hidden_size(config: PretrainedConfig) -> int:
    text = getattr(config, "text_config", None) or config
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(text, key, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{type(config).__name__} names no hidden size (hidden_size, d_model, n_embd)")


class TetherScoreModel(PreTrainedModel):
    """body (B, L) -> last hidden states (B, L, H); score: (..., H) -> (..., 1)."""

    base_model_prefix = "model"
    config_class = PretrainedConfig
    _no_split_modules: list[str] = []
    # Attention runs in the body, which checks its own implementation; the wrapper takes any.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # And the experts of a mixture-of-experts body: transformers decides it by reading the class's
    # source for expert modules, which the wrapper has none of, so it is told (a cached flag of
    # PreTrainedModel; the architecture tests on two transformers releases would see it break).
    _can_set_experts_implementation_cached_value = True

    def __init__(self, config: PretrainedConfig, body: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        self.model = body if body is not None else AutoModel.from_config(config)
        self.score = nn.Linear(hidden_size(config), 1, bias=False)
        self.config.num_labels = 1

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The score at every position, (B, L) float: tether reads the positions it wants."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return self.score(hidden).squeeze(-1)

    def save_pretrained(self, folder: str | Path, **kwargs: Any) -> None:  # type: ignore[override]
        """The body in transformers' own form, the head beside it, and the marker in config.json."""
        from safetensors.torch import save_file

        folder = Path(folder)
        self.model.save_pretrained(folder, **kwargs)
        save_file({"weight": self.score.weight.detach().cpu().contiguous()}, folder / HEAD_FILE)
        config = json.loads((folder / "config.json").read_text())
        config[MARKER] = HEAD_FILE
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)


def is_score_model_folder(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    try:
        return config.is_file() and MARKER in json.loads(config.read_text())
    except ValueError:
        return False


def load_score_model(path: str | Path, trust_remote_code: bool = False) -> TetherScoreModel:
    """A folder `TetherScoreModel.save_pretrained` wrote, read back."""
    from safetensors.torch import load_file

    body = AutoModel.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model = TetherScoreModel(body.config, body)
    model.score.load_state_dict(load_file(Path(path) / HEAD_FILE))
    return model


def score_model_from_causal_lm(causal_lm: PreTrainedModel) -> TetherScoreModel:
    """The body of a loaded causal LM under a new (zero) one-output head; the LM head is dropped."""
    body: Any = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else causal_lm.base_model
    model = TetherScoreModel(causal_lm.config, body)
    with torch.no_grad():
        model.score.weight.zero_()
    return model
