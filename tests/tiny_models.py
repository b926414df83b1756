"""Tiny random-init models and a word-level tokenizer, built from a config (nothing downloaded).

A 40-word vocabulary keeps every forward pass trivially cheap, so tests can run whole PPO loops.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>"]
WORDS = [
    "the",
    "a",
    "an",
    "is",
    "are",
    "was",
    "good",
    "bad",
    "yes",
    "no",
    "cat",
    "dog",
    "sun",
    "moon",
    "red",
    "blue",
    "green",
    "one",
    "two",
    "three",
    "four",
    "five",
    "hello",
    "world",
    "why",
    "what",
    "how",
    "tell",
    "me",
    "about",
    "please",
    "thanks",
    "very",
    "much",
    "more",
    "less",
    "big",
    "small",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(chat_template: bool = True, vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """The word-level tokenizer of the tiny models. vocab_size: the vocabulary filled up to it with
    words w0, w1, ..., so that every id a larger model samples decodes to a word (an id past a
    tokenizer's vocabulary decodes to nothing) and responses have text to score."""
    words = SPECIAL + WORDS
    words += [f"w{i}" for i in range((vocab_size or 0) - len(words))]
    vocab = {token: i for i, token in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_model(folder: Path, arch: str = "llama", seed: int = 0, chat_template: bool = True) -> Path:
    """A random-init causal LM plus tokenizer saved as a Hugging Face folder."""
    tokenizer = make_tokenizer(chat_template)
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            attention_dropout=0.2,  # non-zero on purpose: tests prove tether runs with dropout off
            **common,
        )
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common)  # dropouts 0.1
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(arch)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
