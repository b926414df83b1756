"""The critic-free family on one stage (tether grpo): every estimator, policy loss, aggregation and KL
placement runs and starts where it must (ratio 1, KL 0); the update does not depend on the
micro-batch split under any aggregation; dynamic sampling keeps only groups with signal, under a
cap; kl_in=none runs without a reference; a refused combination says why. The math itself is tested
against hand computations in test_core_estimators.py and test_core_policy_losses.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_grpo import grpo_config, task  # noqa: F401 (the fixture)
from tether.config import ConfigError
from tether.run.log import read_jsonl
from tether.stages.grpo import GRPOTrainer

RECIPES = {
    "grpo": [],
    "dr-grpo": ["grpo.scale_rewards=false", "grpo.loss_aggregation=seq_sum_constant"],
    "rloo": ["grpo.estimator=rloo"],
    "reinforce++": ["grpo.estimator=reinforce_pp", "grpo.kl_in=reward"],
    "reinforce++-baseline": ["grpo.estimator=reinforce_pp_baseline", "grpo.kl_in=reward"],
    "dapo": [
        "grpo.clip_high=0.28",
        "grpo.loss_aggregation=token_mean",
        "grpo.kl_in=none",
        "grpo.dynamic_sampling=true",
        "grpo.overlong_buffer=4",
    ],
    "gspo": [
        "grpo.policy_loss=gspo",
        "grpo.clip_coef=3e-4",
        "grpo.clip_high=4e-4",
        "grpo.loss_aggregation=seq_mean_token_mean",
    ],
    "dual-clip": ["grpo.dual_clip=3.0", "grpo.loss_aggregation=seq_mean_token_sum"],
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_starts_at_ratio_one_with_zero_kl(tiny_llama, task, recipe):  # noqa: F811
    """One epoch of one minibatch: at the first step the policy is the reference and the old
    log-probs come from the same weights."""
    config = grpo_config(tiny_llama, task, "train.steps=1", *RECIPES[recipe])
    trainer = GRPOTrainer(config, task / "run")
    trainer.run.step = 1
    metrics, _ = trainer.iteration()
    assert abs(metrics["policy/ratio_mean"] - 1.0) < 1e-6
    assert metrics["policy/clipfrac"] == 0.0 and metrics["policy/approxkl"] < 1e-10
    if "objective/kl" in metrics:
        assert metrics["objective/kl"] == 0.0
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_sum_constant"])
@pytest.mark.parametrize("loss", ["clip", "gspo"])
def test_the_update_does_not_depend_on_the_micro_batch_split(tiny_llama, task, aggregation, loss):  # noqa: F811
    """The same rollout in 1, 2 or 8 rows per pass leaves the same weights: each aggregation's
    normaliser comes from the whole minibatch."""
    if loss == "gspo" and aggregation == "seq_sum_constant":
        pytest.skip("refused combination (test_refused_combinations_say_why)")
    weights = {}
    for micro in (8, 2, 1):
        config = grpo_config(
            tiny_llama,
            task,
            "train.steps=1",
            "grpo.epochs=2",
            f"train.micro_batch_size={micro}",
            "train.lr=1e-2",
            f"grpo.policy_loss={loss}",
            f"grpo.loss_aggregation={aggregation}",
            *(["grpo.clip_coef=0.05"] if loss == "gspo" else []),
        )
        trainer = GRPOTrainer(config, task / f"run-{micro}")
        trainer.run.step = 1
        trainer.iteration()
        weights[micro] = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    moved = max(float((weights[8][k] - w).abs().max()) for k, w in _start_weights(tiny_llama).items())
    assert moved > 1e-4, "the update did not move the policy: the comparison would be vacuous"
    for micro in (2, 1):
        for name, tensor in weights[8].items():
            torch.testing.assert_close(weights[micro][name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def _start_weights(model: Path) -> dict[str, torch.Tensor]:
    from tether.loading.models import load_causal_lm, load_tokenizer

    return load_causal_lm(str(model), load_tokenizer(str(model))).state_dict()


def test_dynamic_sampling_keeps_only_groups_with_signal_under_a_cap(tiny_llama, task):  # noqa: F811
    """Groups whose responses all scored the same are dropped and counted; with a reward no group
    can vary (always 0) every round drops everything and the cap ends the sampling."""
    (task / "flat.py").write_text("def zero(prompts, responses, **kw):\n    return [0.0] * len(responses)\n")
    config = grpo_config(
        tiny_llama,
        task,
        "train.steps=1",
        f"reward.function={task / 'flat.py'}:zero",
        "rollout.missing_eos_penalty=null",  # else an unfinished response scores -1: signal
        "grpo.dynamic_sampling=true",
        "grpo.max_sampling_rounds=3",
    )
    trainer = GRPOTrainer(config, task / "run")
    trainer.run.step = 1
    metrics, _ = trainer.iteration()
    assert metrics["grpo/sampling_rounds"] == 3.0  # the cap
    assert metrics["grpo/dropped_groups"] == 3 * config.train.batch_size
    # The good_share reward varies within most groups: those are kept, the batch fills in fewer rounds.
    config = grpo_config(tiny_llama, task, "train.steps=1", "grpo.dynamic_sampling=true", "rollout.max_new_tokens=12")
    trainer = GRPOTrainer(config, task / "run2")
    trainer.run.step = 1
    metrics, samples = trainer.iteration()
    assert metrics["grpo/kept_groups"] <= config.train.batch_size
    assert metrics["grpo/zero_std_frac"] == 0.0 or metrics["grpo/kept_groups"] < config.train.batch_size


def test_dynamic_sampling_resumes_exactly(tiny_llama, task, monkeypatch):  # noqa: F811
    """Extra rounds draw extra prompt batches: the sampler's position is in the checkpoint."""
    overrides = ["train.steps=4", "train.save_every=2", "grpo.dynamic_sampling=true", "train.lr=1e-3"]
    GRPOTrainer(grpo_config(tiny_llama, task, *overrides), task / "straight").train()
    interrupted = GRPOTrainer(grpo_config(tiny_llama, task, *overrides), task / "resumed")
    real = interrupted.iteration

    def crash_after_three():
        if interrupted.run.step > 3:
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(interrupted, "iteration", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    GRPOTrainer(grpo_config(tiny_llama, task, *overrides), task / "resumed", resume=True).train()
    strip = ("time/", "throughput/", "memory/")
    rows = [
        [{k: v for k, v in r.items() if not k.startswith(strip)} for r in read_jsonl(task / name / "metrics.jsonl")]
        for name in ("straight", "resumed")
    ]
    assert rows[0] == rows[1]


def test_kl_in_none_loads_no_reference_and_runs_no_reference_pass(tiny_llama, task):  # noqa: F811
    """Full fine-tuning with kl_in=none: no reference model at all; the eval set still judges
    against the start (evaluated before the first update and kept in eval/start.json)."""
    config = grpo_config(tiny_llama, task, "train.steps=2", "grpo.kl_in=none", "eval.num_prompts=2")
    trainer = GRPOTrainer(config, task / "run")
    assert trainer.reference is None
    trainer.train()
    rows = read_jsonl(task / "run" / "metrics.jsonl")
    assert all("time/ref_s" not in r and "objective/kl" not in r for r in rows)
    document = json.loads((task / "run" / "eval" / "eval.json").read_text())
    start = json.loads((task / "run" / "eval" / "start.json").read_text())
    assert document["results"]["start"]["samples"] == start["samples"]
    assert document["results"]["final"]["kl"] is None  # nothing to measure it against


def test_overlong_shaping_lowers_the_score_of_long_responses(tiny_llama, task):  # noqa: F811
    config = grpo_config(
        tiny_llama,
        task,
        "train.steps=1",
        "grpo.overlong_buffer=6",
        "grpo.overlong_penalty=2.0",
        "rollout.missing_eos_penalty=null",
    )
    trainer = GRPOTrainer(config, task / "run")
    trainer.run.step = 1
    metrics, samples = trainer.iteration()
    lengths = torch.tensor([s["length"] for s in samples], dtype=torch.float)
    expected = (2.0 * ((8 - 6) - lengths) / 6).clamp(-2.0, 0.0).mean()
    assert metrics["grpo/overlong_penalty_mean"] == pytest.approx(float(expected), abs=1e-6)
    assert metrics["grpo/overlong_penalty_mean"] < 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rollout.samples_per_prompt=1"], "compares the responses to one prompt"),
        (["rollout.samples_per_prompt=1", "grpo.estimator=reinforce_pp", "grpo.dynamic_sampling=true"], "dynamic"),
        (["grpo.dual_clip=0.9"], "dual_clip must be > 1"),
        (["grpo.overlong_buffer=8"], "overlong_buffer=8 must be below rollout.max_new_tokens=8"),
        (["grpo.policy_loss=gspo", "grpo.loss_aggregation=seq_sum_constant"], "GSPO's ratio is already"),
        (["grpo.estimator=ppo"], "grpo.estimator"),
    ],
)
def test_refused_combinations_say_why(tiny_llama, task, overrides, message):  # noqa: F811
    with pytest.raises(ConfigError, match=message):
        grpo_config(tiny_llama, task, *overrides)


def test_reinforce_pp_takes_one_sample_per_prompt(tiny_llama, task):  # noqa: F811
    """Its baseline is the whole batch, not a group."""
    config = grpo_config(
        tiny_llama,
        task,
        "train.steps=1",
        "grpo.estimator=reinforce_pp",
        "rollout.samples_per_prompt=1",
        "train.batch_size=4",
        "grpo.minibatch_size=4",
    )
    trainer = GRPOTrainer(config, task / "run")
    trainer.run.step = 1
    metrics, _ = trainer.iteration()
    assert "grpo/zero_std_frac" not in metrics and abs(metrics["policy/ratio_mean"] - 1.0) < 1e-6
