"""Resident memory and seconds after each phase of a PPO iteration, on the embedded model.

    .venv/bin/python benchmarks/memory_phases.py --variant lora
    MALLOC_MMAP_THRESHOLD_=131072 .venv/bin/python benchmarks/memory_phases.py --variant lora

The settings of compare_trl.py (8 prompts x 1 response, 32 new tokens, one minibatch, float32), the
demo's reward model (`make demo` first) and 1 PPO epoch. Prints, for every phase the trainer times,
its seconds, the current resident set and the process's peak so far (GiB), and the kernel time and
minor page faults it cost: where memory is held, whether it keeps growing from one iteration to the
next (heap fragmentation does), and how much of a phase is the OS handing pages back in (on a VM a
fault can cost tens of microseconds). Setting one of glibc's heap variables (MALLOC_MMAP_THRESHOLD_,
MALLOC_MMAP_MAX_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_), as the second command does, turns
tether's own heap policy (runtime.keep_freed_memory) off.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def resident_gib() -> tuple[float, float]:
    """(current, peak) resident set of this process; Linux only."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    current = pages * resource.getpagesize() / 2**30
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=["full", "lora"], default="lora")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--critic", choices=["model", "head"], default="model", help="model.critic")
    parser.add_argument("--reward-model", default=str(REPO / "runs" / "demo-rm" / "checkpoints" / "final"))
    args = parser.parse_args()

    import tether.run.log as run_log
    from tether.config import PPOConfig, load_config
    from tether.stages.ppo import PPOTrainer

    timed = run_log.Timer.__call__

    @contextmanager
    def timed_and_measured(self: run_log.Timer, name: str) -> Iterator[None]:
        before = resource.getrusage(resource.RUSAGE_SELF)
        with timed(self, name):
            yield
        after = resource.getrusage(resource.RUSAGE_SELF)
        current, peak = resident_gib()
        print(
            f"  {name:10s} {self.seconds[name]:6.2f} s   now {current:.2f} GiB   peak {peak:.2f} GiB"
            f"   system {after.ru_stime - before.ru_stime:5.2f} s   minor faults {after.ru_minflt - before.ru_minflt}",
            flush=True,
        )

    run_log.Timer.__call__ = timed_and_measured  # type: ignore[method-assign]
    overrides = [
        f"reward.model={args.reward_model}",
        "train.batch_size=8",
        "rollout.samples_per_prompt=1",
        "rollout.max_new_tokens=32",
        "rollout.temperature=0.7",
        f"ppo.epochs={args.epochs}",
        "ppo.minibatch_size=8",
        "train.micro_batch_size=null",
        "train.save_every=0",
        "eval.num_prompts=0",
        "alarms.enabled=false",
        "model.dtype=float32",
        f"model.critic={args.critic}",
    ]
    if args.variant == "lora":
        overrides.append("model.lora={r: 16, alpha: 32}")
    config = load_config(PPOConfig, None, overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = PPOTrainer(config, run_dir)
        print("roles loaded: now {:.2f} GiB, peak {:.2f} GiB".format(*resident_gib()))
        for trainer.run.step in range(1, args.iterations + 1):
            start = time.perf_counter()
            trainer.iteration()
            print(f"iteration {trainer.run.step}: {time.perf_counter() - start:.2f} s", flush=True)
        trainer.run.runlog.close()


if __name__ == "__main__":
    main()
