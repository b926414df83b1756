"""Does starting tether's vLLM engine change the process's threads? (docs/LOG.md 2026-12-02, second entry)

    .venv-vllm/bin/python scripts/vllm_thread_check.py

Prints torch's thread count, the CPU affinity, the time of 200 float32 512x512 matmuls and of the
trainer's own work on the embedded model (a no-grad forward and a forward + backward of 16 rows x 96
tokens, the shape of a GRPO 4x4 minibatch) before the engine starts (rollout.engine=vllm), after it,
and after torch.set_num_threads is called again (vLLM's CPU backend says it skips that call once it
has bound its threads).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM

from tether.config import GRPOConfig, load_config
from tether.engines.vllm import VLLMEngine
from tether.loading.models import BUILTIN_MODEL, eos_token_ids, load_tokenizer, resolve_model_path


def timed(work: Callable[[], object], repeats: int = 3) -> float:
    """The best of `repeats` timings, in seconds: the shared VM's noise only ever adds."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def report(when: str, model: torch.nn.Module) -> None:
    x = torch.randn(512, 512)
    tokens = torch.randint(0, 1000, (16, 96))

    def matmuls() -> None:
        for _ in range(200):
            x @ x

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=tokens)

    def backward() -> None:
        model(input_ids=tokens).logits.float().mean().backward()

    affinity = sorted(os.sched_getaffinity(0))
    print(
        f"{when}: threads {torch.get_num_threads()}, affinity {affinity}, matmuls {timed(matmuls):.3f} s, "
        f"forward {timed(forward):.3f} s, forward+backward {timed(backward):.3f} s",
        flush=True,
    )


if __name__ == "__main__":
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(BUILTIN_MODEL), dtype=torch.float32)
    report("before the engine", model)
    config = load_config(GRPOConfig, None, ["reward.function=tether.reward_functions:concise", "rollout.engine=vllm"])
    tokenizer = load_tokenizer(config.model.name, False)
    base = resolve_model_path(config.model.name)
    engine = VLLMEngine(config, tokenizer, eos_token_ids(tokenizer, None), base)  # alive through the reports
    report("after it started", model)
    torch.set_num_threads(torch.get_num_threads())
    report("after set_num_threads", model)
    del engine
