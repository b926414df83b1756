"""The `tether` command line.

    tether sft --config FILE.yaml [key.sub=value ...] [--output RUN_DIR] [--resume] [--overwrite]
    tether rm  --config FILE.yaml [key.sub=value ...] [--output RUN_DIR] [--resume] [--overwrite]
    tether ppo --config FILE.yaml [key.sub=value ...] [--output RUN_DIR] [--resume] [--overwrite]
    tether dpo --config FILE.yaml [key.sub=value ...] [--output RUN_DIR] [--resume] [--overwrite]
    tether grpo --config FILE.yaml [key.sub=value ...] [--output RUN_DIR] [--resume] [--overwrite]
    tether STAGE --print-config [--config FILE.yaml] [key.sub=value ...]
    tether eval TARGET... [--config FILE.yaml] [key.sub=value ...] [--output DIR]
    tether compare TARGET TARGET... [--config FILE.yaml] [key.sub=value ...] --output DIR
    tether plan STAGE [--config FILE.yaml] [key.sub=value ...] [--memory 24GiB] [--processes N] [--time]
    tether serve-reward (--function FILE.py:NAME | --model DIR) [--host H] [--port N] [...]

A TARGET is a run directory (its final model), a checkpoint folder, or a model name.

A mistake in the input (config, data, model path, reward function, run directory) ends with a
one-paragraph message and exit code 2; a run stopped by non-finite numbers with exit code 1; a run
stopped by Ctrl-C or SIGTERM (after writing a checkpoint) with 130 or 143. `--debug` shows the
traceback as well.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tether.config import (
    ConfigError,
    DPOConfig,
    GRPOConfig,
    OnlineConfig,
    PPOConfig,
    RMConfig,
    SFTConfig,
    config_to_dict,
    load_config,
    read_config_tree,
)
from tether.errors import TetherError, TrainingInterrupted
from tether.files import atomic_write_text

STAGES: dict[str, type] = {
    "sft": SFTConfig,
    "rm": RMConfig,
    "ppo": PPOConfig,
    "dpo": DPOConfig,
    "grpo": GRPOConfig,
    "eval": PPOConfig,
    "compare": PPOConfig,
}
TRAINING = ("sft", "rm", "ppo", "dpo", "grpo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether",
        description="PPO-based RLHF for Hugging Face causal language models.",
    )
    parser.add_argument("stage", choices=sorted(STAGES), help="what to run")
    parser.add_argument(
        "words",
        nargs="*",
        metavar="TARGET | key.sub=value",
        help="config overrides (e.g. ppo.kl_coef=0.1); for eval and compare also the targets: run "
        "directories, checkpoint folders or model names",
    )
    parser.add_argument("--config", type=Path, help="YAML config file (every key has a default)")
    parser.add_argument("--output", type=Path, help="run directory (default: runs/STAGE-YYYYmmdd-HHMMSS)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its newest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --output")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] == "serve-reward":  # a program of its own, with its own flags
        from tether.serve_reward import main as serve_reward

        return serve_reward(words[1:])
    if words and words[0] == "plan":
        from tether.plan import main as plan

        return plan(words[1:])
    args = build_parser().parse_intermixed_args(words)
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
    overrides = [w for w in args.words if "=" in w]
    targets = [w for w in args.words if "=" not in w]
    if args.stage in TRAINING and targets:
        raise ConfigError(f"tether {args.stage} takes no targets, got {targets}; overrides look like key.sub=value")
    if args.stage == "eval" and not targets:
        raise ConfigError("tether eval needs at least one TARGET: a run directory, a checkpoint folder or a model")
    if args.stage == "compare" and len(targets) < 2:
        raise ConfigError("tether compare needs at least two TARGETs to compare")
    config_path = args.config or _config_of_a_run(args, targets)
    config = load_config(
        _config_class(args.stage, config_path), config_path, overrides, allow_missing=args.print_config
    )
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
        for note in config.missing():  # printing the defaults must work; running needs these too
            print(f"# still to set before a run: {note}")
        return 0
    if args.stage in TRAINING:
        return _train(args, config)
    return _judge(args, config, targets)


def _config_class(stage: str, config_path: Path | None) -> type:
    """The stage's config class; eval and compare read a grpo run's config (a `grpo` section in
    place of `ppo`) as a GRPOConfig, so a grpo run can be judged with its own settings."""
    if stage in ("eval", "compare") and config_path is not None:
        try:
            tree = read_config_tree(config_path)
        except ConfigError:
            tree = {}  # load_config reports the problem with the file
        if "grpo" in tree and "ppo" not in tree:
            return GRPOConfig
    return STAGES[stage]


def _config_of_a_run(args: argparse.Namespace, targets: list[str]) -> Path | None:
    """Without --config: a resumed run's own config, or (eval, compare) the first run target's."""
    candidates = [args.output] if args.resume and args.output else []
    candidates += [Path(t) for t in targets]
    for folder in candidates:
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    if targets:
        missing = [t for t in targets if not Path(t).exists() and ("/" in t or t.startswith("."))]
        named = f"; these do not exist: {', '.join(missing)}" if missing else ""
        raise ConfigError(f"no --config given and no TARGET is a run directory with a config.yaml to borrow{named}")
    return None


def _train(args: argparse.Namespace, config: Any) -> int:
    if args.resume and args.output is None:
        raise ConfigError("--resume needs --output RUN_DIR: the run to continue")
    output = args.output or Path("runs") / f"{args.stage}-{time.strftime('%Y%m%d-%H%M%S')}"

    # Heavy imports only once the input is known good.
    trainer: Any
    if args.stage == "ppo":
        from tether.stages.ppo import PPOTrainer

        trainer = PPOTrainer(config, output, resume=args.resume, overwrite=args.overwrite)
    elif args.stage == "grpo":
        from tether.stages.grpo import GRPOTrainer

        trainer = GRPOTrainer(config, output, resume=args.resume, overwrite=args.overwrite)
    elif args.stage == "dpo":
        from tether.stages.dpo import DPOTrainer

        trainer = DPOTrainer(config, output, resume=args.resume, overwrite=args.overwrite)
    elif args.stage == "rm":
        from tether.stages.rm import RMTrainer

        trainer = RMTrainer(config, output, resume=args.resume, overwrite=args.overwrite)
    else:
        from tether.stages.sft import SFTTrainer

        trainer = SFTTrainer(config, output, resume=args.resume, overwrite=args.overwrite)
    try:
        trainer.train()
    finally:
        from tether.runtime import leave_process_group

        leave_process_group()  # under torchrun; a no-op otherwise
    return 0


def _judge(args: argparse.Namespace, config: OnlineConfig, specs: list[str]) -> int:
    from tether import console as term
    from tether.evaluation.runner import evaluate_targets, resolve_targets

    targets = resolve_targets(specs)
    output = args.output
    if output is None:
        if args.stage == "compare" or targets[0].run_dir is None:
            raise ConfigError(f"tether {args.stage} needs --output DIR for where to write its results")
        output = targets[0].run_dir / "eval"  # a run's own eval/ folder
    _check_output_folder(output)  # before the evaluation, not after it
    if args.stage == "compare":
        from tether.evaluation.report import write_report

        page = write_report(config, targets, output)
        term.console.print(f"report: {page}")
        return 0
    document = evaluate_targets(config, targets)
    atomic_write_text(output / "eval.json", json.dumps(document, indent=2))
    term.console.print(term.eval_table(document["results"]))
    term.console.print(f"results: {output / 'eval.json'}")
    return 0


def _check_output_folder(output: Path) -> None:
    """A folder (or a path not yet there) this process may write into, or ConfigError."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file; name a folder for the results")
    existing = output
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {output}: {existing} is not a folder this process may write into")


if __name__ == "__main__":
    raise SystemExit(main())
