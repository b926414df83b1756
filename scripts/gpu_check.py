"""A prepared check of `model.fsdp: true` (FSDP2 sharding, tether/engines/fsdp.py) and of
`rollout.engine: vllm` (tether/engines/vllm.py) on CUDA, in one command.

    bash scripts/gpu_check.sh                        # CUDA: every GPU of the machine, bfloat16, a 0.5B model
    bash scripts/gpu_check.sh --device cpu --small   # the same path on CPU processes (gloo), a tiny model

What it checks, in three parts, each printed as a Markdown table (and written to $OUT/gpu_check.md when
$OUT is set; $OUT/gpu_check.json holds the numbers):

1. Stages. Every training stage (sft, rm, dpo, ppo, grpo) with model.fsdp=true and model.dtype=bfloat16,
   `torchrun --nproc_per_node=<GPU count>`, on a random-init Llama of 494M parameters built from a
   config (Qwen2.5-0.5B's shape: hidden 896, 24 layers, 14 heads, 2 KV heads, vocabulary 151936, tied
   embeddings) with a word-level tokenizer, and data files written here: nothing is downloaded. Full
   fine-tuning everywhere, so every model a stage holds is sharded (ppo: policy, value model and
   reference). A few steps each, then: seconds per step (median of the steps after the first, from
   metrics.jsonl's time/step_s), the peak GPU memory of the busiest process
   (torch.cuda.max_memory_allocated after the whole run, final evaluation and save included, and
   max_memory_reserved) and the stage's last loss or score.
2. Equivalence. The CPU equivalence runs of tests/test_fsdp.py on CUDA: tests/distributed_worker.py
   (deterministic sampling) on its tiny Llama in float32, a plain one-process run against a one-process
   model.fsdp=true run, and with two or more GPUs against two sharded processes (NCCL) as well; the
   bfloat16 mixed-precision runs against plain autocast as tests/test_fsdp.py compares them. CUDA
   kernels need not be bitwise deterministic, so each comparison reports the largest metric and weight
   differences and passes under the tolerances of `TOLERANCES` below.
3. vLLM. Where vLLM is installed (the lent GPU machines have none, and no network to get it: then
   this part reports "not installed" and does not fail the check): ppo and grpo in one process,
   without FSDP, on the stage model, once with `rollout.engine=hf` and once with `vllm`, the same
   settings as part 1 otherwise. Per run the seconds per step and of its sampling, and the gap between
   the engine's sampled log-probs and the trainer's (rollout/logprob_gap_mean, the largest
   rollout/logprob_gap_max); a vLLM run passes when it finishes (its probe check after every push
   stops a stale engine) and its alarm/sampler_gap never fired.

Each stage and launch runs with its own timeout, and the whole check under a budget (--budget-s; the
defaults keep a one-H200 run under 8 minutes); what the budget leaves out is reported as skipped.
The exit status is 0 when every stage ran and every comparison passed, 1 otherwise, 2 when the
machine cannot run the check (scripts/gpu_check.sh: missing modules, no CUDA).

The same file is also the child processes it starts (internal flags): `--worker JOB.json` runs one
stage through tether's command line (`tether.cli.main`, what `torchrun -m tether STAGE ...` runs) and
then records this process's peak memory, which tether does not log for every stage; `--build` makes
the model folders; `--missing-imports` lists the modules tether's imports lack (scripts/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "distributed_worker.py"
STAGES = ("ppo", "grpo", "sft", "rm", "dpo")  # the heaviest first: a budget run short leaves out the light ones
ENTRY_MODULES = ["tether.cli", *(f"tether.stages.{stage}" for stage in STAGES)]
PREINSTALLED = ("torch", "transformers", "peft", "tokenizers", "safetensors")  # never stubbed: the machine's own
NONDETERMINISTIC = ("time/", "throughput/", "memory/")  # wall clock and memory: never compared
# The metrics of its last step each stage's table row shows.
FINAL_METRICS = {
    "sft": ("loss/sft",),
    "rm": ("loss/rm", "rm/accuracy"),
    "dpo": ("loss/dpo",),
    "ppo": ("loss/policy", "objective/scores"),
    "grpo": ("loss/policy", "objective/scores"),
}
# Float32 comparisons: tests/test_distributed.py's tolerances for data parallelism (a metric within
# max(rel * |plain|, abs) of the plain run's, every weight within atol + rtol * |plain|). CUDA runs may
# differ where kernels reduce in a nondeterministic order; on CPU the same runs match to the bit.
# bfloat16: tests/test_fsdp.py's, FSDP's bfloat16 parameters against plain float32 weights under
# autocast: metrics to 2% (2e-3 absolute) and the weights apart by under 10% of how far they moved.
TOLERANCES = {
    "float32": {"metric_rel": 1e-4, "metric_abs": 1e-5, "weight_rtol": 1e-4, "weight_atol": 2e-5},
    "bfloat16": {"metric_rel": 2e-2, "metric_abs": 2e-3, "moved_share": 0.1},
}
PIP_NAMES = {"yaml": "pyyaml"}  # the distributions whose import name differs

PROMPT_WORDS = ["hello", "world", "why", "what", "how", "tell", "me", "about", "please", "thanks", "is", "the"]
BODY_WORDS = ["the", "a", "cat", "dog", "sun", "moon", "red", "blue", "green", "one", "two", "big", "small"]
COLOURS = ["red", "blue", "green"]
# The equivalence runs score with tests/test_ppo.py's function; the stage runs with the mean word length,
# because a random 0.5B model's responses (filler words, below) hardly ever hold "good" and would all
# score 0, leaving every advantage 0.
REWARD_FILE = """
def good_share(prompts, responses, **kw):
    # share of the word "good" among the response's words (tests/test_ppo.py)
    return [sum(w == "good" for w in r.split()) / max(len(r.split()), 1) for r in responses]


def word_length(prompts, responses, **kw):
    # mean characters per word, over 8: random responses differ in it, so advantages are not all 0
    return [sum(len(w) for w in r.split()) / (8 * max(len(r.split()), 1)) for r in responses]
"""


@dataclass(frozen=True)
class Shape:
    """A Llama decoder's size."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


BIG = Shape(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, vocab=151936)  # Qwen2.5-0.5B: 494M
# head_dim 64: the CPU build of vLLM has no attention kernel for 16 (part 3 runs on this shape on a CPU)
SMALL = Shape(hidden=128, intermediate=256, layers=2, heads=2, kv_heads=1, vocab=1024)


@dataclass
class Settings:
    device: str  # "cuda" or "cpu"
    nproc: int  # processes of every stage run
    dtype: str  # model.dtype of the stage runs
    steps: int
    max_new_tokens: int
    shape: Shape
    stage_timeout_s: float
    deadline: float  # time.monotonic() past which nothing new starts
    reserve_s: float  # of the budget, kept from the stages for the equivalence runs
    work: Path
    parts: tuple[str, ...]  # "stages", "equivalence", "vllm"
    stages: tuple[str, ...]

    def left(self) -> float:
        return self.deadline - time.monotonic()


@dataclass
class StageResult:
    stage: str
    status: str  # "ok", "failed (exit N)", "timeout", "skipped (budget)"
    processes: int
    wall_s: float = 0.0
    steps: int = 0
    step_s: float | None = None
    first_step_s: float | None = None
    peak_gib: float | None = None
    reserved_gib: float | None = None
    plan_gib: float | None = None  # `tether plan`'s estimate, which every run prints at its start
    rollout_s: float | None = None  # ppo, grpo: of a step, sampling (median after the first)
    final: str = ""  # FINAL_METRICS of the last step
    engine: str = ""  # part 3: rollout.engine
    gap_mean: float | None = None  # part 3: rollout/logprob_gap_mean, the mean over the steps
    gap_max: float | None = None  # part 3: rollout/logprob_gap_max, the largest of any step


@dataclass
class Comparison:
    case: str
    compared: str
    status: str  # "PASS", "FAIL: ...", "not run: ..."
    rows: int = 0
    metric_rel: float | None = None  # largest |a - b| / |a| over metrics with |a| >= 1e-3
    worst_metric: str = ""  # the metric closest to (or past) its tolerance, "key a -> b"
    weight_abs: float | None = None  # largest |a - b| over every final weight
    weight_check: str = ""  # the weight criterion and its value
    bitwise: bool = False
    details: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------


def child_env(device: str) -> dict[str, str]:
    """What every child process runs with: tether and tests importable from this checkout, no hub
    lookups (the machine has no network), one thread per CPU process (2 processes on 2 cores)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    return env


def launcher(processes: int, torchrun: bool = True) -> list[str]:
    """`torchrun --standalone --nproc_per_node=N`, through this interpreter; plain python for one process
    when asked (tests/test_distributed.py `launch` runs one-process jobs without torchrun)."""
    if not torchrun and processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]


def run_logged(command: list[str], log: Path, timeout_s: float, env: dict[str, str]) -> tuple[int | None, float]:
    """Run `command` with its output in `log`; (exit status or None on timeout, seconds). The command runs
    in a process group of its own, so a timeout ends it and every process it started, and nothing else."""
    started = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return process.wait(timeout=max(timeout_s, 1.0)), time.monotonic() - started
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                try:
                    os.killpg(process.pid, sig)
                    process.wait(timeout=grace)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
            return None, time.monotonic() - started


def tail(log: Path, lines: int = 60) -> str:
    text = log.read_text(errors="replace").splitlines() if log.is_file() else ["(no output)"]
    return "\n".join("    " + line for line in text[-lines:])


def worker(job_file: Path) -> None:
    """One process of a stage run: tether's command line in this process, then this process's peak
    memory into RUN_DIR/peak-rank<k>.json. os._exit, as tests/distributed_worker.py: gloo sometimes
    aborts while the interpreter shuts down after a complete run."""
    job = json.loads(job_file.read_text())
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    code = 1
    try:
        from tether.cli import main as tether_main

        code = tether_main([job["stage"], *job["overrides"], "--output", job["run_dir"]])
    except SystemExit as stop:  # argparse
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # noqa: B036 - any failure is reported through the exit status, with its traceback
        traceback.print_exc()
    import torch

    peak: dict[str, float] = {"exit": code}
    if job["device"] == "cuda" and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        peak["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        peak["reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    else:  # a CPU process: its peak resident set, what tether's memory/peak_gb logs on a CPU
        peak["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"peak-rank{rank}.json").write_text(json.dumps(peak))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --------------------------------------------------------------------------------------------
# Models and data, made here
# --------------------------------------------------------------------------------------------


def word_tokenizer(vocab_size: int) -> Any:
    """tests/tiny_models.py's word-level tokenizer with its vocabulary filled up to the model's."""
    from tests.tiny_models import make_tokenizer

    return make_tokenizer(vocab_size=vocab_size)


def build(folder: Path, shape_name: str, device: str) -> None:
    """The stage runs' model (a random-init Llama from a config, saved in bfloat16 as released
    checkpoints are; tether loads it as float32), the equivalence runs' tiny Llama (tests/tiny_models.py),
    and info.json: versions, GPUs, parameter count. In a child process, so that the check itself never
    holds a CUDA context while the stages run.

    Llama, not Qwen2 with the same shape: transformers loads a folder whose model_type is qwen2 with
    Qwen2Tokenizer, whose byte-level pre-tokenizer replaces the word-level one (every prompt would
    encode to nothing). The tokenizer is loaded back as tether loads it and checked before any run."""
    import peft
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import save_tiny_model

    shape = {"big": BIG, "small": SMALL}[shape_name]
    tokenizer = word_tokenizer(shape.vocab)
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    init_device = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
    with torch.device(init_device):  # 494M random numbers are drawn in a moment on a GPU
        model = LlamaForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    del model
    check_tokenizer(folder / "model")
    save_tiny_model(folder / "tiny-llama", "llama")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if device == "cuda" else []
    info = {
        "parameters": parameters,
        "shape": shape.__dict__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cuda": torch.version.cuda,
        "gpus": gpus,
    }
    (folder / "info.json").write_text(json.dumps(info))


def check_tokenizer(folder: Path) -> None:
    """The saved tokenizer, loaded as tether loads it, reads words as words and writes them back."""
    from tether.loading.models import load_tokenizer

    tokenizer = load_tokenizer(str(folder))
    ids = tokenizer("hello world w7 good", add_special_tokens=False).input_ids
    text = tokenizer.decode(ids)
    if len(ids) != 4 or text != "hello world w7 good":
        raise SystemExit(
            f"{folder}: the tokenizer loads as {type(tokenizer).__name__}, encoding words to {ids} ({text!r})"
        )


def write_data(folder: Path) -> dict[str, Path]:
    """Prompts, preference pairs and SFT examples of the tests' toy tasks (tests/test_ppo.py,
    test_rm.py, test_sft.py), and the reward functions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)

    def words(pool: list[str], low: int, high: int) -> list[str]:
        return [rng.choice(pool) for _ in range(rng.randint(low, high))]

    def pair() -> dict[str, str]:  # chosen holds "good", rejected "bad"; the bodies are drawn apart
        record = {"prompt": " ".join(words(PROMPT_WORDS, 2, 5))}
        for key, word in (("chosen", "good"), ("rejected", "bad")):
            body = words(BODY_WORDS, 2, 6)
            body.insert(rng.randint(0, len(body)), word)
            record[key] = " ".join(body)
        return record

    def example() -> dict[str, str]:
        prompt = words(PROMPT_WORDS, 2, 5)
        return {"prompt": " ".join(prompt), "response": f"the {prompt[-1]} is {rng.choice(COLOURS)} and good"}

    files = {
        "prompts": [{"prompt": " ".join(words(PROMPT_WORDS, 2, 6))} for _ in range(32)],
        "prefs-train": [pair() for _ in range(32)],
        "prefs-eval": [pair() for _ in range(16)],
        "sft-train": [example() for _ in range(64)],
        "sft-eval": [example() for _ in range(16)],
    }
    paths = {}
    for name, records in files.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    paths["reward"] = folder / "reward.py"
    paths["reward"].write_text(REWARD_FILE)
    return paths


# --------------------------------------------------------------------------------------------
# Part 1: every stage, sharded, bfloat16
# --------------------------------------------------------------------------------------------


def multiple(base: int, of: int) -> int:
    """The smallest multiple of `of` at least `base`: every process gets an equal share of a batch."""
    return max(1, math.ceil(base / of)) * of


def stage_overrides(stage: str, s: Settings, model: Path, data: dict[str, Path], engine: str = "") -> list[str]:
    """A few small steps of `stage`, every model sharded. Batches are multiples of the process count
    (model.fsdp refuses uneven shares); no step checkpoints but sft's last (a DCP save of a model and
    its optimizer state; the others would only write gigabytes), the final model always. With
    `engine` (part 3): one process, unsharded (rollout.engine=vllm refuses model.fsdp), sampled by it."""
    n = 1 if engine else s.nproc
    common = [f"model.name={model}", *([] if engine else ["model.fsdp=true"])]
    common += [f"model.dtype={s.dtype}", f"train.device={s.device}"]
    common += [f"train.steps={s.steps}", "train.lr=1e-5", f"train.save_every={s.steps if stage == 'sft' else 0}"]
    if s.device == "cpu":
        common.append("train.num_threads=1")
    if stage in ("sft", "rm", "dpo"):
        files = "sft" if stage == "sft" else "prefs"
        offline = [f"data.train={data[files + '-train']}", f"data.eval={data[files + '-eval']}"]
        offline += [f"train.batch_size={multiple(8, n)}", "train.micro_batch_size=4"]
        return [*common, *offline]
    prompts = multiple(8 if stage == "ppo" else 4, n)
    samples = 1 if stage == "ppo" else 4
    online = [f"data.prompts={data['prompts']}", f"data.eval={data['prompts']}"]
    online.append(f"reward.function={data['reward']}:word_length")
    online += [f"train.batch_size={prompts}", f"rollout.samples_per_prompt={samples}"]
    online += [f"rollout.max_new_tokens={s.max_new_tokens}", f"eval.num_prompts={multiple(8, n)}"]
    if stage == "ppo":
        online += [f"ppo.minibatch_size={prompts}", "ppo.epochs=2"]
    else:
        online += [f"grpo.minibatch_size={prompts * samples // 2}", "grpo.epochs=1"]
    return [*common, *online, *([f"rollout.engine={engine}"] if engine else [])]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_stage(stage: str, s: Settings, model: Path, data: dict[str, Path], engine: str = "") -> StageResult:
    """Part 1's run of `stage` (sharded over s.nproc processes), or with `engine` part 3's (one process)."""
    processes = 1 if engine else s.nproc
    result = StageResult(stage, "skipped (budget)", processes, engine=engine)
    timeout = min(s.stage_timeout_s, s.left() - s.reserve_s)
    if timeout < 20:
        return result
    name = f"{stage}-{engine}" if engine else stage
    run_dir = s.work / "stages" / name
    job = s.work / "stages" / f"{name}.json"
    job.parent.mkdir(parents=True, exist_ok=True)
    overrides = stage_overrides(stage, s, model, data, engine)
    job.write_text(json.dumps({"stage": stage, "run_dir": str(run_dir), "overrides": overrides, "device": s.device}))
    log = s.work / "stages" / f"{name}.log"
    command = f"tether {stage} {' '.join(overrides)}"
    print(f"[{name}] {processes} process(es), timeout {timeout:.0f} s: {command}", flush=True)
    code, result.wall_s = run_logged(
        [*launcher(processes, torchrun=not engine), __file__, "--worker", str(job)], log, timeout, child_env(s.device)
    )
    peaks = [json.loads(p.read_text()) for p in sorted(run_dir.glob("peak-rank*.json"))]
    rows = read_metrics(run_dir)
    result.steps = len(rows)
    times = [row["time/step_s"] for row in rows if "time/step_s" in row]
    if times:
        result.first_step_s = times[0]
        result.step_s = statistics.median(times[1:] or times)
    if peaks:
        result.peak_gib = max(p.get("peak_gib", 0.0) for p in peaks)
        reserved = [p["reserved_gib"] for p in peaks if "reserved_gib" in p]
        result.reserved_gib = max(reserved) if reserved else None
    estimate = re.search(r"estimated peak ([0-9.]+) GiB per process", log.read_text(errors="replace"))
    result.plan_gib = float(estimate.group(1)) if estimate else None
    sampling = [row["time/rollout_s"] for row in rows if "time/rollout_s" in row]
    if sampling:
        result.rollout_s = statistics.median(sampling[1:] or sampling)
    gaps = [row["rollout/logprob_gap_mean"] for row in rows if row.get("rollout/logprob_gap_mean") is not None]
    if gaps:
        result.gap_mean = statistics.mean(gaps)
        result.gap_max = max(row.get("rollout/logprob_gap_max", 0.0) for row in rows)
    if rows:
        shown = [(k, rows[-1][k]) for k in FINAL_METRICS[stage] if rows[-1].get(k) is not None]
        result.final = ", ".join(f"{k} {v:.4g}" for k, v in shown)
    complete = code == 0 or (peaks and len(peaks) == processes and all(p["exit"] == 0 for p in peaks))
    if code is None:
        result.status = "timeout"
    elif not (complete and result.steps == s.steps and (run_dir / "checkpoints" / "final").is_dir()):
        result.status = f"failed (exit {code}, {result.steps}/{s.steps} steps)"
    elif engine == "vllm" and (result.gap_mean is None or any(row.get("alarm/sampler_gap") for row in rows)):
        result.status = "failed (no gap logged)" if result.gap_mean is None else "failed (alarm/sampler_gap fired)"
    else:
        result.status = "ok"
    print(f"[{name}] {result.status} in {result.wall_s:.0f} s", flush=True)
    if result.status != "ok":
        print(f"[{name}] last lines of {log}:\n{tail(log)}", flush=True)
    # The final folders and sft's DCP checkpoint are gigabytes each: gone once read.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------------
# Part 2: the equivalence runs of tests/test_fsdp.py on this device
# --------------------------------------------------------------------------------------------


def equivalence_jobs(folder: Path, tag: str, model: Path, data: dict[str, Path], device: str, sharded: bool) -> list:
    """tests/test_fsdp.py's runs (every stage; rm and grpo with LoRA; ppo's value head with a replicated
    reference; sft and ppo in bfloat16), in tests/distributed_worker.py's job format, on `device`."""
    common = [f"model.name={model}", "train.lr_schedule=constant", "speed.shared_prefix=false", "train.lr=1e-3"]
    common.append(f"train.device={device}")
    offline = [*common, "train.batch_size=4", "train.micro_batch_size=2", "train.steps=2", "train.save_every=1"]
    offline += ["train.eval_every=1", f"data.train={data['prefs-train']}", f"data.eval={data['prefs-eval']}"]
    sft_data = [f"data.train={data['sft-train']}", f"data.eval={data['sft-eval']}"]
    online = [*common, f"data.prompts={data['prompts']}", f"data.eval={data['prompts']}", "train.batch_size=4"]
    online += ["rollout.samples_per_prompt=2", "rollout.max_new_tokens=6", "eval.num_prompts=2", "eval.every=2"]
    online += ["train.save_every=1", "train.micro_batch_size=4", f"reward.function={data['reward']}:good_share"]
    ppo = [*online, "ppo.minibatch_size=8", "ppo.epochs=2", "ppo.kl_target=1.0", "ppo.whiten_rewards=true"]
    ppo += ["train.max_grad_norm=null", "train.steps=2"]  # no clip: its coefficient from a sharded norm differs
    lora = "model.lora={r: 4, alpha: 8}"
    grpo = [*online, "grpo.minibatch_size=8", "grpo.epochs=2", lora, "train.steps=2"]
    fsdp = ["model.fsdp=true"] if sharded else []
    head = [*fsdp, "model.fsdp_frozen=replicate"] if sharded else []
    run = folder / tag
    return [
        ["sft", str(run / "sft"), [*offline, *sft_data, *fsdp], False],
        ["rm", str(run / "rm"), [*offline, lora, *fsdp], False],
        ["dpo", str(run / "dpo"), [*offline, *fsdp], False],
        ["ppo", str(run / "ppo"), [*ppo, *fsdp], False],
        ["ppo", str(run / "ppo-head"), [*ppo, "model.critic=head", *head], False],
        ["grpo", str(run / "grpo"), [*grpo, *fsdp], False],
        ["sft", str(run / "sft-bf16"), [*offline, *sft_data, "model.dtype=bfloat16", *fsdp], False],
        ["ppo", str(run / "ppo-bf16"), [*ppo, "model.dtype=bfloat16", *fsdp], False],
    ]


def launch_worker(jobs: list, folder: Path, tag: str, processes: int, s: Settings) -> str:
    """Run tests/distributed_worker.py on `jobs` as tests/test_distributed.py `launch` does; '' when
    every process finished its jobs, else why not."""
    timeout = min(s.stage_timeout_s * 2, s.left())
    if timeout < 20:
        return "skipped (budget)"
    jobs_file = folder / f"jobs-{tag}.json"
    jobs_file.write_text(json.dumps(jobs))
    log = folder / f"{tag}.log"
    command = [*launcher(processes, torchrun=False), str(WORKER), str(jobs_file)]
    print(f"[equivalence] {tag}: {processes} process(es), {len(jobs)} runs, timeout {timeout:.0f} s", flush=True)
    code, seconds = run_logged(command, log, timeout, child_env(s.device))
    # Every process marks the end of all its jobs; a non-zero exit with every marker is gloo aborting at exit.
    finished = all(Path(f"{jobs_file}.done-rank{rank}").is_file() for rank in range(processes))
    why = "" if code == 0 or finished else ("timeout" if code is None else f"exit {code}")
    print(f"[equivalence] {tag}: {why or 'done'} in {seconds:.0f} s", flush=True)
    if why:
        print(f"[equivalence] last lines of {log}:\n{tail(log)}", flush=True)
    return why


def final_weights(run: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    final = run / "checkpoints" / "final"
    weights = {}
    for file in sorted(final.rglob("*.safetensors")):
        for name, tensor in load_file(file).items():
            weights[f"{file.relative_to(final)}:{name}"] = tensor.float()
    return weights


def compare(case: str, compared: str, a: Path, b: Path, dtype: str, start: dict[str, Any]) -> Comparison:
    """Run b against run a (the plain one): every metric but the clocks and memory, and every final weight."""
    import torch

    result = Comparison(case, compared, "PASS")
    tol = TOLERANCES[dtype]
    ma, mb = read_metrics(a), read_metrics(b)
    result.rows = len(ma)
    if not ma or len(ma) != len(mb):
        result.status = f"FAIL: {len(ma)} metric rows against {len(mb)}"
        return result
    worst, rel = -1.0, 0.0
    for row_a, row_b in zip(ma, mb, strict=True):
        keys = {k for k in row_a if not k.startswith(NONDETERMINISTIC)}
        other = {k for k in row_b if not k.startswith(NONDETERMINISTIC)}
        if keys != other:
            result.details.append(f"step {row_a['step']}: keys differ: {sorted(keys ^ other)}")
        for key in sorted(keys & other):
            x, y = row_a[key], row_b[key]
            if x is None or y is None:  # a non-finite value, logged as null: equal only to another null
                if x is not y:
                    result.details.append(f"step {row_a['step']} {key}: {x} -> {y}")
                continue
            gap = abs(x - y)
            if abs(x) >= 1e-3:
                rel = max(rel, gap / abs(x))
            share = gap / max(tol["metric_rel"] * abs(x), tol["metric_abs"])  # > 1: past the tolerance
            if share > worst:
                worst, result.worst_metric = share, f"{key} {x:.6g} -> {y:.6g}"
            if share > 1:
                result.details.append(f"step {row_a['step']} {key}: {x!r} -> {y!r}")
    result.metric_rel = rel
    wa, wb = final_weights(a), final_weights(b)
    if not wa or wa.keys() != wb.keys():
        result.status = f"FAIL: final weights differ in names ({len(wa)} against {len(wb)} tensors)"
        return result
    result.bitwise = all(torch.equal(wa[k], wb[k]) for k in wa) and all(
        {k: v for k, v in ra.items() if not k.startswith(NONDETERMINISTIC)}
        == {k: v for k, v in rb.items() if not k.startswith(NONDETERMINISTIC)}
        for ra, rb in zip(ma, mb, strict=True)
    )
    result.weight_abs = max(float((wa[k] - wb[k]).abs().max()) if wa[k].numel() else 0.0 for k in wa)
    if dtype == "float32":
        excess = max(
            float(((wa[k] - wb[k]).abs() - tol["weight_atol"] - tol["weight_rtol"] * wa[k].abs()).max())
            for k in wa
            if wa[k].numel()
        )
        result.weight_check = "within tolerance" if excess <= 0 else f"past tolerance by {excess:.3g}"
        if excess > 0:
            result.details.append(f"a final weight is past atol + rtol * abs(w) by {excess:.3g}")
    else:  # tests/test_fsdp.py: apart / moved, the weights moved from the start (or from 0 for a new tensor)
        apart = moved = 0.0
        for key, x in wa.items():
            origin = start.get(key.split(":", 1)[1])
            origin = origin.float() if origin is not None and origin.shape == x.shape else torch.zeros_like(x)
            apart += float((x - wb[key]).pow(2).sum())
            moved += float((x - origin).pow(2).sum())
        share = (apart / moved) ** 0.5 if moved > 0 else math.inf
        result.weight_check = f"apart/moved = {share:.3f} (< {tol['moved_share']:g})"
        if not share < tol["moved_share"]:
            result.details.append(f"the weights are apart by {share:.3f} of how far they moved")
    if result.details:
        result.status = "FAIL: " + "; ".join(result.details[:3])
    return result


def run_equivalence(s: Settings, tiny: Path, data: dict[str, Path]) -> list[Comparison]:
    """A plain process, one sharded process and (with two devices or on CPU) two sharded processes, on
    the same jobs; each sharded run compared with the plain one."""
    from safetensors.torch import load_file

    folder = s.work / "equivalence"
    folder.mkdir(parents=True, exist_ok=True)
    two = s.device == "cpu" or s.nproc >= 2  # NCCL ranks cannot share one GPU
    launches = [("plain", 1, False), ("fsdp-1", 1, True)] + ([("fsdp-2", 2, True)] if two else [])
    failed = {}
    for tag, processes, sharded in launches:
        why = launch_worker(equivalence_jobs(folder, tag, tiny, data, s.device, sharded), folder, tag, processes, s)
        if why:
            failed[tag] = why
    start = load_file(tiny / "model.safetensors")
    results = []
    plain_jobs = equivalence_jobs(folder, "plain", tiny, data, s.device, False)
    for tag, processes, _ in launches[1:]:
        compared = f"1 plain vs {processes} sharded"
        for _, run_dir, overrides, _ in plain_jobs:
            case = Path(run_dir).name
            if "plain" in failed or tag in failed:
                results.append(Comparison(case, compared, f"not run: {failed.get('plain') or failed[tag]}"))
                continue
            dtype = "bfloat16" if "model.dtype=bfloat16" in overrides else "float32"
            results.append(compare(case, compared, Path(run_dir), folder / tag / case, dtype, start))
    if not two:
        results.append(Comparison("all", "1 plain vs 2 sharded", "not run: one GPU (two NCCL ranks need two)"))
    return results


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(s: Settings, info: dict[str, Any], stages: list[StageResult], comparisons: list[Comparison]) -> str:
    gpus = ", ".join(info.get("gpus") or []) or "none (CPU processes, gloo)"
    lines = [
        "# model.fsdp and rollout.engine=vllm check",
        "",
        f"- device: {s.device}; GPUs: {gpus}",
        f"- torch {info.get('torch')} (CUDA {info.get('cuda')}), transformers {info.get('transformers')}, "
        f"peft {info.get('peft')}",
        f"- stage model: random-init Llama, {info.get('parameters', 0):,} parameters "
        f"({', '.join(f'{k} {v}' for k, v in info.get('shape', {}).items())}), model.dtype={s.dtype}, "
        f"{s.steps} steps per stage, rollout.max_new_tokens={s.max_new_tokens}",
        "",
    ]
    if "stages" in s.parts:
        parallel = [r for r in stages if not r.engine]
        memory = "peak GPU memory GiB (allocated / reserved)" if s.device == "cuda" else "peak RSS GiB"
        lines += [
            f"| stage | processes | status | steps | s/step (median after the first) | first step s | {memory} "
            "| tether plan's estimate GiB | of a step, sampling s | last step | wall s |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
        ]
        for r in parallel:
            peak = number(r.peak_gib) + (f" / {number(r.reserved_gib)}" if r.reserved_gib is not None else "")
            lines.append(
                f"| {r.stage} | {r.processes} | {r.status} | {r.steps} | {number(r.step_s)} | "
                f"{number(r.first_step_s)} | {peak} | {number(r.plan_gib)} | {number(r.rollout_s)} | "
                f"{r.final or '-'} | {r.wall_s:.0f} |"
            )
        if s.nproc > 1:
            group = f"{'NCCL' if s.device == 'cuda' else 'gloo'} between the {s.nproc} processes"
        else:  # torchrun with one process sets up no group: tether/engines/fsdp.py `_mesh` makes one
            group = "one process, in the one-process gloo group of tether/engines/fsdp.py `_mesh`"
        lines += [
            "",
            "Peak memory: the largest over the processes, over the whole run (loading, steps, final "
            "evaluation, the final save); tether's estimate is the one every run prints at its start. "
            f"s/step: metrics.jsonl's time/step_s. Process group: {group}.",
            "",
        ]
    if "vllm" in s.parts:
        engines = [r for r in stages if r.engine]
        if not info.get("vllm"):
            lines += ["vLLM: not installed in this environment; part 3 did not run.", ""]
        elif not engines:
            lines += ["vLLM: --stages names neither ppo nor grpo; part 3 did not run.", ""]
        else:
            lines += [
                "| stage | rollout.engine | status | steps | s/step | of a step, sampling s | gap mean | gap max "
                "| last step |",
                "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
            ]
            for r in engines:
                gap_mean = "-" if r.gap_mean is None else f"{r.gap_mean:.2e}"
                gap_max = "-" if r.gap_max is None else f"{r.gap_max:.2e}"
                lines.append(
                    f"| {r.stage} | {r.engine} | {r.status} | {r.steps} | {number(r.step_s)} | {number(r.rollout_s)} "
                    f"| {gap_mean} | {gap_max} | {r.final or '-'} |"
                )
            lines += [
                "",
                "One process, no FSDP. Gap: the sampler's log-prob of each sampled token against the trainer's "
                "recomputation, nats per token; a vLLM run fails where its alarm/sampler_gap fired (mean gap "
                "over alarms.sampler_gap).",
                "",
            ]
    if "equivalence" in s.parts:
        f32, bf16 = TOLERANCES["float32"], TOLERANCES["bfloat16"]
        lines += [
            "| run | compared | status | rows | max rel Δ metric | closest to tolerance | max abs Δ weight "
            "| weights | bitwise |",
            "| --- | --- | --- | ---: | ---: | --- | ---: | --- | --- |",
        ]
        for c in comparisons:
            lines.append(
                f"| {c.case} | {c.compared} | {c.status} | {c.rows} | {number(c.metric_rel, 8) if c.rows else '-'} | "
                f"{c.worst_metric or '-'} | {'-' if c.weight_abs is None else f'{c.weight_abs:.3g}'} | "
                f"{c.weight_check or '-'} | {'yes' if c.bitwise else 'no'} |"
            )
        lines += [
            "",
            f"Tolerances. float32: every metric within max({f32['metric_rel']:g} * |plain|, {f32['metric_abs']:g}) "
            f"and every final weight within {f32['weight_atol']:g} + {f32['weight_rtol']:g} * |plain| "
            "(tests/test_distributed.py's); bfloat16 (FSDP mixed precision against plain autocast): metrics "
            f"within max({bf16['metric_rel']:g} * |plain|, {bf16['metric_abs']:g}), weights apart by under "
            f"{bf16['moved_share']:g} of how far they moved (tests/test_fsdp.py's). Max rel Δ: over metrics "
            "with |plain| >= 1e-3; the clocks and memory (time/, throughput/, memory/) are not compared. "
            "Bitwise: every compared metric and every final weight equal; a sharded gradient norm may differ "
            "in its last bit, and where train.max_grad_norm clips, so may the weights (tests/test_fsdp.py).",
            "",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The check, and the import probe of scripts/gpu_check.sh
# --------------------------------------------------------------------------------------------


def missing_imports() -> int:
    """Print `MISSING name` for each module tether's entry points need and this Python lacks, then exit 3
    (0: all there). A missing module is stood in for by an empty stub and the imports are tried again,
    so one probe names them all, not only the first; torch, transformers and peft are never stubbed."""
    import importlib
    import importlib.abc
    import importlib.machinery
    import types

    stubbed: list[str] = []

    class Anything(type):
        """What a stub's names are: classes (to subclass, call, decorate with) whose attributes are more of them."""

        def __getattr__(cls, name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            return Anything.make(name)

        @staticmethod
        def make(name: str) -> Any:
            return Anything(name, (), {"__init__": lambda self, *a, **k: None, "__call__": lambda self, *a, **k: self})

    class Stub(types.ModuleType):
        __path__: list[str] = []  # a package: its submodules are stubs too
        __version__ = "999"  # torch.utils.tensorboard checks its version

        def __getattr__(self, name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            return Anything.make(name)

    class Loader(importlib.abc.Loader):
        def create_module(self, spec: Any) -> Any:
            return Stub(spec.name)

        def exec_module(self, module: Any) -> None:
            pass

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
            if fullname.partition(".")[0] in stubbed:
                return importlib.machinery.ModuleSpec(fullname, Loader(), is_package=True)
            return None

    sys.meta_path.insert(0, Finder())
    note = ""
    for _ in range(30):
        try:
            for name in ENTRY_MODULES:
                importlib.import_module(name)
            break
        except ModuleNotFoundError as err:
            top = (err.name or "").partition(".")[0]
            if not top or top in stubbed or top in PREINSTALLED or top == "tether":
                print(f"ERROR {err!r}")
                return 4
            stubbed.append(top)
            for name in [m for m in sys.modules if m == "tether" or m.startswith("tether.")]:
                del sys.modules[name]
        except Exception as err:  # past a stub: a consequence of it (or a real error, shown once they are installed)
            if not stubbed:
                traceback.print_exc()
                print(f"ERROR {err!r}")
                return 4
            note = f"NOTE the imports stopped at {err!r} past the stubs; more may be missing"
            break
    for name in stubbed:
        print(f"MISSING {name} {PIP_NAMES.get(name, name)}")
    if note:
        print(note)
    return 3 if stubbed else 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--small", action="store_true", help="a tiny model and 2 steps per stage (the script's path)")
    parser.add_argument("--nproc", type=int, help="processes per stage run (default: the GPU count; on a CPU 2)")
    parser.add_argument(
        "--dtype", choices=["bfloat16", "float32"], help="stage runs (default: cuda bfloat16, cpu float32)"
    )
    parser.add_argument("--steps", type=int, help="steps per stage (default 4; --small 2)")
    parser.add_argument(
        "--max-new-tokens", type=int, help="rollout.max_new_tokens of ppo and grpo (default 32; --small 8)"
    )
    parser.add_argument("--budget-s", type=float, help="the whole check's limit (default: cuda 420 s, cpu 1200 s)")
    parser.add_argument("--stage-timeout-s", type=float, help="one stage run's limit (default: cuda 150 s, cpu 400 s)")
    parser.add_argument("--parts", default="stages,equivalence,vllm", help="comma-separated: stages, equivalence, vllm")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated, of " + ", ".join(STAGES))
    parser.add_argument("--work", type=Path, help="keep the runs in this folder (default: a temporary one, removed)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=["big", "small"], default="big", help=argparse.SUPPRESS)
    parser.add_argument("--missing-imports", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def check(args: argparse.Namespace) -> int:
    started = time.monotonic()
    cpu = args.device == "cpu"
    if args.nproc:
        nproc = args.nproc
    elif cpu:
        nproc = 2
    else:  # the count without initialising CUDA here: the check process itself holds no GPU memory
        import torch

        nproc = torch.cuda.device_count()
        if nproc == 0:
            print("gpu_check: no CUDA device is visible; run `bash scripts/gpu_check.sh --device cpu --small`")
            return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="tether-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    s = Settings(
        device=args.device,
        nproc=nproc,
        dtype=args.dtype or ("float32" if cpu else "bfloat16"),  # bfloat16 matmuls are very slow on a CPU
        steps=args.steps or (2 if args.small else 4),
        max_new_tokens=args.max_new_tokens or (8 if args.small else 32),
        shape=SMALL if args.small else BIG,
        stage_timeout_s=args.stage_timeout_s or (400.0 if cpu else 150.0),
        deadline=started + (args.budget_s or (1200.0 if cpu else 420.0)),
        # On one GPU the two equivalence launches take about a minute and a half; the stages leave them that.
        reserve_s=150.0 if not cpu and "equivalence" in args.parts else 0.0,
        work=work,
        parts=tuple(p.strip() for p in args.parts.split(",") if p.strip()),
        stages=tuple(p.strip() for p in args.stages.split(",") if p.strip()),
    )
    unknown = sorted(set(s.parts) - {"stages", "equivalence", "vllm"}) + sorted(set(s.stages) - set(STAGES))
    if unknown:
        print(f"gpu_check: unknown --parts or --stages: {', '.join(unknown)}")
        return 2
    print(f"gpu_check: {s.device}, {s.nproc} process(es), {s.dtype}, runs in {work}", flush=True)
    try:
        data = write_data(work / "data")
        log = work / "build.log"
        shape = "small" if args.small else "big"
        code, seconds = run_logged(
            [sys.executable, __file__, "--build", str(work), "--shape", shape, "--device", s.device],
            log,
            min(300.0, s.left()),
            child_env(s.device),
        )
        if code != 0:
            print(f"gpu_check: building the models failed (exit {code}):\n{tail(log)}")
            return 1
        info = json.loads((work / "info.json").read_text())
        print(f"gpu_check: models built in {seconds:.0f} s ({info['parameters']:,} parameters)", flush=True)
        stages = [run_stage(stage, s, work / "model", data) for stage in s.stages] if "stages" in s.parts else []
        info["vllm"] = importlib.util.find_spec("vllm") is not None  # found, not imported: seconds saved
        if "vllm" in s.parts and info["vllm"]:
            stages += [
                run_stage(stage, s, work / "model", data, engine)
                for stage in ("ppo", "grpo")
                if stage in s.stages
                for engine in ("hf", "vllm")
            ]
        comparisons = run_equivalence(s, work / "tiny-llama", data) if "equivalence" in s.parts else []
        text = report(s, info, stages, comparisons)
        total = time.monotonic() - started
        text += f"\nWhole check: {total:.0f} s (budget {s.deadline - started:.0f} s).\n"
        print("\n" + text, flush=True)
        out = os.environ.get("OUT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "gpu_check.md").write_text(text)
            numbers = {
                "info": info,
                "stages": [r.__dict__ for r in stages],
                "equivalence": [c.__dict__ for c in comparisons],
            }
            (Path(out) / "gpu_check.json").write_text(json.dumps(numbers, indent=1))
        good = all(r.status == "ok" for r in stages) and all(
            c.status == "PASS" or c.status.startswith("not run: one GPU") for c in comparisons
        )
        return 0 if good else 1
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.missing_imports:
        return missing_imports()
    if args.worker:
        worker(args.worker)  # leaves with os._exit
    if args.build:
        build(args.build, args.shape, args.device)
        return 0
    return check(args)


if __name__ == "__main__":
    raise SystemExit(main())
