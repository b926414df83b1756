"""model.fsdp: FSDP2 sharding of the trained models over the processes of a torchrun job.

    model = shard(model, "policy", dtype="bfloat16")    # in place: per decoder layer, then the root
    with gathered(model): model.generate(...)           # the weights gathered once for the whole call
    with gathered_all(): ...                            # every sharded model whole (the main process evaluates)
    plain = plain_copy(model)                           # collective: an unsharded CPU copy in the main process
    save_sharded(folder, optimizer) / load_sharded(folder, optimizer)   # DCP step checkpoints

Each process holds 1/N of every sharded parameter, its gradient and its optimizer state (DTensors
sharded on dim 0). A forward pass gathers one unit at a time (a decoder layer, or what the root holds:
embeddings, final norm, LM head) and frees it after; backward gathers again and reduce-scatters the
gradients. The reduce-scatter SUMS (`set_gradient_divide_factor(1.0)` with
`set_force_sum_reduction_for_comms(True)`; gloo has no PREMUL_SUM), because tether divides every loss
by the global batch's count already (optim.py): N sharded processes take the step one process takes.
`model.dtype: bfloat16` becomes FSDP's mixed precision: bfloat16 parameters in the forward and
backward passes, float32 gradients reduced into float32 master weights and optimizer state.

Scalar models (value and reward models) are read through their body and their `score` head
separately (roles/value.py `backbone_hidden`), never through the classifier's own forward, so the
body and the head are units of their own. The root is lazily initialised at once (not by whichever
unit runs first), so every unit joins the same root.

The models sharded in this process are registered here (`reset` at the start of every run): the step
checkpoints save the trained ones with torch.distributed.checkpoint, and evaluation, which runs in the
main process only, holds every one gathered while it works. Generation gathers only the model it
samples from, once per `generate` call (per-token gathers are 2.5-8x slower on two CPU processes; once
per call 1.2-1.7x), and while gathered a model is not "FSDP-managed" for transformers, so `generate`
does not synchronise the processes step by step (nothing inside it communicates).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from tether.runtime import barrier, is_main

FrozenMode = Literal["shard", "replicate"]
SHARDED_DIR = "sharded"  # the DCP folder of a step checkpoint


@dataclass
class _Entry:
    role: str
    model: nn.Module
    skeleton: nn.Module  # the unsharded model's structure on the meta device (buffers real): plain_copy's mould
    trained: bool


_sharded: dict[int, _Entry] = {}  # id(root) -> entry, in the order the models were sharded
_trained: dict[str, nn.Module] = {}  # role -> trained module (sharded, or a replicated value head)
_held: set[int] = set()  # ids of the roots `gathered` holds whole now
_meshes: dict[str, DeviceMesh] = {}


def reset() -> None:
    """Forget the models of an earlier run in this process (Run does this first)."""
    _sharded.clear()
    _trained.clear()
    _held.clear()


def active() -> bool:
    """Whether this process holds a sharded model."""
    return bool(_sharded)


def is_sharded(model: Any) -> bool:
    return isinstance(model, FSDPModule)


def mixed_precision(dtype: str) -> MixedPrecisionPolicy:
    """model.dtype as FSDP's policy: bfloat16 parameters in the passes, gradients reduced in float32."""
    if dtype == "bfloat16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _mesh(device: torch.device) -> DeviceMesh:
    """The 1-D mesh of every process of the job. A plain process (no torchrun) gets a one-process
    group of its own, so that model.fsdp runs, unsharded in effect, without torchrun too."""
    if not dist.is_initialized():
        # NCCL on a GPU: gloo would move every gather and reduce-scatter through host memory.
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            store=dist.HashStore(),
            rank=0,
            world_size=1,
            device_id=device if device.type == "cuda" else None,
        )
    if device.type not in _meshes:
        _meshes[device.type] = init_device_mesh(device.type, (dist.get_world_size(),))
    return _meshes[device.type]


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP units below the root, bottom-up: every decoder layer (the classes
    the models name in `_no_split_modules`, else the blocks of the first ModuleList), then for a
    scalar model its body and its `score` head, which the roles call on their own."""
    whole: Any = model
    inner: Any = whole.get_base_model() if hasattr(whole, "get_base_model") else whole
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
        layers = list(lists[0]) if lists else []
    units = list(layers)
    head = getattr(inner, "score", None)
    if isinstance(head, nn.Module):  # a sequence classifier or TetherScoreModel: body and head apart
        body = getattr(inner, "base_model", None)
        if isinstance(body, nn.Module) and body is not inner:
            units.append(body)
        units.append(head)
    return units


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters live on the meta device (no memory) and whose buffers are real
    (the non-persistent ones, such as rotary frequencies, are not in a state dict)."""
    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    return copy.deepcopy(model, memo)


def shard(model: nn.Module, role: str, *, dtype: str, trained: bool = True) -> nn.Module:
    """Shard `model` in place over the job's processes (every process calls it, with the same
    weights: a fresh head or adapter is broadcast first). Returns the model, now an FSDPModule."""
    device = next(model.parameters()).device
    mesh = _mesh(device)
    skeleton = _meta_copy(model)
    policy = mixed_precision(dtype)
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    # reshard_after_forward=True at the root too: a frozen model (no backward) would otherwise keep its
    # embeddings and LM head gathered after its first forward pass.
    fully_shard(model, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum: the losses are divided by the global count
            module.set_force_sum_reduction_for_comms(True)
    # The root is this model, whichever unit runs first (the roles call a scalar model's body directly).
    model._get_fsdp_state()._lazy_init()  # type: ignore[operator]
    _sharded[id(model)] = _Entry(role, model, skeleton, trained)
    if trained:
        _trained[role] = model
    return model


def hold_frozen(model: nn.Module, role: str, mode: FrozenMode, dtype: str) -> nn.Module:
    """A frozen model (reference, reward model) under model.fsdp: sharded like the trained ones, or
    replicated whole in every process; replicated with model.dtype=bfloat16, its parameters are
    held in bfloat16 (what FSDP's mixed precision computes the policy with, so the reference still
    matches the policy at the start; buffers stay float32 as they do under FSDP)."""
    if mode == "shard":
        return shard(model, role, dtype=dtype, trained=False)
    if dtype == "bfloat16":
        with torch.no_grad():
            for param in model.parameters():
                param.data = param.data.to(torch.bfloat16)
    return model


def register_trained(role: str, module: nn.Module) -> None:
    """A trained module that stays whole in every process (ppo's value head): its gradients are
    summed by runtime.sum_gradients, and the step checkpoints save it with the sharded ones."""
    _trained[role] = module


# --------------------------------------------------------------------------------------------
# Gathered for a while: generation, evaluation
# --------------------------------------------------------------------------------------------


@contextmanager
def gathered(*models: Any) -> Iterator[None]:
    """Within the block, every sharded model of `models` is whole in every process, gathered once at
    entry (a collective: every process enters) and freed at exit, and forward passes communicate
    nothing. Models that are not sharded, or already held by an enclosing block, are left alone."""
    roots = [m for m in dict.fromkeys(models) if isinstance(m, FSDPModule) and id(m) not in _held]
    if not roots:
        yield
        return
    units = [m for root in roots for m in root.modules() if isinstance(m, FSDPModule)]  # type: ignore[attr-defined]
    # transformers' generate synchronises the processes at every step for an "FSDP-managed" model;
    # gathered, nothing inside communicates, and each process may stop at its own length.
    managed = [m for root in roots for m in root.modules() if m.__dict__.get("_is_fsdp_managed_module")]  # type: ignore[attr-defined]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    for module in managed:
        module._is_fsdp_managed_module = False
    _held.update(id(root) for root in roots)
    try:
        yield
    finally:
        _held.difference_update(id(root) for root in roots)
        for module in managed:
            module._is_fsdp_managed_module = True
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)
        for root in roots:
            _forget_forward_order(root)


def _forget_forward_order(root: Any) -> None:
    """FSDP records the order units ran forward in, and the next backward prefetches by it. Passes run
    while gathered differ between processes (a generate call stops at each process's own length; the
    main process evaluates alone), so the next backward would prefetch different units in different
    processes and wait forever: the record is dropped (no backward spans a gathered block)."""
    state = root._get_fsdp_state()
    state._comm_ctx.post_forward_order.clear()
    for each in state._state_ctx.all_states:
        for group in each._fsdp_param_groups:
            group._post_forward_indices.clear()


def hold_all() -> ExitStack:
    """`gathered_all` without its final wait, held until the returned stack is closed: from the end
    of a stage's set-up (which may evaluate the starting model in every process) to its first step."""
    stack = ExitStack()
    stack.enter_context(gathered(*(entry.model for entry in _sharded.values())))
    return stack


@contextmanager
def gathered_all() -> Iterator[None]:
    """Every sharded model of this process whole for the block, which every process enters; the
    others wait at its end until the main process (which evaluates and writes) is done."""
    if not _sharded:
        yield
        return
    with gathered(*(entry.model for entry in _sharded.values())):
        try:
            yield
        finally:
            barrier()


def _regather(model: nn.Module) -> None:
    """Gather a held model again: its state dict's pre-hooks put the sharded parameters back."""
    if id(model) in _held:
        for unit in model.modules():
            if isinstance(unit, FSDPModule):
                unit.unshard()


# --------------------------------------------------------------------------------------------
# The final model: a plain copy
# --------------------------------------------------------------------------------------------


def full_state_dict(model: nn.Module) -> dict[str, Any]:
    """The whole, float32 state dict, on the CPU of the main process ({} in the others). A collective."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    _regather(model)
    return state


def plain_copy(model: Any) -> Any:
    """A sharded model as the plain, unsharded model it was (same class, LoRA adapter and config), on
    the CPU of the main process with the trained weights; None in the other processes. A collective.
    A model that is not sharded comes back as it is."""
    entry = _sharded.get(id(model))
    if entry is None:
        return model
    state = full_state_dict(model)
    if not is_main():
        return None
    plain = copy.deepcopy(entry.skeleton)
    plain.load_state_dict(state, strict=False, assign=True)
    made: Any = plain
    inner: Any = made.get_base_model() if hasattr(made, "get_base_model") else made
    if hasattr(inner, "tie_weights"):
        inner.tie_weights()  # a tied LM head is the embedding again (the state dict filled both apart)
    left = [name for name, p in plain.named_parameters() if p.device.type == "meta"]
    if left:
        raise RuntimeError(f"the gathered state dict of the {entry.role} lacks {', '.join(left[:5])}")
    return plain.to("cpu").eval()


# --------------------------------------------------------------------------------------------
# Step checkpoints: torch.distributed.checkpoint
# --------------------------------------------------------------------------------------------


def _container() -> nn.Module:
    if not _trained:
        raise RuntimeError("no trained model is sharded in this process")
    return nn.ModuleDict(_trained)


# Trainable parameters only: a LoRA checkpoint holds the adapters, the frozen base comes from model.name.
_SAVE = StateDictOptions(ignore_frozen_params=True)
_LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)


def save_sharded(folder: Path, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """The trained models and the optimizer state, each process writing its own shards into `folder`
    (a collective; the folder is on a filesystem every process sees)."""
    model_state, optimizer_state = get_state_dict(_container(), list(optimizers), options=_SAVE)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_sharded(folder: Path, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Read what `save_sharded` wrote back into the trained models and the optimizer, resharded for
    this job's process count, which may differ from the one that wrote it. A collective."""
    container = _container()
    model_state, optimizer_state = get_state_dict(container, list(optimizers), options=_LOAD)
    state: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(
        container,
        list(optimizers),
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=_LOAD,
    )


def local_grad(grad: torch.Tensor) -> torch.Tensor:
    """This process's part of a gradient (its shard for a sharded parameter)."""
    return grad.to_local() if isinstance(grad, DTensor) else grad
