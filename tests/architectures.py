"""A zoo of tiny random-init causal LMs, one per popular architecture, built from configs.

tether promises to work with any Hugging Face causal LM, and its speed tricks (the shared prompt
prefix, the prepared linears, the sampler) touch the parts of a model that differ most between
architectures: how positions are encoded (RoPE from position ids, learned absolute embeddings,
ALiBi, positions derived from the attention mask), how attention is masked (full, sliding window,
alternating sliding and full layers, soft-capping) and what the cache holds (key/value tensors,
sliding-window layers, recurrent states of linear-attention and state-space layers). The models
here exercise those differences at almost no cost: 2 layers, hidden size 32, a few heads, and the
44-token word-level tokenizer of `tests/tiny_models.py`, so each forward pass takes 1-5 ms on a CPU.

Sliding-window models get a window of `SLIDING_WINDOW` tokens, shorter than the chat sequences of
the tests (30-40 tokens), so that tests reach past it. Every model is saved with its tokenizer as a
Hugging Face folder that `tether.models.load_causal_lm` and `tether.models.load_tokenizer` load.

    ARCHITECTURES: name -> a function of the tokenizer's special ids that returns the config
    tiny_config(name) -> the config;  build_tiny_architecture(name, seed) -> the model
    save_tiny_architecture(folder, name, seed=0) -> folder

Known limits of the libraries, not of the zoo (transformers 5.23.0, peft 0.21.2): cohere, cohere2,
granite, olmoe, granitemoe, lfm2 and mamba have no `*ForSequenceClassification` class (no reward or
value model from them); peft refuses LoRA `all-linear` on mamba (its `out_proj` and `conv1d`); the
linear-attention / conv cache layers of qwen3_next and lfm2 have no `batch_repeat_interleave`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig, PreTrainedTokenizerFast
from transformers.models import (
    bloom,
    cohere,
    cohere2,
    deepseek_v3,
    falcon,
    gemma,
    gemma2,
    gemma3,
    gpt2,
    gpt_neox,
    gpt_oss,
    gptj,
    granite,
    granitemoe,
    lfm2,
    llama,
    mamba,
    mistral,
    mixtral,
    olmo2,
    olmo3,
    olmoe,
    opt,
    phi,
    phi3,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_moe,
    qwen3_next,
    stablelm,
    starcoder2,
)

from tests.tiny_models import make_tokenizer

# Shorter than the chat prompts of the tests (30-40 tokens), so sliding layers drop early tokens.
SLIDING_WINDOW = 8
MAX_POSITIONS = 256
# Weights drawn 10x wider than HF's usual 0.02. At 0.02 a model this small is almost uniform over
# the vocabulary and almost blind to its context (a log-prob moves by ~0.05 nats when an early token
# changes), so a bug in how context reaches a position would hide in the noise. At 0.2 the entropy
# at temperature 0.7 is ~2.7 nats (uniform: 3.8) and one early token moves a log-prob by 0.5-5 nats.
INIT_RANGE = 0.2

ConfigFactory = Callable[[dict[str, Any]], PreTrainedConfig]

# Sizes most architectures share: 2 layers, hidden 32, 4 query heads of 8 (2 key/value heads).
_DECODER: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=MAX_POSITIONS,
    tie_word_embeddings=False,
)
# Mixture-of-experts sizes: 4 small experts, 2 per token.
_MOE: dict[str, Any] = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
# RoPE on half of each head's dimensions (Phi, GPT-NeoX, StableLM).
_HALF_ROPE: dict[str, Any] = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)
# One sliding layer, then one full layer (Gemma-2/3, Cohere-2, gpt-oss, OLMo-3 alternate like this).
_ALTERNATING = ["sliding_attention", "full_attention"]


def _llama(ids: dict[str, Any]) -> PreTrainedConfig:
    return llama.LlamaConfig(**_DECODER, **ids)


def _qwen2(ids: dict[str, Any]) -> PreTrainedConfig:
    return qwen2.Qwen2Config(**_DECODER, **ids)


def _qwen3(ids: dict[str, Any]) -> PreTrainedConfig:
    return qwen3.Qwen3Config(**_DECODER, head_dim=8, **ids)


def _mistral(ids: dict[str, Any]) -> PreTrainedConfig:
    """Every layer slides over SLIDING_WINDOW tokens."""
    return mistral.MistralConfig(**_DECODER, head_dim=8, sliding_window=SLIDING_WINDOW, **ids)


def _gemma(ids: dict[str, Any]) -> PreTrainedConfig:
    return gemma.GemmaConfig(**{**_DECODER, "tie_word_embeddings": True}, head_dim=8, **ids)


def _gemma2(ids: dict[str, Any]) -> PreTrainedConfig:
    """Alternating sliding/full layers, attention and final logit soft-capping, tied embeddings."""
    return gemma2.Gemma2Config(
        **{**_DECODER, "tie_word_embeddings": True},
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=SLIDING_WINDOW,
        layer_types=_ALTERNATING,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        **ids,
    )


def _gemma3(ids: dict[str, Any]) -> PreTrainedConfig:
    """The text-only Gemma3ForCausalLM: alternating sliding/full layers, q/k norms, two RoPE bases."""
    return gemma3.Gemma3TextConfig(
        **{**_DECODER, "tie_word_embeddings": True},
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=SLIDING_WINDOW,
        layer_types=_ALTERNATING,
        **ids,
    )


def _phi3(ids: dict[str, Any]) -> PreTrainedConfig:
    """Fused qkv and gate/up projections; Phi-3 checkpoints set a sliding window, so this one does."""
    return phi3.Phi3Config(**_DECODER, sliding_window=SLIDING_WINDOW, **ids)


def _phi(ids: dict[str, Any]) -> PreTrainedConfig:
    """Partial rotary embeddings, parallel attention and MLP."""
    return phi.PhiConfig(**_DECODER, rope_parameters=_HALF_ROPE, **ids)


def _gpt2(ids: dict[str, Any]) -> PreTrainedConfig:
    """Learned absolute position embeddings, Conv1D layers (not nn.Linear)."""
    return gpt2.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=MAX_POSITIONS, **ids)


def _gpt_neox(ids: dict[str, Any]) -> PreTrainedConfig:
    """Partial rotary embeddings, fused qkv, parallel residual."""
    return gpt_neox.GPTNeoXConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters=_HALF_ROPE,
        **ids,
    )


def _gptj(ids: dict[str, Any]) -> PreTrainedConfig:
    """Interleaved rotary embeddings on part of each head."""
    return gptj.GPTJConfig(n_embd=32, n_layer=2, n_head=4, n_inner=64, rotary_dim=4, n_positions=MAX_POSITIONS, **ids)


def _opt(ids: dict[str, Any]) -> PreTrainedConfig:
    """Learned position embeddings offset by 2, which OPT itself derives from the attention mask."""
    return opt.OPTConfig(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=MAX_POSITIONS,
        **ids,
    )


def _bloom(ids: dict[str, Any]) -> PreTrainedConfig:
    """ALiBi position biases, computed from the attention mask."""
    return bloom.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **ids)


def _falcon(ids: dict[str, Any]) -> PreTrainedConfig:
    """The new decoder architecture with grouped key/values and rotary embeddings."""
    return falcon.FalconConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        new_decoder_architecture=True,
        max_position_embeddings=MAX_POSITIONS,
        **ids,
    )


def _falcon_alibi(ids: dict[str, Any]) -> PreTrainedConfig:
    """Falcon's ALiBi variant (the original falcon-rw models)."""
    return falcon.FalconConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        alibi=True,
        multi_query=False,
        new_decoder_architecture=False,
        parallel_attn=False,
        bias=True,
        max_position_embeddings=MAX_POSITIONS,
        **ids,
    )


def _olmo2(ids: dict[str, Any]) -> PreTrainedConfig:
    return olmo2.Olmo2Config(**_DECODER, **ids)


def _olmo3(ids: dict[str, Any]) -> PreTrainedConfig:
    return olmo3.Olmo3Config(**_DECODER, sliding_window=SLIDING_WINDOW, layer_types=_ALTERNATING, **ids)


def _cohere(ids: dict[str, Any]) -> PreTrainedConfig:
    """Parallel attention and MLP, interleaved rotary, a logit scale, tied embeddings. The scale is
    0.5, not Command-R's 0.0625, which would flatten a 32-wide model's logits to uniform."""
    return cohere.CohereConfig(**{**_DECODER, "tie_word_embeddings": True}, logit_scale=0.5, **ids)


def _cohere2(ids: dict[str, Any]) -> PreTrainedConfig:
    """Sliding layers with RoPE, full layers without positions (no RoPE); logit scale as `_cohere`."""
    return cohere2.Cohere2Config(
        **{**_DECODER, "tie_word_embeddings": True},
        logit_scale=0.5,
        sliding_window=SLIDING_WINDOW,
        layer_types=_ALTERNATING,
        **ids,
    )


def _granite(ids: dict[str, Any]) -> PreTrainedConfig:
    """Llama with embedding, residual, attention and logit multipliers."""
    return granite.GraniteConfig(
        **_DECODER,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.25,
        logits_scaling=2.0,
        **ids,
    )


def _stablelm(ids: dict[str, Any]) -> PreTrainedConfig:
    return stablelm.StableLmConfig(**_DECODER, rope_parameters=_HALF_ROPE, **ids)


def _starcoder2(ids: dict[str, Any]) -> PreTrainedConfig:
    """Every layer slides (StarCoder2 checkpoints set a window of 4096)."""
    return starcoder2.Starcoder2Config(**_DECODER, sliding_window=SLIDING_WINDOW, **ids)


def _mixtral(ids: dict[str, Any]) -> PreTrainedConfig:
    return mixtral.MixtralConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2, **ids)


def _qwen2_moe(ids: dict[str, Any]) -> PreTrainedConfig:
    """Routed experts plus a gated shared expert."""
    return qwen2_moe.Qwen2MoeConfig(**_DECODER, **_MOE, shared_expert_intermediate_size=32, **ids)


def _qwen3_moe(ids: dict[str, Any]) -> PreTrainedConfig:
    return qwen3_moe.Qwen3MoeConfig(**_DECODER, **_MOE, **ids)


def _olmoe(ids: dict[str, Any]) -> PreTrainedConfig:
    return olmoe.OlmoeConfig(**_DECODER, num_experts=4, num_experts_per_tok=2, **ids)


def _granitemoe(ids: dict[str, Any]) -> PreTrainedConfig:
    return granitemoe.GraniteMoeConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2, **ids)


def _deepseek_v3(ids: dict[str, Any]) -> PreTrainedConfig:
    """Multi-head latent attention; layer 0 dense, layer 1 routed experts plus a shared one."""
    return deepseek_v3.DeepseekV3Config(
        **{**_DECODER, "num_key_value_heads": 4},
        moe_intermediate_size=16,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        **ids,
    )


def _gpt_oss(ids: dict[str, Any]) -> PreTrainedConfig:
    """Alternating sliding/full layers, attention sinks, fused expert weights (not nn.Linear)."""
    return gpt_oss.GptOssConfig(
        **_DECODER,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=SLIDING_WINDOW,
        layer_types=_ALTERNATING,
        # gpt-oss's own YaRN scaling (factor 32), its original context scaled to MAX_POSITIONS.
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=150000.0,
            factor=32.0,
            beta_fast=32.0,
            beta_slow=1.0,
            truncate=False,
            original_max_position_embeddings=MAX_POSITIONS // 32,
        ),
        **ids,
    )


def _qwen3_next(ids: dict[str, Any]) -> PreTrainedConfig:
    """Hybrid: a gated-delta-net linear-attention layer, then a gated full-attention layer; MoE MLPs."""
    return qwen3_next.Qwen3NextConfig(
        **_DECODER,
        head_dim=8,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        **_MOE,
        shared_expert_intermediate_size=16,
        layer_types=["linear_attention", "full_attention"],
        **ids,
    )


def _lfm2(ids: dict[str, Any]) -> PreTrainedConfig:
    """Hybrid: a short-convolution layer (a recurrent conv state in the cache), then attention."""
    return lfm2.Lfm2Config(
        **{**_DECODER, "tie_word_embeddings": True},
        block_auto_adjust_ff_dim=False,
        layer_types=["conv", "full_attention"],
        **ids,
    )


def _mamba(ids: dict[str, Any]) -> PreTrainedConfig:
    """A pure state-space model: no attention, no key/value cache, no position ids. Mamba's own
    initialisation (initializer_range 0.1, time steps drawn from their range) is kept."""
    return mamba.MambaConfig(hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4, **ids)


ARCHITECTURES: dict[str, ConfigFactory] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "mistral": _mistral,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "phi": _phi,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "gptj": _gptj,
    "opt": _opt,
    "bloom": _bloom,
    "falcon": _falcon,
    "falcon_alibi": _falcon_alibi,
    "olmo2": _olmo2,
    "olmo3": _olmo3,
    "cohere": _cohere,
    "cohere2": _cohere2,
    "granite": _granite,
    "stablelm": _stablelm,
    "starcoder2": _starcoder2,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "granitemoe": _granitemoe,
    "deepseek_v3": _deepseek_v3,
    "gpt_oss": _gpt_oss,
    "qwen3_next": _qwen3_next,
    "lfm2": _lfm2,
    "mamba": _mamba,
}


# Architectures that keep their config's initialisation (see the factory's docstring).
_OWN_INIT = {"mamba"}


def tiny_config(name: str, tokenizer: PreTrainedTokenizerFast | None = None) -> PreTrainedConfig:
    """The config of architecture `name`, sized for `tokenizer` (the tests' word-level one by default)."""
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    tokenizer = tokenizer or make_tokenizer()
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = ARCHITECTURES[name](ids)
    if name not in _OWN_INIT and hasattr(config, "initializer_range"):
        config.initializer_range = INIT_RANGE
    return config


def build_tiny_architecture(name: str, seed: int = 0) -> Any:
    """A random-init model of architecture `name` (float32, eval mode), weights drawn from `seed`."""
    config = tiny_config(name)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def save_tiny_architecture(folder: Path, name: str, seed: int = 0) -> Path:
    """Architecture `name`, random-init from `seed`, and the tests' tokenizer (with its chat
    template) saved as a Hugging Face folder for `tether.models.load_causal_lm` (and
    `tether.models.load_tokenizer`, which reloads the same word-level tokenizer)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tiny_architecture(name, seed).save_pretrained(folder)
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(folder)
    _keep_saved_tokenizer_class(folder, tokenizer)
    return folder


def _keep_saved_tokenizer_class(folder: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    """Make AutoTokenizer reload the word-level tokenizer that was saved in `folder`.

    transformers 5 does not trust the saved `tokenizer_class` for some model types (those in
    `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS` that have a tokenizer class of their own, e.g.
    qwen2): it rebuilds the tokenizer as that class (Qwen2Tokenizer, byte-level BPE) from the saved
    vocabulary, which turns every word of the tests into the same few ids. An `auto_map` entry in
    tokenizer_config.json takes the folder off that path (for these model types AutoTokenizer then
    ignores the entry as remote code and loads the saved class). Checked by reloading.
    """
    probe = "<|user|> tell me about the red cat <|assistant|> yes"
    expected = tokenizer(probe)["input_ids"]
    if AutoTokenizer.from_pretrained(folder)(probe)["input_ids"] == expected:
        return
    path = folder / "tokenizer_config.json"
    saved = json.loads(path.read_text())
    saved["auto_map"] = {"AutoTokenizer": [None, saved["tokenizer_class"]]}
    path.write_text(json.dumps(saved, indent=2) + "\n")
    reloaded = AutoTokenizer.from_pretrained(folder)(probe)["input_ids"]
    if reloaded != expected:
        raise RuntimeError(f"{folder}: AutoTokenizer does not reload the saved tokenizer ({reloaded} != {expected})")
