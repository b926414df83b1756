"""Devices, threads, seeds and RNG state: the only module that knows where tensors live.

Every random draw in tether (prompt order, sampling, minibatch shuffles) comes from the global
torch / Python / NumPy generators seeded here, so one snapshot of their states (saved in each
checkpoint) is everything a resumed run needs to continue exactly.
"""

from __future__ import annotations

import random
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tether.errors import TrainingInterrupted

RANK_SEED_STRIDE = 100003  # seed + rank * stride: a different stream per process (RLHF-DETAILS 14)


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={spec!r} but CUDA is not available on this machine")
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
    """What every training stage does first: thread count, seeds, and the device it runs on."""
    set_threads(num_threads)
    seed_everything(seed)
    return pick_device(device)


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

    def interruption(self, stage: str, step: int, checkpoint: Path, run_dir: Path) -> TrainingInterrupted:
        """The error a loop raises after writing `checkpoint` for the signal it received."""
        assert self.signal_number is not None
        name = signal.Signals(self.signal_number).name
        return TrainingInterrupted(
            f"stopped by {name} after step {step}; checkpoint written to {checkpoint}. "
            f"Continue with: tether {stage} --resume --output {run_dir}",
            self.signal_number,
        )
