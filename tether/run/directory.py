"""The run directory: what tether may write there, checked before anything is changed, and locked
while a run lives in it.

    RUN/.tether-run.json   the manifest: this is a tether run, of which stage, what tether writes here
    RUN/.tether.lock       held (flock) by the live run: a second run on the folder refuses at once
    RUN/config.yaml        the resolved config
    RUN/metrics.jsonl      one row of metrics per step (run/log.py); tb/ the same for TensorBoard
    RUN/samples.jsonl      sampled responses (ppo, grpo)
    RUN/checkpoints/       step-NNNNNN/ to resume, final/ to use (run/checkpoints.py)
    RUN/eval/              held-out and eval-set results; report.md (ppo, grpo)

tether deletes only what the manifest says it writes: a folder holding anything else is refused
with the list of those files, --overwrite or not. The lock is an flock on RUN/.tether.lock, which
the kernel releases when the process ends however it ends (SIGKILL included), so a lock left by a
dead run never blocks the next one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from tether.config import save_config
from tether.errors import TetherError
from tether.files import atomic_write_text
from tether.run.checkpoints import CheckpointError, remove_partial_checkpoints, resumable_checkpoint
from tether.runtime import any_rank, barrier, is_main

MANIFEST = ".tether-run.json"
LOCK = ".tether.lock"
COMMON = ("config.yaml", "metrics.jsonl", "tb", "checkpoints", "eval")
WRITES = {  # what each stage writes into its run directory, besides the manifest and the lock
    "sft": COMMON,
    "rm": COMMON,
    "dpo": (*COMMON, "reference_logprobs.pt"),
    "ppo": (*COMMON, "samples.jsonl", "report.md"),
    "grpo": (*COMMON, "samples.jsonl", "report.md"),
}


class RunDirError(TetherError, RuntimeError):
    """The output folder cannot take this run; the message says why and how to proceed."""


class RunLock:
    """An exclusive flock on RUN/.tether.lock, with who holds it written inside."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self.fd: int | None = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 400).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            self.fd = None
            raise RunDirError(
                f"{run_dir} is in use by another tether run ({holder}); two runs in one folder would mix their "
                "metrics and delete each other's checkpoints. Wait for it to end, or choose another --output."
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}".encode())

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __del__(self) -> None:
        self.release()


class RunDirectory:
    """One run's directory. Construction checks it and changes nothing (beyond taking the lock of
    a folder that is already a tether run); `prepare` makes it ready once every input has loaded."""

    def __init__(self, path: Path, stage: str, resume: bool, overwrite: bool) -> None:
        self.path = path
        self.stage = stage
        self.lock: RunLock | None = None
        self.resume_from: Path | None = None
        _check_writable(path)
        self.manifest = _read_manifest(path)
        if self.manifest is not None:  # a live run in this folder: refuse now, before loading anything
            self.lock = _lock_on_main(path)
        if resume:
            self.resume_from = self._checkpoint_to_resume()
            return
        foreign = self.foreign_entries()
        if foreign:
            shown = ", ".join(foreign[:12]) + (f" and {len(foreign) - 12} more" if len(foreign) > 12 else "")
            what = "is not a tether run" if self.manifest is None else "holds files tether did not write"
            raise RunDirError(
                f"--output {path} {what}: {shown}. tether deletes only what it wrote, so it will not run here "
                "(--overwrite or not); choose another --output, or move those files away."
            )
        if self.manifest is not None and self.owned_entries() and not overwrite:
            raise RunDirError(
                f"{path} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                "or choose another --output"
            )

    def owned(self) -> set[str]:
        names = set(WRITES[self.stage]) | {MANIFEST, LOCK}
        if self.manifest is not None:
            names |= set(self.manifest.get("writes", []))
        return names

    def _entries(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []

    def owned_entries(self) -> list[str]:
        owned = self.owned() if self.manifest is not None else set()
        return [name for name in self._entries() if name in owned - {MANIFEST, LOCK}]

    def foreign_entries(self) -> list[str]:
        """What is in the folder that tether did not write (a folder without a manifest: everything)."""
        owned = self.owned() if self.manifest is not None else {LOCK}
        # Leftovers of tether's atomic writes (".NAME.xxxx") belong to their NAME.
        return [n for n in self._entries() if n not in owned and not any(n.startswith(f".{o}.") for o in owned)]

    def _checkpoint_to_resume(self) -> Path:
        path = self.path
        if not path.exists():
            raise RunDirError(f"--resume: {path} does not exist, so there is no run to continue (check --output)")
        if self.manifest is None:
            raise RunDirError(
                f"--resume: {path} is not a tether run (it has no {MANIFEST}), so there is nothing to continue; "
                "nothing was changed"
            )
        if self.manifest.get("stage") != self.stage:
            raise RunDirError(
                f"--resume: {path} holds a tether {self.manifest.get('stage')} run, not a {self.stage} run; "
                f"continue it with tether {self.manifest.get('stage')} --resume"
            )
        try:
            return resumable_checkpoint(path / "checkpoints")
        except CheckpointError as err:
            final = path / "checkpoints" / "final"
            step_folders = [p for p in (path / "checkpoints").glob("step-*") if p.is_dir()]
            if final.is_dir() and not step_folders:
                raise RunDirError(
                    f"--resume: {path} holds a finished run with no step checkpoint to continue from (it saved its "
                    f"final model only, as train.save_every=0 does); nothing was changed. To train that model "
                    f"further, start a new run from it: model.name={final} --output NEW_DIR"
                ) from err
            raise RunDirError(f"--resume: {err}; nothing was changed. Start the run again with --overwrite.") from err

    def prepare(self, config: Any, resumed: bool, changed: dict[str, list[Any]]) -> None:
        """Make the directory ready for this run: locked, an old run cleared unless resumed
        (only what tether wrote), checkpoints whose writing never finished removed, the manifest
        and the resolved config written. `changed`: the keys a resume changed, recorded."""
        barrier()  # every process has checked the run directory before the main one changes it
        if is_main():
            self.path.mkdir(parents=True, exist_ok=True)
            if self.lock is None:
                self.lock = RunLock(self.path)  # a run that started in this new folder meanwhile: refused here
            if not resumed:
                for name in self.owned_entries():  # --overwrite: exactly what the manifest says tether wrote
                    target = self.path / name
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
            remove_partial_checkpoints(self.path / "checkpoints")  # left by a process killed while saving
            manifest = dict(self.manifest or {}) if resumed else {}
            manifest.update({"tether_run": 1, "stage": self.stage, "writes": sorted(self.owned() - {MANIFEST, LOCK})})
            manifest.setdefault("created", time.strftime("%Y-%m-%d %H:%M:%S"))
            if resumed:
                manifest.setdefault("resumes", []).append(
                    {"at": time.strftime("%Y-%m-%d %H:%M:%S"), "changed": changed}
                )
            atomic_write_text(self.path / MANIFEST, json.dumps(manifest, indent=1))
            self.manifest = manifest
            save_config(config, self.path / "config.yaml")
        barrier()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _lock_on_main(path: Path) -> RunLock | None:
    """The main process takes the lock; every process learns whether it could (or all would wait
    at the next collective for one that stopped)."""
    lock, refusal = None, None
    if is_main():
        try:
            lock = RunLock(path)
        except RunDirError as err:
            refusal = err
    if any_rank(refusal is not None):
        raise refusal or RunDirError(f"{path} is in use by another tether run (the main process could not lock it)")
    return lock


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("tether_run") else None


def _check_writable(path: Path) -> None:
    """--output must be a folder (or not exist yet) that this process may write into."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--output {path} is a file, not a folder; choose a folder for the run")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"--output {path}: {existing} is not a folder this process may write into")
