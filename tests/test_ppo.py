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
from tether.loading.models import load_causal_lm, load_scalar_model, load_tokenizer, scalar_head
from tether.roles.policy import response_logprobs
from tether.roles.reward import sequence_scores
from tether.roles.value import ValueHead, response_values
from tether.run.log import read_jsonl
from tether.sampling import generate
from tether.speed import FAST
from tether.speed.old_pass import reuses_old_pass
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


@pytest.mark.parametrize("critic", ["model", "head"])
@pytest.mark.parametrize("micro", [None, 2])
@pytest.mark.parametrize("lora", [False, True])
def test_first_minibatch_has_ratio_one_and_zero_kl(tiny_llama, task, lora, micro, critic):
    """At the first step the policy is the reference and the old log-probs come from the same
    weights: KL to the reference is exactly 0, and the first minibatch's ratio is 1 (nothing
    clipped). One epoch of one minibatch makes the logged stats those of that minibatch alone.
    micro None: the first step reuses the old log-probs' pass (its graph, with grad); 2: the step
    runs its own forward passes, which must agree with the no-grad old pass. critic head: the
    values come from the same passes, and the first value loss is the unclipped one."""
    overrides = ["ppo.epochs=1", "train.steps=1", f"train.micro_batch_size={'null' if micro is None else micro}"]
    overrides += [f"model.critic={critic}"]
    overrides += ["model.lora={r: 4, alpha: 8}"] if lora else []
    trainer = PPOTrainer(tiny_config(tiny_llama, task, *overrides), task / "run")
    assert reuses_old_pass(trainer.config.speed, trainer.sizes) == (micro is None)
    metrics, _ = trainer.iteration()
    assert metrics["objective/kl"] == 0.0
    assert abs(metrics["policy/ratio_mean"] - 1.0) < 1e-6
    assert metrics["policy/approxkl"] < 1e-10
    assert metrics["policy/clipfrac"] == 0.0
    assert metrics["val/clipfrac"] == 0.0


@pytest.mark.parametrize("critic", ["model", "head"])
def test_update_does_not_depend_on_the_micro_batch_split(tiny_llama, task, critic):
    """Same seed, same rollout: one iteration with the minibatch in 1, 2 or 4 micro-batches leaves
    the same weights (gradients are normalised by the minibatch's token count). With 4 (the whole
    rollout) the first step reuses the old log-probs' pass; with 2 and 1 it runs its own."""
    weights = {}
    for micro in (4, 2, 1):
        config = tiny_config(
            tiny_llama,
            task,
            "train.steps=1",
            "ppo.epochs=2",
            f"train.micro_batch_size={micro}",
            "train.lr=1e-3",
            f"model.critic={critic}",
        )
        trainer = PPOTrainer(config, task / f"run-{micro}")
        trainer.iteration()
        weights[micro] = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
        weights[micro] |= {f"critic.{k}": v.clone() for k, v in trainer.roles.critic.state_dict().items()}
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
    ref_probe_before = trainer.reference.logprobs(probe, probe_mask, len(trainer.prompt_ids[0]), 0.7, speed=FAST)
    for trainer.run.step in (1, 2, 3):
        trainer.iteration()
    with trainer.reference.as_model() as reference:
        for name, tensor in reference.state_dict().items():
            assert torch.equal(tensor, ref_before[name]), f"reference weight {name} changed"
    assert any(not torch.equal(v, policy_before[k]) for k, v in trainer.policy.state_dict().items())
    ref_probe_after = trainer.reference.logprobs(probe, probe_mask, len(trainer.prompt_ids[0]), 0.7, speed=FAST)
    assert torch.equal(ref_probe_before, ref_probe_after)
    with torch.no_grad():
        (policy_probe,) = response_logprobs(
            trainer.policy, probe, probe_mask, len(trainer.prompt_ids[0]), 0.7, speed=FAST
        )
    assert not torch.allclose(policy_probe, ref_probe_after)


# Chosen over eight seeds each (train.seed 0-7, one thread; docs/LOG.md 2026-12-02): the rise of the
# share went 0.80-0.98 with the model critic (max |KL| 10.9) and 0.31-0.98 with the head critic, which
# learns more slowly and needs the adaptive KL controller to stay bounded (max |KL| 13.4). The
# earlier 40 steps of 8 prompts rose only 0.20 on some seeds with either critic: a coin toss at 0.2.
LEARNING = {
    "model": ["train.steps=50"],
    "head": ["train.steps=60", "ppo.kl_target=6", "ppo.kl_horizon=200"],
}


@pytest.mark.parametrize("critic", ["model", "head"])
def test_reward_rises_while_kl_stays_bounded(tiny_llama, task, critic):
    """'It learns': the share of the word 'good' (about 1/40 by chance) must rise clearly, with
    either critic."""
    config = tiny_config(
        tiny_llama,
        task,
        f"model.critic={critic}",
        "train.lr=2e-3",
        "train.lr_schedule=constant",
        "rollout.missing_eos_penalty=null",
        "train.batch_size=16",
        "ppo.minibatch_size=16",
        "eval.num_prompts=0",
        *LEARNING[critic],
    )
    PPOTrainer(config, task / "run").train()
    rows = read_jsonl(task / "run" / "metrics.jsonl")
    scores = [r["objective/function_scores"] for r in rows]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert first < 0.1, f"the task should start hard, got {first:.3f}"
    assert last > first + 0.2, f"reward did not rise: {first:.3f} -> {last:.3f}"
    kls = [r["objective/kl"] for r in rows]
    assert all(abs(k) < 20.0 for k in kls), f"KL ran away: max {max(kls):.2f}"


@pytest.mark.parametrize(
    ("stop_after", "save_every", "resume_step", "critic"), [(5, 2, 4, "model"), (3, 1, 3, "model"), (3, 1, 3, "head")]
)
def test_resume_matches_an_uninterrupted_run(
    tiny_llama, task, monkeypatch, stop_after, save_every, resume_step, critic
):
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
        f"model.critic={critic}",
    ]
    straight = PPOTrainer(tiny_config(tiny_llama, task, *overrides), task / "straight")
    straight.train()

    interrupted = PPOTrainer(tiny_config(tiny_llama, task, *overrides), task / "resumed")
    real_iteration = interrupted.iteration

    def iteration_then_crash():
        if interrupted.run.step > stop_after:
            raise KeyboardInterrupt
        return real_iteration()

    monkeypatch.setattr(interrupted, "iteration", iteration_then_crash)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    resumed = PPOTrainer(tiny_config(tiny_llama, task, *overrides), task / "resumed", resume=True)
    assert resumed.run.step == resume_step
    resumed.train()

    straight_rows = read_jsonl(task / "straight" / "metrics.jsonl")
    resumed_rows = read_jsonl(task / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4, 5, 6]
    assert _deterministic(resumed_rows) == _deterministic(straight_rows)
    assert len({r["objective/kl_coef"] for r in straight_rows}) > 1, "the adaptive controller never moved"
    value_file = "value/model.safetensors" if critic == "model" else "value/value_head.safetensors"
    for part in ("model.safetensors", value_file):
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
    """docs/concepts/details.md item 18: every saved head (LoRA adapter, value head) reloads to the same outputs."""
    overrides = ["train.steps=2", "train.lr=1e-2"] + (["model.lora={r: 4, alpha: 8}"] if lora else [])
    trainer = PPOTrainer(tiny_config(tiny_llama, task, *overrides), task / "run")
    for trainer.run.step in (1, 2):
        trainer.iteration()
    folder = trainer.save_checkpoint(final=True)
    probe = torch.tensor([trainer.prompt_ids[1] + [10, 11, 12, 3]])
    mask = torch.ones_like(probe, dtype=torch.bool)
    start = len(trainer.prompt_ids[1])
    tokenizer = load_tokenizer(str(folder))
    with torch.no_grad():
        (expected_logprobs,) = response_logprobs(trainer.policy, probe, mask, start, 0.7, speed=FAST)
        expected_values = response_values(trainer.value_model, probe, mask, start, speed=FAST)
        (reloaded_logprobs,) = response_logprobs(
            load_causal_lm(str(folder), tokenizer), probe, mask, start, 0.7, speed=FAST
        )
        reloaded_values = response_values(
            load_scalar_model(str(folder / "value"), tokenizer), probe, mask, start, speed=FAST
        )
    torch.testing.assert_close(reloaded_logprobs, expected_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(reloaded_values, expected_values, atol=1e-5, rtol=0)
    assert torch.count_nonzero(expected_values) > 0, "the value head never trained: the check would be vacuous"


def test_saved_value_head_reloads_to_identical_values(tiny_llama, task):
    """model.critic=head: the checkpoint's value/ holds the head alone (no second model, no
    tokenizer); it reloads to the values the trained head gives on the saved policy's features."""
    config = tiny_config(tiny_llama, task, "train.steps=2", "model.critic=head", "train.value_lr=1e-2")
    trainer = PPOTrainer(config, task / "run")
    for trainer.run.step in (1, 2):
        trainer.iteration()
    folder = trainer.save_checkpoint(final=True)
    assert sorted(p.name for p in (folder / "value").iterdir()) == ["config.json", "value_head.safetensors"]
    probe = torch.tensor([trainer.prompt_ids[1] + [10, 11, 12, 3]])
    mask = torch.ones_like(probe, dtype=torch.bool)
    start = len(trainer.prompt_ids[1])
    policy = load_causal_lm(str(folder), load_tokenizer(str(folder)))
    with torch.no_grad():
        _, expected = response_logprobs(
            trainer.policy, probe, mask, start, 0.7, value_head=trainer.roles.value_head, speed=FAST
        )
        _, reloaded = response_logprobs(
            policy, probe, mask, start, 0.7, value_head=ValueHead.from_pretrained(folder / "value"), speed=FAST
        )
    torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=0)
    assert torch.count_nonzero(expected) > 0, "the value head never trained: the check would be vacuous"
    assert trainer.value_model is None


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
        scalar_head(trainer.value_model).weight, scalar_head(trainer.roles.rewards.model).weight, atol=0, rtol=0
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
    assert same.roles.rewards.model_tokenizer is None and other.roles.rewards.model_tokenizer is not None
    rollout, _ = generate(
        same.policy, same.prompt_ids[:4], 1, 6, 1.0, same.roles.pad_id, same.roles.eos_ids, speed=FAST
    )
    scored = [
        trainer.roles.rewards.score(rollout.input_ids, rollout.attention_mask, ["p"] * 4, ["r"] * 4, [True] * 4)[1][
            "model"
        ]
        for trainer in (same, other)
    ]
    torch.testing.assert_close(scored[0], scored[1], atol=1e-5, rtol=0)


def test_lora_value_model_lends_its_base_to_the_reward_model(tiny_llama, task):
    """Under LoRA the value model is the reward model's weights plus an adapter, so rewards are
    scored through it with the adapter off (no second copy), and they stay the frozen reward
    model's scores while the value model's adapter and head train away from it."""
    rm = _save_reward_model(task / "rm", tiny_llama)
    config = tiny_config(
        tiny_llama,
        task,
        f"reward.model={rm}",
        "model.lora={r: 4, alpha: 8}",
        "train.lr=5e-2",
        "rollout.missing_eos_penalty=null",
    )
    trainer = PPOTrainer(config, task / "run")
    assert trainer.roles.rewards.model is trainer.value_model  # the separate copy was dropped
    assert trainer.roles.rewards.adapted_reward_model
    frozen = load_scalar_model(str(rm), load_tokenizer(str(rm)))
    rollout, _ = generate(
        trainer.policy, trainer.prompt_ids[:4], 1, 6, 1.0, trainer.roles.pad_id, trainer.roles.eos_ids, speed=FAST
    )
    ids, attn = rollout.input_ids, rollout.attention_mask

    def reward_scores() -> torch.Tensor:
        return trainer.roles.rewards.score(ids, attn, ["p"] * 4, ["r"] * 4, [True] * 4)[1]["model"]

    def value_at_last_token() -> torch.Tensor:
        with torch.no_grad():
            return response_values(trainer.value_model, ids, attn, rollout.response_start, speed=FAST)

    expected = sequence_scores(frozen, ids, attn, speed=FAST)
    torch.testing.assert_close(reward_scores(), expected, atol=1e-6, rtol=0)
    values_before = value_at_last_token()
    for trainer.run.step in range(1, 3):
        trainer.iteration()
    assert (value_at_last_token() - values_before).abs().max() > 1e-3  # the value model did train
    torch.testing.assert_close(reward_scores(), expected, atol=1e-6, rtol=0)  # the reward did not move
    assert trainer.value_model.active_adapters == ["default"]  # and the adapter is back on
