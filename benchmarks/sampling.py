"""Seconds per `generate` call on the embedded model: HF's sampling against tether's, alternating.

    .venv/bin/python benchmarks/sampling.py                      # 8 prompts x 1 sample
    .venv/bin/python benchmarks/sampling.py --samples-per-prompt 8

"multinomial" is HF `generate(do_sample=True)`: softmax, then `torch.multinomial`, which draws an
exponential random number for every vocabulary entry. "inverse CDF" is `tether.sampling.generate`,
whose logits processor draws each token from one uniform number per row (`core.logprobs.sample_tokens`).
Everything else is the same in both: the weights prepared for sampling, the shared prompt prefix,
the shipped prompts with the chat template, 32 new tokens at temperature 0.7, float32. The two run
in alternating order in one process, so a VM that drifts slows both alike. Also prints one step's
token draw alone, for the same number of rows.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import GenerationConfig

from tether.config import PromptData
from tether.core.logprobs import sample_tokens
from tether.data import encode_prompts, load_prompts, shipped_data
from tether.loading.models import BUILTIN_MODEL, load_causal_lm, load_tokenizer
from tether.runtime import prepare_process
from tether.sampling import _generate_inputs, generate, left_pad
from tether.speed import FAST
from tether.speed.prepared_linears import prepared_linears

TEMPERATURE = 0.7


def hf_sampling(model: Any, tokenizer: Any, prompts: list[list[int]], samples: int, new_tokens: int) -> None:
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    ids, mask = ids.repeat_interleave(samples, dim=0), mask.repeat_interleave(samples, dim=0)
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=True,
        temperature=TEMPERATURE,
        top_k=0,
        top_p=1.0,
        eos_token_id=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    with torch.no_grad(), prepared_linears(model):
        model.generate(**_generate_inputs(model, ids, mask, FAST), generation_config=config)


def tether_sampling(model: Any, tokenizer: Any, prompts: list[list[int]], samples: int, new_tokens: int) -> None:
    eos = [tokenizer.eos_token_id]
    generate(model, prompts, samples, new_tokens, TEMPERATURE, tokenizer.pad_token_id, eos, speed=FAST)


def seconds(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples-per-prompt", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    prepare_process(args.threads, 0, "cpu")
    tokenizer = load_tokenizer(BUILTIN_MODEL)
    model = load_causal_lm(BUILTIN_MODEL, tokenizer).eval()
    # The shipped prompts as PPO encodes them (data section defaults: chat template, 512 tokens).
    prompts = encode_prompts(tokenizer, load_prompts(shipped_data("prompts.jsonl")), PromptData())

    systems = {"multinomial": hf_sampling, "inverse CDF": tether_sampling}
    times: dict[str, list[float]] = {name: [] for name in systems}
    for pair in range(args.pairs + 1):  # pair 0 warms both up and is not counted
        start = (pair * args.prompts) % (len(prompts) - args.prompts)
        batch = prompts[start : start + args.prompts]
        order = list(systems) if pair % 2 == 0 else list(reversed(systems))
        for name in order:
            start_time = time.perf_counter()
            systems[name](model, tokenizer, batch, args.samples_per_prompt, args.new_tokens)
            if pair > 0:
                times[name].append(time.perf_counter() - start_time)

    rows = args.prompts * args.samples_per_prompt
    print(f"{args.prompts} prompts x {args.samples_per_prompt} samples, {args.new_tokens} new tokens")
    for name, measured in times.items():
        median, low, high = statistics.median(measured), min(measured), max(measured)
        print(f"  {name:12s} median {median:.2f} s over {args.pairs} pairs (range {low:.2f}-{high:.2f})")
    logits = torch.randn(rows, model.config.vocab_size) * 3
    draws = {
        "multinomial": lambda: torch.multinomial(torch.softmax(logits / TEMPERATURE, dim=-1), 1),
        "inverse CDF": lambda: sample_tokens(logits, TEMPERATURE),
    }
    for name, draw in draws.items():
        draw()
        per_step = statistics.median(seconds(draw) for _ in range(20))
        print(f"  one step's draw alone, {name:12s} {per_step * 1e3:.2f} ms for {rows} rows")


if __name__ == "__main__":
    main()
