"""Does starting tether's vLLM engine change the process's threads? (docs/LOG.md 2026-12-02, second entry)

    .venv-vllm/bin/python scripts/vllm_thread_check.py

Prints torch's thread count, the CPU affinity and the time of 200 float32 512x512 matmuls before the
engine starts (rollout.engine=vllm, the embedded model), after it, and after torch.set_num_threads
is called again (vLLM's CPU backend says it skips that call once it has bound its threads).
"""

from __future__ import annotations

import os
import time

import torch

from tether.config import GRPOConfig, load_config
from tether.engines.vllm import VLLMEngine
from tether.loading.models import eos_token_ids, load_tokenizer, resolve_model_path


def report(when: str) -> None:
    x = torch.randn(512, 512)
    started = time.perf_counter()
    for _ in range(200):
        x @ x
    seconds = time.perf_counter() - started
    affinity = sorted(os.sched_getaffinity(0))
    print(f"{when}: threads {torch.get_num_threads()}, affinity {affinity}, matmuls {seconds:.3f} s")


if __name__ == "__main__":
    report("before the engine")
    config = load_config(GRPOConfig, None, ["reward.function=tether.reward_functions:concise", "rollout.engine=vllm"])
    tokenizer = load_tokenizer(config.model.name, False)
    base = resolve_model_path(config.model.name)
    engine = VLLMEngine(config, tokenizer, eos_token_ids(tokenizer, None), base)  # alive through the reports
    report("after it started")
    torch.set_num_threads(torch.get_num_threads())
    report("after set_num_threads")
    del engine
