"""The run's plain-file record (metrics.jsonl, samples.jsonl, TensorBoard events) and the clocks
and memory readings that go into it.

Both JSON Lines files hold one object a line and are appended to as the run goes. On resume,
rows after the checkpoint's step are dropped (they are about to be recomputed), and TensorBoard is
told to purge its events past that step, so no curve shows a step twice. Under torchrun only the
main process writes; in the others a RunLog records nothing.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from tether.files import atomic_write_text
from tether.runtime import is_main


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


def _drop_rows_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLog:
    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        self.writes = is_main()
        self.tb: SummaryWriter | None = None
        if not self.writes:
            return
        if resume_step is not None:
            _drop_rows_after(self.metrics_path, resume_step)
            _drop_rows_after(self.samples_path, resume_step)
        purge = resume_step + 1 if resume_step is not None else None
        self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if self.tb is None:
            return
        row = {"step": step, **{k: _json_safe(float(v)) for k, v in values.items()}}
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        for key, value in values.items():
            self.tb.add_scalar(key, float(value), step)

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        if not self.writes:
            return
        with self.samples_path.open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


class Timer:
    """Wall-clock seconds per named phase of a step, and since the timer started."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def total(self) -> float:
        return time.perf_counter() - self._start


def peak_memory_gb(device: torch.device) -> float:
    """The process's peak so far: allocated GPU memory, or the resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
