"""tether's PPO against TRL's (`trl==1.12.0`, `trl.experimental.ppo`) on the same machine and task.

    .venv/bin/python benchmarks/compare_trl.py --install-trl              # speed: full + LoRA, 1 and 4 epochs
    .venv/bin/python benchmarks/compare_trl.py --variants lora --epochs 4 --iterations 3
    .venv/bin/python benchmarks/compare_trl.py --reward-seeds --variants lora --epochs 4 --iterations 20

TRL lives in its own virtual environment (benchmarks/.venv-trl: torch 2.13.0, trl 1.12.0 and the
transformers / peft / accelerate versions tether pins), created by `--install-trl` or when missing.
This process runs in tether's venv: it resolves the embedded SmolLM2-135M-Instruct to its converted
Hugging Face folder and encodes tether's shipped prompts (chat template as tether applies it), and
hands both to every child, so the two systems load the same weights and see the same token ids.

Every (system, variant, epochs[, seed]) runs in its own child process, so its peak resident memory
(getrusage ru_maxrss, model loading included) is its own. Both sides get the same settings: 8 prompts
x 1 response, 32 new tokens, temperature 0.7, one minibatch of 8 per PPO epoch, float32, the reward
model tether's demo trained (runs/demo-rm; its saved score normalisation folded into TRL's head),
value model initialised from that reward model, AdamW eps 1e-5 at a constant learning rate, kl_coef
0.05 (k1), clip 0.2, value clip 0.2, vf_coef 0.1, gamma 1, lam 0.95, advantages whitened, no
gradient clipping (TRL's loop never clips), a missing-EOS penalty of -1. LoRA is r=16, alpha=32 on all
linear layers, for the policy and the value model alike (tether's LoRA mode adapts both; TRL's trainer
only adapts the policy it is given a peft_config for, so its value model is wrapped here the same way).

Speed mode: seconds per PPO iteration (median of the iterations after the first, a warm-up, over
every round: `--rounds N` runs the systems one after the other N times, and the table adds each
round's ratio, so the speed of a VM that drifts over an hour shows as spread), one iteration timed
from end to end (rollout, scoring, update; TRL's by a callback at each step end),
generated tokens per second (response tokens up to and including EOS / iteration seconds), peak
resident memory. Prints a Markdown table with the ratios and writes results/compare_trl.json.

Reward mode (`--reward-seeds`): seeds 0, 1, 2 for both systems, `--iterations` each; the mean score
over the last `--last` iterations per seed, then mean and spread over the seeds. Writes
results/compare_trl_rewards.json.

What TRL 1.12 does differently (same settings, different mechanics), measured as it is:
  - old log-probs come from the logits `generate` returns (output_scores), not a separate forward
    pass; it keeps the (B, R, vocab) logits of the whole rollout;
  - every forward pass computes logits for all positions (prompt included) and all hidden states;
  - the score is placed one token after the EOS (the first padding position), where the value loss
    is also trained; tether places it on the EOS token;
  - attention masks are derived from the pad id (tether carries masks explicitly);
  - the prompt order comes from its own shuffled DataLoader (tether: its seeded PromptSampler).
System "tether-head" is tether with `model.critic=head`: a linear value head on the policy's final
hidden state instead of a value model (no fourth model; old log-probs and values in one pass).
System "tether-vllm" is tether with `rollout.engine=vllm` (a colocated vLLM engine samples, the merged
policy is pushed to it after every update), run in .venv-vllm (`make test-vllm` builds it); ask for it
with `--systems trl,tether,tether-vllm`.
The script imports only the standard library at the top: the TRL child runs it in TRL's venv, which
has no tether.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TRL_VENV = HERE / ".venv-trl"
TRL_PYTHON = TRL_VENV / "bin" / "python"
TORCH_PIN = "torch==2.13.0"  # the CPU build on this machine; an unpinned torch pulls CUDA wheels
TRL_PINS = ["trl==1.12.0", "transformers==5.23.0", "peft==0.21.2", "accelerate==1.15.0"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"  # `make test-vllm` builds it (docs/vllm.md)
# "tether-head": tether with model.critic=head (a value head on the policy instead of a value model);
# "tether-vllm": tether with rollout.engine=vllm, run in .venv-vllm (not in the default --systems)
SYSTEMS = ("trl", "tether", "tether-head", "tether-vllm")
DEFAULT_SYSTEMS = ["trl", "tether", "tether-head"]
REWARD_SEEDS = (0, 1, 2)


# --------------------------------------------------------------------------------------------
# TRL's virtual environment
# --------------------------------------------------------------------------------------------


def install_trl() -> None:
    """Create benchmarks/.venv-trl and install torch, then TRL within tether's constraints."""
    if not TRL_PYTHON.exists():
        print(f"creating {TRL_VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(TRL_VENV)], check=True)
    pip = [str(TRL_PYTHON), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH_PIN], check=True)
    subprocess.run([*pip, *TRL_PINS, "-c", str(REPO / "constraints.txt")], check=True)
    version = subprocess.run(
        [str(TRL_PYTHON), "-c", "import trl, torch; print(trl.__version__, torch.__version__)"],
        check=True,
        capture_output=True,
        text=True,
    )
    print(f"TRL venv ready: trl, torch = {version.stdout.strip()}", flush=True)


# --------------------------------------------------------------------------------------------
# Children: one (system, variant, epochs, seed) each. A spec is a plain JSON dict.
# --------------------------------------------------------------------------------------------


def peak_memory() -> dict[str, float]:
    """Peak resident set of this process (Linux reports KiB), and peak CUDA memory where used."""
    peak = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    import torch

    if torch.cuda.is_available():
        peak["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return peak


def tether_child(spec: dict[str, Any]) -> dict[str, Any]:
    """tether's PPOTrainer.iteration(), timed from outside, as benchmarks/ppo_step.py drives it."""
    from tether.config import PPOConfig, load_config
    from tether.stages.ppo import PPOTrainer

    overrides = [
        f"reward.model={spec['reward_model']}",
        f"train.batch_size={spec['batch_size']}",
        "rollout.samples_per_prompt=1",
        f"rollout.max_new_tokens={spec['max_new_tokens']}",
        f"rollout.temperature={spec['temperature']}",
        f"rollout.missing_eos_penalty={spec['missing_eos_penalty']}",
        f"ppo.epochs={spec['epochs']}",
        f"ppo.minibatch_size={spec['batch_size']}",
        f"ppo.kl_coef={spec['kl_coef']}",
        "ppo.kl_estimator=k1",
        "ppo.kl_target=null",
        "ppo.clip_coef=0.2",
        "ppo.value_clip=0.2",
        "ppo.vf_coef=0.1",
        "ppo.gamma=1.0",
        "ppo.lam=0.95",
        "ppo.whiten_rewards=false",
        "ppo.whiten_advantages=true",
        f"train.lr={spec['lr']}",
        "train.value_lr=null",
        "train.lr_schedule=constant",
        "train.adam_eps=1e-5",
        "train.weight_decay=0.0",
        "train.max_grad_norm=null",  # TRL's PPO loop never clips gradients
        "train.micro_batch_size=null",
        f"train.seed={spec['seed']}",
        f"train.num_threads={spec['threads']}",
        f"train.device={spec['device']}",
        "train.save_every=0",
        "model.dtype=float32",
        "eval.num_prompts=0",
        "alarms.enabled=false",
    ]
    if spec["variant"] == "lora":
        overrides.append("model.lora=" + json.dumps(LORA))
    if spec["system"] == "tether-head":
        overrides.append("model.critic=head")  # train.value_lr=null: the head's own default
    if spec["system"] == "tether-vllm":
        overrides.append("rollout.engine=vllm")
    config = load_config(PPOConfig, None, overrides)
    rows = []
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = PPOTrainer(config, run_dir)
        for trainer.run.step in range(1, spec["iterations"] + 1):
            start = time.perf_counter()
            metrics, _ = trainer.iteration()
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "seconds": seconds,
                    "rollout_s": metrics["time/rollout_s"],
                    "response_tokens": metrics["response/length_mean"] * spec["batch_size"],
                    "score": metrics["objective/scores"],
                    "rm_score": metrics["objective/model_scores"],
                    "eos_frac": metrics["response/eos_frac"],
                    "kl": metrics["objective/kl"],
                }
            )
            print(f"tether iteration {trainer.run.step}: {seconds:.1f} s", file=sys.stderr, flush=True)
        trainer.run.runlog.close()
    return {"iterations": rows, **peak_memory()}


def trl_child(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's PPOTrainer.train() for `iterations` batches; a callback stamps the end of each."""
    import torch
    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
        set_seed,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(spec["threads"])
    set_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    tokenizer.padding_side = "left"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id

    policy = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        spec["reward_model"], num_labels=1, dtype=torch.float32
    )
    fold_score_normalization(reward_model)
    value_model = AutoModelForSequenceClassification.from_pretrained(
        spec["reward_model"], num_labels=1, dtype=torch.float32
    )
    peft_config = None
    if spec["variant"] == "lora":
        settings = {
            "r": LORA["r"],
            "lora_alpha": LORA["alpha"],
            "lora_dropout": LORA["dropout"],
            "target_modules": LORA["target_modules"],
        }
        peft_config = LoraConfig(task_type=TaskType.CAUSAL_LM, **settings)  # TRL wraps the policy itself
        value_model = get_peft_model(value_model, LoraConfig(task_type=TaskType.SEQ_CLS, **settings))

    # Rollout time and generated tokens: wrap the module-level function TRL's train() calls.
    rollouts: list[tuple[float, int]] = []
    generate = trl_ppo.batch_generation

    def timed_generation(model: Any, queries: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        query_responses, logits = generate(model, queries, *args, **kwargs)
        responses = query_responses[:, queries.shape[1] :]  # (B, R)
        is_eos = responses == eos_id
        first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, responses.shape[1])
        rollouts.append((time.perf_counter() - start, int(first_eos.sum())))
        return query_responses, logits

    trl_ppo.batch_generation = timed_generation

    class IterationClock(TrainerCallback):
        """A timestamp at the start of training and at the end of every PPO iteration, and its logs."""

        def __init__(self) -> None:
            self.marks: list[float] = []
            self.logs: list[dict[str, float]] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.marks.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            self.logs.append(dict(logs or {}))

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.marks.append(time.perf_counter())
            print(f"trl iteration {len(self.marks) - 1}: {self.marks[-1] - self.marks[-2]:.1f} s", file=sys.stderr)

    clock = IterationClock()
    batch = spec["batch_size"]
    with tempfile.TemporaryDirectory() as output_dir:
        args = PPOConfig(
            output_dir=output_dir,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=1,
            num_mini_batches=1,
            local_rollout_forward_batch_size=batch,
            num_ppo_epochs=spec["epochs"],
            total_episodes=spec["iterations"] * batch,
            response_length=spec["max_new_tokens"],
            temperature=spec["temperature"],
            stop_token="eos",
            missing_eos_penalty=-spec["missing_eos_penalty"],  # TRL subtracts a positive penalty
            learning_rate=spec["lr"],
            lr_scheduler_type="constant",
            adam_epsilon=1e-5,
            weight_decay=0.0,
            kl_coef=spec["kl_coef"],
            kl_estimator="k1",
            cliprange=0.2,
            cliprange_value=0.2,
            vf_coef=0.1,
            gamma=1.0,
            lam=0.95,
            whiten_rewards=False,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            use_cpu=spec["device"] == "cpu",
            seed=spec["seed"],
            num_sample_generations=0,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            logging_steps=1,
            disable_tqdm=True,
        )
        trainer = PPOTrainer(
            args=args,
            processing_class=tokenizer,
            model=policy,
            ref_model=None,  # full: TRL deep-copies the policy; LoRA: the policy with its adapter off
            reward_model=reward_model,
            value_model=value_model,
            train_dataset=Dataset.from_dict({"input_ids": spec["prompt_ids"]}),
            callbacks=[clock],
            peft_config=peft_config,
        )
        trainer.train()
    logs = [log for log in clock.logs if "objective/scores" in log]
    assert len(logs) == len(rollouts) == spec["iterations"] == len(clock.marks) - 1, (logs, rollouts, clock.marks)
    rows = []
    for i, log in enumerate(logs):
        eos_frac = log["val/num_eos_tokens"] / batch  # generation pads after the first EOS: one per finished response
        rows.append(
            {
                "seconds": clock.marks[i + 1] - clock.marks[i],
                "rollout_s": rollouts[i][0],
                "response_tokens": rollouts[i][1],
                "score": log["objective/scores"],
                # the penalty was subtracted from exactly the responses without EOS
                "rm_score": log["objective/scores"] - spec["missing_eos_penalty"] * (1 - eos_frac),
                "eos_frac": eos_frac,
                "kl": log["objective/kl"],
            }
        )
    return {"iterations": rows, **peak_memory()}


def fold_score_normalization(model: Any) -> None:
    """tether scores with its reward model as gain * raw + bias (saved in config.json by `tether rm`);
    TRL reads the raw head. Fold the two numbers into a head with a bias so TRL scores the same."""
    import torch

    saved = getattr(model.config, "tether_score_normalization", None)
    if not saved:
        return
    head = model.score
    folded = torch.nn.Linear(head.in_features, 1, bias=True, dtype=head.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(head.weight * saved["gain"])
        folded.bias.fill_(saved["bias"])
    model.score = folded


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = trl_child(spec) if spec["system"] == "trl" else tether_child(spec)
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# The parent: shared inputs, one child per run, tables
# --------------------------------------------------------------------------------------------


def shared_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The converted model folder and the token ids of tether's shipped prompts, as tether makes them."""
    from tether.config import PPOConfig, load_config
    from tether.data import encode_prompts, load_prompts, shipped_data
    from tether.loading.models import BUILTIN_MODEL, load_tokenizer, resolve_model_path
    from tether.stages.ppo import SHIPPED_PROMPTS

    reward_model = Path(args.reward_model).resolve()
    if not (reward_model / "config.json").is_file():
        raise SystemExit(f"no reward model at {reward_model}: run `make demo` first, or pass --reward-model")
    tokenizer = load_tokenizer(BUILTIN_MODEL)
    config = load_config(PPOConfig, None, [f"reward.model={reward_model}"])  # the prompt settings tether's child uses
    prompts = load_prompts(config.data.prompts or shipped_data(SHIPPED_PROMPTS))  # as stages/ppo.py reads them
    prompt_ids = encode_prompts(tokenizer, prompts, config.data)
    return {
        "model_path": resolve_model_path(BUILTIN_MODEL),
        "reward_model": str(reward_model),
        "prompt_ids": prompt_ids,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "missing_eos_penalty": -1.0,
        "kl_coef": args.kl_coef,
        "threads": args.threads,
        "device": args.device,
        "iterations": args.iterations,
    }


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    python = {"trl": str(TRL_PYTHON), "tether-vllm": str(VLLM_PYTHON)}.get(spec["system"], sys.executable)
    env = os.environ | {"OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    if spec["system"] == "trl":
        env["TRL_EXPERIMENTAL_SILENCE"] = "1"  # the warning that trl.experimental's API may change
    else:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    label = f"{spec['system']} {spec['variant']} epochs={spec['epochs']} seed={spec['seed']}"
    print(f"running {label} ({spec['iterations']} iterations)", flush=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        result = subprocess.run(
            [python, __file__, "--child", f.name], capture_output=True, text=True, env=env, cwd=REPO
        )
    finally:
        os.unlink(f.name)
    if result.returncode != 0:
        raise SystemExit(f"{label} failed:\n{result.stderr[-6000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])  # type: ignore[no-any-return]


def lr_for(variant: str, args: argparse.Namespace) -> float:
    return float(args.lr_lora if variant == "lora" else args.lr_full)


def measured_iterations(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = result["iterations"]
    return rows[1:] or rows  # the first iteration pays one-off warm-up costs


def summarise(results: list[dict[str, Any]], batch_size: int) -> dict[str, float]:
    """One system's runs (one per round) as medians over all their measured iterations."""
    measured = [row for result in results for row in measured_iterations(result)]
    return {
        "s_per_iteration": statistics.median(r["seconds"] for r in measured),
        "rollout_s": statistics.median(r["rollout_s"] for r in measured),
        "tokens_per_s": statistics.median(r["response_tokens"] / r["seconds"] for r in measured),
        "tokens_per_response": statistics.mean(r["response_tokens"] for r in measured) / batch_size,
        "peak_rss_gib": max(result["peak_rss_gib"] for result in results),
    }


def round_speedups(trl: list[dict[str, Any]], other: list[dict[str, Any]]) -> list[float]:
    """TRL's median s/iter over the system's, round by round: each round runs the systems one after
    the other, so a ratio compares runs minutes apart, not a slow hour of the VM with a fast one."""

    def median_seconds(result: dict[str, Any]) -> float:
        return statistics.median(r["seconds"] for r in measured_iterations(result))

    return [median_seconds(t) / median_seconds(o) for t, o in zip(trl, other, strict=True)]


def speed(args: argparse.Namespace, shared: dict[str, Any]) -> dict[str, Any]:
    runs = []
    for variant in args.variants:
        for epochs in args.epochs:
            entry: dict[str, Any] = {"variant": variant, "epochs": epochs}
            results: dict[str, list[dict[str, Any]]] = {system: [] for system in args.systems}
            for _ in range(args.rounds):
                for system in args.systems:
                    spec = shared | {
                        "system": system,
                        "variant": variant,
                        "epochs": epochs,
                        "seed": 0,
                        "lr": lr_for(variant, args),
                    }
                    results[system].append(run_child(spec))
            for system in args.systems:
                entry[system] = summarise(results[system], shared["batch_size"]) | {"raw": results[system]}
                if system != "trl" and "trl" in results:
                    entry[system]["round_speedups"] = round_speedups(results["trl"], results[system])
            runs.append(entry)
    print_speed_table(args, runs)
    return {"runs": runs}


def print_speed_table(args: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    print(
        f"\nPPO on smollm2-135m-instruct, {args.batch_size} prompts x 1 response, {args.max_new_tokens} new tokens, "
        f"float32, {args.threads} threads, median of {max(args.iterations - 1, 1)} iterations after a warm-up"
        f" in each of {args.rounds} round(s)\n"
    )
    compared = [s for s in args.systems if s != "trl"] if "trl" in args.systems else []
    header = ["variant", "epochs"]
    for system in args.systems:
        header += [f"{system} s/iter", f"{system} tokens/s", f"{system} tokens/response", f"{system} peak GiB"]
    for system in compared:
        header += [f"speed-up (TRL s / {system} s)", f"memory ({system} / TRL)"]
        if args.rounds > 1:
            header.append(f"speed-up per round ({system})")
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for run in runs:
        cells = [run["variant"], str(run["epochs"])]
        for system in args.systems:
            s = run[system]
            cells += [
                f"{s['s_per_iteration']:.2f}",
                f"{s['tokens_per_s']:.1f}",
                f"{s['tokens_per_response']:.1f}",
                f"{s['peak_rss_gib']:.2f}",
            ]
        for system in compared:
            cells += [
                f"{run['trl']['s_per_iteration'] / run[system]['s_per_iteration']:.2f}x",
                f"{run[system]['peak_rss_gib'] / run['trl']['peak_rss_gib']:.2f}",
            ]
            if args.rounds > 1:
                cells.append(", ".join(f"{ratio:.2f}x" for ratio in run[system]["round_speedups"]))
        print("| " + " | ".join(cells) + " |")


def rewards(args: argparse.Namespace, shared: dict[str, Any]) -> dict[str, Any]:
    runs = []
    for variant in args.variants:
        for epochs in args.epochs:
            entry: dict[str, Any] = {"variant": variant, "epochs": epochs}
            for system in args.systems:
                per_seed = []
                for seed in REWARD_SEEDS:
                    spec = shared | {
                        "system": system,
                        "variant": variant,
                        "epochs": epochs,
                        "seed": seed,
                        "lr": lr_for(variant, args),
                    }
                    result = run_child(spec)
                    last = result["iterations"][-args.last :]
                    per_seed.append(
                        {
                            "seed": seed,
                            "score": statistics.mean(r["score"] for r in last),
                            "rm_score": statistics.mean(r["rm_score"] for r in last),
                            "first_score": result["iterations"][0]["score"],
                            "raw": result,
                        }
                    )
                entry[system] = {
                    "seeds": per_seed,
                    **{
                        f"{key}_{stat}": fn([s[key] for s in per_seed])
                        for key in ("score", "rm_score")
                        for stat, fn in (("mean", statistics.mean), ("std", statistics.stdev))
                    },
                }
            runs.append(entry)
    print(
        f"\nScore after {args.iterations} PPO iterations (mean of the last {args.last}), seeds "
        f"{', '.join(map(str, REWARD_SEEDS))}: mean ± standard deviation over the seeds. score = reward model "
        "(normalised as tether saves it) + the missing-EOS penalty, what PPO trains on; RM score = without it.\n"
    )
    header = ["variant", "epochs", "lr"]
    for system in args.systems:
        header += [f"{system} score", f"{system} RM score", f"{system} per seed"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for run in runs:
        cells = [run["variant"], str(run["epochs"]), f"{lr_for(run['variant'], args):g}"]
        for system in args.systems:
            s = run[system]
            cells += [
                f"{s['score_mean']:.3f} ± {s['score_std']:.3f}",
                f"{s['rm_score_mean']:.3f} ± {s['rm_score_std']:.3f}",
                ", ".join(f"{x['score']:.3f}" for x in s["seeds"]),
            ]
        print("| " + " | ".join(cells) + " |")
    return {"runs": runs, "seeds": list(REWARD_SEEDS), "last": args.last}


def comma_list(kind: type, allowed: tuple[Any, ...] | None = None) -> Any:
    def parse(text: str) -> list[Any]:
        values = [kind(part) for part in text.split(",") if part]
        bad = [v for v in values if allowed is not None and v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {allowed or kind.__name__}")
        return values

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--install-trl", action="store_true", help=f"(re)install {TRL_VENV.name} first")
    parser.add_argument("--systems", type=comma_list(str, SYSTEMS), default=DEFAULT_SYSTEMS)
    parser.add_argument("--variants", type=comma_list(str, ("full", "lora")), default=["full", "lora"])
    parser.add_argument("--epochs", type=comma_list(int), default=[1, 4], help="PPO epochs per batch, e.g. 1,4")
    parser.add_argument("--iterations", type=int, default=None, help="per run (default: 4 for speed, 20 for rewards)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="speed mode: run the systems one after the other this many times"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in both systems")
    parser.add_argument("--reward-seeds", action="store_true", help="reward reached over seeds 0,1,2, not speed")
    parser.add_argument("--last", type=int, default=5, help="reward mode: average the score over the last N iterations")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--lr-full", type=float, default=3e-6, help="learning rate, full fine-tuning")
    parser.add_argument("--lr-lora", type=float, default=3e-4, help="learning rate, LoRA (tether's demo setting)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--reward-model", default=str(REPO / "runs" / "demo-rm" / "checkpoints" / "final"))
    parser.add_argument("--json", type=Path, default=None, help="default: results/compare_trl[_rewards].json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return
    if args.iterations is None:
        args.iterations = 20 if args.reward_seeds else 4
    if "trl" in args.systems and (args.install_trl or not TRL_PYTHON.exists()):
        install_trl()
    if "tether-vllm" in args.systems and not VLLM_PYTHON.exists():
        raise SystemExit(f"tether-vllm runs in {VLLM_PYTHON.parent.parent}: build it with `make test-vllm` first")

    shared = shared_inputs(args)
    results = rewards(args, shared) if args.reward_seeds else speed(args, shared)
    name = "compare_trl_rewards.json" if args.reward_seeds else "compare_trl.json"
    path = args.json or HERE / "results" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    import torch

    machine = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    settings = {k: v for k, v in shared.items() if k != "prompt_ids"} | {
        "systems": args.systems,
        "variants": args.variants,
        "epochs": args.epochs,
        "lr_full": args.lr_full,
        "lr_lora": args.lr_lora,
        "lora": LORA,
        "trl_pins": TRL_PINS,
    }
    path.write_text(json.dumps({"machine": machine, "settings": settings, **results}, indent=2))
    print(f"\nraw numbers: {path}")


if __name__ == "__main__":
    main()
