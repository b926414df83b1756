"""`tether compare`: runs and checkpoints side by side in one self-contained HTML report.

    tether compare runs/a runs/b --output reports/a-vs-b      # then open reports/a-vs-b/report.html

The report holds the training curves of the runs overlaid (PNG images beside report.html), the
fixed-eval-set table of every target against the starting model, the alarms each run raised, and
every eval prompt with every model's response in one row, so a person can read how behaviour
changed. It opens from disk: no server, no scripts, nothing fetched.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any

from tether.config import OnlineConfig
from tether.evaluation.runner import START, Target, evaluate_targets
from tether.files import atomic_write_text
from tether.run.log import read_jsonl

# (metric key, plot title): the curves a PPO run is read by, in reading order.
CURVES = [
    ("objective/scores", "score (reward sources + EOS penalty)"),
    ("objective/gold_scores", "gold score (never trained on)"),
    ("objective/kl", "KL to the reference (nats per response)"),
    ("objective/entropy", "policy entropy (nats per token)"),
    ("response/length_mean", "response length (tokens)"),
    ("policy/clipfrac", "policy clip fraction"),
    ("eval/score", "eval set: score"),
    ("eval/win_rate", "eval set: win rate against the start"),
]


def plot_curves(runs: dict[str, list[dict[str, Any]]], output: Path) -> list[tuple[str, str]]:
    """One PNG per metric that any run logged, every run overlaid. returns [(file name, title)]."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []
    for key, title in CURVES:
        series = {name: _series(rows, key) for name, rows in runs.items()}
        series = {name: points for name, points in series.items() if points}
        if not series:
            continue
        figure, axes = plt.subplots(figsize=(5.2, 3.2), dpi=100)
        for name, points in series.items():
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=name)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        file_name = "curve-" + re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-") + ".png"
        figure.savefig(output / file_name)
        plt.close(figure)
        written.append((file_name, title))
    return written


def _series(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [
        (int(r["step"]), float(r[key])) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]


def alarms_seen(rows: list[dict[str, Any]]) -> dict[str, list[int]]:
    """alarm key -> the steps at which it was active."""
    seen: dict[str, list[int]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("alarm/") and value:
                seen.setdefault(key.removeprefix("alarm/"), []).append(int(row["step"]))
    return seen


def write_report(config: OnlineConfig, targets: list[Target], output: Path) -> Path:
    """Evaluate every target, plot the runs' curves, write report.html, eval.json and the images."""
    output.mkdir(parents=True, exist_ok=True)
    runs = {t.name: read_jsonl(t.run_dir / "metrics.jsonl") for t in targets if t.run_dir is not None}
    images = plot_curves(runs, output)
    document = evaluate_targets(config, targets)
    atomic_write_text(output / "eval.json", json.dumps(document, indent=2))
    page = render_html(targets, runs, images, document)
    atomic_write_text(output / "report.html", page)
    return output / "report.html"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; max-width: 1400px; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; }
.grid { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; } figure img { border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.35rem 0.5rem; vertical-align: top; text-align: left; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
#side-by-side td { max-width: 28rem; white-space: pre-wrap; }
.score { color: #666; font-size: 0.8rem; display: block; margin-top: 0.3rem; }
.cut { color: #b35; }
"""


def render_html(
    targets: list[Target],
    runs: dict[str, list[dict[str, Any]]],
    images: list[tuple[str, str]],
    document: dict[str, Any],
) -> str:
    results = document["results"]
    names = list(results)
    esc = html.escape
    settings = document["settings"]
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8"><title>tether compare</title>',
        f"<style>{STYLE}</style></head><body>",
        "<h1>tether compare</h1>",
        "<p>" + ", ".join(f"<b>{esc(n)}</b>: {esc(document['models'][n])}" for n in names) + "</p>",
        f"<p>Fixed eval set: {settings['prompts']} prompts, temperature {settings['temperature']}, "
        f"{settings['max_new_tokens']} new tokens, seed {settings['seed']}; wins judged by "
        f"<b>{esc(settings['judge'])}</b> against <b>{esc(settings['baseline'])}</b> "
        f"(tie margin {settings['tie_margin']}).</p>",
    ]
    if images:
        parts.append("<h2>Training curves</h2><div class='grid'>")
        parts += [
            f"<figure><img src='{esc(file)}' alt='{esc(title)}' width='520' height='320'></figure>"
            for file, title in images
        ]
        parts.append("</div>")
    parts += ["<h2>Fixed eval set</h2>", _eval_table(results)]
    alarm_rows = [(run, key, steps) for run, rows in runs.items() for key, steps in alarms_seen(rows).items()]
    parts.append("<h2>Alarms raised during training</h2>")
    if alarm_rows:
        parts.append("<table id='alarms'><tr><th>run</th><th>alarm</th><th>steps</th></tr>")
        parts += [
            f"<tr><td>{esc(run)}</td><td>{esc(key)}</td><td>{esc(_steps(steps))}</td></tr>"
            for run, key, steps in alarm_rows
        ]
        parts.append("</table>")
    else:
        parts.append("<p>None.</p>")
    parts += ["<h2>Outputs, prompt by prompt</h2>", _side_by_side(results), "</body></html>"]
    return "\n".join(parts)


def _eval_table(results: dict[str, Any]) -> str:
    esc = html.escape
    headings = [
        "model",
        "reward",
        "gold",
        "win rate (W/T/L)",
        "KL",
        "length",
        "EOS rate",
        "distinct-1",
        "distinct-2",
        "self-similarity",
        "most repeated openings",
    ]
    rows = ["<table id='eval-table'><tr>" + "".join(f"<th>{h}</th>" for h in headings) + "</tr>"]
    for name, r in results.items():
        gold = r["scores"].get("gold")
        win = r["win_rate"]
        cells = [
            f"{r['scores']['reward']['mean']:+.3f} ± {r['scores']['reward']['std']:.3f}",
            f"{gold['mean']:+.3f} ± {gold['std']:.3f}" if gold else "-",
            f"{win['rate']:.2f} ({win['wins']}/{win['ties']}/{win['losses']})",
            f"{r['kl']['mean']:.3f}" if r["kl"] else "-",
            f"{r['length']['mean']:.1f}",
            f"{r['eos_rate']:.2f}",
            f"{r['distinct_1']:.3f}",
            f"{r['distinct_2']:.3f}",
            f"{r['self_similarity']:.3f}",
        ]
        openings = "; ".join(f"“{esc(text)}” ×{count}" for text, count in r["top_openings"]) or "-"
        rows.append(
            f"<tr><td>{esc(name)}</td>"
            + "".join(f"<td class='num'>{c}</td>" for c in cells)
            + f"<td>{openings}</td></tr>"
        )
    rows.append("</table>")
    return "\n".join(rows)


def _side_by_side(results: dict[str, Any]) -> str:
    esc = html.escape
    names = list(results)
    rows = ["<table id='side-by-side'><tr><th>prompt</th>" + "".join(f"<th>{esc(n)}</th>" for n in names) + "</tr>"]
    for i, sample in enumerate(results[START]["samples"]):
        cells = []
        for name in names:
            s = results[name]["samples"][i]
            cut = "" if s["finished"] else " <span class='cut'>(cut off: no EOS)</span>"
            cells.append(f"<td>{esc(s['response'])}<span class='score'>score {s['score']:+.3f}{cut}</span></td>")
        rows.append(f"<tr><td>{esc(sample['prompt'])}</td>{''.join(cells)}</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _steps(steps: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    spans: list[list[int]] = []
    for step in steps:
        if spans and step == spans[-1][1] + 1:
            spans[-1][1] = step
        else:
            spans.append([step, step])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)
