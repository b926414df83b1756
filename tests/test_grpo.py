"""The GRPO loop on a tiny random model: first-step invariants, split-independent updates, exact
resume, the CLI's run directory (no value model), and a run in which the rule-based reward must rise."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.test_cli import run_tether
from tests.test_ppo import NONDETERMINISTIC, PROMPTS, REWARD_FILE
from tether.config import ConfigError, GRPOConfig, load_config
from tether.run.log import read_jsonl
from tether.stages.grpo import GRPOTrainer


@pytest.fixture
def task(tmp_path: Path) -> Path:
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return tmp_path


def grpo_config(model: Path, task: Path, *overrides: str) -> GRPOConfig:
    return load_config(
        GRPOConfig,
        None,
        [
            f"model.name={model}",
            f"reward.function={task / 'reward.py'}:good_share",
            f"data.prompts={task / 'prompts.jsonl'}",
            f"data.eval={task / 'prompts.jsonl'}",
            "train.batch_size=2",
            "rollout.samples_per_prompt=4",
            "grpo.minibatch_size=8",
            "rollout.max_new_tokens=8",
            "train.sample_every=0",
            "train.save_every=0",
            "eval.num_prompts=2",
            *overrides,
        ],
    )


def _deterministic(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(NONDETERMINISTIC)} for row in rows]


@pytest.mark.parametrize("lora", [False, True])
def test_first_minibatch_has_ratio_one_and_zero_kl(tiny_llama, task, lora):
    """At the first step the policy is the reference: KL 0 (logged and in the loss), ratio 1."""
    overrides = ["train.steps=1"] + (["model.lora={r: 4, alpha: 8}"] if lora else [])
    trainer = GRPOTrainer(grpo_config(tiny_llama, task, *overrides), task / "run")
    metrics, samples = trainer.iteration()
    assert metrics["objective/kl"] == 0.0
    assert metrics["loss/kl"] == 0.0 and metrics["policy/ref_kl"] == 0.0
    assert abs(metrics["policy/ratio_mean"] - 1.0) < 1e-6
    assert metrics["policy/clipfrac"] == 0.0
    assert len(samples) == 8  # 2 prompts x a group of 4
    assert "loss/value" not in metrics and "val/explained_variance" not in metrics


def test_the_loss_is_the_group_advantage_weighted_log_prob_at_ratio_one(tiny_llama, task):
    """With one epoch of one minibatch, kl_coef 0 and ratio 1, the logged policy loss must be minus
    the token mean of the group advantages: recompute it from the logged samples by hand."""
    config = grpo_config(tiny_llama, task, "train.steps=1", "grpo.kl_coef=0", "train.sample_every=1")
    trainer = GRPOTrainer(config, task / "run")
    metrics, samples = trainer.iteration()
    by_prompt: dict[str, list[float]] = {}
    for row in samples:
        by_prompt.setdefault(row["prompt"], []).append(row["score"])
    token_sum = 0.0
    for row in samples:
        group = torch.tensor(by_prompt[row["prompt"]])
        advantage = (row["score"] - float(group.mean())) / (float(group.std()) + 1e-4)
        token_sum += advantage * row["length"]
    expected = -token_sum / sum(row["length"] for row in samples)
    assert metrics["loss/policy"] == pytest.approx(expected, abs=1e-5)
    assert "loss/kl" not in metrics


def test_update_does_not_depend_on_the_micro_batch_split(tiny_llama, task):
    weights = {}
    for micro in (8, 2):
        config = grpo_config(
            tiny_llama, task, "train.steps=1", "grpo.epochs=2", f"train.micro_batch_size={micro}", "train.lr=1e-3"
        )
        trainer = GRPOTrainer(config, task / f"run-{micro}")
        trainer.iteration()
        weights[micro] = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    for name, tensor in weights[8].items():
        torch.testing.assert_close(weights[2][name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_reward_rises_while_kl_stays_bounded(tiny_llama, task):
    """'It learns': the share of the word 'good' (about 1/40 by chance) must rise clearly, with no
    critic at all: the only baseline is the group."""
    config = grpo_config(
        tiny_llama,
        task,
        "train.steps=30",
        "train.lr=3e-3",
        "train.lr_schedule=constant",
        "rollout.missing_eos_penalty=null",
        "train.batch_size=4",
        "grpo.minibatch_size=16",
        "eval.num_prompts=0",
    )
    GRPOTrainer(config, task / "run").train()
    rows = read_jsonl(task / "run" / "metrics.jsonl")
    scores = [r["objective/function_scores"] for r in rows]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert first < 0.1, f"the task should start hard, got {first:.3f}"
    assert last > first + 0.2, f"reward did not rise: {first:.3f} -> {last:.3f}"
    kls = [r["objective/kl"] for r in rows]
    assert all(abs(k) < 20.0 for k in kls), f"KL ran away: max {max(kls):.2f}"


def test_resume_matches_an_uninterrupted_run(tiny_llama, task, monkeypatch):
    overrides = ["train.steps=4", "train.save_every=2", "train.lr=1e-3", "eval.num_prompts=0", "grpo.kl_in=reward"]
    assert_resume_is_exact(
        lambda run, resume: GRPOTrainer(grpo_config(tiny_llama, task, *overrides), run, resume=resume),
        task,
        monkeypatch,
    )


def assert_resume_is_exact(make_trainer: Callable[[Path, bool], Any], folder: Path, monkeypatch) -> None:
    """A 4-step run interrupted in step 4 (its last checkpoint: step 2) and resumed equals the
    uninterrupted run: every deterministic metric of every step, and the final weights bit for bit.
    make_trainer(run directory, resume) builds the stage's trainer with save_every=2."""
    make_trainer(folder / "straight", False).train()
    interrupted = make_trainer(folder / "resumed", False)
    real_iteration = interrupted.iteration

    def iteration_then_crash():
        if interrupted.run.step > 3:
            raise KeyboardInterrupt
        return real_iteration()

    monkeypatch.setattr(interrupted, "iteration", iteration_then_crash)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    resumed = make_trainer(folder / "resumed", True)
    assert resumed.run.step == 2
    resumed.train()
    straight_rows = read_jsonl(folder / "straight" / "metrics.jsonl")
    resumed_rows = read_jsonl(folder / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4]
    assert _deterministic(resumed_rows) == _deterministic(straight_rows)
    assert_same_final_weights(folder / "straight", folder / "resumed")


def assert_same_final_weights(run_a: Path, run_b: Path) -> None:
    """Both runs' final folders hold the same weight files (LoRA adapters, value heads included),
    equal bit for bit."""
    final_a, final_b = run_a / "checkpoints" / "final", run_b / "checkpoints" / "final"
    files = sorted(str(p.relative_to(final_a)) for p in final_a.rglob("*.safetensors"))
    assert files, f"no weights in {final_a}: nothing compared"
    assert files == sorted(str(p.relative_to(final_b)) for p in final_b.rglob("*.safetensors"))
    for name in files:
        a, b = load_file(final_a / name), load_file(final_b / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_grpo_cli_writes_the_run_directory_and_eval_reads_it(tiny_llama, tmp_path):
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    config = {
        "model": {"name": str(tiny_llama), "lora": {"r": 4, "alpha": 8}},
        "data": {"prompts": str(tmp_path / "prompts.jsonl"), "eval": str(tmp_path / "prompts.jsonl")},
        "reward": {"function": f"{tmp_path / 'reward.py'}:good_share"},
        "rollout": {"max_new_tokens": 6, "samples_per_prompt": 2},
        "train": {"steps": 2, "batch_size": 2, "save_every": 1, "sample_every": 1, "lr": 1e-3},
        "grpo": {"minibatch_size": 2},
        "eval": {"num_prompts": 2},
    }
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    result = run_tether("grpo", "--config", str(tmp_path / "grpo.yaml"), "--output", str(run), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["grpo"]["kl_coef"] == 0.04 and "ppo" not in resolved
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("objective/scores", "objective/kl", "loss/policy", "loss/kl", "policy/clipfrac", "grpo/zero_std_frac"):
        assert all(key in r for r in rows), key
    assert len(read_jsonl(run / "samples.jsonl")) == 2 * 4  # two logged steps of 2 prompts x 2
    final = run / "checkpoints" / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "value").exists()
    assert (run / "checkpoints" / "step-000002" / "trainer_state.pt").is_file()
    assert (run / "eval" / "eval.json").is_file() and (run / "report.md").is_file()
    assert any((run / "tb").iterdir())

    # tether eval reads a grpo run's own config (a grpo section, no ppo section) and, with the same
    # fixed eval settings, gives the final model exactly the answers the run's own report gave it.
    judged = tmp_path / "judged"
    result = run_tether("eval", str(run), "--output", str(judged), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads((judged / "eval.json").read_text())
    own = json.loads((run / "eval" / "eval.json").read_text())
    assert list(document["results"]) == ["start", "run"]
    responses = [s["response"] for s in document["results"]["run"]["samples"]]
    assert responses == [s["response"] for s in own["results"]["final"]["samples"]]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rollout.samples_per_prompt=1", "at least 2"),
        ("model.value_model=somewhere", "no value model"),
        ("model.critic=head", "grpo has no critic"),
        ("grpo.kl_in=both", "grpo.kl_in"),
        ("grpo.minibatch_size=3", "must divide"),
        ("ppo.epochs=2", "unknown config key"),
    ],
)
def test_bad_grpo_settings_are_refused_by_name(tiny_llama, task, override, message):
    with pytest.raises(ConfigError, match=message):
        grpo_config(tiny_llama, task, override)
