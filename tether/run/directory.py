"""The run directory: what may be written where, checked before anything is changed.

RUN/config.yaml        the resolved config
RUN/metrics.jsonl      one row of metrics per step (run/log.py); tb/ the same for TensorBoard
RUN/samples.jsonl      sampled responses (ppo, grpo)
RUN/checkpoints/       step-NNNNNN/ to resume, final/ to use (run/checkpoints.py)
RUN/eval/              held-out and eval-set results; report.md (ppo, grpo)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tether.config import save_config
from tether.errors import TetherError
from tether.run.checkpoints import remove_partial_checkpoints, step_checkpoints
from tether.runtime import barrier, is_main


class RunDirError(TetherError, RuntimeError):
    """The output folder holds another run; the message says how to proceed."""


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


def prepare_run_dir(run_dir: Path, config: Any, resumed: bool) -> None:
    """Make the run directory ready for this run, once every input has loaded (so a mistake found
    while loading leaves an old run untouched): an old run cleared unless resumed, checkpoints whose
    writing never finished removed, the resolved config saved."""
    barrier()  # every process has checked the run directory before the main one changes it
    if is_main():
        if not resumed:
            clear_run_dir(run_dir)  # --overwrite, or --resume of a run with no checkpoint yet
        remove_partial_checkpoints(run_dir / "checkpoints")  # left by a process killed while saving
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    barrier()
