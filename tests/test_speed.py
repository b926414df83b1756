"""Every speed trick against its plain path (tether/speed/): the same log-probs, values and metrics
to float rounding, on tiny models of every architecture of tests/architectures.py.

A trick an architecture cannot take is switched off for it by a rule decided from its config
(`speed.shared_prefix.unsupported`): for those the check is that the rule fires, and that with the
switch left on the numbers are still the plain ones. Tolerances: 2e-5 nats on log-probs, 1e-4 on
hidden states, 1e-3 relative on a short run's metrics (rounding compounds over optimizer steps).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests.architectures import ARCHITECTURES, build_tiny_architecture
from tests.tiny_models import make_tokenizer
from tether.config import LoraConfig, SpeedConfig
from tether.data import Prompt, encode_prompt
from tether.loading.models import add_lora
from tether.roles.forward import model_forward
from tether.roles.policy import response_logprobs
from tether.sampling import generate, left_pad
from tether.speed import FAST, PLAIN, refusals
from tether.speed.shared_prefix import expand_to_columns, split_shared_prefix, unsupported

SYSTEM = "please tell me about the big red sun and the small blue moon"  # 12 words every prompt shares
USER = ["hello", "why is the cat very good", "tell me more about the dog and the cat and the sun please"]
REFUSED = {"mistral", "gemma2", "gemma3", "phi3", "olmo3", "cohere2", "starcoder2", "gpt_oss"}  # sliding window
RECURRENT = {"qwen3_next", "lfm2", "mamba"}
# Each trick switched off alone, and all of them.
SWITCHED = {
    "all on": FAST,
    "no shared prefix": dataclasses.replace(FAST, shared_prefix=False),
    "no prepared linears": dataclasses.replace(FAST, prepared_linears=False),
    "no inverse-CDF sampler": dataclasses.replace(FAST, inverse_cdf_sampler=False),
    "all off": PLAIN,
}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    prompts = [Prompt(({"role": "system", "content": SYSTEM}, {"role": "user", "content": u}), u) for u in USER]
    return [encode_prompt(tokenizer, p, True, 256) for p in prompts]


_MODELS: dict[str, torch.nn.Module] = {}


def tiny(name: str) -> torch.nn.Module:
    if name not in _MODELS:
        _MODELS[name] = build_tiny_architecture(name, seed=0).eval()
    return _MODELS[name]


def _sample(model, tokenizer, prompt_ids, speed: SpeedConfig, seed: int = 0):
    torch.manual_seed(seed)
    return generate(
        model,
        prompt_ids,
        2,
        10,
        0.7,
        tokenizer.pad_token_id,
        [tokenizer.eos_token_id],
        speed=speed,
        return_logprobs=True,
    )


def test_the_prompts_share_a_prefix_worth_computing_once(prompt_ids):
    ids, mask = left_pad(prompt_ids, 0)
    split = split_shared_prefix(ids, mask)
    assert split is not None and split.length >= len(SYSTEM.split())
    assert len({len(p) for p in prompt_ids}) == 3  # every row has its own amount of left padding


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_the_shared_prefix_rule_refuses_exactly_the_architectures_it_cannot_serve(name):
    reason = unsupported(tiny(name))
    assert (reason is not None) == (name in REFUSED | RECURRENT), reason
    if name in REFUSED:
        assert "sliding-window" in reason
    logged = refusals(FAST, tiny(name))
    assert bool(logged) == (reason is not None) and not refusals(PLAIN, tiny(name))


@pytest.mark.parametrize("switches", sorted(SWITCHED))
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_sampled_logprobs_equal_a_plain_recomputation(name, switches, tokenizer, prompt_ids):
    """What generate reports it sampled from is the policy's own distribution, recomputed by one
    plain padded forward pass (no cache, no trick), with each trick on or off. This is the check
    that found 2-7 nats per token on sliding-window models before the rule existed."""
    model = tiny(name)
    trajectory, sampled = _sample(model, tokenizer, prompt_ids, SWITCHED[switches])
    with torch.no_grad():
        (plain,) = response_logprobs(
            model, trajectory.input_ids, trajectory.attention_mask, trajectory.response_start, 0.7, speed=PLAIN
        )
    mask = trajectory.response_mask
    assert mask.any()
    torch.testing.assert_close(sampled[mask], plain[mask], atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_policy_logprobs_entropy_and_gradients_equal_the_plain_pass(name, tokenizer, prompt_ids):
    """The training-side pass (old log-probs, entropy, the update's forward and backward) with
    speed.shared_prefix on equals the plain one, on rows that share a system prompt."""
    model = tiny(name)
    trajectory, _ = _sample(model, tokenizer, prompt_ids, FAST)
    args = (trajectory.input_ids, trajectory.attention_mask, trajectory.response_start, 0.7)
    results = []
    for speed in (FAST, PLAIN):
        model.zero_grad(set_to_none=True)
        logprobs, entropy = response_logprobs(model, *args, speed=speed, with_entropy=True)
        (logprobs * trajectory.response_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logprobs.detach(), entropy, grads))
    (fast, fast_entropy, fast_grads), (plain, plain_entropy, plain_grads) = results
    mask = trajectory.response_mask
    torch.testing.assert_close(fast[mask], plain[mask], atol=2e-5, rtol=0)
    torch.testing.assert_close(fast_entropy[mask], plain_entropy[mask], atol=2e-5, rtol=0)
    assert fast_grads.keys() == plain_grads.keys() and plain_grads
    for key, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[key], grad, atol=1e-4, rtol=1e-3, msg=key)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_the_backbone_states_value_and_reward_models_read_equal_the_plain_pass(name, tokenizer, prompt_ids):
    """Value and reward models read the last hidden states of their body (roles/value.py
    backbone_hidden); here the same body pass on the causal LM's body, in every column."""
    model = tiny(name)
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    trajectory, _ = _sample(model, tokenizer, prompt_ids, FAST)
    ids, mask = trajectory.input_ids, trajectory.attention_mask
    with torch.no_grad():
        out, prefix, split = model_forward(body, ids, mask, FAST)
        states = (
            out.last_hidden_state
            if split is None
            else expand_to_columns(prefix.last_hidden_state, out.last_hidden_state, split)
        )
        plain = model_forward(body, ids, mask, PLAIN)[0].last_hidden_state
    assert (split is not None) == (unsupported(model) is None)
    real = mask.bool()
    torch.testing.assert_close(states[real], plain[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma2", "mixtral", "qwen2_moe", "falcon"])
def test_a_moved_lora_policy_samples_its_own_distribution_with_every_trick(name, tokenizer, prompt_ids):
    """LoRA adds the folded W + dW of the prepared linears (Conv1D layers are left as they are, as
    are MoE expert parameters) on top of the shared prefix."""
    torch.manual_seed(1)
    policy = add_lora(build_tiny_architecture(name, seed=0), LoraConfig(r=4, alpha=8)).eval()
    with torch.no_grad():
        for key, param in policy.named_parameters():
            if "lora_B" in key:
                param.normal_(0, 0.3)
    trajectory, sampled = _sample(policy, tokenizer, prompt_ids, FAST)
    with torch.no_grad():
        args = (trajectory.input_ids, trajectory.attention_mask, trajectory.response_start, 0.7)
        (plain,) = response_logprobs(policy, *args, speed=PLAIN)
        with policy.disable_adapter():
            (base,) = response_logprobs(policy, *args, speed=PLAIN)
    mask = trajectory.response_mask
    torch.testing.assert_close(sampled[mask], plain[mask], atol=2e-5, rtol=0)
    assert (plain[mask] - base[mask]).abs().max() > 1e-2, "the adapter did not move the policy: a vacuous check"


# --------------------------------------------------------------------------------------------
# Whole stages: a switch changes no metric (timings aside)
# --------------------------------------------------------------------------------------------

REWARD_FILE = """
def good_share(prompts, responses, **kw):
    return [sum(w == "good" for w in r.split()) / max(len(r.split()), 1) for r in responses]
"""
NONDETERMINISTIC = ("time/", "throughput/", "memory/")


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    from tests.architectures import save_tiny_architecture

    folder = tmp_path_factory.mktemp("speed-task")
    save_tiny_architecture(folder / "llama", "llama")
    (folder / "reward.py").write_text(REWARD_FILE)
    rows = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": u}]} for u in USER]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    sft = [{"messages": [*r["messages"], {"role": "assistant", "content": "the cat is very good"}]} for r in rows]
    (folder / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft * 3))
    pairs = [{**r, "chosen": "the cat is good", "rejected": "no"} for r in rows]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs * 3))
    return folder


def _run(stage: str, task: Path, run: Path, speed: SpeedConfig, *extra: str) -> list[dict]:
    from tether.cli import main

    switches = [f"speed.{f.name}={str(getattr(speed, f.name)).lower()}" for f in dataclasses.fields(speed)]
    common = [f"model.name={task / 'llama'}", "train.save_every=0", "train.num_threads=2", *switches]
    if stage in ("ppo", "grpo"):
        common += [
            f"reward.function={task / 'reward.py'}:good_share",
            f"data.prompts={task / 'prompts.jsonl'}",
            f"data.eval={task / 'prompts.jsonl'}",
            "eval.num_prompts=3",
            "train.steps=2",
            "train.batch_size=3",
            "train.lr=1e-3",
            "rollout.max_new_tokens=8",
            "train.sample_every=0",
        ]
    else:
        data = task / ("sft.jsonl" if stage == "sft" else "pairs.jsonl")
        common += [f"data.train={data}", f"data.eval={data}", "train.steps=3", "train.batch_size=3", "train.lr=1e-3"]
    assert main([stage, *common, *extra, "--output", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(NONDETERMINISTIC)} for r in rows]


def _assert_same_metrics(fast: list[dict], plain: list[dict]) -> None:
    assert len(fast) == len(plain) and fast
    for a, b in zip(fast, plain, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key == "rewards/accuracies" and a["step"] == 1:
                # DPO's first step: the policy is the reference, every margin is 0 up to rounding, and
                # a tie (counted 1/2) or a win by 1e-7 is decided by the order of a sum.
                continue
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), (a["step"], key)


STAGE_SWITCHES = [
    ("ppo", "shared_prefix", ("ppo.minibatch_size=3",)),
    ("ppo", "prepared_linears", ("ppo.minibatch_size=3",)),
    ("ppo", "reuse_old_pass", ("ppo.minibatch_size=3", "ppo.epochs=2")),
    ("ppo", "fused_adamw", ("ppo.minibatch_size=3",)),
    ("ppo", "keep_freed_memory", ("ppo.minibatch_size=3",)),
    ("grpo", "reuse_old_pass", ("rollout.samples_per_prompt=2", "grpo.minibatch_size=6")),
    ("grpo", "shared_prefix", ("rollout.samples_per_prompt=2", "grpo.minibatch_size=6")),
    ("sft", "shared_prefix", ()),
    ("rm", "shared_prefix", ()),
    ("dpo", "shared_prefix", ()),
]


@pytest.mark.parametrize(("stage", "switch", "extra"), STAGE_SWITCHES, ids=[f"{s}-{w}" for s, w, _ in STAGE_SWITCHES])
def test_a_run_logs_the_same_metrics_with_the_switch_off(stage, switch, extra, task, tmp_path):
    fast = _run(stage, task, tmp_path / "fast", FAST, *extra)
    plain = _run(stage, task, tmp_path / "plain", dataclasses.replace(FAST, **{switch: False}), *extra)
    _assert_same_metrics(fast, plain)


def test_the_sampler_switch_changes_the_draws_not_the_distribution(task, tmp_path):
    """HF's multinomial draws other tokens than the inverse CDF for the same seed, so a run's
    metrics differ; what must hold on both paths is that the first iteration samples the policy
    itself: KL 0 to the reference and a ratio of exactly 1."""
    for speed in (FAST, dataclasses.replace(FAST, inverse_cdf_sampler=False)):
        rows = _run(
            "ppo", task, tmp_path / str(speed.inverse_cdf_sampler), speed, "ppo.minibatch_size=3", "ppo.epochs=1"
        )
        assert rows[0]["objective/kl"] == 0.0
        assert abs(rows[0]["policy/ratio_mean"] - 1.0) < 1e-6


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_sampled_logprobs_equal_each_row_recomputed_alone_without_padding(name, tokenizer, prompt_ids):
    """The strictest reference: every sampled row forwarded on its own, no padding at all, against
    what generate reported with every trick on. 5e-5 nats: a recurrent layer's chunked float32 sums
    depend on the sequence's length (Qwen3-Next: 2.0e-5); a trick's error was 0.1-7 nats."""
    model = tiny(name)
    trajectory, sampled = _sample(model, tokenizer, prompt_ids, FAST)
    for row in range(len(trajectory)):
        prompt = trajectory.prompt_ids[row][trajectory.prompt_mask[row]]
        response = trajectory.response_ids[row][trajectory.response_mask[row]]
        ids = torch.cat([prompt, response])[None]
        with torch.no_grad():
            (alone,) = response_logprobs(
                model, ids, torch.ones_like(ids, dtype=torch.bool), len(prompt), 0.7, speed=PLAIN
            )
        torch.testing.assert_close(sampled[row, : len(response)], alone[0], atol=5e-5, rtol=0)
