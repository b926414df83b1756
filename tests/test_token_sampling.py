"""Drawing one token per row (core.logprobs.sample_tokens): the tokens follow softmax(logits / T), each
is the first token whose cumulative probability exceeds the row's uniform number, a token of
probability 0 is never drawn, and generate's draws are the log-probs it reports."""

from __future__ import annotations

import pytest
import torch

from tests.test_roles import _prompt_ids
from tether.config import LoraConfig
from tether.core.logprobs import sample_tokens
from tether.loading.models import add_lora, load_causal_lm, load_tokenizer
from tether.roles.policy import response_logprobs
from tether.sampling import generate
from tether.speed import FAST


def test_each_token_is_the_first_whose_cumulative_probability_exceeds_the_uniform_number():
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 2
    temperature = 0.7
    torch.manual_seed(3)
    tokens, logprobs = sample_tokens(logits, temperature)
    torch.manual_seed(3)
    uniforms = torch.rand((64, 1), dtype=torch.float64)[:, 0]  # the numbers sample_tokens drew
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    for row in range(64):
        running, expected = 0.0, None
        for token in range(10):  # brute force: walk the distribution until it passes u
            running += float(probs[row, token])
            if running > float(uniforms[row]):
                expected = token
                break
        assert int(tokens[row]) == expected
    reference = torch.log_softmax(logits / temperature, dim=-1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs, reference)


def test_frequencies_follow_the_tempered_distribution_and_impossible_tokens_never_come():
    logits = torch.tensor([2.0, 0.5, -1.0, float("-inf"), 1.0, -3.0])
    temperature = 1.3
    draws = 200_000
    torch.manual_seed(0)
    tokens, _ = sample_tokens(logits.expand(draws, -1), temperature)
    counts = torch.bincount(tokens, minlength=6).double()
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    assert counts[3] == 0  # -inf: probability 0
    # Each count is binomial: within 5 standard deviations of its mean (fails by chance ~1e-6).
    spread = (draws * probs * (1 - probs)).sqrt()
    assert ((counts - draws * probs).abs() <= 5 * spread + 1e-9).all(), (counts / draws, probs)
    # A rare token (p = 0.00117 here) is drawn at its rate too, not rounded away.
    assert counts[5] > 0


def test_a_row_without_a_finite_logit_or_a_temperature_of_zero_is_refused():
    logits = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample_tokens(logits, 0.0)
    logits[1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        sample_tokens(logits, 1.0)


@pytest.mark.parametrize("lora", [False, True])
def test_generation_ignores_the_models_own_processors_and_reports_what_it_drew(tiny_llama, lora):
    """A model's generation_config with a repetition penalty, top-k and a minimum length must not
    change what is sampled (generate fills unset settings from it): the log-probs generate reports
    for its draws are the plain tempered ones, and the model keeps its own config."""
    tokenizer = load_tokenizer(str(tiny_llama))
    model = load_causal_lm(str(tiny_llama), tokenizer)
    hostile = {"top_k": 3, "repetition_penalty": 3.0, "no_repeat_ngram_size": 1, "min_new_tokens": 10}
    for key, value in hostile.items():
        setattr(model.generation_config, key, value)
    if lora:
        model = add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    rollout, sampled = generate(
        model,
        _prompt_ids(tokenizer),
        2,
        10,
        0.8,
        tokenizer.pad_token_id,
        [tokenizer.eos_token_id],
        speed=FAST,
        return_logprobs=True,
    )
    with torch.no_grad():
        (recomputed,) = response_logprobs(
            model, rollout.input_ids, rollout.attention_mask, rollout.response_start, 0.8, speed=FAST
        )
    mask = rollout.response_mask
    torch.testing.assert_close(sampled[mask], recomputed[mask], atol=1e-5, rtol=0)
    inner = model.get_base_model() if lora else model
    assert {key: getattr(inner.generation_config, key) for key in hostile} == hostile
