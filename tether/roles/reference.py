"""The reference: the frozen starting policy that the KL penalty tethers the policy to.

Either its own frozen model (full fine-tuning), or, for a LoRA policy, the policy itself with the
adapter disabled: the same base weights, no second copy (docs/concepts/details.md item 17).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from tether.config import SpeedConfig
from tether.roles.policy import response_logprobs


class Reference:
    def __init__(self, model: Any | None = None, lora_policy: Any | None = None) -> None:
        if (model is None) == (lora_policy is None):
            raise ValueError("a Reference is either its own model or a LoRA policy's base, not both")
        self._model = model
        self._lora_policy = lora_policy
        self._adapter_off = False  # inside as_model() already: nested uses must not re-enable it
        if model is not None:
            model.eval()
            model.requires_grad_(False)

    @contextmanager
    def as_model(self) -> Iterator[Any]:
        """The reference as a callable model for the duration of the block (adapter disabled).

        Re-entrant: PEFT's disable_adapter() re-enables the adapter when *any* block exits, so a
        nested use (reference log-probs while evaluating the reference) must not open a second one.
        """
        if self._lora_policy is None:
            yield self._model
        elif self._adapter_off:
            yield self._lora_policy
        else:
            self._adapter_off = True
            try:
                with self._lora_policy.disable_adapter():
                    yield self._lora_policy
            finally:
                self._adapter_off = False

    @torch.no_grad()
    def logprobs(
        self, input_ids: Tensor, attention_mask: Tensor, response_start: int, temperature: float, speed: SpeedConfig
    ) -> Tensor:
        """(B, P + R) -> (B, R) reference log-probs of the response under the rollout temperature."""
        with self.as_model() as model:
            return response_logprobs(model, input_ids, attention_mask, response_start, temperature, speed=speed)[0]
