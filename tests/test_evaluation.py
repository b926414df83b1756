"""Evaluation on the fixed eval set (tiny models): fixed seeded outputs, KL and win rate against
the starting model, periodic eval inside training, `tether eval`, and alarms during a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_ppo import NONDETERMINISTIC, PROMPTS, REWARD_FILE, tiny_config
from tether.cli import main
from tether.evaluation.runner import START, add_win_rates, build_evaluator
from tether.run.log import read_jsonl
from tether.stages.ppo import PPOTrainer


@pytest.fixture
def task(tmp_path: Path) -> Path:
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return tmp_path


def test_the_same_model_gives_the_same_outputs_and_leaves_the_callers_rng_alone(tiny_llama, task):
    evaluator = build_evaluator(tiny_config(tiny_llama, task, "eval.num_prompts=6"))
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    with evaluator.reference.as_model() as model:
        first = evaluator.evaluate(model, "a")
        second = evaluator.evaluate(model, "b")
    assert torch.equal(torch.rand(3), expected_next), "evaluation consumed the caller's random numbers"
    assert [s["response"] for s in first["samples"]] == [s["response"] for s in second["samples"]]
    assert len(first["samples"]) == 6


def test_the_starting_model_against_itself_has_zero_kl_and_only_ties(tiny_llama, task):
    evaluator = build_evaluator(tiny_config(tiny_llama, task, "eval.num_prompts=8"))
    with evaluator.reference.as_model() as model:
        results = {START: evaluator.evaluate(model, START), "copy": evaluator.evaluate(model, "copy")}
    add_win_rates(results, START, tie_margin=0.0)
    assert results["copy"]["kl"]["mean"] == 0.0 and results["copy"]["kl"]["max"] == 0.0
    assert results["copy"]["win_rate"] == {"vs": START, "wins": 0, "ties": 8, "losses": 0, "rate": 0.5}
    # Every reward source is reported with its spread, next to the length, EOS and diversity numbers.
    result = results[START]
    assert set(result["scores"]) == {"reward", "function"}
    assert {"mean", "std", "min", "max"} <= result["scores"]["function"].keys()
    assert 0.0 <= result["distinct_2"] <= 1.0 and 0.0 <= result["self_similarity"] <= 1.0
    assert result["length"]["mean"] == pytest.approx(sum(s["length"] for s in result["samples"]) / 8)


def test_greedy_eval_reports_no_kl(tiny_llama, task):
    evaluator = build_evaluator(tiny_config(tiny_llama, task, "eval.num_prompts=2", "eval.temperature=0"))
    with evaluator.reference.as_model() as model:
        assert evaluator.evaluate(model, START)["kl"] is None


def test_periodic_eval_inside_training_logs_eval_metrics_and_keeps_resume_exact(tiny_llama, task, monkeypatch):
    overrides = [
        "train.steps=4",
        "eval.every=2",
        "eval.num_prompts=4",
        "train.lr=1e-3",
        "train.save_every=2",
        "reward.gold=" + str(task / "reward.py") + ":good_share",
    ]
    PPOTrainer(tiny_config(tiny_llama, task, *overrides), task / "straight").train()
    rows = read_jsonl(task / "straight" / "metrics.jsonl")
    with_eval = [r["step"] for r in rows if "eval/win_rate" in r]
    assert with_eval == [2, 4]
    assert {"eval/score", "eval/gold_score", "eval/kl", "eval/length_mean", "eval/distinct_2"} <= rows[1].keys()
    assert (task / "straight" / "eval" / "step-000002.json").is_file()
    final = json.loads((task / "straight" / "eval" / "eval.json").read_text())
    assert set(final["results"]) == {START, "final"} and final["settings"]["judge"] == "gold"

    # Evaluating inside the run must not change the run: stop after step 3, resume, compare.
    interrupted = PPOTrainer(tiny_config(tiny_llama, task, *overrides), task / "resumed")
    real = interrupted.iteration

    def crash_at_step_3():
        if interrupted.run.step == 3:
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(interrupted, "iteration", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    PPOTrainer(tiny_config(tiny_llama, task, *overrides), task / "resumed", resume=True).train()
    strip = [{k: v for k, v in r.items() if not k.startswith(NONDETERMINISTIC)} for r in rows]
    resumed = [
        {k: v for k, v in r.items() if not k.startswith(NONDETERMINISTIC)}
        for r in read_jsonl(task / "resumed" / "metrics.jsonl")
    ]
    assert resumed == strip


def test_eval_cli_writes_the_runs_eval_folder(tiny_llama, task, capsys):
    run = task / "run"
    PPOTrainer(tiny_config(tiny_llama, task, "train.steps=2", "train.save_every=2"), run).train()
    (run / "eval" / "eval.json").unlink()
    step = run / "checkpoints" / "step-000002"
    assert main(["eval", str(run), str(step), "eval.num_prompts=3"]) == 0
    document = json.loads((run / "eval" / "eval.json").read_text())
    assert list(document["results"]) == [START, "run", "run/step-000002"]
    assert document["settings"]["prompts"] == 3
    # The final model and the step-2 checkpoint of a 2-step run are the same weights.
    a, b = document["results"]["run"], document["results"]["run/step-000002"]
    assert [s["response"] for s in a["samples"]] == [s["response"] for s in b["samples"]]
    assert "fixed eval set" in capsys.readouterr().out


def test_eval_cli_needs_an_output_for_a_bare_model(tiny_llama, task, capsys):
    config = task / "c.yaml"
    config.write_text(f"model: {{name: {tiny_llama}}}\nreward: {{function: {task / 'reward.py'}:good_share}}\n")
    assert main(["eval", str(tiny_llama), "--config", str(config)]) == 2
    assert "needs --output" in capsys.readouterr().err


def test_an_alarm_fires_during_training_and_is_logged(tiny_llama, task, capsys):
    """With a KL ceiling far below what any update produces, kl_runaway must fire, be printed
    once with its advice, and appear as alarm/kl_runaway in metrics.jsonl."""
    config = tiny_config(tiny_llama, task, "train.steps=5", "train.lr=1e-2", "alarms.kl_max=1e-6", "alarms.window=2")
    PPOTrainer(config, task / "run").train()
    rows = read_jsonl(task / "run" / "metrics.jsonl")
    fired = [r["step"] for r in rows if r.get("alarm/kl_runaway")]
    assert fired and fired[0] >= 2, fired
    out = capsys.readouterr().out
    assert out.count("alarm at step") == 1 and "kl_runaway" in out and "What to do" in out


def test_a_healthy_short_run_raises_no_alarm(tiny_llama, task):
    PPOTrainer(tiny_config(tiny_llama, task, "train.steps=6", "train.lr=1e-4"), task / "run").train()
    rows = read_jsonl(task / "run" / "metrics.jsonl")
    assert not [k for r in rows for k in r if k.startswith("alarm/")]


def test_a_judge_function_decides_the_wins(tiny_llama, task):
    """eval.judge as a function: its scores (not the training reward) decide wins and ties."""
    (task / "judge.py").write_text(
        "def longer(prompts, responses, **kw):\n    return [len(r.split()) for r in responses]\n"
    )
    config = tiny_config(tiny_llama, task, "eval.num_prompts=8", f"eval.judge={task / 'judge.py'}:longer")
    evaluator = build_evaluator(config)
    with evaluator.reference.as_model() as model:
        results = {START: evaluator.evaluate(model, START)}
    shorter = dict(results[START], samples=[dict(s, judge=s["judge"] - 1) for s in results[START]["samples"]])
    results["shorter"] = shorter
    add_win_rates(results, START, tie_margin=0.0)
    assert results[START]["judge"]["name"].endswith("judge.py:longer")
    assert all(s["judge"] == len(s["response"].split()) for s in results[START]["samples"])
    assert results["shorter"]["win_rate"]["losses"] == 8 and results["shorter"]["win_rate"]["rate"] == 0.0
