"""`tether plan STAGE --config FILE [key.sub=value ...] [--memory 24GiB] [--processes N] [--time]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

STAGE_CONFIGS = {"ppo": "PPOConfig", "grpo": "GRPOConfig", "sft": "SFTConfig", "rm": "RMConfig", "dpo": "DPOConfig"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether plan",
        description="Estimate a run's peak memory per process (and its time per step) before loading anything.",
    )
    parser.add_argument("stage", choices=sorted(STAGE_CONFIGS), help="the stage the config is for")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, as for the stage")
    parser.add_argument("--config", type=Path, help="YAML config file (every key has a default)")
    parser.add_argument("--memory", help="the memory one process may use, e.g. 24GiB (default: this machine's)")
    parser.add_argument("--processes", type=int, default=1, help="processes of a torchrun job (default 1)")
    parser.add_argument(
        "--time", action="store_true", help="calibrate this machine (~2 s) and estimate seconds per step"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], help="plan for this device (default: train.device)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def run(argv: list[str] | None = None) -> int:
    import tether.config as config_module
    from tether.errors import TetherError
    from tether.plan import calibrate, parse_memory, plan_for

    args = build_parser().parse_intermixed_args(argv)
    try:
        if args.processes < 1:
            raise ValueError(f"--processes must be at least 1, got {args.processes}")
        memory = parse_memory(args.memory) if args.memory else None
        cls = getattr(config_module, STAGE_CONFIGS[args.stage])
        config = config_module.load_config(cls, args.config, args.overrides)
        calibration = calibrate(config.train.num_threads) if args.time else None
        plan = plan_for(config, args.stage, memory, args.processes, calibration, device=args.device)
    except (TetherError, ValueError, OSError) as err:
        if args.debug:
            raise
        print(f"tether plan: error: {err}", file=sys.stderr)
        return 2
    print(plan.render())
    return 0 if plan.fits else 1
