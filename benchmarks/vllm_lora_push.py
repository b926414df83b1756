"""Two ways a LoRA policy reaches a vLLM engine: merged weights (what tether does) or a LoRA request.

    .venv-vllm/bin/python benchmarks/vllm_lora_push.py --out benchmarks/results/vllm_lora_push.json

The embedded model with a LoRA adapter (r=16, alpha=32, tether's default targets) whose B matrices
are drawn at random before every push, so each push is a new policy. Both ways are timed in this
one process, one after the other:

- `merged`: tether's own engine (engines/vllm.py). A push is `hold`: W + dW folded for every adapted
  layer, `reload_weights` in place, the prefix cache reset, and the probe check.
- `lora request`: a second tether engine, started with vLLM's `enable_lora=True`. A push is the adapter saved with
  peft's `save_pretrained` and sampled under a new `LoRARequest` id (vLLM loads an adapter on its
  first use): the save plus the first call's extra time over a steady call.

For each: seconds per push and per sampling call (median over `--pushes`), and the largest gap
between the engine's sampled log-probs and the trainer's recomputation (transformers + peft).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tether.config import GRPOConfig, LoraConfig, load_config
from tether.data import Prompt, encode_prompt
from tether.engines.vllm import VLLMEngine
from tether.loading.models import add_lora, eos_token_ids, load_causal_lm, load_tokenizer, resolve_model_path
from tether.passes import hold_weights
from tether.roles.policy import response_logprobs
from tether.speed import PLAIN

MODEL = "smollm2-135m-instruct"
QUESTIONS = [
    "What is 2+2?",
    "Tell me about Rome.",
    "Why is the sky blue?",
    "Write a haiku about the sea.",
    "Name three rivers.",
    "What is a prime number?",
    "How do bees make honey?",
    "Give me a word that rhymes with cat.",
]
TEMPERATURE = 0.7


def new_adapter(policy: Any, seed: int) -> None:
    """Random B matrices (small, as after some training), so the adapted policy differs from its base."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)


def largest_gap(policy: Any, trajectory: Any, sampled: torch.Tensor) -> float:
    with torch.no_grad():
        args = (trajectory.input_ids, trajectory.attention_mask, trajectory.response_start, TEMPERATURE)
        trained = response_logprobs(policy, *args, speed=PLAIN)[0]
    mask = trajectory.response_mask
    return float((sampled[mask] - trained[mask]).abs().max())


def merged(config: Any, tokenizer: Any, policy: Any, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    engine = VLLMEngine(config, tokenizer, eos_token_ids(tokenizer, policy), resolve_model_path(MODEL))
    pushes, calls, gaps = [], [], []
    for version in range(args.pushes):
        new_adapter(policy, version)
        started = time.perf_counter()
        hold_weights(engine, policy, version, prompts[0], "float32", PLAIN)
        pushes.append(time.perf_counter() - started)
        for call in range(2):
            started = time.perf_counter()
            trajectory, sampled = engine.generate(prompts, args.samples, args.max_new_tokens, TEMPERATURE, seed=call)
            calls.append(time.perf_counter() - started)
        gaps.append(largest_gap(policy, trajectory, sampled))
    return {"push_s": statistics.median(pushes), "sample_s": statistics.median(calls), "gap_max": max(gaps)}


def lora_request(config: Any, tokenizer: Any, policy: Any, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    from vllm.lora.request import LoRARequest

    eos = eos_token_ids(tokenizer, policy)
    options = {"enable_lora": True, "max_lora_rank": args.rank, "max_loras": 1}
    engine = VLLMEngine(config, tokenizer, eos, resolve_model_path(MODEL), **options)

    def sample(request: Any, seed: int) -> tuple[Any, torch.Tensor]:
        return engine.generate(prompts, args.samples, args.max_new_tokens, TEMPERATURE, seed, lora_request=request)

    pushes, calls, gaps = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for version in range(args.pushes):
            new_adapter(policy, version)
            folder = Path(tmp) / f"adapter-{version}"
            started = time.perf_counter()
            policy.save_pretrained(folder)
            request = LoRARequest(f"policy-{version}", version + 1, str(folder))
            sample(request, 0)  # vLLM loads the adapter on its first use
            first_s = time.perf_counter() - started
            steady = []
            for call in range(2):
                started = time.perf_counter()
                trajectory, sampled = sample(request, call)
                steady.append(time.perf_counter() - started)
            calls += steady
            pushes.append(first_s - statistics.median(steady))
            gaps.append(largest_gap(policy, trajectory, sampled))
    return {"push_s": statistics.median(pushes), "sample_s": statistics.median(calls), "gap_max": max(gaps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pushes", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (8 prompts)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer = load_tokenizer(MODEL)
    policy = add_lora(load_causal_lm(MODEL, tokenizer), LoraConfig(r=args.rank, alpha=2 * args.rank))
    config = load_config(GRPOConfig, None, ["reward.function=tether.reward_functions:concise"])
    prompts = [encode_prompt(tokenizer, Prompt(({"role": "user", "content": q},), q), True, 256) for q in QUESTIONS]
    results = {"merged": merged(config, tokenizer, policy, prompts, args)}
    print("merged", json.dumps(results["merged"]), flush=True)
    results["lora request"] = lora_request(config, tokenizer, policy, prompts, args)
    print("lora request", json.dumps(results["lora request"]), flush=True)
    print("\n| way | push s | sampling call s | largest log-prob gap |")
    print("| --- | ---: | ---: | ---: |")
    for way, r in results.items():
        print(f"| {way} | {r['push_s']:.2f} | {r['sample_s']:.2f} | {r['gap_max']:.2g} |")
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
