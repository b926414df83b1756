"""Time one PPO iteration on the embedded SmolLM2-135M-Instruct, phase by phase.

    .venv/bin/python benchmarks/ppo_step.py                      # full and LoRA, defaults below
    .venv/bin/python benchmarks/ppo_step.py --variants lora --iterations 4 --max-new-tokens 32

Each variant runs in its own process (so peak memory is its own): it builds the PPO trainer,
runs `--iterations` iterations and reports the median over all but the first (warm-up) of the
phases the trainer times itself: rollout (generation), old log-probs (policy forward), reference
forward, value forward, scoring, and the update (all PPO epochs). Generated tokens per second is
response tokens / whole iteration time. Peak memory is the process's peak resident set (CPU) or
peak allocated CUDA memory.

Prints a Markdown table (pasted into docs/benchmarks.md) and writes the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PHASES = [
    ("rollout", "time/rollout_s"),
    ("old logprobs", "time/logprobs_s"),
    ("reference", "time/ref_s"),
    ("value", "time/value_s"),
    ("scoring", "time/score_s"),
    ("update", "time/train_s"),
    ("iteration", "time/step_s"),
]


def child(args: argparse.Namespace) -> None:
    """Run the iterations of one variant and print its metrics as one JSON line."""
    from tether.config import PPOConfig, load_config
    from tether.stages.ppo import PPOTrainer

    overrides = [
        "reward.function=tether.reward_functions:concise",
        f"train.batch_size={args.batch_size}",
        f"ppo.minibatch_size={args.batch_size}",
        f"ppo.epochs={args.epochs}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        f"model.dtype={args.dtype}",
        f"train.device={args.device}",
        "train.save_every=0",
    ]
    if args.child == "lora":
        overrides.append("model.lora={r: 16, alpha: 32}")
    config = load_config(PPOConfig, None, overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = PPOTrainer(config, run_dir)
        rows = []
        for trainer.run.step in range(1, args.iterations + 1):
            metrics, _ = trainer.iteration()
            rows.append(metrics)
        trainer.run.runlog.close()
    print("RESULT " + json.dumps(rows))


def run_variant(variant: str, args: argparse.Namespace) -> list[dict[str, float]]:
    command = [sys.executable, __file__, "--child", variant, *_shared_flags(args)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{result.stderr[-4000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])  # type: ignore[no-any-return]


def _shared_flags(args: argparse.Namespace) -> list[str]:
    return [
        "--iterations",
        str(args.iterations),
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
    ]


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    measured = rows[1:] or rows  # the first iteration pays one-off warm-up costs
    summary = {name: statistics.median(r[key] for r in measured) for name, key in PHASES}
    summary["tokens/s"] = statistics.median(r["throughput/tokens_per_s"] for r in measured)
    summary["response tokens"] = statistics.median(r["response/length_mean"] for r in measured)
    summary["peak memory GiB"] = max(r["memory/peak_gb"] for r in rows)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="full,lora", help="comma-separated: full, lora")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "ppo_step.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    results = {v: summarise(run_variant(v, args)) for v in args.variants.split(",")}
    header = ["variant", *[f"{name} s" for name, _ in PHASES], "tokens/s", "peak memory GiB"]
    print(
        f"\nPPO iteration on smollm2-135m-instruct: {args.batch_size} prompts x 1 sample, "
        f"{args.max_new_tokens} new tokens, {args.epochs} epochs, {args.dtype}, "
        f"median of {max(args.iterations - 1, 1)} iterations after warm-up\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for variant, s in results.items():
        cells = [
            variant,
            *[f"{s[name]:.2f}" for name, _ in PHASES],
            f"{s['tokens/s']:.1f}",
            f"{s['peak memory GiB']:.2f}",
        ]
        print("| " + " | ".join(cells) + " |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    args.json.write_text(
        json.dumps({"machine": machine, "args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2)
    )
    print(f"\nraw numbers: {args.json}")


if __name__ == "__main__":
    main()
