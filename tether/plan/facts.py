"""What the plan knows about a model without its weights: its config, its parameter counts (a model
built on the meta device, which allocates nothing), LoRA's counts (peft on that meta model), and the
token lengths of the data it will read.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# model_type values whose MLP is a plain two-matrix one (GELU or ReLU, no gate): the gpt2 formula.
PLAIN_MLP_TYPES = {"gpt2", "gpt_neo", "gptj", "gpt_bigcode", "opt", "bloom", "phi", "gpt_neox", "codegen", "falcon"}


def tether_function(name: str) -> Any:
    """A function of tether's model loading, wherever this version keeps it (tether.models, or
    tether.loading.models after the restructuring)."""
    for module in ("tether.models", "tether.loading.models"):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"tether has no {name} in tether.models or tether.loading.models")


@dataclass(frozen=True)
class LoraCounts:
    trainable: int  # adapter matrices (+ a scalar model's trained head copy)
    targeted: int  # parameters of the base layers that carry an adapter (what a fold copies)
    per_layer_rank_floats: int  # sum over one decoder layer's adapted modules of r (saved A outputs)


@dataclass
class ModelFacts:
    """One model as the plan sees it (everything from its config)."""

    name: str  # as configured
    path: str  # the folder or hub id its config came from (a LoRA adapter folder's base)
    architecture: str
    model_type: str
    gated_mlp: bool  # llama-style gate * up MLP (else gpt2-style)
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    causal_params: int  # sum of numel over AutoModelForCausalLM's parameters (tied ones once)
    scalar_params: int  # ... over AutoModelForSequenceClassification(num_labels=1)
    linear_params: int  # weights + biases of every nn.Linear of the causal LM (lm_head included)
    layer_params: int  # one decoder layer's parameters (what FSDP gathers at a time)
    adapter: str | None = None  # the LoRA adapter folder model.name pointed at, if it did
    _lora: dict[tuple[Any, ...], LoraCounts] = field(default_factory=dict, repr=False)
    _config: Any = field(default=None, repr=False)

    def lora(self, r: int, target_modules: Any, scalar: bool) -> LoraCounts:
        key = (r, json.dumps(target_modules), scalar)
        if key not in self._lora:
            self._lora[key] = _lora_counts(self._config, r, target_modules, scalar, self.layers)
        return self._lora[key]


def _first(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def load_hf_config(path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    quiet = tether_function("quiet_transformers")
    with quiet():
        try:  # a hub id whose config is cached answers without a network
            return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
        except OSError:
            return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def resolve(name: str) -> tuple[str, str | None]:
    """(folder or hub id whose config.json describes the model, the adapter folder or None).
    A LoRA adapter folder describes its base's shape, plus the adapter (merged when tether loads it)."""
    path = tether_function("resolve_model_path")(name)
    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.is_file() and not (Path(path) / "config.json").is_file():
        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{adapter_config} names no base_model_name_or_path")
        base_path, _ = resolve(str(base))
        return base_path, path
    return path, None


@lru_cache(maxsize=32)
def model_facts(name: str, trust_remote_code: bool = False) -> ModelFacts:
    """Facts of the model `name` (any model.name tether accepts), from its config alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path, adapter = resolve(name)
    config = load_hf_config(path, trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(_first(text, "hidden_size", "n_embd", "d_model"))
    heads = int(_first(text, "num_attention_heads", "n_head", "num_heads"))
    head_dim = int(_first(text, "head_dim", default=hidden // heads))
    quiet = tether_function("quiet_transformers")
    with torch.device("meta"), quiet():
        causal = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        scalar_config = load_hf_config(path, trust_remote_code)
        scalar_config.num_labels = 1
        try:
            scalar = AutoModelForSequenceClassification.from_config(scalar_config, trust_remote_code=trust_remote_code)
            scalar_params = _count(scalar)
        except (ValueError, KeyError):  # no sequence-classifier class: its body plus a score head
            scalar_params = _count(causal) - _lm_head_params(causal) + hidden
    layers_list = _decoder_layers(causal)
    layers = int(_first(text, "num_hidden_layers", "n_layer", "num_layers", default=len(layers_list)))
    names = [n for n, _ in causal.named_modules()]
    gated = any(n.endswith(("gate_proj", "gate_up_proj", ".w1", ".w3")) for n in names)
    if text.model_type in PLAIN_MLP_TYPES:
        gated = False
    intermediate = _first(text, "intermediate_size", "n_inner", "ffn_dim")
    intermediate = int(intermediate) if intermediate else 4 * hidden
    out = causal.get_output_embeddings()
    inp = causal.get_input_embeddings()
    tied = out is not None and inp is not None and out.weight is inp.weight
    facts = ModelFacts(
        name=name,
        path=path,
        architecture=(config.architectures or [type(causal).__name__])[0],
        model_type=str(text.model_type),
        gated_mlp=gated,
        hidden=hidden,
        layers=layers,
        intermediate=intermediate,
        heads=heads,
        kv_heads=int(_first(text, "num_key_value_heads", "n_head_kv", default=heads)),
        head_dim=head_dim,
        vocab=int(_first(text, "vocab_size")),
        tied=tied,
        causal_params=_count(causal),
        scalar_params=scalar_params,
        linear_params=sum(
            m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
            for m in causal.modules()
            if type(m) is torch.nn.Linear
        ),
        layer_params=max((_count(layer) for layer in layers_list), default=0),
        adapter=adapter,
    )
    facts._config = config
    return facts


def _count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _lm_head_params(model: Any) -> int:
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    if out is None or (inp is not None and out.weight is inp.weight):
        return 0
    return _count(out)


def _decoder_layers(model: Any) -> list[Any]:
    """The longest ModuleList in the model: its decoder layers."""
    import torch

    longest: list[Any] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(longest):
            longest = list(module)
    return longest


def _lora_counts(config: Any, r: int, target_modules: Any, scalar: bool, layers: int) -> LoraCounts:
    """peft's own LoRA on a meta-device model: its trainable parameters, the parameters of the
    layers it adapts, and the rank-sized activations one decoder layer saves."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quiet = tether_function("quiet_transformers")
    with torch.device("meta"), quiet():
        if scalar:
            config = type(config).from_dict(config.to_dict())
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
        peft_config = LoraConfig(
            r=r,
            lora_alpha=2 * r,
            target_modules=target_modules,
            task_type=TaskType.SEQ_CLS if scalar else TaskType.CAUSAL_LM,
        )
        wrapped = get_peft_model(model, peft_config)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    adapted = [m for m in wrapped.modules() if isinstance(m, LoraLayer)]
    targeted = sum(_count(m.get_base_layer()) for m in adapted)
    return LoraCounts(trainable, targeted, (len(adapted) * r) // max(layers, 1))


# --------------------------------------------------------------------------------------------
# Token lengths of the data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lengths:
    """Token lengths the plan assumes, and where they came from."""

    prompt: int  # longest prompt (online) or longest prompt of an example (offline)
    response: int  # longest response (online: max_new_tokens, every turn of an episode)
    shared_prefix: int  # tokens every prompt starts with, computed once per batch (0: none)
    source: str  # one line: measured on which file, or taken from which setting
    sequence: int = 0  # rm: the longest whole sequence (prompt + the longer response); 0: prompt + response
    eval_prompt: int = 0  # online: the longest eval prompt
    eval_shared_prefix: int = 0


def _tokenizer(name: str, trust_remote_code: bool) -> Any:
    try:
        return tether_function("load_tokenizer")(name, trust_remote_code)
    except Exception as err:  # no tokenizer cached: lengths come from the config's limits
        log.info("plan: no tokenizer for %s (%s); using the configured limits", name, err)
        return None


def _common_prefix(rows: list[list[int]], min_shared: int = 8) -> int:
    """Leading tokens every row shares, as roles/shared_prefix.py splits them (at least one token of
    every row stays out of the prefix; fewer than `min_shared` shared tokens are not split)."""
    if len(rows) < 2:
        return 0
    shortest = min(len(r) for r in rows) - 1
    length = 0
    while length < shortest and all(r[length] == rows[0][length] for r in rows):
        length += 1
    return length if length >= min_shared else 0


def online_lengths(config: Any, trust_remote_code: bool) -> Lengths:
    """Prompt lengths of data.prompts (else tether's shipped prompts) and data.eval, encoded as the run
    encodes them; without a tokenizer, data.max_prompt_length."""
    data = config.data
    limit = int(data.max_prompt_length)
    response = int(config.rollout.longest_response)
    tokenizer = _tokenizer(config.model.name, trust_remote_code)
    if tokenizer is None:
        return Lengths(limit, response, 0, f"data.max_prompt_length={limit} (no tokenizer to measure the prompts)")
    from tether.data import encode_prompt, load_prompts, shipped_data, uses_chat_template

    def encoded(path: str | None, shipped: str) -> tuple[list[list[int]], str]:
        source = path or shipped_data(shipped)
        prompts = load_prompts(source)
        chat = uses_chat_template(tokenizer, data.apply_chat_template)
        # warn=False: the run itself warns about long prompts, once
        return [encode_prompt(tokenizer, p, chat, limit, warn=False) for p in prompts], source

    rows, source = encoded(data.prompts, "prompts.jsonl")
    eval_rows: list[list[int]] = []
    if getattr(config, "eval", None) is not None and config.eval.num_prompts > 0:
        eval_rows, _ = encoded(data.eval, "eval_prompts.jsonl")
        eval_rows = eval_rows[: config.eval.num_prompts]
    prompt = max(len(r) for r in rows)
    return Lengths(
        prompt=prompt,
        response=response,
        shared_prefix=_common_prefix(rows),
        source=f"the longest of {len(rows)} prompts in {Path(source).name}, tokenized as the run does",
        eval_prompt=max((len(r) for r in eval_rows), default=0),
        eval_shared_prefix=_common_prefix(eval_rows),
    )


def offline_lengths(config: Any, stage: str, trust_remote_code: bool) -> Lengths:
    """Longest prompt and longest response among the training examples that fit data.max_length
    (the stage's shipped file when data.train is null); without a tokenizer, the configured limits."""
    data = config.data
    limit, total = int(data.max_prompt_length), int(data.max_length)
    tokenizer = _tokenizer(config.model.name, trust_remote_code)
    if tokenizer is None:
        return Lengths(limit, total - limit, 0, f"data.max_prompt_length={limit}, data.max_length={total}")
    from tether.data import (
        encode_prompt,
        encode_response,
        load_preferences,
        load_sft_examples,
        shipped_data,
        uses_chat_template,
    )

    eos = tether_function("eos_token_ids")(tokenizer)[0]
    chat = uses_chat_template(tokenizer, data.apply_chat_template)
    shipped = {"sft": "sft_train.jsonl", "rm": "preferences_train.jsonl", "dpo": "preferences_train.jsonl"}[stage]
    source = data.train or shipped_data(shipped)
    prompts: list[list[int]] = []
    responses: list[int] = []
    sequences: list[int] = []
    if stage == "sft":
        for example in load_sft_examples(source):
            p = encode_prompt(tokenizer, example.prompt, chat, limit)
            r = len(encode_response(tokenizer, example.response, eos))
            if len(p) + r <= total:
                prompts.append(p)
                responses.append(r)
                sequences.append(len(p) + r)
    else:
        for pair in load_preferences(source):
            p = encode_prompt(tokenizer, pair.prompt, chat, limit)
            lengths = [len(encode_response(tokenizer, text, eos)) for text in (pair.chosen, pair.rejected)]
            if len(p) + max(lengths) <= total:
                prompts.append(p)
                responses.append(max(lengths))
                sequences.append(len(p) + max(lengths))
    if not prompts:
        return Lengths(limit, total - limit, 0, f"no example of {Path(source).name} fits; the configured limits")
    return Lengths(
        prompt=max(len(p) for p in prompts),
        response=max(responses),
        shared_prefix=_common_prefix(prompts),
        source=f"the longest prompt and response of {len(prompts)} examples in {Path(source).name}",
        sequence=max(sequences),
    )
