"""`tether plan`: peak memory per process (and, after a short calibration, seconds per step) of a
run, estimated before anything is loaded.

    tether plan ppo --config configs/demo.yaml [key.sub=value ...] [--memory 24GiB] [--processes N] [--time]
    plan = plan_for(load_config(PPOConfig, "configs/demo.yaml"), "ppo"); print(plan.render())

It reads only configs: each model's `config.json` (parameter counts from a model built on the meta
device, which allocates nothing; LoRA's from peft on that model), the run's settings, and the
token lengths of the data files (with the tokenizer, when one is at hand). The estimate is a sum
of terms (tether/plan/memory.py), each with its role, the phases it is live in and the assumption
behind it; benchmarks/plan_check.py measures real runs against it (docs/plan.md has the table).
"""

from __future__ import annotations

import os
import re
from typing import Any

from tether.plan.memory import GiB, Term
from tether.plan.report import Plan, Suggestion, suggest
from tether.plan.stages import build, device_of
from tether.plan.timing import Calibration, calibrate, estimate_seconds

__all__ = [
    "Calibration",
    "Plan",
    "Suggestion",
    "Term",
    "calibrate",
    "machine_memory",
    "main",
    "parse_memory",
    "plan_for",
    "start_of_run_report",
]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kib": 2**10,
    "kb": 10**3,
    "m": 2**20,
    "mib": 2**20,
    "mb": 10**6,
    "g": GiB,
    "gib": GiB,
    "gb": 10**9,
    "t": 2**40,
    "tib": 2**40,
    "tb": 10**12,
}


def parse_memory(text: str) -> int:
    """'24GiB', '24G' (GiB), '24GB' (10^9), '512MiB', '1.5TiB' or a byte count -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as an amount of memory; write e.g. 24GiB, 24GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def machine_memory(device: str, processes: int = 1) -> tuple[int, str]:
    """(bytes one process may use, where that number came from): a GPU's memory, or this machine's
    RAM shared by the processes."""
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            return int(total), f"{torch.cuda.get_device_name()} memory"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    share = f", shared by {processes} processes" if processes > 1 else ""
    return int(total // processes), f"this machine's RAM{share}"


def plan_for(
    config: Any,
    stage: str,
    memory: int | None = None,
    processes: int = 1,
    calibration: Calibration | None = None,
    device: str | None = None,
) -> Plan:
    """The estimate for `stage` ('ppo', 'grpo', 'sft', 'rm', 'dpo') run with `config` in each of
    `processes` processes. No weights are loaded. memory: the limit (bytes) the suggestions aim
    under; None: the machine's (a GPU's memory, else RAM / processes). calibration: from
    `calibrate()`, adds seconds per step. device: 'cpu' or 'cuda' (default: train.device)."""
    device = device or device_of(config)
    if memory is None:
        memory, source = machine_memory(device, processes)
    else:
        source = "--memory"
    terms, roles, shapes = build(config, stage, processes, device)
    plan = Plan(stage, device, processes, memory, source, terms.terms, roles, shapes, config)
    if calibration is not None:
        plan.seconds, plan.time_note = estimate_seconds(plan, calibration)

    def replan(changed: Any) -> float:
        changed_terms, changed_roles, changed_shapes = build(changed, stage, processes, device)
        return Plan(
            stage, device, processes, memory, source, changed_terms.terms, changed_roles, changed_shapes, changed
        ).peak

    plan.suggestions = suggest(config, stage, plan, replan)
    return plan


def start_of_run_report(config: Any, stage: str, processes: int = 1) -> str:
    """What a run prints before loading anything: the plan, or why there is none. Never raises, and
    never refuses the run: a config that does not fit by the estimate gets a warning with the
    suggested change."""
    try:
        plan = plan_for(config, stage, processes=processes)
    except Exception as err:  # an estimate must never stop a run
        return f"tether plan: no estimate for this run ({type(err).__name__}: {err})"
    text = plan.render()
    warning = plan.warning()
    return f"{text}\n\n{warning}" if warning else text


def main(argv: list[str] | None = None) -> int:
    from tether.plan.cli import run

    return run(argv)
