"""Memory per process of full fine-tuning the embedded model (SmolLM2-135M, float32, AdamW): one
process, two data-parallel (DDP-style) processes, two FSDP2 processes (model.fsdp=true), on gloo.

    .venv/bin/python benchmarks/fsdp_memory.py                      # the three layouts, a table
    .venv/bin/python benchmarks/fsdp_memory.py --out benchmarks/results/fsdp_memory.json

Each layout is a real `tether sft` run (the shipped SFT pairs, LoRA off, 2 steps of 4 examples),
started by torchrun in its own processes with one thread each. After the last optimizer step
(before the run's end gathers the model whole to evaluate and save it), every process reports:
- model state: the bytes of the parameters, gradients and AdamW moments this process holds (its
  shard of each under FSDP: DTensor.to_local), counted from the tensors;
- RSS: the process's resident memory then (the interpreter, torch, the tokenizer, the model state,
  what the allocator keeps), and its high-water mark so far (getrusage), which is reached while
  loading: every process loads and converts the whole model before it is sharded.
The model state is what sharding divides by the process count; the RSS shows what is left.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "1 process": (1, []),
    "2 processes, data parallel": (2, []),
    "2 processes, FSDP2": (2, ["model.fsdp=true"]),
    # speed.keep_freed_memory (on by default) keeps freed memory in the process for the next tensors,
    # so the RSS still holds the whole model each process loaded before sharding it: the same two
    # layouts with it off show what a process needs.
    "2 processes, data parallel, keep_freed_memory off": (2, ["speed.keep_freed_memory=false"]),
    "2 processes, FSDP2, keep_freed_memory off": (2, ["model.fsdp=true", "speed.keep_freed_memory=false"]),
}
OVERRIDES = [
    "model.lora=null",
    "train.steps=2",
    "train.batch_size=4",
    "train.micro_batch_size=2",
    "train.save_every=0",
    "train.eval_every=0",
    "train.device=cpu",
]


def local_bytes(tensors: Any) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def worker(run_dir: str, extra: list[str]) -> None:
    from tether.config import SFTConfig, load_config
    from tether.runtime import world
    from tether.stages.sft import SFTTrainer

    trainer = SFTTrainer(load_config(SFTConfig, str(ROOT / "configs" / "sft.yaml"), [*OVERRIDES, *extra]), run_dir)
    iteration = trainer.iteration

    def measured_iteration() -> Any:
        result = iteration()
        # After the step, before the next one frees the gradients and before the run's end gathers the
        # model whole to evaluate and save it: what the training steps hold.
        params = list(trainer.model.parameters())
        moments = [v for state in trainer.optimizer.state.values() for v in state.values() if v.dim() > 0]
        row = {
            "rank": world().rank,
            "processes": world().size,
            "parameters_mb": local_bytes(params) / 2**20,
            "gradients_mb": local_bytes(p.grad for p in params) / 2**20,
            "optimizer_mb": local_bytes(moments) / 2**20,
            "live_tensors_mb": live_tensor_mb(),
            "rss_mb": resident_mb(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        row["model_state_mb"] = row["parameters_mb"] + row["gradients_mb"] + row["optimizer_mb"]
        Path(run_dir, f"memory-rank{row['rank']}.json").write_text(json.dumps(row))
        return result

    trainer.iteration = measured_iteration  # type: ignore[method-assign]
    trainer.train()


def live_tensor_mb() -> float:
    """The bytes of every tensor storage alive in this process (each storage once), on the CPU."""
    import gc

    import torch

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and type(obj) is not _dtensor_type():
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values()) / 2**20


def _dtensor_type() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_layout(name: str, folder: Path) -> list[dict[str, Any]]:
    processes, extra = LAYOUTS[name]
    run_dir = folder / name.replace(" ", "_").replace(",", "")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command += [__file__, "--worker", str(run_dir), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    rows = [json.loads(p.read_text()) for p in sorted(run_dir.glob("memory-rank*.json"))]
    if len(rows) != processes:
        raise SystemExit(f"{name}: {' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the raw numbers here (JSON)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1:])
        return
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in LAYOUTS:
            results[name] = run_layout(name, Path(tmp))
            print(f"{name}: done", file=sys.stderr)
    columns = [
        "parameters",
        "gradients",
        "AdamW state",
        "model state",
        "live tensors",
        "RSS after the step",
        "peak RSS",
    ]
    print("| layout | " + " | ".join(f"{c} MB" for c in columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for name, rows in results.items():
        for row in rows:
            label = name if len(rows) == 1 else f"{name} (process {row['rank']})"
            cells = [
                row[k]
                for k in (
                    "parameters_mb",
                    "gradients_mb",
                    "optimizer_mb",
                    "model_state_mb",
                    "live_tensors_mb",
                    "rss_mb",
                    "peak_rss_mb",
                )
            ]
            print(f"| {label} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
