"""Multi-turn episodes with tools (tether/episodes.py, tether/environments.py): the layout of an
episode, exact log-probs across turns, the tool's tokens out of every loss, PPO and GRPO runs with
an environment (ratio 1 at the first step, exact resume, whole episodes in samples and eval), the
calculator environment, and environments that fail or are misconfigured."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.test_cli import run_tether
from tests.test_grpo import assert_resume_is_exact
from tests.test_ppo import PROMPTS
from tests.tiny_models import make_tokenizer
from tether.config import ConfigError, GRPOConfig, PPOConfig, load_config
from tether.core import (
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    gspo_policy_loss,
    kl_per_token,
    loss_normaliser,
    per_token_rewards,
    ppo_policy_loss,
    spread_over_tokens,
)
from tether.environments import TOOL_PROMPT, Calculator, Step, calculate
from tether.episodes import EpisodeError, tool_message_frame, transcript
from tether.errors import RewardStoppedRun
from tether.passes import policy_pass, policy_sampler, sample_batch
from tether.run.log import read_jsonl
from tether.stages.grpo import GRPOTrainer
from tether.stages.ppo import PPOTrainer

ASSETS = Path(__file__).resolve().parent.parent / "tether" / "assets"

ENVIRONMENT_FILE = '''
from tether.environments import Step


class Lookup:
    """The first `calls` turns are answered with a fixed tool output; the next one is the answer,
    rewarded with its share of the word "good"."""

    def __init__(self, tool_output="the cat is very good", calls=1):
        self.tool_output, self.calls = tool_output, calls

    def reset(self, prompt):
        self.turn = 0

    def step(self, turn):
        self.turn += 1
        if self.turn <= self.calls:
            return Step(observation=self.tool_output)
        words = turn.split()
        return Step(done=True, reward=sum(w == "good" for w in words) / max(len(words), 1))


class Broken(Lookup):
    def step(self, turn):
        raise ValueError("the sandbox is down")


class NaNReward(Lookup):
    def step(self, turn):
        return Step(done=True, reward=float("nan"))


class NoMethods:
    pass
'''


@pytest.fixture
def task(tmp_path: Path) -> Path:
    (tmp_path / "env.py").write_text(ENVIRONMENT_FILE)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return tmp_path


def _overrides(model: Path, task: Path, environment: str = "Lookup") -> list[str]:
    return [
        f"model.name={model}",
        f"rollout.environment={task / 'env.py'}:{environment}",
        "rollout.max_turns=3",
        "rollout.max_new_tokens=6",
        "rollout.max_tool_tokens=4",
        f"data.prompts={task / 'prompts.jsonl'}",
        f"data.eval={task / 'prompts.jsonl'}",
        "train.batch_size=2",
        "train.sample_every=0",
        "train.save_every=0",
        "eval.num_prompts=2",
        "speed.inverse_cdf_sampler=true",  # the sampler reports the log-prob of every token it drew
    ]


def grpo_config(model: Path, task: Path, *overrides: str, environment: str = "Lookup") -> GRPOConfig:
    extra = ["rollout.samples_per_prompt=4", "grpo.minibatch_size=8"]
    return load_config(GRPOConfig, None, [*_overrides(model, task, environment), *extra, *overrides])


def ppo_config(model: Path, task: Path, *overrides: str) -> PPOConfig:
    return load_config(PPOConfig, None, [*_overrides(model, task), "ppo.minibatch_size=2", *overrides])


# --- an episode's layout and its log-probs ---------------------------------------------------------


def test_an_episode_is_model_turns_and_tool_output_in_order_with_the_tool_masked(tiny_llama, task):
    trainer = GRPOTrainer(grpo_config(tiny_llama, task, "train.steps=1"), task / "run")
    episodes = trainer.roles.episodes
    assert episodes is not None
    trajectory = trainer.sample([0, 1])
    tool_ids, kept = episodes.tool_ids("the cat is very good", True)
    assert kept == "the cat is very"  # rollout.max_tool_tokens=4 cuts the 5-word tool output
    for row in range(len(trajectory)):
        turns = trajectory.episodes[row]
        roles = [role for role, _ in turns]
        # Lookup answers the first turn with a tool output and ends at the second.
        assert roles == ["assistant", "tool", "assistant"]
        ids = trajectory.response_ids[row][trajectory.response_mask[row]].tolist()
        tool = trajectory.tool_mask[row][trajectory.response_mask[row]].tolist()
        first_turn = tool.index(True)
        tool_span = [i for i, t in zip(ids, tool, strict=True) if t]
        finished_first = ids[first_turn - 1] in trainer.roles.eos_ids
        expected_tool = episodes.tool_ids("the cat is very good", finished_first)[0]
        assert tool_span == expected_tool  # exactly the frame and the cut tool output, once
        assert all(not t for t in tool[first_turn + len(tool_span) :])  # the second turn is the model's
        assert trajectory.responses[row] == turns[-1][1]  # reward functions read the last model turn
        assert trajectory.mask[row].sum() == len(ids) - len(tool_span)
        words = turns[-1][1].split()
        assert float(trajectory.environment_scores[row]) == pytest.approx(
            sum(w == "good" for w in words) / max(len(words), 1)
        )
    assert tool_ids  # the frame is never empty


def test_log_probs_of_model_tokens_are_exact_across_turns(tiny_llama, task):
    """Every model token's log-prob as the sampler drew it (turn by turn, from the context so far)
    equals the one the trainer recomputes over the whole episode in one pass."""
    trainer = GRPOTrainer(grpo_config(tiny_llama, task, "train.steps=1", "rollout.max_turns=4"), task / "run")
    config = trainer.config
    trajectory = sample_batch(trainer.roles, config, [p.text for p in trainer.prompts[:2]], trainer.prompt_ids[:2])
    assert trajectory.sample_logprobs.shape == trajectory.response_ids.shape
    trajectory, _ = policy_pass(trainer.roles, config, trajectory, keep_graph=False)
    mask = trajectory.mask
    assert trajectory.tool_mask.any() and mask.sum() > 10
    gap = (trajectory.sample_logprobs - trajectory.old_logprobs)[mask].abs()
    assert float(gap.max()) < 1e-4, f"sampler and trainer disagree on model tokens by up to {float(gap.max())}"


def test_the_tool_frame_is_read_off_the_chat_template():
    from tether.loading.models import eos_token_ids, load_tokenizer

    smol = load_tokenizer("smollm2-135m-instruct", False)
    before, after = tool_message_frame(smol, eos_token_ids(smol, None), True)
    assert (before, after) == ("\n<|im_start|>tool\n", "<|im_end|>\n<|im_start|>assistant\n")
    tiny = make_tokenizer()
    assert tool_message_frame(tiny, [tiny.eos_token_id], True) == (" <|tool|> ", " <|assistant|>")
    assert tool_message_frame(tiny, [tiny.eos_token_id], False) == ("\n", "\n")


# --- the tool's tokens count in no loss ------------------------------------------------------------


def _episode_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch laid out as episodes: model tokens, tool tokens between them, padding at the end."""
    gen = torch.Generator().manual_seed(seed)
    response = torch.tensor(
        [[1, 1, 1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]]
    )
    tool = torch.zeros_like(response)
    tool[0, 2:5] = 1
    tool[1, 3:5] = 1
    tool[1, 7:8] = 1
    shape = response.shape
    return {
        "response": response.bool(),
        "tool": tool.bool(),
        "logprobs": -torch.rand(shape, generator=gen) * 3,
        "old_logprobs": -torch.rand(shape, generator=gen) * 3,
        "ref_logprobs": -torch.rand(shape, generator=gen) * 3,
        "values": torch.randn(shape, generator=gen),
        "old_values": torch.randn(shape, generator=gen),
        "scores": torch.tensor([1.0, -0.5, 0.25]),
        "group": torch.tensor([0, 0, 1]),
    }


def _losses(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every loss of ppo and grpo, computed as the stages do, with the model-token mask."""
    mask = batch["response"] & ~batch["tool"]
    logprobs = batch["logprobs"]
    kl = torch.where(mask, kl_per_token(batch["old_logprobs"], batch["ref_logprobs"], "k1"), 0.0)
    rewards = per_token_rewards(batch["scores"], kl, mask, 0.1)
    advantages, returns = compute_gae(rewards, batch["values"], mask, 0.99, 0.95)
    out = {
        "ppo": ppo_policy_loss(logprobs, batch["old_logprobs"], advantages, mask, 0.2)[0],
        "value": clipped_value_loss(batch["values"] + 0.1, batch["old_values"], returns, mask, 0.2)[0],
        "advantages": advantages[mask],
    }
    outcome = spread_over_tokens(batch["scores"] - batch["scores"].mean(), mask)
    for aggregation in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_sum_constant"):
        normaliser = loss_normaliser(mask, aggregation, 10)
        out[aggregation] = clipped_policy_loss(
            logprobs, batch["old_logprobs"], outcome, mask, 0.2, 0.28, 3.0, aggregation, normaliser
        )[0]
    out["gspo"] = gspo_policy_loss(logprobs, batch["old_logprobs"], outcome, mask)[0]
    return out


def test_no_loss_reads_anything_at_the_tool_tokens():
    """Whatever the log-probs, reference log-probs and values are at the tool's positions (the
    trainer computes them there: they are in the context), no loss, advantage or return moves,
    and no gradient reaches them."""
    clean = _episode_batch()
    expected = _losses(clean)
    for garbage in (0.0, 50.0, -1e4, float("nan")):
        dirty = dict(clean)
        for name in ("logprobs", "old_logprobs", "ref_logprobs", "values", "old_values"):
            dirty[name] = torch.where(clean["tool"], torch.full_like(clean[name], garbage), clean[name])
        got = _losses(dirty)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=f"{name} with {garbage} at the tool")
    logprobs = clean["logprobs"].clone().requires_grad_(True)
    total = sum(v.sum() for k, v in _losses({**clean, "logprobs": logprobs}).items() if k != "advantages")
    total.backward()
    assert (logprobs.grad[clean["tool"]] == 0).all() and logprobs.grad[
        clean["response"] & ~clean["tool"]
    ].abs().sum() > 0


# --- the stages with an environment -----------------------------------------------------------------


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_first_step_has_ratio_one_and_zero_kl_with_an_environment(tiny_llama, task, stage):
    overrides = ["train.steps=1", "ppo.epochs=1"] if stage == "ppo" else ["train.steps=1"]  # one epoch: old = new
    config = (ppo_config if stage == "ppo" else grpo_config)(tiny_llama, task, *overrides)
    trainer = (PPOTrainer if stage == "ppo" else GRPOTrainer)(config, task / "run")
    metrics, samples = trainer.iteration()
    assert metrics["objective/kl"] == 0.0
    assert abs(metrics["policy/ratio_mean"] - 1.0) < 1e-6 and metrics["policy/clipfrac"] == 0.0
    assert metrics["episode/tool_results_mean"] == 1.0 and metrics["episode/turns_mean"] == 2.0
    assert metrics["episode/tool_tokens_mean"] > 0
    assert metrics["rollout/logprob_gap_max"] < 1e-4  # exact across turns, in the run itself
    assert metrics["objective/environment_scores"] == pytest.approx(metrics["objective/scores"], abs=1.0)
    for sample in samples:
        assert [turn["role"] for turn in sample["episode"]] == ["assistant", "tool", "assistant"]
        assert sample["response"] == transcript(tuple((t["role"], t["content"]) for t in sample["episode"]))
        assert "[tool] the cat is" in sample["response"]
        assert "environment_score" in sample


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_resume_with_an_environment_matches_an_uninterrupted_run(tiny_llama, task, monkeypatch, stage):
    overrides = ["train.steps=4", "train.save_every=2", "train.lr=1e-3", "eval.num_prompts=0"]
    make = ppo_config if stage == "ppo" else grpo_config
    trainer_class = PPOTrainer if stage == "ppo" else GRPOTrainer
    assert_resume_is_exact(
        lambda run, resume: trainer_class(make(tiny_llama, task, *overrides), run, resume=resume), task, monkeypatch
    )


def test_cli_run_shows_whole_episodes_in_samples_eval_and_report(tiny_llama, task):
    out = task / "run"
    args = [f"{o}" for o in _overrides(tiny_llama, task)]
    result = run_tether(
        "grpo", *args, "rollout.samples_per_prompt=2", "grpo.minibatch_size=4", "train.steps=2", "train.sample_every=1",
        "--output", str(out), cwd=task,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    samples = read_jsonl(out / "samples.jsonl")
    assert samples and all(s["episode"][1]["role"] == "tool" for s in samples)
    document = json.loads((out / "eval" / "eval.json").read_text())
    for name in ("start", "final"):
        for sample in document["results"][name]["samples"]:
            assert [t["role"] for t in sample["episode"]] == ["assistant", "tool", "assistant"]
            assert "[tool] the cat is" in sample["response"]
    assert "[tool] the cat is" in (out / "report.md").read_text()
    rows = read_jsonl(out / "metrics.jsonl")
    assert all("episode/turns_mean" in r and "objective/environment_scores" in r for r in rows)


# --- failures and refusals ---------------------------------------------------------------------------


def test_an_environment_that_raises_or_gives_a_bad_reward_stops_the_run(tiny_llama, task):
    for environment, words in (("Broken", "the sandbox is down"), ("NaNReward", "finite")):
        with pytest.raises(EpisodeError, match=words):
            GRPOTrainer(grpo_config(tiny_llama, task, "train.steps=1", environment=environment), task / environment)
        assert not (task / environment).exists()  # caught by the pre-flight probe: no run directory


def test_an_environment_failing_mid_run_stops_with_its_reason_and_exit_code(tiny_llama, task, monkeypatch):
    trainer = GRPOTrainer(grpo_config(tiny_llama, task, "train.steps=3"), task / "run")
    episodes = trainer.roles.episodes
    assert episodes is not None
    made = episodes.new_environment

    def broken_later():
        environment = made()
        if trainer.run.step >= 2:
            environment.step = lambda turn: (_ for _ in ()).throw(OSError("tool server gone"))
        return environment

    monkeypatch.setattr(episodes, "new_environment", broken_later)
    with pytest.raises(RewardStoppedRun, match="tool server gone") as caught:
        trainer.train()
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rollout.environment=null", "rollout.max_turns=3 needs rollout.environment"),
        ("rollout.engine=vllm", "multi-turn episodes sample with transformers"),
        ("grpo.overlong_buffer=2", "the length limit is per turn"),
    ],
)
def test_settings_that_do_not_fit_episodes_are_refused_by_name(tiny_llama, task, override, message):
    with pytest.raises(ConfigError, match=message):
        grpo_config(tiny_llama, task, override)


def test_an_environment_without_the_protocol_is_exit_2_naming_it(tiny_llama, task):
    result = run_tether("grpo", *_overrides(tiny_llama, task, "NoMethods"), "--output", str(task / "run"), cwd=task)
    assert result.returncode == 2
    assert "NoMethods" in result.stderr and "reset(prompt)" in result.stderr
    assert not (task / "run").exists()


def test_an_environment_needs_no_other_reward_source(tiny_llama, task):
    config = grpo_config(tiny_llama, task)
    assert config.reward.function is None and config.missing() == []
    plain = load_config(GRPOConfig, None, [f"model.name={tiny_llama}"], allow_missing=True)
    assert plain.missing()


# --- the calculator ---------------------------------------------------------------------------------


def test_calculate_computes_arithmetic_and_refuses_the_rest():
    assert calculate("37 * 12") == 444
    assert calculate(" (3 + 4) * -2 ") == -14
    assert calculate("7 / 2") == 3.5 and calculate("8 / 2") == 4 and isinstance(calculate("8 / 2"), int)
    assert calculate("1 / 3") == pytest.approx(0.333333)
    for bad, why in [
        ("", "1 to 64"),
        ("2 ** 10", "only integers"),
        ("__import__('os')", "only integers"),
        ("1 / 0", "division by zero"),
        ("1.5 + 2", "only integers"),
        ("99999999 * 99999999", "too large"),
        ("3 +", "not an arithmetic"),
        ("1" * 65, "1 to 64"),
    ]:
        with pytest.raises(ValueError, match=why):
            calculate(bad)


def test_the_calculator_answers_calls_and_scores_the_answer():
    env = Calculator()
    prompt = json.loads((ASSETS / "arithmetic_tool_eval.jsonl").read_text().splitlines()[0])["prompt"]
    env.reset(prompt)
    a, op, b, answer = env.question
    assert env.step(f"Let me check: <calc>{a} {op} {b}</calc>") == Step(observation=f"<result>{answer}</result>")
    assert env.step("<calc>2 ** 3</calc>") == Step(
        observation="<result>error: only integers, + - * / and parentheses</result>"
    )
    assert env.step(f"{answer}") == Step(done=True, reward=1.0)
    assert env.step(f"{answer + 1}") == Step(done=True, reward=0.0)
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        env.reset("What is 2 + 3? Reply with the number only.")  # the plain task's prompt: no tool described


def test_every_shipped_tool_prompt_is_the_plain_question_with_the_call_format():
    for split in ("train", "eval"):
        plain = [json.loads(line) for line in (ASSETS / f"arithmetic_{split}.jsonl").read_text().splitlines()]
        tool = [json.loads(line) for line in (ASSETS / f"arithmetic_tool_{split}.jsonl").read_text().splitlines()]
        assert len(plain) == len(tool) > 0
        for p, t in zip(plain, tool, strict=True):
            assert TOOL_PROMPT.fullmatch(t["prompt"]) and t["answer"] == p["answer"]
            assert t["prompt"].split("?")[0] == p["prompt"].split("?")[0]


def test_the_calculator_on_the_embedded_model_gives_exact_log_probs_across_turns(tmp_path):
    """The real chat template's tool frame, on SmolLM2: a first turn that calls the calculator
    (forced), its result read back, and the second turn sampled after it, whose tokens have the
    log-probs the trainer recomputes over the whole episode."""
    config = load_config(
        GRPOConfig,
        None,
        [
            "model.lora={r: 4, alpha: 8}",
            "rollout.environment=tether.environments:Calculator",
            "rollout.max_turns=2",
            "rollout.max_new_tokens=12",
            f"data.prompts={ASSETS / 'arithmetic_tool_train.jsonl'}",
            "train.batch_size=2",
            "rollout.samples_per_prompt=2",
            "grpo.minibatch_size=4",
            "eval.num_prompts=0",
            "speed.inverse_cdf_sampler=true",
        ],
    )
    trainer = GRPOTrainer(config, tmp_path / "run")
    roles = trainer.roles
    assert roles.episodes is not None
    call = trainer.tokenizer("<calc>3 * 4</calc>", add_special_tokens=False)["input_ids"] + roles.eos_ids[:1]
    turn = policy_sampler(roles, config, 12, config.rollout.temperature, True)

    def first_turn_calls(contexts, samples):
        sampled, logprobs = turn(contexts, samples)
        if samples == 1:  # the second turn, as the policy samples it
            return sampled, logprobs
        ids = torch.full_like(sampled.response_ids, roles.pad_id)
        ids[:, : len(call)] = torch.tensor(call)
        mask = torch.zeros_like(sampled.response_mask)
        mask[:, : len(call)] = True
        forced = replace(sampled, response_ids=ids, response_mask=mask, finished=torch.ones(len(ids), dtype=torch.bool))
        return forced, torch.zeros(ids.shape)  # no sampler log-probs for forced tokens: not compared

    texts = [p.text for p in trainer.prompts[:2]]
    with torch.no_grad():
        trajectory = roles.episodes.run(first_turn_calls, texts, trainer.prompt_ids[:2], 2)
    assert all(episode[1] == ("tool", "<result>12</result>") for episode in trajectory.episodes)
    trajectory = replace(trajectory.to(trainer.device), prompts=tuple(texts[int(i)] for i in trajectory.prompt_index))
    trajectory, _ = policy_pass(roles, config, trajectory, keep_graph=False)
    second = trajectory.mask.clone()
    second[:, : len(call)] = False  # the forced turn
    assert int(second.sum()) >= 4
    gap = (trajectory.sample_logprobs - trajectory.old_logprobs)[second].abs()
    assert float(gap.max()) < 1e-4, f"second-turn log-probs differ by up to {float(gap.max())}"
