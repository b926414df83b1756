"""Checkpoint folders: checkpoints/step-NNNNNN (to resume) and checkpoints/final (to use).

A checkpoint is written into a hidden temporary folder next to its final place and renamed when
complete (files.atomic_dir), so a crash never leaves a half-written one behind a real name. A step
checkpoint holds the trained models and `trainer_state.pt`: every stateful part of the stage
(optimizer, scheduler, data position, KL controller, ...) and every process's random-generator
state, which is all an exact resume needs (docs/concepts/details.md item 16). Its manifest,
`checkpoint.json`, is written last: every file with its size and SHA-256. A checkpoint is complete
when its files have the sizes it lists, and resumable when their checksums agree too; a damaged one
is reported and passed over for the one before it.

Under model.fsdp a step checkpoint holds no model folder: the trained models and the optimizer state
are in `sharded/`, written by torch.distributed.checkpoint (each process its own shards, `.metadata`
by the main one), resharded on load for any process count; trainer_state.pt holds the rest. The final
model is a plain folder either way, written from an unsharded copy (engines/fsdp.py `plain_copy`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch

from tether import console as term
from tether.engines import fsdp
from tether.errors import TetherError
from tether.files import atomic_dir, sha256_of
from tether.loading.models import save_model
from tether.runtime import barrier, broadcast_object, is_main, restore_rng_states, rng_states_of_all_ranks

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
    if parts is not None and fsdp.active():
        _write_sharded_checkpoint(checkpoints, target, step, parts, rng, keep_last)
        return target
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


def _optimizers(parts: dict[str, Stateful]) -> dict[str, torch.optim.Optimizer]:
    return {key: part for key, part in parts.items() if isinstance(part, torch.optim.Optimizer)}


def _write_sharded_checkpoint(
    checkpoints: Path, target: Path, step: int, parts: dict[str, Stateful], rng: Any, keep_last: int
) -> None:
    """model.fsdp: the step checkpoint with the trained models and the optimizer in sharded/ (DCP:
    every process writes its own shards) and the other parts, the random states and the step in
    trainer_state.pt; atomic and with its manifest like any other."""
    optimizers = _optimizers(parts)
    with atomic_dir(target) if is_main() else nullcontext(None) as made:
        tmp = Path(str(broadcast_object(str(made) if made is not None else None)))  # the main process's folder
        # Every process writes its shards; this returns when all are written.
        fsdp.save_sharded(tmp / fsdp.SHARDED_DIR, [optimizers[key] for key in sorted(optimizers)])
        if is_main():
            state = {key: part.state_dict() for key, part in parts.items() if key not in optimizers}
            save_trainer_state(tmp, {**state, "step": step, "rng": rng, "sharded": sorted(optimizers)})
            write_manifest(tmp, step)
    if is_main():
        prune_step_checkpoints(checkpoints, keep_last)
    barrier()


def restore_trainer_state(folder: Path, parts: dict[str, Stateful], seed: int) -> int:
    """Load each stateful part from a checkpoint's trainer state, then the random generators;
    returns the checkpoint's step. The parts are the same in every process, so a checkpoint
    written by N processes resumes on M."""
    state = load_trainer_state(folder)
    sharded = state.get("sharded")  # model.fsdp: the models and optimizers are in sharded/ (DCP)
    if (sharded is not None) != fsdp.active():
        raise CheckpointError(
            f"{folder} was written {'with' if sharded is not None else 'without'} model.fsdp and this run "
            f"{'has' if fsdp.active() else 'has not'} it: a checkpoint resumes with the setting it was written with"
        )
    if sharded is not None:
        optimizers = _optimizers(parts)
        fsdp.load_sharded(folder / fsdp.SHARDED_DIR, [optimizers[key] for key in sharded])
    for key, part in parts.items():
        if sharded is None or key not in sharded:
            part.load_state_dict(state[key])
    step = int(state["step"])
    restore_rng_states(state["rng"], seed, step)  # last: loading models draws random numbers
    term.console.print(f"resuming from {folder} (step {step})", soft_wrap=True)
    return step
