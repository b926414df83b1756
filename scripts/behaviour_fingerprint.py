"""Run every stage with fixed seeds and print what it logged, minus wall-clock and memory readings.

    .venv/bin/python scripts/behaviour_fingerprint.py OUT.json            # tiny models only (~2 min)
    .venv/bin/python scripts/behaviour_fingerprint.py OUT.json --embedded # plus the embedded SmolLM2 (~10 min)
    .venv/bin/python scripts/behaviour_fingerprint.py --compare A.json B.json

A refactoring that must not change behaviour is checked by running this before and after it (the
earlier commit from a `git worktree`, with PYTHONPATH pointing at it) and comparing: every metric of
every step (metrics.jsonl) and every eval result must be equal. Runs go through the command line,
so the script does not depend on tether's Python API.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

# MKL's results may depend on memory alignment (seen: 1e-7 apart between two runs of one commit);
# its conditional-reproducibility mode makes two runs of the same code agree to the bit.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.tiny_models

# Readings that differ between runs by nature.
NONDETERMINISTIC = ("time/", "throughput/", "memory/")
REWARD_FILE = """
def good_share(prompts, responses, **kw):
    return [sum(w == "good" for w in r.split()) / max(len(r.split()), 1) for r in responses]
"""
PROMPTS = [
    "hello world",
    "tell me about the cat",
    "why is the sun red",
    "what is one and two",
    "how big is the moon",
    "please tell me more",
    "the dog is blue",
    "thanks very much",
]


def runs(tiny: Path, task: Path, embedded: bool) -> dict[str, list[str]]:
    """name -> tether command-line words (stage first)."""
    reward = f"reward.function={task / 'reward.py'}:good_share"
    prompts = [f"data.prompts={task / 'prompts.jsonl'}", f"data.eval={task / 'prompts.jsonl'}"]
    offline = [
        "train.batch_size=4",
        "train.steps=4",
        "train.save_every=2",
        "train.eval_every=2",
        f"data.eval={task / 'pairs.jsonl'}",
    ]
    online = [
        "train.batch_size=4",
        "train.steps=3",
        "rollout.max_new_tokens=8",
        "train.sample_every=1",
        "train.save_every=2",
        "eval.num_prompts=4",
        "eval.every=2",
        reward,
        *prompts,
    ]
    found = {
        "sft-tiny": ["sft", f"model.name={tiny}", *offline[:-1], f"data.eval={task / 'sft.jsonl'}"],
        "rm-tiny": ["rm", f"model.name={tiny}", *offline],
        "rm-tiny-lora": ["rm", f"model.name={tiny}", "model.lora={r: 4, alpha: 8}", *offline],
        "dpo-tiny": ["dpo", f"model.name={tiny}", *offline],
        "ppo-tiny": ["ppo", f"model.name={tiny}", "ppo.minibatch_size=2", "ppo.epochs=2", *online],
        "ppo-tiny-lora-head": [
            "ppo",
            f"model.name={tiny}",
            "model.lora={r: 4, alpha: 8}",
            "model.critic=head",
            "ppo.minibatch_size=4",
            "ppo.epochs=2",
            "train.lr=1e-3",
            *online,
        ],
        "ppo-tiny-adaptive-kl": [
            "ppo",
            f"model.name={tiny}",
            "ppo.kl_target=1.0",
            "ppo.minibatch_size=4",
            "train.micro_batch_size=2",
            "ppo.whiten_rewards=true",
            *online,
        ],
        "grpo-tiny": [
            "grpo",
            f"model.name={tiny}",
            "rollout.samples_per_prompt=4",
            "grpo.minibatch_size=8",
            "grpo.epochs=2",
            *online,
        ],
        "grpo-tiny-reward-kl": [
            "grpo",
            f"model.name={tiny}",
            "rollout.samples_per_prompt=2",
            "grpo.kl_in=reward",
            "grpo.scale_rewards=false",
            "grpo.minibatch_size=8",
            *online,
        ],
    }
    if embedded:
        lora = "model.lora={r: 8, alpha: 16}"
        found |= {
            "sft-embedded": [
                "sft",
                lora,
                "train.batch_size=4",
                "train.steps=2",
                "train.save_every=0",
                f"data.eval={task / 'sft.jsonl'}",
            ],
            "rm-embedded": [
                "rm",
                lora,
                "train.batch_size=4",
                "train.steps=2",
                "train.save_every=0",
                f"data.eval={task / 'pairs.jsonl'}",
            ],
            "ppo-embedded-lora-head": [
                "ppo",
                lora,
                "model.critic=head",
                "reward.function=tether.reward_functions:concise",
                "reward.gold=tether.reward_functions:gold_judge",
                "train.batch_size=4",
                "train.steps=2",
                "rollout.max_new_tokens=16",
                "ppo.minibatch_size=4",
                "ppo.epochs=1",
                "train.lr=3e-4",
                "train.save_every=0",
                "train.sample_every=1",
                "eval.num_prompts=4",
            ],
            "grpo-embedded": [
                "grpo",
                "--config",
                str(ROOT / "configs/grpo-arithmetic.yaml"),
                "train.steps=2",
                "train.batch_size=2",
                "rollout.samples_per_prompt=4",
                "grpo.minibatch_size=8",
                "rollout.max_new_tokens=12",
                "train.save_every=0",
                "eval.num_prompts=4",
                f"data.prompts={ROOT / 'tether/assets/arithmetic_train.jsonl'}",
                f"data.eval={ROOT / 'tether/assets/arithmetic_eval.jsonl'}",
            ],
        }
    return found


def clean(value: Any) -> Any:
    """An eval document without its timings."""
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def fingerprint(run_dir: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    found: dict[str, Any] = {
        "metrics": [{k: v for k, v in row.items() if not k.startswith(NONDETERMINISTIC)} for row in rows]
    }
    eval_json = run_dir / "eval" / "eval.json"
    if eval_json.is_file():
        document = clean(json.loads(eval_json.read_text()))
        document.pop("model", None)  # a path under the run directory
        document.pop("models", None)
        found["eval"] = document
    samples = run_dir / "samples.jsonl"
    if samples.is_file():
        found["samples"] = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    return found


def record(out: Path, embedded: bool) -> None:
    from tests.tiny_models import save_tiny_model
    from tether.cli import main

    work = Path(tempfile.mkdtemp(prefix="tether-fingerprint-"))
    tiny = save_tiny_model(work / "tiny", "llama")
    (work / "reward.py").write_text(REWARD_FILE)
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    shipped = ROOT / "tether" / "assets"
    (work / "pairs.jsonl").write_text("".join((shipped / "preferences_test.jsonl").read_text().splitlines(True)[:12]))
    (work / "sft.jsonl").write_text("".join((shipped / "sft_test.jsonl").read_text().splitlines(True)[:12]))
    results = {}
    for name, words in runs(tiny, work, embedded).items():
        run_dir = work / "runs" / name
        code = main([*words, "--output", str(run_dir), "train.num_threads=2"])
        if code != 0:
            raise SystemExit(f"{name}: exit {code}")
        results[name] = fingerprint(run_dir)
        print(f"{name}: {len(results[name]['metrics'])} metric rows", flush=True)
    out.write_text(json.dumps(results, indent=1, sort_keys=True))


def compare(a: Path, b: Path) -> int:
    left, right = json.loads(a.read_text()), json.loads(b.read_text())
    differences = 0

    def walk(x: Any, y: Any, where: str) -> None:
        nonlocal differences
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y)):
                if key not in x or key not in y:
                    differences += 1
                    print(f"{where}.{key}: only in {'B' if key not in x else 'A'}")
                else:
                    walk(x[key], y[key], f"{where}.{key}")
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                walk(u, v, f"{where}[{i}]")
        elif x != y and not (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)):
            differences += 1
            print(f"{where}: {x!r} != {y!r}")

    for name in sorted(set(left) | set(right)):
        if name not in left or name not in right:
            print(f"{name}: only in {'B' if name not in left else 'A'}")
            differences += 1
            continue
        walk(left[name], right[name], name)
    print(f"{differences} difference(s) over {len(set(left) & set(right))} runs")
    return 1 if differences else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--embedded", action="store_true")
    parser.add_argument("--compare", nargs=2, type=Path)
    args = parser.parse_args()
    if args.compare:
        raise SystemExit(compare(*args.compare))
    record(args.out, args.embedded)
