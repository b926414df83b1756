"""What a person watching a run sees: a live progress bar in a terminal (one plain line per step
elsewhere: CI logs, nohup, Slurm), tables of samples, alarms and the final report."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

console = Console()


class StepProgress:
    """Progress over a run's steps: `update(step, status)` after each one; `console` prints above it."""

    def __init__(self, name: str, total: int, completed: int, live: Progress | None) -> None:
        self.name, self.total, self.first = name, total, completed
        self.live = live
        self.task = live.add_task(name, total=total, completed=completed, status="") if live is not None else None
        self.started = time.perf_counter()
        self.console = live.console if live is not None else console

    def update(self, step: int, status: str) -> None:
        if self.live is not None and self.task is not None:
            self.live.update(self.task, completed=step, status=status)
            return
        # No terminal: one plain line per step, with the time left at this session's pace.
        done = step - self.first
        per_step = (time.perf_counter() - self.started) / max(done, 1)
        left = _duration(per_step * (self.total - step))
        self.console.print(
            f"{self.name} step {step}/{self.total}  {status}  ({left} left)", markup=False, highlight=False
        )


@contextmanager
def step_progress(name: str, total: int, completed: int) -> Iterator[StepProgress]:
    """A live progress bar when the console is a terminal, else plain lines (StepProgress.update)."""
    if not console.is_terminal:
        yield StepProgress(name, total, completed, None)
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        console=console,
    )
    with bar:
        yield StepProgress(name, total, completed, bar)


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


StatusKeys = tuple[tuple[str, str, str], ...]  # (label, metric key, format) of the metrics a step shows


def status_line(metrics: dict[str, float], keys: StatusKeys) -> str:
    """The status of a step: (label, metric key, format) for each metric the step logged, then its time."""
    parts = [f"{label} {metrics[key]:{fmt}}" for label, key, fmt in keys if key in metrics]
    return "  ".join([*parts, f"{metrics['time/step_s']:.1f}s/step"])


def _clip(text: str, width: int) -> str:
    text = text.replace("\n", " ⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def sample_table(step: int, rows: list[dict[str, Any]], limit: int = 4) -> Table:
    table = Table(title=f"samples at step {step}", show_lines=True, expand=True)
    table.add_column("prompt", ratio=2)
    table.add_column("response", ratio=4)
    table.add_column("score", justify="right")
    for row in rows[:limit]:
        table.add_row(_clip(row["prompt"], 160), _clip(row["response"], 400), f"{row['score']:+.3f}")
    return table


def _sample_cell(sample: dict[str, Any], width: int = 500) -> str:
    note = "" if sample["finished"] else ", cut off: no EOS"
    return f"{_clip(sample['response'], width)}\n[dim]score {sample['score']:+.3f}{note}[/dim]"


def before_after_table(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> Table:
    """The starting model's and the trained policy's eval responses to the same prompts."""
    table = Table(
        title="the starting model (before) and the trained policy (after): same prompts, same seed",
        show_lines=True,
        expand=True,
    )
    table.add_column("prompt", ratio=2)
    table.add_column("before", ratio=4)
    table.add_column("after", ratio=4)
    for start, final in zip(before, after, strict=True):
        table.add_row(_clip(start["prompt"], 200), _sample_cell(start), _sample_cell(final))
    return table


EVAL_COLUMNS = [  # (heading, how to read it from an eval result)
    ("reward", lambda r: f"{r['scores']['reward']['mean']:+.3f}"),
    ("gold", lambda r: f"{r['scores']['gold']['mean']:+.3f}" if "gold" in r["scores"] else "-"),
    (
        "win rate",
        lambda r: (
            f"{r['win_rate']['rate']:.2f} ({r['win_rate']['wins']}/{r['win_rate']['ties']}/{r['win_rate']['losses']})"
        ),
    ),
    ("KL", lambda r: f"{r['kl']['mean']:.2f}" if r["kl"] is not None else "-"),
    ("length", lambda r: f"{r['length']['mean']:.1f}"),
    ("EOS", lambda r: f"{r['eos_rate']:.2f}"),
    ("distinct-2", lambda r: f"{r['distinct_2']:.3f}"),
    ("self-sim", lambda r: f"{r['self_similarity']:.3f}"),
    ("top opening", lambda r: f"{r['top_openings'][0][0]!r} x{r['top_openings'][0][1]}" if r["top_openings"] else "-"),
]


def eval_table(results: dict[str, dict[str, Any]]) -> Table:
    """One row per metric, one column per model: narrow enough for any terminal."""
    table = Table(title="fixed eval set (win: rate (wins/ties/losses) against the starting model)")
    table.add_column("")
    for name in results:
        table.add_column(name, justify="right")
    for heading, read in EVAL_COLUMNS:
        table.add_row(heading, *[read(result) for result in results.values()])
    return table


def alarm_panel(step: int, alarm: Any) -> Panel:
    return Panel(
        f"{alarm.saw}\n[bold]What to do:[/bold] {alarm.advice}",
        title=f"alarm at step {step}: {alarm.key}",
        border_style="yellow",
    )


def report_markdown(
    stage: str, run_dir: Any, summary: dict[str, dict[str, float]], results: dict[str, dict[str, Any]]
) -> str:
    """report.md: first-vs-last training metrics, the eval table, and every eval prompt before/after."""
    lines = [
        f"# tether {stage} report: {run_dir}",
        "",
        "## Training (mean of the first and last fifth of the steps)",
        "",
        "| metric | first steps | last steps |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {k} | {v['first']:+.4f} | {v['last']:+.4f} |" for k, v in summary.items()]
    if results:
        lines += [
            "",
            "## Fixed eval set",
            "",
            "| model | " + " | ".join(h for h, _ in EVAL_COLUMNS) + " |",
            "|" + " --- |" * (len(EVAL_COLUMNS) + 1),
        ]
        lines += [
            f"| {name} | " + " | ".join(read(r) for _, read in EVAL_COLUMNS) + " |" for name, r in results.items()
        ]
        lines += ["", "## Before and after (same prompts, same seed)", ""]
        for start, final in zip(results["start"]["samples"], results["final"]["samples"], strict=True):
            lines += [
                f"### {start['prompt']}",
                "",
                f"**before** ({_note(start)}): {start['response']}",
                "",
                f"**after** ({_note(final)}): {final['response']}",
                "",
            ]
    return "\n".join(lines)


def _note(sample: dict[str, Any]) -> str:
    return f"score {sample['score']:+.3f}" + ("" if sample["finished"] else ", cut off: no EOS")
