"""Child process of tests/test_distributed.py: run tether stages on a tiny model, as one plain
process (`python tests/distributed_worker.py JOBS.json`) or as several under torchrun.

JOBS.json is a list of [stage, run_dir, [key.sub=value, ...], resume]; the jobs run in order in the
same process group. Sampling is replaced by a deterministic function of the prompt, the sample's
index and the iteration, so the batches a run trains on do not depend on how many processes share
them: everything after sampling (advantages, whitening, the KL controller, minibatches, gradients,
checkpoints) is then comparable between a one-process and an N-process run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from tether.sampling import left_pad, truncate_after_eos
from tether.trajectory import Trajectory

_calls = {"count": 0}


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
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    width = max(len(r) for r in rows)
    response_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        response_ids[i, : len(row)] = torch.tensor(row)
    response_ids, response_mask, finished = truncate_after_eos(response_ids, eos_ids, pad_id)
    rollout = Trajectory(
        prompt_ids=prompt_ids.repeat_interleave(samples_per_prompt, dim=0),
        prompt_mask=prompt_mask.repeat_interleave(samples_per_prompt, dim=0),
        response_ids=response_ids,
        response_mask=response_mask,
        finished=finished,
        prompt_index=torch.arange(len(prompts)).repeat_interleave(samples_per_prompt),
    )
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


def main(jobs_file: str) -> None:
    import tether.passes
    from tether.runtime import leave_process_group

    tether.passes.generate = deterministic_generate  # type: ignore[assignment]
    for stage, run_dir, overrides, resume in json.loads(Path(jobs_file).read_text()):
        run_job(stage, run_dir, overrides, resume)
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
