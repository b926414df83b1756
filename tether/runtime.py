"""Devices, threads, seeds, RNG state and torch.distributed: the only module that knows where
tensors live and which process this is.

Every random draw in tether (sampling, minibatch shuffles) comes from generators seeded here, so a
snapshot of their states (saved in each checkpoint) is everything a resumed run needs to continue
exactly. Prompt order and minibatch shuffles use generators seeded from (seed, step, epoch) that every
process shares; sampling uses each process's own stream (seed + rank * stride).

Data parallelism (`torchrun --nproc_per_node N -m tether STAGE ...`): every process holds the whole
model and draws the same global batch; `shard` gives it its share of the rows. A loss is divided by
the count of the *global* batch (tokens or pairs), so summing the gradients over the processes
(`sum_gradients`) gives exactly the one-process gradient, however the rows are split. Only the main
process (rank 0) writes files and prints. Without torchrun, every function here is the
single-process no-op.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from tether import console
from tether.config import ConfigError
from tether.errors import TrainingInterrupted

T = TypeVar("T")
Rows = TypeVar("Rows", bound=Sequence[Any] | Tensor)

RANK_SEED_STRIDE = 100003  # seed + rank * stride: a different stream per process (docs/concepts/details.md item 14)


def pick_device(spec: str) -> torch.device:
    """train.device: auto (a GPU when there is one), cpu, cuda or cuda:N. Under torchrun a bare
    "cuda" (or auto) is this process's own GPU, cuda:LOCAL_RANK."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ConfigError(f"train.device={spec!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.device={spec!r}: tether runs on 'cpu' or 'cuda' devices")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={spec!r} but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"train.device={spec!r} but this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0..)"
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", _launched("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def set_threads(num_threads: int | None) -> None:
    if num_threads is not None:
        torch.set_num_threads(num_threads)


def seed_everything(seed: int, rank: int = 0) -> int:
    process_seed = seed + rank * RANK_SEED_STRIDE
    random.seed(process_seed)
    np.random.seed(process_seed % 2**32)
    torch.manual_seed(process_seed)
    return process_seed


def prepare_process(num_threads: int | None, seed: int, device: str) -> torch.device:
    """What every training stage does first: thread count, the device it runs on, the process
    group when torchrun started it, and this process's seeds."""
    set_threads(num_threads)
    chosen = pick_device(device)
    join_process_group(chosen)
    seed_everything(seed, world().rank)
    if not world().is_main:  # only the main process prints (warnings still reach stderr)
        console.console.quiet = True
    return chosen


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_states_of_all_ranks() -> list[dict[str, Any]]:
    """Every process's generator states, by rank (what a checkpoint saves)."""
    return gather_objects(rng_state())


def restore_rng_states(states: list[dict[str, Any]] | dict[str, Any], seed: int, step: int) -> None:
    """Continue each process's random stream from a checkpoint. A process the checkpoint has no
    stream for (resumed on more processes than wrote it) starts a fresh one from (seed, step, rank):
    the run continues correctly, though not bit for bit as it would have on the old count."""
    if isinstance(states, dict):  # a checkpoint written by one process before streams were per rank
        states = [states]
    rank = world().rank
    if rank < len(states):
        set_rng_state(states[rank])
    else:
        seed_everything(seed + 7919 * step, rank)


def shared_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator that draws the same numbers in every process, from (seed, *keys) alone:
    minibatch shuffles that do not depend on the process count or on the sampling stream."""
    value = seed
    for key in keys:
        value = value * 1_000_003 + key
    return torch.Generator().manual_seed(value % 2**63)


# --------------------------------------------------------------------------------------------
# torch.distributed: which process this is, and the few collectives the stages need
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    rank: int = 0  # this process, 0..size-1
    size: int = 1  # processes in the job
    local_rank: int = 0  # this process on its machine (its GPU index)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launched(name: str, default: int) -> int:
    """An integer torchrun (or accelerate launch) put in the environment."""
    return int(os.environ.get(name, default))


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _launched("LOCAL_RANK", 0))
    return World()


def is_main() -> bool:
    return world().is_main


def join_process_group(device: torch.device) -> None:
    """Join the job torchrun started (WORLD_SIZE > 1 in the environment): NCCL between GPUs, gloo
    between CPU processes. A plain `tether ...` stays a single process."""
    if _launched("WORLD_SIZE", 1) <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Rank 0 may evaluate or write a report while the others wait at the next collective.
    dist.init_process_group(backend, timeout=timedelta(hours=2), device_id=device if device.type == "cuda" else None)


def leave_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(rows: Rows) -> Rows:
    """This process's contiguous share of `rows` (a list or a 1-D tensor). Shares differ in size
    by at most one; the shares of ranks 0..N-1, concatenated, are `rows` in order."""
    w = world()
    base, extra = divmod(len(rows), w.size)
    start = w.rank * base + min(w.rank, extra)
    return rows[start : start + base + (1 if w.rank < extra else 0)]  # type: ignore[return-value]


def require_divisible(count: int, field: str) -> None:
    """A count every process must get an equal share of (prompts: each samples the same number)."""
    size = world().size
    if count % size:
        raise ConfigError(
            f"{field}={count} cannot be split evenly over the {size} processes this job runs; "
            f"make it a multiple of {size}"
        )


def sum_gradients(params: Sequence[Tensor], bucket_elements: int = 2**25) -> None:
    """Sum every parameter's gradient over the processes, in place (one all-reduce per bucket of
    up to `bucket_elements` values of one dtype). A process that saw no rows contributes zeros.
    A parameter sharded by model.fsdp (a DTensor) is skipped: FSDP's reduce-scatter has summed its
    gradient into each process's shard already (engines/fsdp.py)."""
    if world().size == 1:
        return
    grads = []
    for p in params:
        if isinstance(p, DTensor):
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    buckets: list[list[Tensor]] = []
    filled = 0
    for grad in grads:
        if not buckets or filled + grad.numel() > bucket_elements or grad.dtype != buckets[-1][0].dtype:
            buckets.append([])
            filled = 0
        buckets[-1].append(grad)
        filled += grad.numel()
    for bucket in buckets:
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def sum_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each key summed over the processes (a key one process lacks counts as 0 there)."""
    if world().size == 1:
        return dict(values)
    total: dict[str, float] = {}
    for part in gather_objects(dict(values)):
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + value
    return total


def gather_objects(obj: T) -> list[T]:
    """Every process's `obj`, by rank (pickled; CPU tensors only)."""
    if world().size == 1:
        return [obj]
    gathered: list[Any] = [None] * world().size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: T) -> T:
    """The main process's `obj` in every process (pickled)."""
    if world().size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_trainable(model: torch.nn.Module) -> None:
    """Give every process rank 0's trained weights: a new head or LoRA matrices start random, and
    each process draws from its own stream."""
    if world().size == 1:
        return
    for p in model.parameters():
        if p.requires_grad:
            dist.broadcast(p.data, src=0)


def any_rank(flag: bool) -> bool:
    """True in every process when it is true in any (a stop signal one process caught)."""
    if world().size == 1:
        return flag
    return any(gather_objects(flag))


def barrier() -> None:
    if world().size > 1:
        dist.barrier()


def autocast(device: torch.device, dtype: str) -> Any:
    """bfloat16 compute for forward passes when asked; weights stay float32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


class StopRequest:
    """Turn the first SIGINT (Ctrl-C) or SIGTERM into a request to stop at the next safe point.

    The loop checks `signal_number` between iterations, writes a checkpoint and stops. The handlers
    are restored as soon as the first signal arrives, so a second one acts as usual (Ctrl-C twice
    aborts at once). Outside the main thread signals cannot be caught, and nothing is installed.
    """

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_number = signum
        self._restore()
        print(
            f"\n{signal.Signals(signum).name}: stopping after this iteration with a checkpoint "
            "(send it again to abort now)",
            file=sys.stderr,
            flush=True,
        )

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def requested(self) -> bool:
        """Whether to stop now: a signal reached this process or any other of the job (all stop
        at the same step, or the others would wait for them forever)."""
        if any_rank(self.signal_number is not None):
            self.signal_number = self.signal_number or signal.SIGTERM
            return True
        return False

    def interruption(self, stage: str, step: int, checkpoint: Path, run_dir: Path) -> TrainingInterrupted:
        """The error a loop raises after writing `checkpoint` for the signal it received."""
        assert self.signal_number is not None
        name = signal.Signals(self.signal_number).name
        return TrainingInterrupted(
            f"stopped by {name} after step {step}; checkpoint written to {checkpoint}. "
            f"Continue with: tether {stage} --resume --output {run_dir}",
            self.signal_number,
        )
