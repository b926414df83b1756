"""Atomic files and checkpoint folders: a crash never leaves a half-written one behind a real name.

A checkpoint is written into a hidden temporary folder next to its final place and renamed when
complete; anything whose name starts with '.' is never picked up as a checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tether.errors import TetherError


class RunDirError(TetherError, RuntimeError):
    """The output folder holds another run; the message says how to proceed."""


STEP_DIR = re.compile(r"^step-(\d{6,})$")
TRAINER_STATE = "trainer_state.pt"


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `target` in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            # Move the old one aside first so the rename below is a plain one; delete it after.
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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


RUN_FILES = ("metrics.jsonl", "samples.jsonl", "report.md", "reference_logprobs.pt")
RUN_FOLDERS = ("checkpoints", "tb", "eval")


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Refuse a folder that holds another run unless told what to do; changes nothing on disk.

    returns the checkpoint to resume from (None: start at step 0).
    """
    has_run = any((run_dir / name).exists() for name in ("metrics.jsonl", "checkpoints"))
    if resume:
        found = step_checkpoints(run_dir / "checkpoints")
        return found[-1][1] if found else None
    if has_run and not overwrite:
        raise RunDirError(
            f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
            "or choose another --output"
        )
    return None


def clear_run_dir(run_dir: Path) -> None:
    """Delete what an earlier run wrote into `run_dir` (only tether's own files and folders)."""
    for name in RUN_FOLDERS:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
