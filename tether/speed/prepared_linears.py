"""Linear layers prepared once per rollout, so that each decoding step is one fast GEMM per layer.

Sampling calls the policy once per token with only B rows per matmul, so a decoding step streams
every weight from memory and does little arithmetic with it. Two things make that slow, and both
are fixed for the length of a `generate` call by `prepared_linears`:

- **LoRA layers** run the base matmul plus two small adapter matmuls and an add. Here each runs one
  matmul on W + dW, computed once at entry into a new tensor. The base weights are never written
  (a peft merge / unmerge round trip is not exact in floating point), so nothing needs restoring.
- **On the CPU**, MKL's sgemm streams a weight at 6-8 GB/s when the input has 8 rows, against
  11-13 GB/s for oneDNN's GEMM on a weight reordered once into its blocked layout (the same kernel
  `torch.compile` uses for frozen CPU weights), on a VM that reads memory at ~26 GB/s
  (docs/benchmarks.md). So every linear weight is reordered at entry.

Only float32 arithmetic is prepared: under bf16 / fp16 (weights or autocast), W + dW would round
away most of a young adapter's small update. The results differ from the plain forward only by
float rounding (the order of the sums), and training recomputes every log-prob in its own pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

LinearForward = Callable[[Tensor], Tensor]


@contextmanager
def prepared_linears(model: nn.Module) -> Iterator[int]:
    """Within the block (which runs without grad), `model`'s linear layers compute with weights
    prepared at entry: LoRA layers on W + dW, and on the CPU every weight in oneDNN's layout.
    Afterwards every layer is its own again; no weight was changed. Yields the number of layers
    replaced (0: nothing to gain, or not float32)."""
    replaced: list[nn.Module] = []
    with torch.no_grad():
        try:
            if _float32_without_autocast(model):
                prepare = _onednn_prepared if _onednn_usable(_device_type(model)) else None
                for module, forward in _sampling_forwards(model, prepare):
                    module.forward = forward  # an instance attribute: nn.Module.__call__ uses it
                    replaced.append(module)
            yield len(replaced)
        finally:
            for module in replaced:
                del module.forward  # back to the class's forward


def _sampling_forwards(
    model: nn.Module, prepare: Callable[[Tensor, Tensor | None], LinearForward] | None
) -> Iterator[tuple[nn.Module, LinearForward]]:
    """(module, replacement forward) for every layer worth replacing. `prepare(weight, bias)` makes
    the forward of a plain layer; None: plain layers gain nothing (not on a oneDNN CPU), only LoRA
    layers are folded."""
    make = prepare or _plain_linear
    covered: set[int] = set()  # modules a replaced LoRA layer no longer calls
    for module in model.modules():
        if isinstance(module, LoraLayer):
            weights = folded_lora_weights(module)
            if weights is not None:
                covered.update(id(m) for m in module.modules())
                yield module, make(*weights)
    if prepare is None:
        return
    for module in model.modules():
        if type(module) is nn.Linear and id(module) not in covered:
            yield module, prepare(module.weight, module.bias)


def folded_lora_weights(layer: LoraLayer) -> tuple[Tensor, Tensor | None] | None:
    """(W + dW of the active adapters, bias) of a LoRA linear layer, as its forward would use them
    without dropout; None for a layer this does not know how to fold (a LoRA variant such as DoRA,
    a non-linear or transposed base layer), which then runs as it is."""
    base = layer.get_base_layer()
    if not isinstance(layer, LoraLinear) or type(base) is not nn.Linear or layer.fan_in_fan_out:
        return None
    if layer.disable_adapters or layer.merged:
        return base.weight, base.bias
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if any(name in layer.lora_variant for name in active):
        return None
    weight, bias = base.weight, base.bias
    for name in active:
        weight = weight + layer.get_delta_weight(name)
        if layer.lora_bias[name]:
            lora_bias = layer.lora_B[name].bias * layer.scaling[name]
            bias = lora_bias if bias is None else bias + lora_bias
    return weight, bias


def _plain_linear(weight: Tensor, bias: Tensor | None) -> LinearForward:
    return lambda x: nn.functional.linear(x, weight, bias)


def _onednn_prepared(weight: Tensor, bias: Tensor | None) -> LinearForward:
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@functools.cache
def _onednn_usable(device_type: str) -> bool:
    """oneDNN's prepared-weight linear is private API of torch's CPU build: used only where it
    exists and gives nn.Linear's answer on a probe."""
    if device_type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 16, generator=generator)
        bias = torch.randn(24, generator=generator)
        x = torch.randn(2, 3, 16, generator=generator)
        got = _onednn_prepared(weight, bias)(x)
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.allclose(got, nn.functional.linear(x, weight, bias), atol=1e-5, rtol=1e-5))


def _float32_without_autocast(model: nn.Module) -> bool:
    parameters = list(model.parameters())
    return (
        bool(parameters)
        and all(p.dtype == torch.float32 for p in parameters)
        and not torch.is_autocast_enabled(_device_type(model))
    )


def _device_type(model: nn.Module) -> str:
    parameter = next(model.parameters(), None)
    return parameter.device.type if parameter is not None else "cpu"
