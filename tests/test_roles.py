"""The roles' forward conventions on tiny random models: where each log-prob, value and score is
read, and that none of it depends on padding or on what else is in the batch."""

from __future__ import annotations

import pytest
import torch

from tether.config import LoraConfig
from tether.data import Prompt, encode_prompt
from tether.loading.models import (
    add_lora,
    eos_token_ids,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    scalar_head,
)
from tether.roles.policy import response_logprobs
from tether.roles.reference import Reference
from tether.roles.reward import sequence_scores
from tether.roles.value import ValueHead, backbone_hidden, response_values
from tether.sampling import generate, left_pad, truncate_after_eos
from tether.speed import FAST

TEXTS = ["hello world", "tell me about the big red cat please", "why", "one two three four five six"]


def _prompt_ids(tokenizer, texts=TEXTS):
    return [encode_prompt(tokenizer, Prompt(({"role": "user", "content": t},), t), True, 64) for t in texts]


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def lm(request):
    path = str(request.getfixturevalue(request.param))
    tokenizer = load_tokenizer(path)
    return tokenizer, load_causal_lm(path, tokenizer)


def test_truncate_after_eos_masks_everything_after_the_first_eos():
    eos, pad = 9, 0
    ids = torch.tensor([[5, 9, 7, 9], [5, 6, 7, 8], [9, 5, 5, 5]])
    cut, mask, finished = truncate_after_eos(ids, [eos], pad)
    assert cut.tolist() == [[5, 9, 0, 0], [5, 6, 7, 8], [9, 0, 0, 0]]
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert finished.tolist() == [True, False, True]


def test_left_pad_aligns_the_ends():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_rollout_logprobs_equal_training_forward_logprobs(lm, temperature):
    """generate's sampling distribution (KV cache, left padding) and the training forward (full
    sequence, position ids from the mask) agree token by token, at the sampling temperature."""
    tokenizer, model = lm
    torch.manual_seed(0)
    rollout, sampled_logprobs = generate(
        model,
        _prompt_ids(tokenizer),
        2,
        12,
        temperature,
        tokenizer.pad_token_id,
        eos_token_ids(tokenizer, model),
        return_logprobs=True,
        speed=FAST,
    )
    with torch.no_grad():
        (recomputed,) = response_logprobs(
            model, rollout.input_ids, rollout.attention_mask, rollout.response_start, temperature, speed=FAST
        )
    mask = rollout.response_mask
    torch.testing.assert_close(recomputed[mask], sampled_logprobs[mask], atol=1e-5, rtol=0)


def _sequence_logprobs(model, prompt, response, temperature=0.9, left_extra=0, right_extra=0, others=()):
    """Log-probs of `response` after `prompt`, laid out with extra padding / other rows."""
    rows = [(prompt, response), *others]
    width_p = max(len(p) for p, _ in rows) + left_extra
    width_r = max(len(r) for _, r in rows) + right_extra
    ids = torch.zeros((len(rows), width_p + width_r), dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        ids[i, width_p - len(p) : width_p] = torch.tensor(p)
        mask[i, width_p - len(p) : width_p] = True
        ids[i, width_p : width_p + len(r)] = torch.tensor(r)
        mask[i, width_p : width_p + len(r)] = True
    with torch.no_grad():
        (logprobs,) = response_logprobs(model, ids, mask, width_p, temperature, speed=FAST)
    return logprobs[0, : len(response)]


def test_logprobs_do_not_depend_on_padding_or_batch_composition(lm):
    tokenizer, model = lm
    prompt = _prompt_ids(tokenizer)[1]
    response = tokenizer("the cat is very good")["input_ids"]
    alone = _sequence_logprobs(model, prompt, response)
    other = (
        _prompt_ids(tokenizer)[3] + [7, 8],
        tokenizer("no more please thanks a lot big dog")["input_ids"],
    )
    variants = {
        "left-padded": _sequence_logprobs(model, prompt, response, left_extra=5),
        "right-padded": _sequence_logprobs(model, prompt, response, right_extra=4),
        "batched": _sequence_logprobs(model, prompt, response, others=(other,)),
        "both": _sequence_logprobs(model, prompt, response, left_extra=3, right_extra=2, others=(other, other)),
    }
    for name, logprobs in variants.items():
        torch.testing.assert_close(logprobs, alone, atol=2e-5, rtol=0, msg=f"{name} padding changed log-probs")


def test_values_do_not_depend_on_padding(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    value = load_scalar_model(str(tiny_llama), tokenizer, new_head="reward")
    prompt = _prompt_ids(tokenizer)[0]
    response = tokenizer("a big red dog")["input_ids"]
    results = []
    for left in (0, 4):
        ids = torch.tensor([[0] * left + prompt + response + [0, 0]])
        mask = torch.tensor([[False] * left + [True] * (len(prompt) + len(response)) + [False, False]])
        with torch.no_grad():
            results.append(response_values(value, ids, mask, left + len(prompt), speed=FAST)[0, : len(response)])
    torch.testing.assert_close(results[0], results[1], atol=2e-5, rtol=0)


def test_value_model_from_a_causal_lm_starts_at_zero(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    value = load_scalar_model(str(tiny_llama), tokenizer)
    ids = torch.tensor([_prompt_ids(tokenizer)[1]])
    with torch.no_grad():
        values = response_values(value, ids, torch.ones_like(ids, dtype=torch.bool), 2, speed=FAST)
    assert torch.count_nonzero(values) == 0


def test_value_head_reads_the_final_hidden_state_and_never_trains_the_policy(tiny_llama, tmp_path):
    """A value head's values are w . rms_normalise(h) + b at the positions of the log-probs, h being
    the trunk's final (normed) hidden state, computed here from the trunk alone; its loss gives the
    head a gradient and the policy none (the features are detached); it reloads to the same values."""
    tokenizer = load_tokenizer(str(tiny_llama))
    policy = load_causal_lm(str(tiny_llama), tokenizer)
    head = ValueHead(policy.config.hidden_size)
    with torch.no_grad():
        head.linear.weight.normal_()
        head.linear.bias.fill_(0.5)
    prompt = _prompt_ids(tokenizer)[1]
    response = tokenizer("the cat is very good")["input_ids"]
    ids = torch.tensor([prompt + response])
    mask = torch.ones_like(ids, dtype=torch.bool)
    logprobs, values = response_logprobs(policy, ids, mask, len(prompt), 0.7, value_head=head, speed=FAST)
    (plain_logprobs,) = response_logprobs(policy, ids, mask, len(prompt), 0.7, speed=FAST)
    torch.testing.assert_close(logprobs, plain_logprobs, atol=0, rtol=0)

    with torch.no_grad():
        hidden = policy.model(input_ids=ids).last_hidden_state[0, len(prompt) - 1 : -1]  # predicts each response token
        normalised = hidden / hidden.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        expected = normalised @ head.linear.weight[0] + 0.5
    torch.testing.assert_close(values[0], expected, atol=1e-5, rtol=1e-5)

    values.sum().backward()
    assert head.linear.weight.grad is not None and torch.count_nonzero(head.linear.weight.grad) > 0
    assert all(p.grad is None for p in policy.parameters()), "the value loss reached the policy"

    head.save_pretrained(tmp_path / "value")
    reloaded = ValueHead.from_pretrained(tmp_path / "value")
    with torch.no_grad():  # the same weights: the same values, bit for bit
        torch.testing.assert_close(reloaded(hidden.unsqueeze(0)), head(hidden.unsqueeze(0)), atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="value_head.safetensors"):
        ValueHead.from_pretrained(tmp_path)


def test_value_head_starts_at_zero():
    assert torch.count_nonzero(ValueHead(16)(torch.randn(2, 5, 16))) == 0


@pytest.mark.parametrize("side", ["left", "right"])
def test_reward_is_read_at_the_last_real_token(tiny_llama, side):
    """The score of each sequence equals the head applied to the hidden state of its last real
    token (its EOS) computed on the unpadded sequence, whatever the padding side."""
    tokenizer = load_tokenizer(str(tiny_llama))
    reward_model = load_scalar_model(str(tiny_llama), tokenizer, new_head="reward")
    eos = tokenizer.eos_token_id
    sequences = [p + [eos] for p in _prompt_ids(tokenizer)]
    width = max(len(s) for s in sequences) + 2
    ids = torch.full((len(sequences), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, s in enumerate(sequences):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.tensor(s)
        mask[i, cols] = True
    scores = sequence_scores(reward_model, ids, mask, speed=FAST)
    with torch.no_grad():
        for i, s in enumerate(sequences):
            alone = torch.tensor([s])
            hidden = backbone_hidden(reward_model, alone, torch.ones_like(alone, dtype=torch.bool), speed=FAST)
            expected = scalar_head(reward_model)(hidden[0, -1]).item()
            assert scores[i].item() == pytest.approx(expected, abs=1e-5)


def test_lora_reference_is_the_policy_with_the_adapter_off(tiny_llama):
    """At the start the LoRA policy and its reference agree exactly; after the adapter moves, the
    reference still gives the base model's log-probs (and no second copy of weights exists)."""
    tokenizer = load_tokenizer(str(tiny_llama))
    base_logprobs_model = load_causal_lm(str(tiny_llama), tokenizer)
    policy = add_lora(load_causal_lm(str(tiny_llama), tokenizer), LoraConfig(r=4, alpha=8))
    reference = Reference(lora_policy=policy)
    rollout, _ = generate(
        policy, _prompt_ids(tokenizer), 1, 8, 1.0, tokenizer.pad_token_id, [tokenizer.eos_token_id], speed=FAST
    )
    args = (rollout.input_ids, rollout.attention_mask, rollout.response_start, 1.0)
    with torch.no_grad():
        (expected,) = response_logprobs(base_logprobs_model, *args, speed=FAST)
        (policy_before,) = response_logprobs(policy, *args, speed=FAST)
    mask = rollout.response_mask
    assert torch.equal(reference.logprobs(*args, speed=FAST)[mask], policy_before[mask])
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)
        (policy_after,) = response_logprobs(policy, *args, speed=FAST)
    assert not torch.allclose(policy_after[mask], policy_before[mask])
    torch.testing.assert_close(reference.logprobs(*args, speed=FAST)[mask], expected[mask], atol=1e-6, rtol=0)
    # Nested use (the reference's own log-probs while the reference is being evaluated) keeps the
    # adapter off until the outermost block ends.
    with reference.as_model() as model, torch.no_grad():
        reference.logprobs(*args, speed=FAST)
        (inside,) = response_logprobs(model, *args, speed=FAST)
    torch.testing.assert_close(inside[mask], expected[mask], atol=1e-6, rtol=0)
    with torch.no_grad():
        (after_blocks,) = response_logprobs(policy, *args, speed=FAST)
    torch.testing.assert_close(after_blocks[mask], policy_after[mask], atol=0, rtol=0)
