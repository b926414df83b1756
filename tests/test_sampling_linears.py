"""Sampling with prepared linear layers (LoRA folded in, oneDNN's weight layout on the CPU) samples
the trained policy's own distribution and leaves every weight and module as it was."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

import tether.speed.prepared_linears as sampling
from tests.test_roles import _prompt_ids
from tether.config import LoraConfig
from tether.loading.models import add_lora, load_causal_lm, load_tokenizer
from tether.roles.policy import response_logprobs
from tether.sampling import generate, left_pad
from tether.speed import FAST
from tether.speed.prepared_linears import prepared_linears

ONEDNN = sampling._onednn_usable("cpu")


def _moved_lora_policy(path, dora=False):
    """A LoRA policy whose adapter has moved away from zero (B = 0 would make it the base model)."""
    tokenizer = load_tokenizer(str(path))
    model = load_causal_lm(str(path), tokenizer)
    if dora:  # not a tether option: peft's own config
        policy = get_peft_model(model, PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
    else:
        policy = add_lora(model, LoraConfig(r=4, alpha=8))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                param.copy_(param + torch.randn(param.shape, generator=gen) * 0.3)
    return tokenizer, policy


def _logits(model, tokenizer):
    ids, mask = left_pad(_prompt_ids(tokenizer), tokenizer.pad_token_id)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask.long()).logits


def _replaced(model):
    return [name for name, module in model.named_modules() if "forward" in vars(module)]


def test_lora_policy_samples_the_trained_policy_and_no_weight_changes(tiny_llama):
    """What is sampled follows the policy with its adapter (not the base model), to float rounding,
    and afterwards every parameter is bit-for-bit what it was and every module its own again."""
    tokenizer, policy = _moved_lora_policy(tiny_llama)
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    torch.manual_seed(0)
    rollout, sampled = generate(
        policy,
        _prompt_ids(tokenizer),
        2,
        12,
        0.8,
        tokenizer.pad_token_id,
        [tokenizer.eos_token_id],
        speed=FAST,
        return_logprobs=True,
    )
    assert all(torch.equal(p, before[name]) for name, p in policy.named_parameters())
    assert _replaced(policy) == []
    args = (rollout.input_ids, rollout.attention_mask, rollout.response_start, 0.8)
    with torch.no_grad():
        (trained,) = response_logprobs(policy, *args, speed=FAST)
        with policy.disable_adapter():
            (base,) = response_logprobs(policy, *args, speed=FAST)
    mask = rollout.response_mask
    torch.testing.assert_close(sampled[mask], trained[mask], atol=1e-5, rtol=0)
    assert (sampled[mask] - base[mask]).abs().max() > 1e-2  # the adapter matters to what was sampled


def test_every_linear_layer_is_replaced_and_gives_the_same_logits(tiny_llama):
    """Inside the block: LoRA layers on W + dW; on a oneDNN CPU every other linear layer too (the
    LM head included), never a LoRA layer's own base or adapter matmuls, which it no longer calls."""
    tokenizer, policy = _moved_lora_policy(tiny_llama)
    expected = _logits(policy, tokenizer)
    lora_layers = {name for name, m in policy.named_modules() if isinstance(m, LoraLayer)}
    assert lora_layers
    with prepared_linears(policy) as count:
        replaced = set(_replaced(policy))
        inside = _logits(policy, tokenizer)
        assert not torch.is_grad_enabled()
    assert count == len(replaced)
    assert lora_layers <= replaced
    assert not any(name.startswith(tuple(f"{layer}." for layer in lora_layers)) for name in replaced)
    others = {
        name for name, m in policy.named_modules() if type(m) is nn.Linear and not name.startswith(tuple(lora_layers))
    }
    assert others  # the LM head is no LoRA target
    assert (others <= replaced) == ONEDNN
    torch.testing.assert_close(inside, expected, atol=1e-5, rtol=1e-5)
    assert torch.is_grad_enabled()
    assert torch.equal(_logits(policy, tokenizer), expected)


def test_a_model_without_adapter_gives_the_same_logits(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    model = load_causal_lm(str(tiny_llama), tokenizer)
    expected = _logits(model, tokenizer)
    with prepared_linears(model) as count:
        inside = _logits(model, tokenizer)
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert count == (linears if ONEDNN else 0)
    torch.testing.assert_close(inside, expected, atol=1e-5, rtol=1e-5)
    assert _replaced(model) == []


def test_without_onednn_only_lora_layers_are_folded(tiny_llama, monkeypatch):
    """Elsewhere (a GPU, a CPU build without oneDNN) plain layers gain nothing; LoRA layers still
    run one matmul on W + dW."""
    monkeypatch.setattr(sampling, "_onednn_usable", lambda device_type: False)
    tokenizer, policy = _moved_lora_policy(tiny_llama)
    expected = _logits(policy, tokenizer)
    with prepared_linears(policy):
        replaced = set(_replaced(policy))
        inside = _logits(policy, tokenizer)
    assert replaced == {name for name, m in policy.named_modules() if isinstance(m, LoraLayer)}
    torch.testing.assert_close(inside, expected, atol=1e-5, rtol=1e-5)


def test_a_disabled_adapter_samples_the_base_model(tiny_llama):
    tokenizer, policy = _moved_lora_policy(tiny_llama)
    with policy.disable_adapter():
        expected = _logits(policy, tokenizer)
        with prepared_linears(policy):
            inside = _logits(policy, tokenizer)
    torch.testing.assert_close(inside, expected, atol=1e-5, rtol=1e-5)


def test_lora_variants_it_cannot_fold_run_as_they_are(tiny_llama):
    """DoRA rescales W + dW per column: not a plain fold, so those layers keep peft's forward (and
    the answer stays right)."""
    tokenizer, policy = _moved_lora_policy(tiny_llama, dora=True)
    expected = _logits(policy, tokenizer)
    with prepared_linears(policy):
        replaced = set(_replaced(policy))
        inside = _logits(policy, tokenizer)
    assert not any(isinstance(policy.get_submodule(name), LoraLayer) for name in replaced)
    torch.testing.assert_close(inside, expected, atol=1e-5, rtol=1e-5)


def test_only_float32_without_autocast_is_prepared(tiny_llama):
    """In bf16 (weights or autocast) W + dW would round a small update away."""
    tokenizer, policy = _moved_lora_policy(tiny_llama)
    with torch.autocast("cpu", dtype=torch.bfloat16), prepared_linears(policy) as count:
        assert count == 0
    with prepared_linears(policy.to(torch.bfloat16)) as count:
        assert count == 0
        assert _replaced(policy) == []


def test_every_layer_is_restored_when_the_block_raises(tiny_llama):
    tokenizer, policy = _moved_lora_policy(tiny_llama)
    with pytest.raises(RuntimeError, match="inside"), prepared_linears(policy) as count:
        assert count > 0
        raise RuntimeError("inside")
    assert _replaced(policy) == []
