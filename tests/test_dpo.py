"""`tether dpo`: the DPO/IPO losses by hand, and the stage on a tiny random model: it starts at
log 2 (the policy is the reference), raises the held-out preference accuracy on a separable toy
set, caches the reference log-probs once and resumes exactly with them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.test_rm import rm_overrides, write_preferences
from tether.cli import main
from tether.config import DPOConfig, load_config
from tether.core import dpo_loss
from tether.run.log import read_jsonl
from tether.stages.dpo import REFERENCE_FILE, DPOTrainer


def test_dpo_loss_is_log_2_when_the_policy_is_the_reference():
    logps = torch.randn(5) * 10
    other = torch.randn(5) * 10
    loss, stats = dpo_loss(logps, other, logps, other, beta=0.3)
    assert float(loss) == pytest.approx(math.log(2))
    assert float(stats["rewards/margins"]) == 0.0 and float(stats["rewards/accuracies"]) == 0.5


def test_dpo_and_ipo_losses_by_hand():
    # chosen -1 vs reference -2 (+1), rejected -3 vs reference -2 (-1): h = 2.
    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))
    loss, stats = dpo_loss(*args, beta=0.5)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-1.0)))  # -log sigmoid(0.5 * 2)
    assert float(stats["rewards/chosen"]) == pytest.approx(0.5)
    assert float(stats["rewards/rejected"]) == pytest.approx(-0.5)
    assert float(stats["rewards/margins"]) == pytest.approx(1.0)
    assert float(stats["rewards/accuracies"]) == 1.0
    ipo, _ = dpo_loss(*args, beta=0.5, loss_type="ipo")
    assert float(ipo) == pytest.approx((2.0 - 1.0) ** 2)  # (h - 1 / (2 beta))^2
    # Two micro-batches normalised by the whole batch sum to the whole batch's loss.
    chosen, rejected = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0])
    ref = torch.tensor([-2.0, -2.0])
    whole, _ = dpo_loss(chosen, rejected, ref, ref, 0.5)
    halves = [dpo_loss(chosen[i : i + 1], rejected[i : i + 1], ref[:1], ref[:1], 0.5, pair_count=2)[0] for i in (0, 1)]
    assert float(sum(halves)) == pytest.approx(float(whole))


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    return write_preferences(tmp_path_factory.mktemp("dpo-prefs"))


def test_dpo_through_the_cli_learns_the_toy_preference(tiny_llama, prefs, tmp_path):
    run = tmp_path / "run"
    args = rm_overrides(tiny_llama, prefs, "train.epochs=3", "train.lr=1e-3", "train.save_every=0")
    assert main(["dpo", *args, "--output", str(run)]) == 0
    rows = read_jsonl(run / "metrics.jsonl")
    assert rows[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: policy == reference
    result = json.loads((run / "eval" / "eval.json").read_text())["metrics"]
    assert result["eval/rewards/accuracies"] >= 0.9
    assert result["eval/rewards/margins"] > 0 and result["eval/loss"] < math.log(2)
    for name in ("config.yaml", "tb", "checkpoints/final/config.json", REFERENCE_FILE):
        assert (run / name).exists(), name


def test_held_out_accuracy_starts_at_chance(tiny_llama, prefs, tmp_path):
    """The untrained policy is its own reference: every margin is 0 and every pair a tie."""
    trainer = DPOTrainer(load_config(DPOConfig, None, rm_overrides(tiny_llama, prefs)), tmp_path / "run")
    start = trainer.evaluate()
    assert start["eval/rewards/accuracies"] == 0.5
    assert start["eval/loss"] == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_resume_reads_the_cached_reference_and_matches_an_uninterrupted_run(tiny_llama, prefs, tmp_path, lora):
    """Stopped after 2 steps and resumed to 4 == 4 steps in one go. With full fine-tuning the model
    loaded on resume is the trained one, so recomputing the reference would change the losses."""
    extra = ["train.lr=1e-3", "train.lr_schedule=constant", "train.save_every=2", "train.batch_size=16"]
    if lora:
        extra.append("model.lora={r: 4, alpha: 8}")
    args = rm_overrides(tiny_llama, prefs, *extra)
    assert main(["dpo", *args, "train.steps=4", "--output", str(tmp_path / "whole")]) == 0
    assert main(["dpo", *args, "train.steps=2", "--output", str(tmp_path / "split")]) == 0
    assert main(["dpo", *args, "train.steps=4", "--resume", "--output", str(tmp_path / "split")]) == 0
    whole = [r["loss/dpo"] for r in read_jsonl(tmp_path / "whole" / "metrics.jsonl")]
    split = [r["loss/dpo"] for r in read_jsonl(tmp_path / "split" / "metrics.jsonl")]
    assert split == whole and len(whole) == 4


def test_bad_beta_is_refused(tiny_llama, prefs, tmp_path, capsys):
    assert main(["dpo", *rm_overrides(tiny_llama, prefs, "dpo.beta=0"), "--output", str(tmp_path / "r")]) == 2
    assert "dpo.beta" in capsys.readouterr().err
