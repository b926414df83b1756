"""Which models a stage holds, how many tokens each pass sees, and so which terms a run has."""

from __future__ import annotations

import math
from typing import Any

from tether.plan.facts import Lengths, model_facts, offline_lengths, online_lengths
from tether.plan.memory import ALL, EVALUATION, REFERENCE, SAMPLING, UPDATE, Role, Shapes, Terms, fragmentation

ONLINE = ("ppo", "grpo")
OFFLINE = ("sft", "rm", "dpo")
SPEED_DEFAULTS = {
    "shared_prefix": True,
    "prepared_linears": True,
    "reuse_old_pass": True,
    "keep_freed_memory": True,
    "fused_adamw": True,
}


def speed_settings(config: Any) -> dict[str, bool]:
    """config.speed's switches where this version has them, else tether's defaults (all on)."""
    speed = getattr(config, "speed", None)
    return {key: bool(getattr(speed, key, default)) for key, default in SPEED_DEFAULTS.items()}


def device_of(config: Any) -> str:
    spec = str(config.train.device)
    if spec == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if spec.startswith("cuda") else "cpu"


def _trained(config: Any) -> tuple[str, int, Any]:
    lora = config.model.lora
    if lora is None:
        return "full", 0, None
    return "lora", int(lora.r), lora.target_modules


def roles_of(config: Any, stage: str, processes: int, fsdp: bool) -> list[Role]:
    """Every model the stage holds in each process."""
    m = config.model
    remote = bool(getattr(m, "trust_remote_code", False))
    trained, r, targets = _trained(config)
    shards = processes if fsdp else 1
    frozen_shards = shards if getattr(m, "fsdp_frozen", "shard") == "shard" else 1  # model.fsdp_frozen
    if stage in OFFLINE:
        kind = "scalar" if stage == "rm" else "causal"
        return [
            Role(
                "policy" if kind == "causal" else "reward model",
                model_facts(m.name, remote),
                kind,
                trained,
                r,
                targets,
                sharded=shards,
            )
        ]
    policy = Role("policy", model_facts(m.name, remote), "causal", trained, r, targets, sharded=shards)
    roles = [policy]
    ref_model = getattr(m, "ref_model", None)
    if trained == "lora" and ref_model is None:
        roles.append(Role("reference", policy.facts, "causal", "frozen", shares_weights_with="the policy"))
    else:
        roles.append(
            Role("reference", model_facts(ref_model or m.name, remote), "causal", "frozen", sharded=frozen_shards)
        )
    reward_name = config.reward.model
    value_source = None
    if stage == "ppo" and getattr(m, "critic", "model") == "model":
        value_source = getattr(m, "value_model", None) or reward_name or m.name
        roles.append(Role("value", model_facts(value_source, remote), "scalar", trained, r, targets, sharded=shards))
    if reward_name is not None:
        reward = Role("reward", model_facts(reward_name, remote), "scalar", "frozen", sharded=frozen_shards)
        same_vocab = reward.facts.vocab == policy.facts.vocab
        if trained == "lora" and value_source == reward_name and same_vocab:
            reward.shares_weights_with = "the value model"  # scored through its base, adapter off
        roles.append(reward)
    return roles


def shapes_of(config: Any, stage: str, processes: int, lengths: Lengths, speed: dict[str, bool]) -> Shapes:
    micro = config.train.micro_batch_size
    if stage in ONLINE:
        rollout = config.train.batch_size * config.rollout.samples_per_prompt
        mine = math.ceil(rollout / processes)
        minibatch = (config.ppo if stage == "ppo" else config.grpo).minibatch_size
        share = math.ceil(minibatch / processes)
        reuse = speed["reuse_old_pass"] and processes == 1 and minibatch == rollout and (micro or minibatch) == rollout
        evaluation = config.eval.num_prompts
        return Shapes(
            rollout_rows=mine,
            scoring_rows=min(micro, mine) if micro else mine,
            update_rows=min(micro or minibatch, share),
            lengths=lengths,
            reuse_old_pass=reuse,
            eval_rows=evaluation,
            eval_response=config.eval.max_new_tokens or config.rollout.max_new_tokens,
        )
    share = math.ceil(config.train.batch_size / processes)
    rows = min(micro or config.train.batch_size, share)
    return Shapes(
        rollout_rows=0,
        scoring_rows=micro or config.train.batch_size,  # evaluation batches (main process)
        update_rows=rows,
        lengths=lengths,
        reuse_old_pass=False,
    )


def build(config: Any, stage: str, processes: int = 1, device: str | None = None) -> tuple[Terms, list[Role], Shapes]:
    """The terms of `stage` run with `config` in each of `processes` processes."""
    if stage not in ONLINE + OFFLINE:
        raise ValueError(f"tether plan knows the stages {', '.join(ONLINE + OFFLINE)}, not {stage!r}")
    speed = speed_settings(config)
    device = device or device_of(config)
    fsdp = bool(getattr(config.model, "fsdp", False))
    remote = bool(getattr(config.model, "trust_remote_code", False))
    lengths = online_lengths(config, remote) if stage in ONLINE else offline_lengths(config, stage, remote)
    if not speed["shared_prefix"]:
        lengths = Lengths(lengths.prompt, lengths.response, 0, lengths.source, lengths.sequence, lengths.eval_prompt, 0)
    roles = roles_of(config, stage, processes, fsdp)
    shapes = shapes_of(config, stage, processes, lengths, speed)
    terms = Terms(device, config.model.dtype == "bfloat16", speed)
    terms.process()
    for role in roles:
        terms.weights(role)
        terms.training_state(role)
        terms.gathered(role)
    if stage in ONLINE:
        _online(terms, config, stage, roles, shapes)
    else:
        _offline(terms, config, stage, roles[0], shapes)
    if device == "cpu" and speed["keep_freed_memory"]:
        passes = sorted({p for t in terms.terms for p in t.phases if p != ALL})
        passes = [p for p in passes if not any(q.startswith(p + "/") for q in passes)]
        if stage in OFFLINE:  # only what recurs between steps: dpo's reference pass runs once, before
            passes = [p for p in passes if p == UPDATE or (p == EVALUATION and config.train.eval_every)]
        allowance, why = fragmentation(terms.terms, passes)
        terms.add("process", "heap fragmentation", allowance, (ALL,), why)
    return terms, roles, shapes


def _online(terms: Terms, config: Any, stage: str, roles: list[Role], s: Shapes) -> None:
    by = {r.name: r for r in roles}
    policy, reference = by["policy"], by["reference"]
    lengths = s.lengths
    rows = s.rollout_rows
    head = stage == "ppo" and getattr(config.model, "critic", "model") == "head"
    # Sampling.
    terms.prepared_linears(policy, (SAMPLING, "evaluation/sampling") if s.eval_rows else (SAMPLING,))
    terms.kv_cache(policy, rows, lengths.prompt + lengths.response, SAMPLING)
    terms.sampling_step(policy, rows, lengths.prompt, SAMPLING)
    # Scoring: the old log-probs (and a value head's values), the reference, the reward, the values.
    section = config.ppo if stage == "ppo" else config.grpo
    rollout = config.train.batch_size * config.rollout.samples_per_prompt
    share = math.ceil(section.minibatch_size / max(1, math.ceil(rollout / rows)))  # this process's rows of one
    passes = section.epochs * (rollout // section.minibatch_size) * math.ceil(share / s.update_rows)
    repeated = passes > 1  # forward/backward passes of each trained model per iteration
    if s.reuse_old_pass:
        terms.grad_pass(
            policy, rows, lengths, ("scoring", "update/policy"), True, what="old pass, graph kept", repeated=repeated
        )
    else:
        terms.nograd_pass(policy, s.scoring_rows, lengths, "scoring/old log-probs", True, "old log-probs pass")
    terms.nograd_pass(reference, s.scoring_rows, lengths, "scoring/reference", True, "reference pass")
    if "reward" in by:
        terms.nograd_pass(by["reward"], s.scoring_rows, lengths, "scoring/reward", False, "reward pass")
    if "value" in by:
        terms.nograd_pass(by["value"], s.scoring_rows, lengths, "scoring/values", False, "values pass")
    # The update: the policy's forward and backward, then the critic's (one after the other).
    if not s.reuse_old_pass:
        terms.grad_pass(policy, s.update_rows, lengths, ("update/policy",), True, repeated=repeated)
    if "value" in by:
        terms.grad_pass(by["value"], s.update_rows, lengths, ("update/value",), False, repeated=repeated)
    if head:
        h = policy.facts.hidden
        terms.add("value", "value head", 16 * (h + 1), (ALL,), "one linear layer: weights, gradients and AdamW state")
        terms.add(
            "value",
            "value head features",
            3 * s.update_rows * (lengths.response + 1) * h * 4,
            (UPDATE, "scoring"),
            "the policy's last hidden states, detached and RMS-normalised in float32",
        )
    # The fixed eval set: every eval prompt at once, the policy and the reference on its responses.
    if s.eval_rows:
        eval_lengths = Lengths(
            lengths.eval_prompt or lengths.prompt, s.eval_response, lengths.eval_shared_prefix, lengths.source
        )
        terms.kv_cache(policy, s.eval_rows, eval_lengths.prompt + s.eval_response, "evaluation/sampling")
        terms.sampling_step(policy, s.eval_rows, eval_lengths.prompt, "evaluation/sampling")
        terms.nograd_pass(policy, s.eval_rows, eval_lengths, "evaluation/log-probs", True, "eval log-probs pass")
        if "reward" in by:
            rm_rows = config.train.micro_batch_size or s.eval_rows
            terms.nograd_pass(by["reward"], rm_rows, eval_lengths, "evaluation/reward", False, "eval reward pass")


def _offline(terms: Terms, config: Any, stage: str, model: Role, s: Shapes) -> None:
    lengths = s.lengths
    per_example = 2 if stage in ("rm", "dpo") else 1  # a preference pair is two sequences
    rows = s.update_rows * per_example
    accumulating = math.ceil(config.train.batch_size / s.update_rows) > 1  # micro-batches per step
    if stage == "rm":
        terms.grad_pass(
            model, rows, lengths, (UPDATE,), logits=False, sequence=lengths.sequence, accumulating=accumulating
        )
        terms.nograd_pass(model, s.scoring_rows * 2, lengths, EVALUATION, False, "held-out pass")
        return
    terms.grad_pass(model, rows, lengths, (UPDATE,), logits=True, accumulating=accumulating)
    terms.nograd_pass(model, s.scoring_rows * per_example, lengths, EVALUATION, True, "held-out pass")
    if stage == "dpo":  # the reference log-probs of every pair, once, in batches of 8 pairs
        terms.nograd_pass(model, 16, lengths, REFERENCE, True, "reference log-probs pass")
