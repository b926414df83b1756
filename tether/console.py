"""What a person watching the terminal sees: a live progress bar and tables of samples."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

console = Console()


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        console=console,
    )


def status_line(metrics: dict[str, float]) -> str:
    return (
        f"score {metrics['objective/scores']:+.3f}  kl {metrics['objective/kl']:.3f}  "
        f"len {metrics['response/length_mean']:.0f}  {metrics['time/step_s']:.1f}s/step"
    )


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


def before_after_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(
        title="the starting model (before) and the trained policy (after), same prompts, greedy",
        show_lines=True,
        expand=True,
    )
    table.add_column("prompt", ratio=2)
    table.add_column("before", ratio=4)
    table.add_column("after", ratio=4)
    for row in rows:
        table.add_row(
            _clip(row["prompt"], 200),
            f"{_clip(row['before'], 500)}\n[dim]{score_note(row, 'before')}[/dim]",
            f"{_clip(row['after'], 500)}\n[dim]{score_note(row, 'after')}[/dim]",
        )
    return table


def score_note(row: dict[str, Any], which: str) -> str:
    """'score +0.500' plus a note when the response was cut off before EOS."""
    note = "" if row[f"{which}_finished"] else ", cut off: no EOS"
    return f"score {row[f'{which}_score']:+.3f}{note}"
