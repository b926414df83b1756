"""Checkpoint folders: checkpoints/step-NNNNNN (to resume) and checkpoints/final (to use).

A checkpoint is written into a hidden temporary folder next to its final place and renamed when
complete (files.atomic_dir), so a crash never leaves a half-written one behind a real name. A step
checkpoint holds the trained models and `trainer_state.pt`: every stateful part of the stage
(optimizer, scheduler, data position, KL controller, ...) and every process's random-generator
state, which is all an exact resume needs (docs/concepts/details.md item 16). Its manifest,
`checkpoint.json`, is written last: every file with its size and SHA-256. A checkpoint is complete
when its files have the sizes it lists, and resumable when their checksums agree too; a damaged one
is reported and passed over for the one before it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch

from tether import console as term
from tether.errors import TetherError
from tether.files import atomic_dir, sha256_of
from tether.loading.models import save_model
from tether.runtime import barrier, is_main, restore_rng_states, rng_states_of_all_ranks

STEP_DIR = re.compile(r"^step-(\d{6,})$")
TRAINER_STATE = "trainer_state.pt"
MANIFEST = "checkpoint.json"
FINAL = "final"

log = logging.getLogger(__name__)


class CheckpointError(TetherError):
    """No checkpoint to resume from, or none that is whole; the message says what was found."""


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def write_manifest(folder: Path, step: int) -> None:
    """checkpoint.json: every file of the folder with its size and SHA-256 (written last)."""
    files = {
        str(path.relative_to(folder)): {"size": path.stat().st_size, "sha256": sha256_of(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
    (folder / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))


def damage(folder: Path, checksums: bool) -> str | None:
    """What is wrong with a checkpoint folder (None: nothing): no manifest, a file missing, of
    another size, or (with checksums) of other contents than the manifest lists."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{folder} has no readable {MANIFEST} (its writing never finished)"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{path} has {path.stat().st_size} bytes, {entry['size']} were written (truncated?)"
        if checksums and sha256_of(path) != entry["sha256"]:
            return f"{path} does not match its checksum (changed or damaged since it was written)"
    return None


def step_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints (their files have the sizes their manifest lists), oldest first."""
    if not checkpoints.is_dir():
        return []
    found = []
    for child in checkpoints.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / TRAINER_STATE).is_file() and damage(child, checksums=False) is None:
            found.append((int(match.group(1)), child))
    return sorted(found)


def _step_of(folder: Path) -> int:
    match = STEP_DIR.match(folder.name)
    return int(match.group(1)) if match else -1


def resumable_checkpoint(checkpoints: Path) -> Path:
    """The newest step checkpoint whose files all verify; each damaged newer one is reported.
    Raises CheckpointError when there is none."""
    candidates = [child for child in (checkpoints.iterdir() if checkpoints.is_dir() else []) if _step_of(child) >= 0]
    problems: list[str] = []
    for folder in sorted(candidates, key=_step_of, reverse=True):
        problem = damage(folder, checksums=True)
        if problem is None:
            for earlier in problems:
                log.warning("passing over a damaged checkpoint: %s", earlier)
                term.console.print(f"[yellow]passing over a damaged checkpoint:[/yellow] {earlier}", soft_wrap=True)
            return folder
        problems.append(problem)
    found = "; ".join(problems) if problems else "no step checkpoint at all"
    raise CheckpointError(f"{checkpoints} holds no checkpoint a run can resume from ({found})")


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
            write_manifest(tmp, step)  # last: a folder without it is not a checkpoint
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
    term.console.print(f"resuming from {folder} (step {step})", soft_wrap=True)
    return step
