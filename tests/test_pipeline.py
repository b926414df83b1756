"""The whole path through the command line, on tiny models: `tether sft` -> `tether rm` (starting
from the SFT model) -> `tether ppo` (policy = the SFT model, reward.model = the trained RM, a gold
function logged beside it) -> `tether eval` of the PPO run. Each stage reads the folder the one
before it wrote, exactly as a user would chain them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.test_ppo import PROMPTS
from tests.test_rm import write_preferences
from tests.test_sft import write_sft_data
from tether.cli import main
from tether.config import RMConfig, load_config
from tether.evaluation.runner import START
from tether.loading.models import load_causal_lm
from tether.roles.reward import NORMALIZATION_KEY
from tether.run.log import read_jsonl
from tether.stages.rm import RMTrainer

GOLD_FILE = """
def good_share(prompts, responses, **kw):
    # the judge: share of the word "good" among the response's words
    return [sum(w == "good" for w in r.split()) / max(len(r.split()), 1) for r in responses]
"""


def test_sft_then_rm_then_ppo_then_eval(tiny_llama: Path, tmp_path: Path, capsys):
    """Every stage exits 0 and hands the next a folder it can load: the RM's backbone starts as
    the SFT model, PPO's policy is the SFT model and its reward the RM (normalised), and the PPO run
    logs finite objective/model_scores and objective/gold_scores at every step; `tether eval` of
    the PPO run writes its eval/eval.json with the start and the final model judged by the gold
    function."""
    sft_train, sft_eval = write_sft_data(tmp_path / "sft-data")
    pref_train, pref_eval = write_preferences(tmp_path / "prefs")
    (tmp_path / "gold.py").write_text(GOLD_FILE)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))

    # 1. SFT
    sft = tmp_path / "runs" / "sft"
    code = main(
        [
            "sft",
            f"model.name={tiny_llama}",
            f"data.train={sft_train}",
            f"data.eval={sft_eval}",
            "train.lr=1e-3",
            "--output",
            str(sft),
        ]
    )
    assert code == 0
    sft_final = sft / "checkpoints" / "final"
    assert (sft_final / "model.safetensors").is_file()

    # 2. RM from the SFT model
    rm = tmp_path / "runs" / "rm"
    code = main(
        [
            "rm",
            f"model.name={sft_final}",
            f"data.train={pref_train}",
            f"data.eval={pref_eval}",
            "train.epochs=3",
            "train.lr=1e-3",
            "--output",
            str(rm),
        ]
    )
    assert code == 0
    rm_final = rm / "checkpoints" / "final"
    rm_eval = json.loads((rm / "eval" / "eval.json").read_text())
    assert rm_eval["metrics"]["eval/accuracy"] >= 0.9, rm_eval["metrics"]
    assert NORMALIZATION_KEY in json.loads((rm_final / "config.json").read_text())
    # `tether rm` starts from the SFT weights: the backbone of a fresh RM trainer with
    # model.name = the SFT folder is the SFT model's, exactly (and not the base model's).
    rm_config = load_config(
        RMConfig, None, [f"model.name={sft_final}", f"data.train={pref_train}", f"data.eval={pref_eval}"]
    )
    fresh = RMTrainer(rm_config, tmp_path / "runs" / "rm-untrained")
    fresh.run.runlog.close()
    sft_weights = load_causal_lm(str(sft_final), fresh.tokenizer).model.state_dict()
    base_weights = load_causal_lm(str(tiny_llama), fresh.tokenizer).model.state_dict()
    start = fresh.model.model.state_dict()
    assert start.keys() == sft_weights.keys()
    for name, tensor in sft_weights.items():
        assert torch.equal(start[name], tensor), name
    assert any(not torch.equal(start[k], v) for k, v in base_weights.items()), "SFT did not move the backbone"

    # 3. PPO: the SFT policy, the trained RM as reward, the gold function as judge
    ppo = tmp_path / "runs" / "ppo"
    code = main(
        [
            "ppo",
            f"model.name={sft_final}",
            f"reward.model={rm_final}",
            f"reward.gold={tmp_path / 'gold.py'}:good_share",
            f"data.prompts={prompts}",
            f"data.eval={prompts}",
            "train.steps=2",
            "train.batch_size=4",
            "ppo.minibatch_size=4",
            "rollout.max_new_tokens=8",
            "train.save_every=2",
            "train.sample_every=0",
            "eval.num_prompts=2",
            "--output",
            str(ppo),
        ]
    )
    assert code == 0
    rows = read_jsonl(ppo / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("objective/model_scores", "objective/gold_scores", "objective/scores", "objective/kl"):
            assert key in row and math.isfinite(row[key]), (key, row.get(key))
        assert "objective/function_scores" not in row  # no reward function: the RM alone is the reward
    assert rows[0]["objective/kl"] == 0.0  # the reference is the SFT model the policy starts as
    assert (ppo / "checkpoints" / "final" / "model.safetensors").is_file()
    assert (ppo / "checkpoints" / "final" / "value" / "model.safetensors").is_file()

    # 4. tether eval of the PPO run: its config is borrowed, results go to the run's eval/ folder
    (ppo / "eval" / "eval.json").unlink()
    capsys.readouterr()
    assert main(["eval", str(ppo), "eval.num_prompts=2"]) == 0
    document = json.loads((ppo / "eval" / "eval.json").read_text())
    assert list(document["results"]) == [START, "ppo"]
    assert document["settings"]["prompts"] == 2 and document["settings"]["judge"] == "gold"
    for name, result in document["results"].items():
        assert {"reward", "gold"} <= set(result["scores"]), (name, result["scores"])
        assert all(math.isfinite(result["scores"][source]["mean"]) for source in ("reward", "gold"))
    assert "results:" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["rm", "ppo"])
def test_a_lora_sft_adapter_feeds_the_next_stage(tiny_llama: Path, tmp_path: Path, stage: str):
    """A LoRA SFT run's final folder (an adapter) is a valid model.name for the next stage: `tether
    rm` trains a reward model on the adapted backbone, and `tether ppo` with a reward function only
    (so its value model also starts from model.name) runs."""
    sft_train, sft_eval = write_sft_data(tmp_path / "sft-data")
    sft = tmp_path / "runs" / "sft"
    assert (
        main(
            [
                "sft",
                f"model.name={tiny_llama}",
                f"data.train={sft_train}",
                f"data.eval={sft_eval}",
                "model.lora={r: 4, alpha: 8}",
                "train.steps=2",
                "train.lr=1e-2",
                "--output",
                str(sft),
            ]
        )
        == 0
    )
    adapter = sft / "checkpoints" / "final"
    assert (adapter / "adapter_config.json").is_file()
    if stage == "rm":
        pref_train, pref_eval = write_preferences(tmp_path / "prefs", train=16, held_out=8)
        args = ["rm", f"model.name={adapter}", f"data.train={pref_train}", f"data.eval={pref_eval}", "train.steps=2"]
    else:
        (tmp_path / "gold.py").write_text(GOLD_FILE)
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
        args = [
            "ppo",
            f"model.name={adapter}",
            f"reward.function={tmp_path / 'gold.py'}:good_share",
            f"data.prompts={prompts}",
            "train.steps=1",
            "train.batch_size=4",
            "ppo.minibatch_size=4",
            "rollout.max_new_tokens=4",
            "train.save_every=0",
            "eval.num_prompts=0",
        ]
    assert main([*args, "--output", str(tmp_path / "runs" / stage)]) == 0
    assert (tmp_path / "runs" / stage / "checkpoints" / "final" / "config.json").is_file()
