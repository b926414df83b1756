"""The policy-gradient family on the shipped arithmetic task: same start, same sample budget, seeds.

    .venv/bin/python benchmarks/critic_free.py --seeds 0 1 2 --steps 15 --out benchmarks/results/critic_free.json
    .venv/bin/python benchmarks/critic_free.py --table benchmarks/results/critic_free.json

Every recipe trains the embedded SmolLM2-135M-Instruct with LoRA r=16 from configs/grpo-arithmetic.yaml
(4 questions x a group of 8 answers per iteration, temperature 1.0, 24 tokens, the exact 0/1 checker)
for the same number of iterations, so each sees the same number of sampled answers (DAPO's dynamic
sampling draws more: its extra rounds are counted). PPO runs on the same batches with the value
head (model.critic=head). Reported per recipe, over the seeds: held-out accuracy on the eval set
(64 questions, sampled at 1.0 with the fixed eval seed) before and after, the KL to the start,
seconds per iteration, and the share of groups with no signal (all answers scored the same).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES: dict[str, tuple[str, list[str]]] = {  # name -> (stage, overrides)
    "PPO (value head)": ("ppo", ["model.critic=head", "ppo.epochs=1", "ppo.minibatch_size=16", "ppo.kl_coef=0.04"]),
    "GRPO": ("grpo", []),
    "Dr. GRPO": ("grpo", ["grpo.scale_rewards=false", "grpo.loss_aggregation=seq_sum_constant"]),
    "RLOO": ("grpo", ["grpo.estimator=rloo"]),
    "REINFORCE++": ("grpo", ["grpo.estimator=reinforce_pp", "grpo.kl_in=reward"]),
    "DAPO": (
        "grpo",
        ["grpo.clip_high=0.28", "grpo.kl_in=none", "grpo.dynamic_sampling=true", "grpo.overlong_buffer=8"],
    ),
    "GSPO": (
        "grpo",
        [
            "grpo.policy_loss=gspo",
            "grpo.clip_coef=3e-4",
            "grpo.clip_high=4e-4",
            "grpo.loss_aggregation=seq_mean_token_mean",
        ],
    ),
}


def run_one(name: str, seed: int, steps: int, work: Path) -> dict:
    stage, overrides = RECIPES[name]
    run = work / f"{name.split()[0].lower().replace('.', '')}-{seed}"
    data = [
        f"data.prompts={ROOT / 'tether/assets/arithmetic_train.jsonl'}",
        f"data.eval={ROOT / 'tether/assets/arithmetic_eval.jsonl'}",
    ]
    summary, _, _ = train_and_read(stage, config_for(stage, work), seed, steps, [*data, *overrides], run)
    return {"recipe": name, **summary}


def train_and_read(
    stage: str, config: Path, seed: int, steps: int, overrides: list[str], run: Path
) -> tuple[dict, list[dict], dict]:
    """One `tether STAGE` run of `steps` iterations (no checkpoints but the final one, no samples):
    what the tables report of it (held-out accuracy before and after, the KL to the start, seconds
    per iteration, the share of zero-signal groups), its metrics rows and its eval results."""
    words = [
        sys.executable,
        "-m",
        "tether",
        stage,
        "--config",
        str(config),
        f"train.steps={steps}",
        f"train.seed={seed}",
        "train.save_every=0",
        "train.sample_every=0",
        *overrides,
        "--output",
        str(run),
        "--overwrite",
    ]
    started = time.time()
    done = subprocess.run(words, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{run.name}: exit {done.returncode}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    document = json.loads((run / "eval" / "eval.json").read_text())["results"]
    tail = rows[len(rows) // 2 :]
    summary = {
        "seed": seed,
        "steps": steps,
        "accuracy_start": document["start"]["judge"]["mean"],
        "accuracy_final": document["final"]["judge"]["mean"],
        "eval_kl": document["final"]["kl"]["mean"] if document["final"]["kl"] else None,
        "seconds_per_iteration": statistics.median(r["time/step_s"] for r in (rows[1:] or rows)),
        "zero_signal_share": statistics.mean(r.get("grpo/zero_std_frac", float("nan")) for r in tail)
        if stage == "grpo"
        else None,
        "sampling_rounds": statistics.mean(r.get("grpo/sampling_rounds", 1.0) for r in rows),
        "train_accuracy_last_half": statistics.mean(r["objective/scores"] for r in tail),
        "wall_s": round(time.time() - started, 1),
    }
    return summary, rows, document


def measure_all(
    key: str, names: list[str], seeds: list[int], steps: int, out: Path, work: Path, run: Callable[..., dict]
) -> list[dict]:
    """`run(name, seed, steps, work)` for every seed and name not yet in `out` (a long benchmark can
    be continued), each result written to `out` as it comes; returns every result."""
    results = json.loads(out.read_text()) if out.is_file() else []
    for seed in seeds:
        for name in names:
            if any(r[key] == name and r["seed"] == seed and r["steps"] == steps for r in results):
                continue  # measured already
            results.append(run(name, seed, steps, work))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
            print(json.dumps(results[-1]), flush=True)
    return results


def table(results: list[dict]) -> str:
    lines = [
        "| recipe | held-out accuracy: start -> final, mean ± std (each seed) | KL to the start (nats) | s / iteration "
        "| zero-signal groups | sampling rounds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in RECIPES:
        rows = [r for r in results if r["recipe"] == name]
        if not rows:
            continue
        final = [r["accuracy_final"] for r in rows]
        spread = statistics.stdev(final) if len(final) > 1 else 0.0
        kls = [r["eval_kl"] for r in rows if r["eval_kl"] is not None]
        zero = [r["zero_signal_share"] for r in rows if r["zero_signal_share"] is not None]
        accuracy = (
            f"{rows[0]['accuracy_start']:.3f} -> {statistics.mean(final):.3f} ± {spread:.3f} "
            f"({', '.join(f'{v:.3f}' for v in final)})"
        )
        kl = f"{statistics.mean(kls):.2f}" if kls else "-"
        seconds = statistics.mean(r["seconds_per_iteration"] for r in rows)
        zero_share = f"{statistics.mean(zero):.2f}" if zero else "-"
        rounds = statistics.mean(r["sampling_rounds"] for r in rows)
        lines.append(f"| {name} | {accuracy} | {kl} | {seconds:.1f} | {zero_share} | {rounds:.2f} |")
    return "\n".join(lines)


def config_for(stage: str, work: Path) -> Path:
    """configs/grpo-arithmetic.yaml for `stage`: ppo reads the same settings without the grpo section."""
    import yaml

    tree = yaml.safe_load((ROOT / "configs/grpo-arithmetic.yaml").read_text())
    if stage == "ppo":
        tree.pop("grpo")
    path = work / f"arithmetic-{stage}.yaml"
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/critic_free.json")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/critic-free")
    parser.add_argument("--table", type=Path, help="print the table of a results file and exit")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        raise SystemExit(0)
    print(table(measure_all("recipe", args.recipes, args.seeds, args.steps, args.out, args.work, run_one)))
