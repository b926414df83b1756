"""The arithmetic task with and without the calculator tool: multi-turn episodes against one-turn ones.

    .venv/bin/python benchmarks/calculator_tool.py --seeds 0 1 2 --steps 8
    .venv/bin/python benchmarks/calculator_tool.py --table benchmarks/results/calculator_tool.json

Both arms train the embedded SmolLM2-135M-Instruct with GRPO from configs/grpo-calculator.yaml
(LoRA r=16, 4 questions x a group of 8 per iteration at temperature 1.0, 24 tokens a turn) on the
same prompts, which describe the tool, for the same number of iterations:
  - with the tool: rollout.max_turns=3, so a turn with <calc>...</calc> gets its result and the
    model answers in a later turn;
  - without: rollout.max_turns=1, so a call ends the episode unanswered (score 0).
Reported per arm over the seeds: held-out accuracy on the 64 eval questions before and after
(sampled at 1.0 with the fixed eval seed, whole episodes), the share of training episodes that
read a tool result (first and last third of the run), the KL to the start and seconds per iteration.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from critic_free import ROOT, measure_all, train_and_read

ARMS: dict[str, list[str]] = {"with the calculator": ["rollout.max_turns=3"], "without": ["rollout.max_turns=1"]}


def run_one(arm: str, seed: int, steps: int, work: Path) -> dict:
    run = work / f"{arm.split()[0]}-{seed}"
    config = ROOT / "configs/grpo-calculator.yaml"
    summary, rows, document = train_and_read("grpo", config, seed, steps, ARMS[arm], run)
    third = max(1, len(rows) // 3)
    tool_use = [r.get("episode/tool_results_mean", 0.0) for r in rows]  # tool results per episode
    final_samples = document["final"]["samples"]
    return {
        "arm": arm,
        **summary,
        "tool_use_first_third": statistics.mean(tool_use[:third]),
        "tool_use_last_third": statistics.mean(tool_use[-third:]),
        "eval_tool_use": statistics.mean(
            sum(turn["role"] == "tool" for turn in s.get("episode", [])) > 0 for s in final_samples
        ),
    }


def table(results: list[dict]) -> str:
    lines = [
        "| arm | held-out accuracy: start -> final, mean ± std (each seed) | episodes reading a tool result "
        "(train: first third -> last third; eval, final) | KL to the start (nats) | s / iteration |",
        "| --- | --- | --- | --- | --- |",
    ]
    for arm in ARMS:
        rows = [r for r in results if r["arm"] == arm]
        if not rows:
            continue
        final = [r["accuracy_final"] for r in rows]
        spread = statistics.stdev(final) if len(final) > 1 else 0.0
        kls = [r["eval_kl"] for r in rows if r["eval_kl"] is not None]
        accuracy = (
            f"{rows[0]['accuracy_start']:.3f} -> {statistics.mean(final):.3f} ± {spread:.3f} "
            f"({', '.join(f'{v:.3f}' for v in final)})"
        )
        tools = (
            f"{statistics.mean(r['tool_use_first_third'] for r in rows):.3f} -> "
            f"{statistics.mean(r['tool_use_last_third'] for r in rows):.3f}; "
            f"{statistics.mean(r['eval_tool_use'] for r in rows):.3f}"
        )
        kl = f"{statistics.mean(kls):.2f}" if kls else "-"
        seconds = statistics.mean(r["seconds_per_iteration"] for r in rows)
        lines.append(f"| {arm} | {accuracy} | {tools} | {kl} | {seconds:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/calculator_tool.json")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/calculator-tool")
    parser.add_argument("--table", type=Path, help="print the table of a results file and exit")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        raise SystemExit(0)
    print(table(measure_all("arm", args.arms, args.seeds, args.steps, args.out, args.work, run_one)))
