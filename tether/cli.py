"""The `tether` command line.

    tether ppo --config FILE.yaml [key.sub=value ...] [--output RUN_DIR] [--resume] [--overwrite]
    tether ppo --print-config [--config FILE.yaml] [key.sub=value ...]

A mistake in the input (config, data, model path, reward function, run directory) ends with a
one-paragraph message and exit code 2; a run stopped by non-finite numbers with exit code 1; a run
stopped by Ctrl-C or SIGTERM (after writing a checkpoint) with 130 or 143. `--debug` shows the
traceback as well.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import yaml

from tether.config import ConfigError, PPOConfig, config_to_dict, load_config
from tether.errors import TetherError, TrainingInterrupted

STAGES = {"ppo": PPOConfig}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether",
        description="PPO-based RLHF for Hugging Face causal language models.",
    )
    parser.add_argument("stage", choices=sorted(STAGES), help="what to run")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. ppo.kl_coef=0.1")
    parser.add_argument("--config", type=Path, help="YAML config file (every key has a default)")
    parser.add_argument("--output", type=Path, help="run directory (default: runs/STAGE-YYYYmmdd-HHMMSS)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its newest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --output")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except TetherError as err:
        if args.debug:
            raise
        kind = "" if isinstance(err, TrainingInterrupted) else "error: "
        print(f"tether {args.stage}: {kind}{err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # before the training loop's own handler is installed, or a second Ctrl-C
        if args.debug:
            raise
        print(f"tether {args.stage}: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    config_path = args.config
    if config_path is None and args.resume and args.output and (args.output / "config.yaml").is_file():
        config_path = args.output / "config.yaml"  # resume with the run's own resolved config
    config = load_config(STAGES[args.stage], config_path, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
        return 0
    if args.resume and args.output is None:
        raise ConfigError("--resume needs --output RUN_DIR: the run to continue")
    output = args.output or Path("runs") / f"{args.stage}-{time.strftime('%Y%m%d-%H%M%S')}"

    from tether.stages.ppo import PPOTrainer  # heavy imports only once the input is known good

    trainer = PPOTrainer(config, output, resume=args.resume, overwrite=args.overwrite)
    trainer.train()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
