"""`tether ppo` through the command line: the run directory of docs/run-directory.md, every metric key,
checkpoints that load back to identical outputs, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tests.test_ppo import PROMPTS, REWARD_FILE
from tether.run.log import read_jsonl

CONTRACT_METRICS = [
    "step",
    "objective/scores",
    "objective/scores_std",
    "objective/kl",
    "objective/kl_coef",
    "objective/rlhf_reward",
    "objective/entropy",
    "loss/policy",
    "loss/value",
    "policy/clipfrac",
    "policy/approxkl",
    "val/clipfrac",
    "val/explained_variance",
    "response/length_mean",
    "response/eos_frac",
    "time/rollout_s",
    "time/train_s",
    "time/step_s",
    "throughput/tokens_per_s",
]


def run_tether(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tether", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture
def config_file(tmp_path: Path, tiny_llama: Path) -> Path:
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    config = {
        "model": {"name": str(tiny_llama)},
        "data": {"prompts": str(tmp_path / "prompts.jsonl"), "eval": str(tmp_path / "prompts.jsonl")},
        "reward": {
            "function": f"{tmp_path / 'reward.py'}:good_share",
            "gold": f"{tmp_path / 'reward.py'}:good_share",
        },
        "rollout": {"max_new_tokens": 6, "samples_per_prompt": 2},
        "train": {"steps": 4, "batch_size": 4, "save_every": 2, "sample_every": 2, "lr": 1e-3},
        "ppo": {"epochs": 2, "minibatch_size": 4},
        "eval": {"num_prompts": 2},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("lora", [False, True])
def test_ppo_cli_writes_the_contract_run_directory(config_file: Path, tmp_path: Path, lora: bool):
    run = tmp_path / "run"
    extra = ["model.lora={r: 4, alpha: 8}"] if lora else []
    result = run_tether("ppo", "--config", str(config_file), *extra, "--output", str(run), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 4 and resolved["ppo"]["kl_coef"] == 0.05  # defaults included

    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in CONTRACT_METRICS + ["objective/gold_scores"]:
        assert all(key in r for r in rows), f"metric {key} missing"
    samples = read_jsonl(run / "samples.jsonl")
    assert {s["step"] for s in samples} == {1, 2, 4} and len(samples) == 3 * 8
    assert {"prompt", "response", "score", "finished", "length"} <= samples[0].keys()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "report.md").is_file()
    evaluation = json.loads((run / "eval" / "eval.json").read_text())
    assert list(evaluation["results"]) == ["start", "final"] and evaluation["settings"]["prompts"] == 2

    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["final", "step-000002", "step-000004"]
    assert (run / "checkpoints" / "step-000002" / "trainer_state.pt").is_file()

    # Hugging Face format: plain transformers (+ peft for an adapter) loads what tether saved.
    final = run / "checkpoints" / "final"
    if lora:
        assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
        base_name = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_name), str(final))
        assert (final / "value" / "adapter_config.json").is_file()
    else:
        model = AutoModelForCausalLM.from_pretrained(final)
        value = AutoModelForSequenceClassification.from_pretrained(final / "value")
        assert value.config.num_labels == 1
    probe = torch.tensor([[4, 28, 29, 5, 10, 11, 12, 3]])  # "<|user|> hello world <|assistant|> ..."
    with torch.no_grad():
        assert torch.isfinite(model(probe).logits).all()


def test_an_existing_run_is_never_overwritten_silently(config_file: Path, tmp_path: Path):
    run = tmp_path / "run"
    first = run_tether("ppo", "--config", str(config_file), "train.steps=2", "--output", str(run), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_tether("ppo", "--config", str(config_file), "train.steps=2", "--output", str(run), cwd=tmp_path)
    assert again.returncode == 2 and "--resume" in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    # --resume with more steps extends the finished run from its last step checkpoint.
    more = run_tether("ppo", "--resume", "train.steps=3", "--output", str(run), cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["ppo.kl_cof=0.1"], "did you mean 'ppo.kl_coef'"),
        (["train.lr=-1"], "train.lr must be"),
        (["ppo.minibatch_size=3"], "ppo.minibatch_size=3 must divide"),
        (["model.name=/no/such/model"], "/no/such/model"),
        (["data.prompts=/no/such/file.jsonl"], "/no/such/file.jsonl does not exist"),
        (["reward.function=/no/such.py:f"], "/no/such.py"),
    ],
)
def test_bad_input_is_a_clear_error_without_traceback(config_file: Path, tmp_path: Path, args, expected):
    result = run_tether("ppo", "--config", str(config_file), *args, "--output", str(tmp_path / "r"), cwd=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_print_config_shows_resolved_defaults(tmp_path: Path):
    result = run_tether("ppo", "--print-config", "reward.function=tether.reward_functions:concise", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["ppo"]["clip_coef"] == 0.2 and printed["reward"]["function"] == "tether.reward_functions:concise"


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo", "dpo", "grpo"])
def test_print_config_prints_every_stages_defaults_and_what_is_still_to_set(stage: str):
    """How a user learns the keys: on the bare defaults it prints the whole resolved config, exit 0,
    with a note for what a run still needs (ppo and grpo: a reward source)."""
    import contextlib
    import io

    from tether.cli import STAGES, main
    from tether.config import config_to_dict

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([stage, "--print-config"]) == 0
    printed = yaml.safe_load(out.getvalue())
    assert printed == config_to_dict(STAGES[stage]())
    notes = [line for line in out.getvalue().splitlines() if line.startswith("# still to set")]
    assert bool(notes) == (stage in ("ppo", "grpo"))
    assert all("reward.model" in n and "reward.function" in n for n in notes)
