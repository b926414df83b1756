"""The PPO loop on a tiny random model: first-step invariants, split-independent updates, a frozen
reference, exact resume, and a run in which the reward must rise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from tether.config import PPOConfig, load_config
from tether.models import load_causal_lm, load_scalar_model, load_tokenizer, scalar_head
from tether.roles.policy import response_logprobs
from tether.roles.value import response_values
from tether.rollout import generate
from tether.runlog import read_jsonl
from tether.stages.ppo import PPOTrainer

REWARD_FILE = """
def good_share(prompts, responses, **kw):
    # share of the word "good" among the response's words
    return [sum(w == "good" for w in r.split()) / max(len(r.split()), 1) for r in responses]
"""
PROMPTS = [
    "hello world",
    "tell me about the cat",
    "why is the sun red",
    "what is one and two",
    "how big is the moon",
    "please tell me more",
    "the dog is blue",
    "thanks very much",
]
# Wall-clock and memory readings differ between runs by nature; everything else must not.
NONDETERMINISTIC = ("time/", "throughput/", "memory/")


@pytest.fixture
def task(tmp_path: Path) -> Path:
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return tmp_path


def tiny_config(model: Path, task: Path, *overrides: str) -> PPOConfig:
    return load_config(
        PPOConfig,
        None,
        [
            f"model.name={model}",
            f"reward.function={task / 'reward.py'}:good_share",
            f"data.prompts={task / 'prompts.jsonl'}",
            f"data.eval={task / 'prompts.jsonl'}",
            "train.batch_size=4",
            "ppo.minibatch_size=4",
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
    """At the first step the policy is the reference and the old log-probs come from the same
    weights: KL to the reference is exactly 0, and the first minibatch's ratio is 1 (nothing
    clipped). One epoch of one minibatch makes the logged stats those of that minibatch alone."""
    overrides = ["ppo.epochs=1", "train.steps=1"] + (["model.lora={r: 4, alpha: 8}"] if lora else [])
    trainer = PPOTrainer(tiny_config(tiny_llama, task, *overrides), task / "run")
    metrics, _ = trainer.iteration()
    assert metrics["objective/kl"] == 0.0
    assert abs(metrics["policy/ratio_mean"] - 1.0) < 1e-6
    assert metrics["policy/approxkl"] < 1e-10
    assert metrics["policy/clipfrac"] == 0.0


def test_update_does_not_depend_on_the_micro_batch_split(tiny_llama, task):
    """Same seed, same rollout: one iteration with the minibatch in 1, 2 or 4 micro-batches leaves
    the same weights (gradients are normalised by the minibatch's token count)."""
    weights = {}
    for micro in (4, 2, 1):
        config = tiny_config(
            tiny_llama,
            task,
            "train.steps=1",
            "ppo.epochs=2",
            f"train.micro_batch_size={micro}",
            "train.lr=1e-3",
        )
        trainer = PPOTrainer(config, task / f"run-{micro}")
        trainer.iteration()
        weights[micro] = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    for micro in (2, 1):
        for name, tensor in weights[4].items():
            torch.testing.assert_close(weights[micro][name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_reference_stays_frozen_while_the_policy_moves(tiny_llama, task):
    trainer = PPOTrainer(tiny_config(tiny_llama, task, "train.steps=3", "train.lr=1e-3"), task / "run")
    with trainer.reference.as_model() as reference:
        ref_before = {k: v.clone() for k, v in reference.state_dict().items()}
    policy_before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    probe = torch.tensor([trainer.prompt_ids[0] + [10, 11, 12]])
    probe_mask = torch.ones_like(probe, dtype=torch.bool)
    ref_probe_before = trainer.reference.logprobs(probe, probe_mask, len(trainer.prompt_ids[0]), 0.7)
    for trainer.step in (1, 2, 3):
        trainer.iteration()
    with trainer.reference.as_model() as reference:
        for name, tensor in reference.state_dict().items():
            assert torch.equal(tensor, ref_before[name]), f"reference weight {name} changed"
    assert any(not torch.equal(v, policy_before[k]) for k, v in trainer.policy.state_dict().items())
    ref_probe_after = trainer.reference.logprobs(probe, probe_mask, len(trainer.prompt_ids[0]), 0.7)
    assert torch.equal(ref_probe_before, ref_probe_after)
    with torch.no_grad():
        (policy_probe,) = response_logprobs(trainer.policy, probe, probe_mask, len(trainer.prompt_ids[0]), 0.7)
    assert not torch.allclose(policy_probe, ref_probe_after)


def test_reward_rises_while_kl_stays_bounded(tiny_llama, task):
    """'It learns': the share of the word 'good' (about 1/40 by chance) must rise clearly."""
    config = tiny_config(
        tiny_llama,
        task,
        "train.steps=40",
        "train.lr=3e-3",
        "train.lr_schedule=constant",
        "rollout.missing_eos_penalty=null",
        "train.batch_size=8",
        "ppo.minibatch_size=8",
        "eval.num_prompts=0",
    )
    PPOTrainer(config, task / "run").train()
    rows = read_jsonl(task / "run" / "metrics.jsonl")
    scores = [r["objective/function_scores"] for r in rows]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert first < 0.1, f"the task should start hard, got {first:.3f}"
    assert last > first + 0.2, f"reward did not rise: {first:.3f} -> {last:.3f}"
    kls = [r["objective/kl"] for r in rows]
    assert all(abs(k) < 20.0 for k in kls), f"KL ran away: max {max(kls):.2f}"


@pytest.mark.parametrize(("stop_after", "save_every", "resume_step"), [(5, 2, 4), (3, 1, 3)])
def test_resume_matches_an_uninterrupted_run(tiny_llama, task, monkeypatch, stop_after, save_every, resume_step):
    """Interrupt after `stop_after` iterations, resume from the newest checkpoint, and finish:
    metrics and final weights are bit-identical to a run that was never stopped. Step 4 ends a
    pass over the 8 prompts (an epoch boundary of the data) and leaves a logged step 5 to be
    redone; step 3 is mid-pass. The adaptive KL controller is on, so its coefficient must survive
    the checkpoint too."""
    overrides = [
        "train.steps=6",
        f"train.save_every={save_every}",
        "train.keep_last=1",
        "ppo.kl_target=0.5",
        "ppo.kl_horizon=100",
        "train.lr=1e-3",
        "eval.num_prompts=0",
    ]
    straight = PPOTrainer(tiny_config(tiny_llama, task, *overrides), task / "straight")
    straight.train()

    interrupted = PPOTrainer(tiny_config(tiny_llama, task, *overrides), task / "resumed")
    real_iteration = interrupted.iteration

    def iteration_then_crash():
        if interrupted.step > stop_after:
            raise KeyboardInterrupt
        return real_iteration()

    monkeypatch.setattr(interrupted, "iteration", iteration_then_crash)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    resumed = PPOTrainer(tiny_config(tiny_llama, task, *overrides), task / "resumed", resume=True)
    assert resumed.step == resume_step
    resumed.train()

    straight_rows = read_jsonl(task / "straight" / "metrics.jsonl")
    resumed_rows = read_jsonl(task / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4, 5, 6]
    assert _deterministic(resumed_rows) == _deterministic(straight_rows)
    assert len({r["objective/kl_coef"] for r in straight_rows}) > 1, "the adaptive controller never moved"
    for part in ("model.safetensors", "value/model.safetensors"):
        a = load_file(task / "straight" / "checkpoints" / "final" / part)
        b = load_file(task / "resumed" / "checkpoints" / "final" / part)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{part}:{name} differs after resume"


def test_keep_last_prunes_old_step_checkpoints(tiny_llama, task):
    config = tiny_config(
        tiny_llama, task, "train.steps=5", "train.save_every=1", "train.keep_last=2", "eval.num_prompts=0"
    )
    PPOTrainer(config, task / "run").train()
    names = sorted(p.name for p in (task / "run" / "checkpoints").iterdir())
    assert names == ["final", "step-000004", "step-000005"]


@pytest.mark.parametrize("lora", [False, True])
def test_saved_policy_and_value_reload_to_identical_outputs(tiny_llama, task, lora):
    """RLHF-DETAILS 18: every saved head (LoRA adapter, value head) reloads to the same outputs."""
    overrides = ["train.steps=2", "train.lr=1e-2"] + (["model.lora={r: 4, alpha: 8}"] if lora else [])
    trainer = PPOTrainer(tiny_config(tiny_llama, task, *overrides), task / "run")
    for trainer.step in (1, 2):
        trainer.iteration()
    folder = trainer.save_checkpoint(final=True)
    probe = torch.tensor([trainer.prompt_ids[1] + [10, 11, 12, 3]])
    mask = torch.ones_like(probe, dtype=torch.bool)
    start = len(trainer.prompt_ids[1])
    tokenizer = load_tokenizer(str(folder))
    with torch.no_grad():
        (expected_logprobs,) = response_logprobs(trainer.policy, probe, mask, start, 0.7)
        expected_values = response_values(trainer.value_model, probe, mask, start)
        (reloaded_logprobs,) = response_logprobs(load_causal_lm(str(folder), tokenizer), probe, mask, start, 0.7)
        reloaded_values = response_values(load_scalar_model(str(folder / "value"), tokenizer), probe, mask, start)
    torch.testing.assert_close(reloaded_logprobs, expected_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(reloaded_values, expected_values, atol=1e-5, rtol=0)
    assert torch.count_nonzero(expected_values) > 0, "the value head never trained: the check would be vacuous"


def _save_reward_model(folder: Path, source: Path, extra_token: bool = False) -> Path:
    """A tiny one-output sequence classifier with a random (non-zero) head, saved with a tokenizer
    (optionally with one more token, so its vocabulary differs from the policy's)."""
    from tests.tiny_models import make_tokenizer

    tokenizer = make_tokenizer()
    if extra_token:
        tokenizer.add_tokens(["zebra"])
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_reward_model_and_function_mix_with_their_weights(tiny_llama, task):
    rm = _save_reward_model(task / "rm", tiny_llama)
    config = tiny_config(
        tiny_llama,
        task,
        f"reward.model={rm}",
        "reward.model_weight=0.5",
        "reward.function_weight=2.0",
        "rollout.missing_eos_penalty=null",
        "train.steps=1",
    )
    trainer = PPOTrainer(config, task / "run")
    # The value model starts from the reward model, head included (N+ details).
    torch.testing.assert_close(
        scalar_head(trainer.value_model).weight, scalar_head(trainer.rewards.model).weight, atol=0, rtol=0
    )
    metrics, samples = trainer.iteration()
    for row in samples:
        assert row["score"] == pytest.approx(0.5 * row["model_score"] + 2.0 * row["function_score"], abs=1e-5)
    assert metrics["objective/model_scores"] == pytest.approx(sum(r["model_score"] for r in samples) / len(samples))


def test_reward_model_with_another_vocabulary_reads_the_same_text(tiny_llama, task):
    """A reward model whose tokenizer differs re-tokenizes the decoded text; for text that
    round-trips, its scores equal scoring the policy's own token ids."""
    same = PPOTrainer(
        tiny_config(tiny_llama, task, f"reward.model={_save_reward_model(task / 'a', tiny_llama)}"), task / "run-a"
    )
    other = PPOTrainer(
        tiny_config(tiny_llama, task, f"reward.model={_save_reward_model(task / 'b', tiny_llama, extra_token=True)}"),
        task / "run-b",
    )
    assert same.rewards.model_tokenizer is None and other.rewards.model_tokenizer is not None
    rollout, _ = generate(same.policy, same.prompt_ids[:4], 1, 6, 1.0, same.roles.pad_id, same.roles.eos_ids)
    scored = [
        trainer.rewards.score(rollout.input_ids, rollout.attention_mask, ["p"] * 4, ["r"] * 4, [True] * 4)[1]["model"]
        for trainer in (same, other)
    ]
    torch.testing.assert_close(scored[0], scored[1], atol=1e-5, rtol=0)
