"""Child process of tests/test_distributed.py: run tether stages on a tiny model, as one plain
process (`python tests/distributed_worker.py JOBS.json`) or as several under torchrun.

JOBS.json is a list of [stage, run_dir, [key.sub=value, ...], resume]; the jobs run in order in the
same process group. Sampling is replaced by a deterministic function of the prompt, the sample's
index and the iteration, so the batches a run trains on do not depend on how many processes share
them: everything after sampling (advantages, whitening, the KL controller, minibatches, gradients,
checkpoints) is then comparable between a one-process and an N-process run. The stage "fsdp-pieces"
is no stage: it checks model.fsdp's parts on their own (engines/fsdp.py, `fsdp_pieces`), with real
generation, into run_dir/pieces-rank<k>.json.

When every job is done, each process writes JOBS.json.done-rank<k> (after leaving the process group)
and leaves at once with os._exit(0): gloo sometimes aborts while the interpreter shuts down, after a
run whose results are complete, and the marker is how the test tells that from a failure
(tests/test_distributed.py `launch`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from tether.sampling import trajectory_from_rows
from tether.trajectory import Trajectory

_calls = {"count": 0}


def deterministic_sampler(
    model: Any,
    pad_id: int,
    eos_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    speed: Any = None,
    return_logprobs: bool = False,
) -> Any:
    """sampling.turn_sampler's contract, sampling with `deterministic_generate`: the rollouts'
    sampler (passes.py). The eval set still samples with the model."""
    return lambda contexts, samples: deterministic_generate(
        model, contexts, samples, max_new_tokens, temperature, pad_id, eos_ids
    )


def deterministic_generate(
    model: Any,
    prompts: list[list[int]],
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    pad_id: int,
    eos_ids: list[int],
    *,
    speed: Any = None,
    return_logprobs: bool = False,
) -> tuple[Trajectory, None]:
    """generate()'s contract (left-padded prompts, responses cut after the first EOS) with tokens
    drawn from a generator seeded by (prompt, sample index, call number) instead of the model."""
    _calls["count"] += 1
    vocab = model.config.vocab_size
    rows = []
    for prompt in prompts:
        for sample in range(samples_per_prompt):
            key = sum((i + 1) * 131 * t for i, t in enumerate(prompt)) + 7919 * sample + 104729 * _calls["count"]
            generator = torch.Generator().manual_seed(key)
            length = int(torch.randint(1, max_new_tokens + 1, (1,), generator=generator))
            tokens = torch.randint(6, vocab, (length,), generator=generator)  # no special tokens
            if length < max_new_tokens:  # as generate: a response stops at EOS or at max_new_tokens
                tokens = torch.cat([tokens, torch.tensor([eos_ids[0]])])
            rows.append(tokens.tolist())
    rollout = trajectory_from_rows(prompts, samples_per_prompt, rows, pad_id, eos_ids)
    return rollout, None


def run_job(stage: str, run_dir: str, overrides: list[str], resume: bool) -> None:
    from tether.config import DPOConfig, GRPOConfig, PPOConfig, RMConfig, SFTConfig, load_config
    from tether.stages.dpo import DPOTrainer
    from tether.stages.grpo import GRPOTrainer
    from tether.stages.ppo import PPOTrainer
    from tether.stages.rm import RMTrainer
    from tether.stages.sft import SFTTrainer

    config_class, trainer_class = {
        "ppo": (PPOConfig, PPOTrainer),
        "grpo": (GRPOConfig, GRPOTrainer),
        "sft": (SFTConfig, SFTTrainer),
        "rm": (RMConfig, RMTrainer),
        "dpo": (DPOConfig, DPOTrainer),
    }[stage]
    trainer = trainer_class(load_config(config_class, None, overrides), run_dir, resume=resume)
    _calls["count"] = trainer.run.step  # a resumed run draws what the uninterrupted one would have
    trainer.train()


def fsdp_pieces(run_dir: str, model_dir: str) -> None:
    """model.fsdp's parts under torchrun, each process writing what it saw to run_dir/pieces-rank<k>.json:
    real generation with the sharded policy (each process its own prompts; process 0 stops after
    one token, the others run on) against the unsharded model, and the all-gathers it took; the
    clipped norm of sharded gradients against the whole gradient's; a non-finite value in one
    process's shard, seen by every process, the update skipped everywhere."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from tether.config import SpeedConfig
    from tether.engines import fsdp
    from tether.optim import UpdateGuard, clip_gradients, make_optimizer, take_step
    from tether.runtime import prepare_process, world
    from tether.sampling import generate

    prepare_process(1, 0, "cpu")
    fsdp.reset()
    rank, size = world().rank, world().size
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    sharded = fsdp.shard(AutoModelForCausalLM.from_pretrained(model_dir).eval(), "policy", dtype="float32")
    speed = SpeedConfig()
    prompts = [[6 + (3 * rank + i) % 30 for i in range(3 + rank + row)] for row in range(2)]  # lengths differ
    first, _ = generate(plain, prompts, 2, 1, 0.0, 0, [3], speed=speed)
    eos = sorted({int(t) for t in first.response_ids[:, 0]}) if rank == 0 else [3]  # process 0 stops at once
    gathers = {"count": 0}
    original = dist.all_gather_single

    def counted(*args: Any, **kwargs: Any) -> Any:
        gathers["count"] += 1
        return original(*args, **kwargs)

    dist.all_gather_single = counted  # type: ignore[assignment]
    try:
        expected, _ = generate(plain, prompts, 2, 12, 0.0, 0, eos, speed=speed)
        with fsdp.gathered(sharded):
            got, _ = generate(sharded, prompts, 2, 12, 0.0, 0, eos, speed=speed)
    finally:
        dist.all_gather_single = original  # type: ignore[assignment]
    units = sum(isinstance(m, torch.distributed.fsdp.FSDPModule) for m in sharded.modules())

    # Sharded gradients: the clipped norm is the whole gradient's; a non-finite shard stops every process.
    ids = torch.tensor([[6 + (i * 7 + r) % 30 for i in range(10)] for r in range(4)])
    mine = ids[2 * rank : 2 * rank + 2] if size == 2 else ids
    for model in (plain, sharded):
        model.zero_grad(set_to_none=True)
        batch = ids if model is plain else mine
        (model(input_ids=batch, labels=batch).loss * len(batch) / len(ids)).backward()
    plain_norm = clip_gradients(list(plain.parameters()), None)
    sharded_norm = clip_gradients(list(sharded.parameters()), None)
    params = list(sharded.parameters())
    optimizer, scheduler = make_optimizer([{"params": params, "lr": 1e-2}], 1e-8, 0.0, "constant", 0, 10, fused=True)
    before = [p.full_tensor().clone() for p in params]
    local = params[3].grad.to_local()
    if rank == size - 1:
        local.view(-1)[0] = float("inf")
    guard = UpdateGuard()
    stats = take_step(optimizer, scheduler, guard, {"train/grad_norm": params}, {}, 1.0, 1)
    unchanged = all(torch.equal(b, p.full_tensor()) for b, p in zip(before, params, strict=True))
    result = {
        "tokens_equal": torch.equal(got.response_ids, expected.response_ids),
        "masks_equal": torch.equal(got.response_mask, expected.response_mask),
        "response_width": int(got.response_ids.shape[1]),
        "all_gathers": gathers["count"],
        "units": units,
        "plain_norm": plain_norm,
        "sharded_norm": sharded_norm,
        "nonfinite_norm": stats["train/grad_norm"],
        "skipped_updates": guard.skipped_updates,
        "weights_unchanged": unchanged,
    }
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / f"pieces-rank{rank}.json").write_text(json.dumps(result))


def main(jobs_file: str) -> None:
    import os

    import tether.passes
    from tether.runtime import leave_process_group, world

    tether.passes.turn_sampler = deterministic_sampler  # type: ignore[assignment]
    for stage, run_dir, overrides, resume in json.loads(Path(jobs_file).read_text()):
        if stage == "fsdp-pieces":
            fsdp_pieces(run_dir, overrides[0])
        else:
            run_job(stage, run_dir, overrides, resume)
    rank = world().rank
    leave_process_group()
    Path(f"{jobs_file}.done-rank{rank}").write_text("done\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter shutdown: where gloo sometimes aborts after a complete run


if __name__ == "__main__":
    main(sys.argv[1])
