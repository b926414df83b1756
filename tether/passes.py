"""The passes of a rollout iteration over its batch (ppo, grpo), each a function that returns the
trajectory with its own fields added (trajectory.py):

    sample_batch     2. responses sampled (transformers' generate, or the vLLM engine), truncated after
                        their first EOS, decoded; hold_weights gives the engine the policy's weights
    policy_pass      3. the policy's old log-probs and entropy (and a value head's values), no grad
    reference_pass   3. the reference's log-probs
    value_pass       3. a value model's values (ppo)
    score_batch      4. the reward sources, plus the missing-EOS penalty
and, in the update, `update_logprobs` and `update_values`: the same of some rows, with grad. Before
the first iteration, `probe_scorers` calls every scorer once on a small real batch.

Every log-prob is taken under the rollout temperature (docs/concepts/details.md item 1). Forward
passes without grad run in chunks of `sizes.pass_rows` rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from tether.config import OnlineConfig, SpeedConfig
from tether.core import truncated_is_weights
from tether.engines import fsdp
from tether.engines.vllm import VLLMEngine
from tether.loading.models import resolve_model_path
from tether.loading.roles import RolloutRoles
from tether.roles.forward import in_chunks
from tether.roles.policy import response_logprobs
from tether.roles.value import response_values
from tether.runtime import autocast
from tether.sampling import SampleTurn, decode_responses, turn_sampler
from tether.trajectory import Trajectory

# The policy's pass of step 3 with its autograd graph kept (speed.reuse_old_pass): its log-probs
# (and a value head's values), still attached, for the update's first step.
OldPass = tuple[Tensor, ...]


def sample_batch(
    roles: RolloutRoles,
    config: OnlineConfig,
    prompt_texts: list[str],
    prompt_ids: list[list[int]],
    engine: VLLMEngine | None = None,
) -> Trajectory:
    """rollout.samples_per_prompt responses to each prompt, decoded, on the policy's device, with the
    log-probs the sampler drew them with: transformers' generate, or the vLLM engine (which must
    hold the policy's current weights: `hold_weights`). With rollout.environment, each is a
    multi-turn episode (episodes.py)."""
    device = next(roles.policy.parameters()).device
    rollout = config.rollout
    sampled: Tensor | None
    if engine is not None:
        # The engine's draws are seeded from this process's stream, which checkpoints save: a
        # resumed run samples what the uninterrupted one would have.
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
        trajectory, sampled = engine.generate(
            prompt_ids, rollout.samples_per_prompt, rollout.max_new_tokens, rollout.temperature, seed
        )
    else:
        # Free with tether's sampler (it has them); transformers' would keep every step's logits.
        turn = policy_sampler(
            roles, config, rollout.max_new_tokens, rollout.temperature, config.speed.inverse_cdf_sampler
        )
        with autocast(device, config.model.dtype), fsdp.gathered(roles.policy):  # model.fsdp: gathered once per call
            if roles.episodes is not None:
                trajectory, sampled = (
                    roles.episodes.run(turn, prompt_texts, prompt_ids, rollout.samples_per_prompt),
                    None,
                )
            else:
                trajectory, sampled = turn(prompt_ids, rollout.samples_per_prompt)
    if sampled is not None:
        trajectory = dataclasses.replace(trajectory, sample_logprobs=sampled)
    return read_back(roles, trajectory.to(device), prompt_texts)


def policy_sampler(
    roles: RolloutRoles, config: OnlineConfig, max_new_tokens: int, temperature: float, with_logprobs: bool
) -> SampleTurn:
    """The policy's responses through transformers' generate (sampling.turn_sampler)."""
    return turn_sampler(
        roles.policy, roles.pad_id, roles.eos_ids, max_new_tokens, temperature, config.speed, with_logprobs
    )


def read_back(roles: RolloutRoles, trajectory: Trajectory, prompt_texts: list[str]) -> Trajectory:
    """The texts of a sampled trajectory: each row's prompt, and its response (an episode's already has them)."""
    prompts = tuple(prompt_texts[int(i)] for i in trajectory.prompt_index)
    if trajectory.episodes:
        return dataclasses.replace(trajectory, prompts=prompts)
    return dataclasses.replace(
        trajectory, prompts=prompts, responses=decode_responses(roles.tokenizer, trajectory, roles.eos_ids)
    )


def hold_weights(
    engine: VLLMEngine, model: Any, version: Any, probe: list[int], dtype: str, speed: SpeedConfig
) -> None:
    """The engine holds `model`'s weights at `version`, checked against the trainer's own
    recomputation of a probe sample (engines/vllm.py)."""

    def recomputed(trajectory: Trajectory) -> Tensor:
        device = next(model.parameters()).device
        with torch.no_grad(), autocast(device, dtype):
            return response_logprobs(
                model,
                trajectory.input_ids.to(device),
                trajectory.attention_mask.to(device),
                trajectory.response_start,
                1.0,
                speed=speed,
            )[0]

    engine.hold(model, version, probe, recomputed)


def policy_pass(
    roles: RolloutRoles, config: OnlineConfig, trajectory: Trajectory, keep_graph: bool
) -> tuple[Trajectory, OldPass | None]:
    """The policy's log-probs and entropy of the sampled tokens (and a value head's values, read off
    the same pass), detached. keep_graph: the pass records its graph, which comes back as well."""
    ids, attn, start = trajectory.input_ids, trajectory.attention_mask, trajectory.response_start
    with torch.set_grad_enabled(keep_graph), autocast(ids.device, config.model.dtype):
        logprobs, entropy, *head_values = in_chunks(
            lambda i, m: response_logprobs(
                roles.policy,
                i,
                m,
                start,
                config.rollout.temperature,
                speed=config.speed,
                with_entropy=True,
                value_head=roles.value_head,
            ),
            ids,
            attn,
            config.sizes().pass_rows,
        )
    values = head_values[0].detach() if head_values else trajectory.values
    trajectory = dataclasses.replace(trajectory, old_logprobs=logprobs.detach(), entropy=entropy, values=values)
    return trajectory, ((logprobs, *head_values) if keep_graph else None)


@torch.no_grad()
def reference_pass(roles: RolloutRoles, config: OnlineConfig, trajectory: Trajectory) -> Trajectory:
    reference = roles.reference
    assert reference is not None, "a run without a reference (grpo.kl_in=none) runs no reference pass"
    ids, attn, start = trajectory.input_ids, trajectory.attention_mask, trajectory.response_start
    with autocast(ids.device, config.model.dtype):
        (ref_logprobs,) = in_chunks(
            lambda i, m: (reference.logprobs(i, m, start, config.rollout.temperature, config.speed),),
            ids,
            attn,
            config.sizes().pass_rows,
        )
    return dataclasses.replace(trajectory, ref_logprobs=ref_logprobs)


@torch.no_grad()
def value_pass(roles: RolloutRoles, config: OnlineConfig, trajectory: Trajectory) -> Trajectory:
    """The value model's V(state before each response token); a value head's came with policy_pass."""
    ids, attn, start = trajectory.input_ids, trajectory.attention_mask, trajectory.response_start
    with autocast(ids.device, config.model.dtype):
        (values,) = in_chunks(
            lambda i, m: (response_values(roles.value_model, i, m, start, config.speed),),
            ids,
            attn,
            config.sizes().pass_rows,
        )
    return dataclasses.replace(trajectory, values=values)


def score_batch(roles: RolloutRoles, trajectory: Trajectory) -> Trajectory:
    scores, parts = roles.rewards.score_trajectory(trajectory)
    return dataclasses.replace(trajectory, scores=scores, score_parts=parts)


def update_logprobs(
    roles: RolloutRoles,
    config: OnlineConfig,
    trajectory: Trajectory,
    rows: Tensor,
    reused: OldPass | None,
) -> tuple[Tensor, ...]:
    """The policy's (len(rows), R) log-probs of `rows` for an update's loss, with grad, and the value
    head's (len(rows), R) values when there is one: `reused`, the old log-probs' pass itself, when
    the step reuses it (then `rows` is every row in order), else a fresh forward pass."""
    if reused is not None:
        return reused
    ids, attn = trajectory.input_ids, trajectory.attention_mask
    with autocast(ids.device, config.model.dtype):
        return response_logprobs(
            roles.policy,
            ids[rows],
            attn[rows],
            trajectory.response_start,
            config.rollout.temperature,
            speed=config.speed,
            value_head=roles.value_head,
        )


def update_values(roles: RolloutRoles, config: OnlineConfig, trajectory: Trajectory, rows: Tensor) -> Tensor:
    """The value model's (len(rows), R) values of `rows`, with grad (ppo's update, critic=model)."""
    ids, attn = trajectory.input_ids, trajectory.attention_mask
    with autocast(ids.device, config.model.dtype):
        return response_values(roles.value_model, ids[rows], attn[rows], trajectory.response_start, config.speed)


PROBE_PROMPTS = 2
PROBE_TOKENS = 16


def probe_scorers(
    roles: RolloutRoles, config: OnlineConfig, prompt_texts: list[str], prompt_ids: list[list[int]], judge: Any
) -> None:
    """Call every reward source, the gold judge and the eval judge (`judge(trajectory)`, or None)
    once on a small real batch, the policy's greedy responses to the first prompts, so that one
    that fails or returns something unusable stops the run before its directory is touched (each
    names itself and the sample). Greedy decoding inside a forked RNG: the run draws what it would
    have drawn without the probe."""
    device = next(roles.policy.parameters()).device
    turn = policy_sampler(roles, config, min(PROBE_TOKENS, config.rollout.max_new_tokens), 0.0, False)
    texts, ids = prompt_texts[:PROBE_PROMPTS], prompt_ids[:PROBE_PROMPTS]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        with autocast(device, config.model.dtype), fsdp.gathered(roles.policy):  # model.fsdp: gathered once per call
            # With an environment, it is probed too: made, reset and stepped.
            trajectory = roles.episodes.run(turn, texts, ids, 1) if roles.episodes is not None else turn(ids, 1)[0]
        trajectory = read_back(roles, trajectory.to(device), texts)
        roles.rewards.score_trajectory(trajectory)
        if judge is not None:
            judge(trajectory)


def start_engine(config: OnlineConfig, roles: RolloutRoles) -> VLLMEngine | None:
    """The vLLM engine of rollout.engine=vllm, started from the policy's base weights; None for hf."""
    if config.rollout.engine != "vllm":
        return None
    return VLLMEngine(config, roles.tokenizer, roles.eos_ids, base=resolve_model_path(config.model.name))


def importance_weights(config: OnlineConfig, trajectory: Trajectory) -> tuple[Tensor | None, dict[str, float]]:
    """rollout.is_correction's truncated importance weights (B, R) and what to log of them; (None, {}) off."""
    if not config.rollout.is_correction:
        return None, {}
    weights = truncated_is_weights(trajectory.old_logprobs, trajectory.sample_logprobs, config.rollout.is_cap)
    mask = trajectory.mask
    return weights, {
        "rollout/is_weight_mean": float(weights[mask].mean()),
        "rollout/is_capped_frac": float((weights[mask] >= config.rollout.is_cap).float().mean()),
    }
