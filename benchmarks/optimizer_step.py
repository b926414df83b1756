"""Seconds per AdamW step over 136M parameters shaped like SmolLM2-135M's, per torch implementation.

    .venv/bin/python benchmarks/optimizer_step.py

torch's default AdamW on the CPU is the per-tensor loop ("for-loop"); "foreach" batches the tensors
into multi-tensor ops; "fused" is one kernel per tensor group. tether uses the fused one wherever
torch has it (stages/common.py make_optimizer), as TRL's Trainer does (`adamw_torch_fused`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # One tied 49152 x 576 embedding, 30 layers of ~3.7M-parameter matrices, 61 norm vectors.
    shapes = [(49152, 576)] + [(576, 576)] * 60 + [(192, 576)] * 60 + [(1536, 576)] * 90 + [(576,)] * 61
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    print(f"{sum(p.numel() for p in params) / 1e6:.0f}M parameters in {len(params)} tensors, {args.threads} threads")
    for name, options in (("for-loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(params, lr=1e-5, eps=1e-5, **options)
        for p in params:
            p.grad = torch.randn_like(p)
        seconds = []
        for _ in range(args.steps):
            start = time.perf_counter()
            optimizer.step()
            seconds.append(time.perf_counter() - start)
        measured = seconds[1:]  # the first step allocates the moment buffers
        print(f"{name:9s} median {statistics.median(measured):.3f} s per step (min {min(measured):.3f})")
        del optimizer


if __name__ == "__main__":
    main()
