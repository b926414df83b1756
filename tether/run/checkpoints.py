"""Checkpoint folders: checkpoints/step-NNNNNN (to resume) and checkpoints/final (to use).

A checkpoint is written into a hidden temporary folder next to its final place and renamed when
complete (files.atomic_dir), so a crash never leaves a half-written one behind a real name. A step
checkpoint holds the trained models and `trainer_state.pt`: every stateful part of the stage
(optimizer, scheduler, data position, KL controller, ...) and every process's random-generator
state, which is all an exact resume needs (docs/concepts/details.md item 16).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch

from tether import console as term
from tether.files import atomic_dir
from tether.loading.models import save_model
from tether.runtime import barrier, is_main, restore_rng_states, rng_states_of_all_ranks

STEP_DIR = re.compile(r"^step-(\d{6,})$")
TRAINER_STATE = "trainer_state.pt"
FINAL = "final"


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def step_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = []
    for child in checkpoints.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def prune_step_checkpoints(checkpoints: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete step checkpoints (never the newest one)."""
    existing = step_checkpoints(checkpoints)
    for _, path in existing[: max(len(existing) - max(keep_last, 1), 0)]:
        shutil.rmtree(path, ignore_errors=True)


def remove_partial_checkpoints(checkpoints: Path) -> None:
    """Delete hidden temporary folders of checkpoints whose writing never finished."""
    if checkpoints.is_dir():
        for child in checkpoints.iterdir():
            if child.name.startswith(".") and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)


def save_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    torch.save(state, folder / TRAINER_STATE)


def load_trainer_state(folder: Path) -> dict[str, Any]:
    # weights_only=False: the state holds NumPy and Python RNG states, written by tether itself.
    return torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=False)


def write_checkpoint(
    checkpoints: Path,
    step: int,
    models: dict[str, tuple[Any, str]],
    tokenizer: Any,
    parts: dict[str, Stateful] | None,
    keep_last: int,
) -> Path:
    """checkpoints/step-NNNNNN, or checkpoints/final when `parts` is None (a final model is for
    using, not resuming: no trainer state); older step checkpoints are pruned.

    models: subfolder ("" for the trained model itself) -> (model, the base name a LoRA adapter
    points at). Every process calls this; the main one writes (the others' weights and state are
    the same), with every process's random-generator state.
    """
    final = parts is None
    target = checkpoints / (FINAL if final else step_dir_name(step))
    rng = None if final else rng_states_of_all_ranks()
    if is_main():
        with atomic_dir(target) as tmp:
            for subfolder, (model, base_name) in models.items():
                save_model(model, tmp / subfolder if subfolder else tmp, tokenizer, base_name)
            if parts is not None:
                state = {key: part.state_dict() for key, part in parts.items()}
                save_trainer_state(tmp, {**state, "step": step, "rng": rng})
        if not final:
            prune_step_checkpoints(checkpoints, keep_last)
    barrier()  # nobody reads or resumes from a checkpoint before it is whole
    return target


def restore_trainer_state(folder: Path, parts: dict[str, Stateful], seed: int) -> int:
    """Load each stateful part from a checkpoint's trainer state, then the random generators;
    returns the checkpoint's step. The parts are the same in every process, so a checkpoint
    written by N processes resumes on M."""
    state = load_trainer_state(folder)
    for key, part in parts.items():
        part.load_state_dict(state[key])
    step = int(state["step"])
    restore_rng_states(state["rng"], seed, step)  # last: loading models draws random numbers
    term.console.print(f"resuming from {folder} (step {step})")
    return step
