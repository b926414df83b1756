"""`tether plan`'s estimate against measured peaks: every case in its own fresh process.

    .venv/bin/python benchmarks/plan_check.py                  # every case, writes results/plan_check.json
    .venv/bin/python benchmarks/plan_check.py --only tiny      # the random-init models only (~3 min)
    .venv/bin/python benchmarks/plan_check.py --cases ppo-llama-m-full-model,sft-gpt2-m-full
    .venv/bin/python benchmarks/plan_check.py --list

A case is a stage, a model, full or LoRA, a critic and a few overrides. The models are random-init
Hugging Face folders built from configs (`MODELS`: llama and gpt2 at several sizes, one with the
embedded model's 49k-token vocabulary) plus the embedded `smollm2-135m-instruct` itself; nothing is
downloaded. Each case runs the stage's trainer for `steps` steps in a new interpreter (peaks only
grow, so two cases never share a process) and records what tether logs as `memory/peak_gb`
(`ru_maxrss`, the resident set's high-water mark) after the last step, the peak after every phase,
the baseline right after the imports, and the seconds per step. The estimate is
`tether.plan.plan_for(config, stage)` of the same config, computed in the parent process before
the run (no weights loaded). The table compares the estimate's training peak with the measured one;
`--time` also checks the time estimate (a short calibration in the parent process).

Run it on an otherwise idle machine: the numbers are memory, so a busy machine changes only the
seconds, but a measurement that competes for memory with another process can fail.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "plan_check.json"
GIB = 2**30

# Random-init models, by name: llama (gated MLP, RMSNorm, rotary, grouped KV heads) and gpt2
# (LayerNorm, GELU MLP, learned positions, Conv1D layers). vocab "words" is the 44-token word-level
# tokenizer of tests/tiny_models.py; "smollm" is the embedded model's 49,152-token tokenizer, where
# the logits term is large.
MODELS: dict[str, dict[str, Any]] = {
    "llama-s": {"arch": "llama", "hidden": 64, "layers": 2, "intermediate": 128, "heads": 4, "kv_heads": 2},
    "llama-m": {"arch": "llama", "hidden": 256, "layers": 4, "intermediate": 688, "heads": 8, "kv_heads": 4},
    "llama-l": {"arch": "llama", "hidden": 512, "layers": 8, "intermediate": 1376, "heads": 8, "kv_heads": 4},
    "gpt2-s": {"arch": "gpt2", "hidden": 128, "layers": 2, "heads": 4},
    "gpt2-m": {"arch": "gpt2", "hidden": 384, "layers": 6, "heads": 6},
    "llama-v": {
        "arch": "llama",
        "hidden": 256,
        "layers": 4,
        "intermediate": 688,
        "heads": 8,
        "kv_heads": 4,
        "vocab": "smollm",
    },
}
EMBEDDED = "smollm2-135m-instruct"

# Overrides every case shares: no checkpoints, no samples, no alarms, no eval unless a case asks.
COMMON_ONLINE = [
    "train.save_every=0",
    "train.sample_every=0",
    "eval.num_prompts=0",
    "alarms.enabled=false",
    "reward.function=tether.reward_functions:concise",
    "rollout.missing_eos_penalty=null",
]
COMMON_OFFLINE = ["train.save_every=0", "train.eval_every=0"]
LORA = "model.lora={r: 8, alpha: 16}"


def _case(name: str, stage: str, model: str, *overrides: str, steps: int = 3, group: str = "tiny") -> dict[str, Any]:
    return {"name": name, "stage": stage, "model": model, "overrides": list(overrides), "steps": steps, "group": group}


def _ppo(model: str, lora: bool, critic: str, *extra: str, group: str = "tiny", steps: int = 3) -> dict[str, Any]:
    name = f"ppo-{model}-{'lora' if lora else 'full'}-{critic}"
    overrides = [f"model.critic={critic}", *([LORA] if lora else []), *extra]
    return _case(name, "ppo", model, *overrides, group=group, steps=steps)


# The tiny cases: batch 8 prompts x 1 sample, 24 new tokens, 2 PPO epochs of 2 minibatches, so the
# update runs its own passes; `reuse` cases take the whole rollout as one minibatch (the old pass's
# graph is kept for the first step).
TINY_PPO = ["train.batch_size=8", "rollout.max_new_tokens=24", "ppo.epochs=2", "ppo.minibatch_size=4"]
REUSE = ["train.batch_size=8", "rollout.max_new_tokens=24", "ppo.epochs=1", "ppo.minibatch_size=8"]
SFT_DATA = ["data.train=@sft", "data.eval=@sft"]
PREFS = ["data.train=@prefs", "data.eval=@prefs"]
CASES: list[dict[str, Any]] = [
    *[
        _ppo(model, lora, critic, *TINY_PPO)
        for model in ("llama-s", "llama-m", "llama-l", "gpt2-s", "gpt2-m")
        for lora in (False, True)
        for critic in ("model", "head")
    ],
    _ppo("llama-v", False, "model", *REUSE),
    _ppo("llama-v", True, "head", *REUSE),
    {
        **_ppo("llama-l", False, "model", *TINY_PPO, "train.batch_size=16", "rollout.max_new_tokens=64"),
        "name": "ppo-llama-l-full-model-b16-r64",
    },
    {**_ppo("llama-l", True, "model", *TINY_PPO, "reward.model=@llama-l-rm"), "name": "ppo-llama-l-lora-model-rm"},
    _case(
        "grpo-llama-m-full",
        "grpo",
        "llama-m",
        "train.batch_size=4",
        "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=24",
        "grpo.minibatch_size=8",
    ),
    _case(
        "grpo-llama-v-lora",
        "grpo",
        "llama-v",
        LORA,
        "train.batch_size=4",
        "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=24",
        "grpo.minibatch_size=16",
    ),
    _case("sft-llama-l-full", "sft", "llama-l", *SFT_DATA, "train.batch_size=8", steps=3),
    _case("sft-gpt2-m-lora", "sft", "gpt2-m", LORA, *SFT_DATA, "train.batch_size=8", steps=3),
    _case("rm-llama-m-full", "rm", "llama-m", *PREFS, "train.batch_size=8", steps=3),
    _case("rm-gpt2-m-lora", "rm", "gpt2-m", LORA, *PREFS, "train.batch_size=8", steps=3),
    _case("dpo-llama-v-lora", "dpo", "llama-v", LORA, *PREFS, "train.batch_size=4", steps=3),
    _case("dpo-llama-m-full", "dpo", "llama-m", *PREFS, "train.batch_size=8", steps=3),
    # Held out: configurations added after the constants were chosen, to check them on new ground.
    _ppo(
        "llama-m",
        False,
        "model",
        "train.batch_size=8",
        "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=40",
        "ppo.epochs=1",
        "ppo.minibatch_size=8",
        "train.micro_batch_size=2",
        group="holdout",
    )
    | {"name": "ppo-llama-m-full-model-micro2"},
    _case(
        "grpo-gpt2-m-lora",
        "grpo",
        "gpt2-m",
        LORA,
        "train.batch_size=2",
        "rollout.samples_per_prompt=8",
        "rollout.max_new_tokens=32",
        "grpo.minibatch_size=8",
        group="holdout",
    ),
    _case(
        "sft-gpt2-m-full-b16",
        "sft",
        "gpt2-m",
        *SFT_DATA,
        "train.batch_size=16",
        "train.micro_batch_size=8",
        group="holdout",
    ),
    _ppo(
        "llama-v",
        True,
        "model",
        "train.batch_size=4",
        "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=48",
        "ppo.epochs=2",
        "ppo.minibatch_size=8",
        group="holdout",
    ),
    # The embedded model: 4 prompts x 2 samples of up to 32 tokens, one epoch of one minibatch.
    *[
        _ppo(
            EMBEDDED,
            lora,
            critic,
            "train.batch_size=4",
            "rollout.samples_per_prompt=2",
            "rollout.max_new_tokens=32",
            "ppo.epochs=1",
            "ppo.minibatch_size=8",
            group="embedded",
        )
        for lora in (False, True)
        for critic in ("model", "head")
    ],
    _case(
        "grpo-smollm2-lora",
        "grpo",
        EMBEDDED,
        LORA,
        "train.batch_size=2",
        "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=32",
        "grpo.minibatch_size=8",
        group="embedded",
    ),
    _case("sft-smollm2-full", "sft", EMBEDDED, *SFT_DATA, "train.batch_size=4", steps=3, group="embedded"),
    _case("dpo-smollm2-lora", "dpo", EMBEDDED, LORA, *PREFS, "train.batch_size=4", steps=3, group="embedded"),
]


# --------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------


def build_model(name: str, folder: Path, kind: str = "causal") -> Path:
    """MODELS[name] as a random-init Hugging Face folder with its tokenizer (kind 'scalar': a
    one-output sequence classifier, a reward model)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        GPT2Config,
        LlamaConfig,
    )

    sys.path.insert(0, str(REPO))
    from tests.tiny_models import make_tokenizer

    spec = MODELS[name]
    if spec.get("vocab") == "smollm":
        from tether.plan.facts import tether_function

        tokenizer = AutoTokenizer.from_pretrained(tether_function("resolve_model_path")(EMBEDDED))
    else:
        tokenizer = make_tokenizer()
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id,
    }
    if spec["arch"] == "llama":
        config: Any = LlamaConfig(
            hidden_size=spec["hidden"],
            intermediate_size=spec["intermediate"],
            num_hidden_layers=spec["layers"],
            num_attention_heads=spec["heads"],
            num_key_value_heads=spec["kv_heads"],
            max_position_embeddings=1024,
            tie_word_embeddings=spec.get("vocab") == "smollm",
            **ids,
        )
    else:
        config = GPT2Config(
            n_embd=spec["hidden"], n_layer=spec["layers"], n_head=spec["heads"], n_positions=1024, **ids
        )
    torch.manual_seed(0)
    if kind == "scalar":
        config.num_labels = 1
        config.architectures = None
        model: Any = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prompt_file(folder: Path) -> Path:
    """Prompts of the tiny tokenizer's words, all 24 words long (so every batch has the same width)."""
    sys.path.insert(0, str(REPO))
    from tests.tiny_models import WORDS

    path = folder / "prompts.jsonl"
    lines = []
    for i in range(32):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(24)]
        lines.append(json.dumps({"prompt": " ".join(words)}) + "\n")
    path.write_text("".join(lines))
    return path


def data_file(kind: str, folder: Path) -> Path:
    """Training examples that all have the same length (so every batch is the longest one, which is
    what the estimate assumes): 'sft' 20-word prompts with 60-word responses, 'prefs' the same
    prompts with a 60-word chosen and a 40-word rejected response."""
    sys.path.insert(0, str(REPO))
    from tests.tiny_models import WORDS

    def words(seed: int, n: int) -> str:
        return " ".join(WORDS[(seed * 5 + j * 7) % len(WORDS)] for j in range(n))

    path = folder / f"{kind}.jsonl"
    rows = []
    for i in range(32):
        if kind == "sft":
            rows.append({"prompt": words(i, 20), "response": words(i + 1, 60)})
        else:
            rows.append({"prompt": words(i, 20), "chosen": words(i + 1, 60), "rejected": words(i + 2, 40)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def case_overrides(case: dict[str, Any], models: Path) -> list[str]:
    """The case's full override list, its model folders built under `models` when missing."""
    overrides = []
    model = case["model"]
    if model != EMBEDDED:
        folder = models / model
        if not (folder / "config.json").is_file():
            build_model(model, folder)
        overrides.append(f"model.name={folder}")
        if MODELS[model].get("vocab") != "smollm" and case["stage"] in ("ppo", "grpo"):
            overrides.append(f"data.prompts={prompt_file(models)}")
    for text in case["overrides"]:
        if text.endswith(("=@sft", "=@prefs")):  # key=@sft / @prefs: fixed-length training examples
            key, kind = text.split("=@")
            overrides.append(f"{key}={data_file(kind, models)}")
            continue
        if "=@" in text:  # key=@MODEL-rm: a random-init reward model of that spec
            key, ref = text.split("=@")
            base = ref.removesuffix("-rm")
            folder = models / ref
            if not (folder / "config.json").is_file():
                build_model(base, folder, kind="scalar")
            text = f"{key}={folder}"
        overrides.append(text)
    common = COMMON_ONLINE if case["stage"] in ("ppo", "grpo") else COMMON_OFFLINE
    if any(o.startswith("reward.model=") for o in overrides):
        common = [c for c in common if not c.startswith("reward.function")]
    return [*common, *overrides, f"train.steps={case['steps']}"]


CONFIG_CLASSES = {"ppo": "PPOConfig", "grpo": "GRPOConfig", "sft": "SFTConfig", "rm": "RMConfig", "dpo": "DPOConfig"}


def load_case_config(stage: str, overrides: list[str]) -> Any:
    import tether.config as config_module

    return config_module.load_config(getattr(config_module, CONFIG_CLASSES[stage]), None, overrides)


# --------------------------------------------------------------------------------------------
# The measurement: one case in this (fresh) process
# --------------------------------------------------------------------------------------------


def _resident() -> tuple[float, float]:
    """(current, peak) resident set of this process in GiB (Linux: VmRSS and VmHWM).

    VmHWM, not ru_maxrss: ru_maxrss is preserved across execve, so a worker started from a large
    Python process (this script's parent, or pytest) would report its parent's peak when its own is
    smaller. For a run started from a shell, the two are the same number: what tether logs as
    memory/peak_gb."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":")
            fields[key] = int(value.split()[0]) * 1024 / GIB
    return fields["VmRSS"], fields["VmHWM"]


def _own_getrusage(real: Any) -> Any:
    """resource.getrusage with ru_maxrss replaced by this process's own VmHWM (see _resident), so
    that what tether logs as memory/peak_gb is this process's peak however it was started."""

    def getrusage(who: int) -> Any:
        usage = real(who)
        if who != resource.RUSAGE_SELF:
            return usage
        fields = list(usage)
        fields[2] = int(_resident()[1] * 2**20)  # KiB, as Linux reports ru_maxrss
        return resource.struct_rusage(fields)

    return getrusage


def _hook_phases(result: dict[str, Any]) -> None:
    """Best effort: the peak after every phase the trainers time (their Timer), wherever this
    version of tether keeps it; and the peak after every step of the offline stages."""
    for name in ("tether.stages.online", "tether.run.log", "tether.run.loop"):
        try:
            timer = importlib.import_module(name).Timer
        except (ImportError, AttributeError):
            continue
        timed = timer.__call__

        @contextmanager
        def timed_and_measured(self: Any, phase: str, *args: Any, _timed: Any = timed, **kwargs: Any) -> Any:
            with _timed(self, phase, *args, **kwargs):
                yield
            seconds = getattr(self, "seconds", {}).get(phase)
            result["phases"].append({"phase": phase, "seconds": seconds, "peak_gib": _resident()[1]})

        timer.__call__ = timed_and_measured
        break
    for name, cls in (("tether.stages.supervised", "SupervisedTrainer"), ("tether.stages.offline", "OfflineTrainer")):
        try:
            trainer = getattr(importlib.import_module(name), cls)
        except (ImportError, AttributeError):
            continue
        method = "train_step" if hasattr(trainer, "train_step") else "iteration"  # older versions: train_step
        step = getattr(trainer, method, None)
        if step is None:
            continue

        def measured_step(self: Any, *args: Any, _step: Any = step, **kwargs: Any) -> Any:
            returned = _step(self, *args, **kwargs)
            metrics = returned[0] if isinstance(returned, tuple) else returned  # iteration: (metrics, samples)
            if isinstance(metrics, dict):
                metrics.setdefault("memory/peak_gb", _resident()[1])
            result["phases"].append({"phase": "step", "seconds": None, "peak_gib": _resident()[1]})
            return returned

        setattr(trainer, method, measured_step)


def measure(stage: str, overrides: list[str]) -> dict[str, Any]:
    """Run `tether STAGE overrides --output DIR` here (tether's own command line, in this process);
    peaks (GiB) after the imports, after every phase of every step, and after the last step."""
    started = time.perf_counter()
    for name in (
        "tether.stages.ppo",
        "tether.stages.grpo",
        "tether.stages.sft",
        "tether.stages.rm",
        "tether.stages.dpo",
    ):
        importlib.import_module(name)  # everything a run imports, before the baseline is read
    import tether.cli

    imported = time.perf_counter() - started
    result: dict[str, Any] = {"baseline_gib": _resident()[1], "import_s": imported, "phases": []}
    resource.getrusage = _own_getrusage(resource.getrusage)  # type: ignore[assignment]
    _hook_phases(result)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        code = tether.cli.main([stage, *overrides, "--output", str(run_dir)])
        if code != 0:
            raise RuntimeError(f"tether {stage} exited with {code}")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result["process_peak_gib"] = _resident()[1]  # the final checkpoint and evaluation included
    logged = [row["memory/peak_gb"] for row in rows if "memory/peak_gb" in row]
    steps = [p["peak_gib"] for p in result["phases"]]
    # After the last step: what the run logged (ru_maxrss, here this process's VmHWM), else the
    # peaks seen after its phases, else the whole process's (a version that logs neither).
    result["peak_gib"] = logged[-1] if logged else max(steps) if steps else result["process_peak_gib"]
    result["step_s"] = [row["time/step_s"] for row in rows if "time/step_s" in row]
    result["times"] = [{k: v for k, v in row.items() if k.startswith("time/")} for row in rows]
    return result


def run_case_process(stage: str, overrides: list[str], timeout: float = 1800) -> dict[str, Any]:
    """`measure` in a fresh interpreter (this file's --worker mode), under `nice`."""
    command = ["nice", "-n", "10", sys.executable, str(Path(__file__).resolve()), "--worker", stage, *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {stage} {overrides} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------


def estimate_row(
    case: dict[str, Any], models: Path, measured: dict[str, Any], calibration: Any = None
) -> dict[str, Any]:
    """The comparison row of one case: `measured` (from `measure`) against the current estimate."""
    from tether.plan import plan_for

    overrides = case_overrides(case, models)
    plan = plan_for(load_case_config(case["stage"], overrides), case["stage"], calibration=calibration)
    estimate = plan.training_peak / GIB
    row = {
        "case": case["name"],
        "stage": case["stage"],
        "model": case["model"],
        "overrides": case["overrides"],
        "measured_gib": round(measured["peak_gib"], 3),
        "estimated_gib": round(estimate, 3),
        "error_pct": round(100 * (estimate - measured["peak_gib"]) / measured["peak_gib"], 1),
        "estimated_phases_gib": {name: round(v / GIB, 3) for name, v in plan.phase_peaks().items()},
        "measured": measured,
    }
    if plan.seconds_per_step is not None:
        steady = measured["step_s"][1:] or measured["step_s"]
        seconds = sorted(steady)[len(steady) // 2]
        row["measured_step_s"] = round(seconds, 2)
        row["estimated_step_s"] = round(plan.seconds_per_step, 2)
        row["time_error_pct"] = round(100 * (plan.seconds_per_step - seconds) / seconds, 1)
    return row


def check_case(case: dict[str, Any], models: Path, with_time: bool = False, calibration: Any = None) -> dict[str, Any]:
    """Measure one case in a fresh process and compare it with the estimate."""
    measured = run_case_process(case["stage"], case_overrides(case, models))
    return estimate_row(case, models, measured, calibration if with_time else None)


def reestimate(path: Path, models: Path) -> None:
    """Recompute the estimate columns of a results file with the current estimator (no measuring)."""
    document = json.loads(path.read_text())
    cases = {c["name"]: c for c in CASES}
    calibration = None
    if document.get("calibration"):
        from tether.plan import Calibration

        saved = dict(document["calibration"])
        saved["matmul_flops"] = {int(k): v for k, v in saved["matmul_flops"].items()}
        calibration = Calibration(**saved)
    document["rows"] = [
        estimate_row(cases[r["case"]], models, r["measured"], calibration) if r["case"] in cases else r
        for r in document["rows"]
    ]
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(table(document["rows"]))


def describe(case: dict[str, Any]) -> str:
    """A case's settings in words, for the docs table."""
    words = {
        "model.critic=model": "value model",
        "model.critic=head": "value head",
        LORA: "LoRA r=8",
    }
    parts = [words.get(o, o) for o in case["overrides"] if not o.startswith(("data.train=", "data.eval="))]
    if LORA not in case["overrides"] and case["stage"] != "rm":
        parts.insert(0, "full")
    return ", ".join(
        p.replace("train.", "").replace("rollout.", "").replace("ppo.", "").replace("grpo.", "") for p in parts
    )


def markdown(document: dict[str, Any]) -> str:
    """The docs tables: memory for every row, then time where measured."""
    cases = {c["name"]: c for c in CASES}
    lines = [
        "| case | stage | model | settings | measured GiB | estimated GiB | error |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in document["rows"]:
        case = cases.get(r["case"], {"overrides": r["overrides"], "stage": r["stage"]})
        lines.append(
            f"| {r['case']} | {r['stage']} | {r['model']} | {describe(case)} | {r['measured_gib']:.3f} | "
            f"{r['estimated_gib']:.3f} | {r['error_pct']:+.1f}% |"
        )
    errors = [abs(r["error_pct"]) for r in document["rows"]]
    lines.append("")
    lines.append(
        f"{len(errors)} cases; largest error {max(errors):.1f}%, mean absolute error {sum(errors) / len(errors):.1f}%."
    )
    timed = [r for r in document["rows"] if "measured_step_s" in r]
    if timed:
        lines += [
            "",
            "| case | measured s/step | estimated s/step | error |",
            "| --- | --- | --- | --- |",
        ]
        for r in timed:
            seconds = f"{r['measured_step_s']:.2f} | {r['estimated_step_s']:.2f}"
            lines.append(f"| {r['case']} | {seconds} | {r['time_error_pct']:+.0f}% |")
    return "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | measured GiB | estimated GiB | error | measured s/step | estimated s/step | error |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        time_cells = (
            f"{r['measured_step_s']:.2f} | {r['estimated_step_s']:.2f} | {r['time_error_pct']:+.0f}%"
            if "measured_step_s" in r
            else "| |"
        )
        memory_cells = f"{r['measured_gib']:.3f} | {r['estimated_gib']:.3f} | {r['error_pct']:+.1f}%"
        lines.append(f"| {r['case']} | {memory_cells} | {time_cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["tiny", "holdout", "embedded"], help="one group of cases")
    parser.add_argument("--cases", help="comma-separated case names")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--time", action="store_true", help="also check the time estimate (calibrates first)")
    parser.add_argument("--models", type=Path, help="where the random-init models are built (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--reestimate", action="store_true", help="recompute the estimates of --output, measure nothing"
    )
    parser.add_argument("--markdown", action="store_true", help="print the docs tables of --output, measure nothing")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker[0], args.worker[1:])))
        return
    if args.reestimate:
        with tempfile.TemporaryDirectory() as tmp:
            reestimate(args.output, args.models or Path(tmp))
        return
    if args.markdown:
        print(markdown(json.loads(args.output.read_text())))
        return
    cases = CASES
    if args.only:
        cases = [c for c in cases if c["group"] == args.only]
    if args.cases:
        wanted = args.cases.split(",")
        cases = [c for c in cases if c["name"] in wanted]
    if args.list:
        for c in cases:
            print(c["name"], c["stage"], " ".join(c["overrides"]))
        return
    calibration = None
    if args.time:
        from tether.plan import calibrate

        calibration = calibrate()
    import torch

    partial = bool(args.only or args.cases)
    old_rows = json.loads(args.output.read_text()).get("rows", []) if partial and args.output.exists() else []
    order = [c["name"] for c in CASES]
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models or Path(tmp)
        rows: list[dict[str, Any]] = []
        for case in cases:
            try:
                row = check_case(case, models, args.time, calibration)
            except Exception as err:  # one broken case must not lose the others' rows
                print(f"{case['name']:40s} FAILED: {err}", flush=True)
                continue
            rows.append(row)
            timing = (
                f"   {row['measured_step_s']:.2f} s vs {row['estimated_step_s']:.2f} s"
                if "measured_step_s" in row
                else ""
            )
            print(
                f"{row['case']:40s} measured {row['measured_gib']:.3f} GiB  estimated {row['estimated_gib']:.3f} GiB"
                f"  {row['error_pct']:+.1f}%{timing}",
                flush=True,
            )
            ran = {r["case"] for r in rows}
            merged = [r for r in old_rows if r["case"] not in ran] + rows
            merged.sort(key=lambda r: order.index(r["case"]) if r["case"] in order else len(order))
            document = {
                "date": time.strftime("%Y-%m-%d"),
                "machine": {
                    "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(),
                    "torch": torch.__version__,
                    "load_average": os.getloadavg(),
                },
                "calibration": calibration.__dict__ if calibration is not None else None,
                "rows": merged,
            }
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(document, indent=2) + "\n")  # after every case
    print(table(rows))
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
