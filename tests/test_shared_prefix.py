"""The prompt prefix every row shares is computed once, and nothing a role reads changes: log-probs,
values, scores and gradients equal those of the plain pass to float rounding."""

from __future__ import annotations

import pytest
import torch

import tether.sampling as rollout_module
from tether.config import LoraConfig
from tether.loading.models import add_lora, load_causal_lm, load_scalar_model, load_tokenizer, scalar_head
from tether.roles.policy import response_logprobs
from tether.roles.reward import sequence_scores
from tether.roles.value import ValueHead, response_values
from tether.sampling import generate, left_pad
from tether.speed import FAST, PLAIN
from tether.speed.shared_prefix import MIN_SHARED_TOKENS, expand_to_columns, split_shared_prefix

PAD = 0


def _batch(prompts, responses):
    """[left-padded prompt | right-padded response] ids, mask and the response start column."""
    prompt_ids, prompt_mask = left_pad(prompts, PAD)
    width = max(len(r) for r in responses)
    response_ids = torch.full((len(responses), width), PAD)
    response_mask = torch.zeros((len(responses), width), dtype=torch.bool)
    for row, r in enumerate(responses):
        response_ids[row, : len(r)] = torch.tensor(r)
        response_mask[row, : len(r)] = True
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    return ids, torch.cat([prompt_mask, response_mask], dim=1), prompt_ids.shape[1]


SYSTEM = [4, 10, 11, 12, 13, 14, 15, 16, 17, 18, 5]  # 11 tokens every prompt starts with
PROMPTS = [SYSTEM + [20, 21, 22], SYSTEM + [23], SYSTEM + [24, 25, 26, 27, 28, 29], SYSTEM + [30, 31]]
RESPONSES = [[6, 7, 8, 3], [9, 10], [11, 12, 13, 14, 15, 16], [17, 3]]


def test_the_split_finds_the_shared_prefix_and_keeps_every_rest_aligned():
    ids, mask, start = _batch(PROMPTS, RESPONSES)
    split = split_shared_prefix(ids, mask, start)
    assert split is not None and split.length == len(SYSTEM)
    assert split.prefix_ids.tolist() == [SYSTEM]
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        real = split.rest_ids[row][split.attention_mask[row, split.length :]].tolist()
        assert real == prompt[len(SYSTEM) :] + response  # the rest of the row, in order
        # Positions continue from the prefix over real tokens, as in the full row.
        rest_positions = split.rest_positions[row][split.attention_mask[row, split.length :]].tolist()
        assert rest_positions == list(range(len(SYSTEM), len(prompt) + len(response)))
    # Every row's response still starts in one column (the last columns are the same as before).
    assert torch.equal(split.rest_ids[:, -(ids.shape[1] - start) :], ids[:, start:])
    # `order` maps [prefix | rest] back to the original columns: a permutation of each row.
    assert torch.equal(split.order.sort(dim=1).values, torch.arange(ids.shape[1]).expand_as(ids))
    assert torch.equal(
        torch.cat([split.prefix_ids.expand(len(ids), -1), split.rest_ids], 1), ids.gather(1, split.order)
    )


def test_the_split_never_takes_a_whole_prompt_and_refuses_short_or_single_prefixes():
    same = [SYSTEM + [20, 21]] * 3
    ids, mask, start = _batch(same, [[6, 7], [6, 7], [6, 8]])
    split = split_shared_prefix(ids, mask, start)
    assert split is not None and split.length == len(same[0]) - 1  # one prompt token stays in each rest
    full = split_shared_prefix(ids, mask)  # no prompt block given: into the responses, one token kept
    assert full is not None and full.length == len(same[0]) + 1

    short = [SYSTEM[: MIN_SHARED_TOKENS - 1] + [20, 21, 22], SYSTEM[: MIN_SHARED_TOKENS - 1] + [23, 24]]
    assert split_shared_prefix(*_batch(short, [[6], [7]])[:2]) is None
    assert split_shared_prefix(*_batch(PROMPTS[:1], RESPONSES[:1])[:2]) is None  # one row: nothing to share
    ids, mask, start = _batch(PROMPTS, RESPONSES)
    mask[1, start - 3] = False  # a gap inside row 1's prefix: not a shared run of real tokens
    assert split_shared_prefix(ids, mask, start) is None or split_shared_prefix(ids, mask, start).length < len(SYSTEM)


def test_expand_to_columns_puts_every_state_back_in_its_column():
    ids, mask, start = _batch(PROMPTS, RESPONSES)
    split = split_shared_prefix(ids, mask, start)
    assert split is not None
    states = ids[..., None].float() * torch.tensor([1.0, -1.0])  # (B, L, 2): each column's own token
    back = expand_to_columns(
        states[:1, split.order[0, : split.length]],
        states.gather(1, split.order[:, split.length :, None].expand(-1, -1, 2)),
        split,
    )
    assert torch.equal(back, states)


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_gpt2"])
def test_policy_logprobs_values_and_gradients_equal_the_plain_pass(request, model_fixture):
    path = str(request.getfixturevalue(model_fixture))
    tokenizer = load_tokenizer(path)
    policy = add_lora(load_causal_lm(path, tokenizer), LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    head = ValueHead(policy.config.hidden_size)
    with torch.no_grad():
        head.linear.weight.normal_()
    ids, mask, start = _batch(PROMPTS, RESPONSES)
    assert split_shared_prefix(ids, mask, start) is not None

    def run(speed):
        policy.zero_grad(set_to_none=True)
        logprobs, entropy, values = response_logprobs(
            policy, ids, mask, start, 0.7, speed=speed, with_entropy=True, value_head=head
        )
        (logprobs * mask[:, start:]).sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        return logprobs.detach(), entropy, values.detach(), grads

    shared = run(FAST)
    plain = run(PLAIN)
    response_mask = mask[:, start:]
    for got, expected in zip(shared[:3], plain[:3], strict=True):
        torch.testing.assert_close(got[response_mask], expected[response_mask], atol=1e-5, rtol=1e-5)
    assert shared[3].keys() == plain[3].keys() and shared[3]
    for name, grad in plain[3].items():
        torch.testing.assert_close(shared[3][name], grad, atol=1e-5, rtol=1e-4)


def test_value_model_and_reward_model_read_the_same_with_a_shared_prefix(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    scalar = load_scalar_model(str(tiny_llama), tokenizer, new_head="reward")
    with torch.no_grad():
        scalar_head(scalar).weight.normal_()
    ids, mask, start = _batch(PROMPTS, RESPONSES)
    with torch.no_grad():
        shared = (response_values(scalar, ids, mask, start, FAST), sequence_scores(scalar, ids, mask, FAST))
        plain = (response_values(scalar, ids, mask, start, PLAIN), sequence_scores(scalar, ids, mask, PLAIN))
    response_mask = mask[:, start:]
    torch.testing.assert_close(shared[0][response_mask], plain[0][response_mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared[1], plain[1], atol=1e-5, rtol=1e-5)
    assert shared[1].std() > 0  # the scores are not a constant the test would match anyway


@pytest.mark.parametrize(("model_fixture", "lora"), [("tiny_llama", False), ("tiny_gpt2", False), ("tiny_llama", True)])
def test_generation_with_a_cached_prefix_samples_the_policy(request, monkeypatch, model_fixture, lora):
    """generate starts from the shared prefix's KV cache: the rollout keeps the usual layout, the
    log-probs generate sampled from are the policy's own (recomputed by the training forward), and
    the prefix pass really ran."""
    path = str(request.getfixturevalue(model_fixture))
    tokenizer = load_tokenizer(path)
    policy = load_causal_lm(path, tokenizer)
    if lora:  # a moved adapter: sampling folds it into W + dW (speed/prepared_linears.py) on top of the cache
        policy = add_lora(policy, LoraConfig(r=4, alpha=8))
        with torch.no_grad():
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.2)
    calls = []
    real_prefix_pass = rollout_module.prefix_pass
    monkeypatch.setattr(
        rollout_module, "prefix_pass", lambda *a, **k: calls.append(a[1].length) or real_prefix_pass(*a, **k)
    )
    torch.manual_seed(0)
    eos = [tokenizer.eos_token_id]
    rollout, sampled = generate(
        policy, PROMPTS, 2, 6, 0.9, tokenizer.pad_token_id, eos, speed=FAST, return_logprobs=True
    )
    assert calls == [len(SYSTEM)]
    expected_ids, expected_mask = left_pad(PROMPTS, tokenizer.pad_token_id)
    assert torch.equal(rollout.prompt_ids, expected_ids.repeat_interleave(2, dim=0))
    assert torch.equal(rollout.prompt_mask, expected_mask.repeat_interleave(2, dim=0))
    with torch.no_grad():  # recomputed by the plain pass: no shared path on the other side of the check
        (recomputed,) = response_logprobs(
            policy, rollout.input_ids, rollout.attention_mask, rollout.response_start, 0.9, speed=PLAIN
        )
    mask = rollout.response_mask
    torch.testing.assert_close(sampled[mask], recomputed[mask], atol=1e-5, rtol=1e-5)
