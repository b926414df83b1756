"""Seconds per step from a short calibration of this machine (about two seconds): a roofline-style
count of the work of each phase, divided by the speeds measured here.

  matmul speed     GFLOP/s of float32 512-row matmuls from width w to 4w, at three widths (the forward
                   and backward passes; backward taken as twice the forward)
  weight streaming bytes/s of an 8-row matmul against a 32 MiB weight (a decoding step reads every
                   weight once: sampling is bound by this, not by arithmetic)
  per-layer cost   seconds of one tiny decoder-layer call (the small ops and Python around every
                   layer, paid per decoding step and per pass)
  sampler          seconds per (row x vocabulary entry) of a log-softmax + float64 cumulative sum
  AdamW            seconds per parameter of a fused AdamW step
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from tether.plan.memory import MiB


@dataclass
class Calibration:
    matmul_flops: dict[int, float]  # width -> FLOP/s at 512 rows
    stream_bytes: float  # bytes/s of weight streamed by an 8-row matmul
    layer_seconds: float  # one tiny decoder layer call, no grad
    sampler_seconds: float  # per row x vocabulary entry
    adam_seconds: float  # per parameter
    threads: int
    seconds: float  # how long the calibration took

    def flops(self, width: int) -> float:
        """Matmul speed at this model width (log-interpolated between the calibrated widths)."""
        widths = sorted(self.matmul_flops)
        if width <= widths[0]:
            return self.matmul_flops[widths[0]]
        if width >= widths[-1]:
            return self.matmul_flops[widths[-1]]
        for lo, hi in zip(widths, widths[1:], strict=False):
            if lo <= width <= hi:
                t = (math.log(width) - math.log(lo)) / (math.log(hi) - math.log(lo))
                return self.matmul_flops[lo] * (1 - t) + self.matmul_flops[hi] * t
        return self.matmul_flops[widths[-1]]


def _best(fn: Any, repeats: int, budget: float = 0.3) -> float:
    """The fastest of at least `repeats` calls, and of as many more as fit in `budget` seconds: the
    machine's speed when nothing else takes the CPU (a busy machine only makes single calls slower)."""
    fn()
    best = math.inf
    started = time.perf_counter()
    calls = 0
    while calls < repeats or time.perf_counter() - started < budget:
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        calls += 1
    return best


def calibrate(num_threads: int | None = None) -> Calibration:
    """Measure this machine's speeds for the time estimate (~2 s)."""
    import torch

    started = time.perf_counter()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    flops = {}
    with torch.no_grad():
        for width in (256, 768, 2048):  # a layer's MLP matmul: 512 rows, width -> 4 x width
            a, b = torch.randn(512, width), torch.randn(width, 4 * width)
            flops[width] = 2 * 512 * width * 4 * width / _best(lambda a=a, b=b: a @ b, 5)
        weight = torch.randn(4096, 2048)  # 32 MiB
        x = torch.randn(8, 2048)
        stream = _prepared_linear(weight)
        stream_bytes = weight.numel() * 4 / _best(lambda: stream(x), 5)
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
        config._attn_implementation = "sdpa"  # as a loaded model runs (unset, every call logs a warning)
        layer = LlamaDecoderLayer(config, 0).eval()
        rotary = LlamaRotaryEmbedding(config)
        h = torch.randn(8, 1, 64)
        position = torch.zeros(8, 1, dtype=torch.long)
        emb = rotary(h, position)
        layer_seconds = _best(lambda: layer(h, position_embeddings=emb, attention_mask=None), 20)
        logits = torch.randn(8, 32768)
        sampler = _best(lambda: torch.cumsum(torch.log_softmax(logits, -1).exp(), -1, dtype=torch.float64), 5)
        sampler_seconds = sampler / logits.numel()
    params = torch.nn.Parameter(torch.randn(4 * MiB))
    params.grad = torch.randn_like(params)
    optimizer = torch.optim.AdamW([params], fused=True)
    adam_seconds = _best(optimizer.step, 3) / params.numel()
    return Calibration(
        matmul_flops=flops,
        stream_bytes=stream_bytes,
        layer_seconds=layer_seconds,
        sampler_seconds=sampler_seconds,
        adam_seconds=adam_seconds,
        threads=torch.get_num_threads(),
        seconds=time.perf_counter() - started,
    )


def _prepared_linear(weight: Any) -> Any:
    """An 8-row linear as sampling runs it on the CPU (oneDNN, weight reordered once), else plain."""
    import torch

    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        run = lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")  # noqa: E731
        run(torch.randn(8, weight.shape[1]))
        return run
    except (AttributeError, RuntimeError):
        return lambda x: torch.nn.functional.linear(x, weight)


def estimate_seconds(plan: Any, cal: Calibration) -> tuple[dict[str, float], str]:
    """Seconds per step (ppo, grpo: per iteration) by phase, and how they were counted."""
    config, s, lengths = plan.config, plan.shapes, plan.shapes.lengths
    roles = {r.name: r for r in plan.roles}
    policy = roles.get("policy") or roles["reward model"]
    f = policy.facts
    speed = cal.flops(f.hidden)
    total = lengths.prompt + lengths.response
    prefix = lengths.shared_prefix

    def attention(rows: int, length: int, model: Any) -> float:
        return 4 * model.layers * model.heads * model.head_dim * rows * length * length / 2

    def forward(model: Any, rows: int, logits: bool, length: int = total, response: int = lengths.response) -> float:
        """Seconds of one forward pass without grad over `rows` sequences."""
        tokens = rows * (length - prefix) + prefix
        flops = 2 * (model.linear_params - model.vocab * model.hidden) * tokens + attention(rows, length, model)
        if logits:
            flops += 2 * model.vocab * model.hidden * rows * (response + 1)
        calls = 2 if prefix else 1
        return flops / cal.flops(model.hidden) + calls * model.layers * cal.layer_seconds * 1.5

    seconds: dict[str, float] = {}
    online = plan.stage in ("ppo", "grpo")
    if online:
        rows = s.rollout_rows
        prefill = forward(f, rows, False, lengths.prompt)
        weight_bytes = 4 * f.linear_params
        per_token = (
            weight_bytes / cal.stream_bytes + f.layers * cal.layer_seconds + rows * f.vocab * cal.sampler_seconds
        )
        seconds["sampling"] = prefill + lengths.response * per_token
        scoring = forward(f, rows, True)  # old log-probs (+ entropy)
        scoring += forward(roles["reference"].facts, rows, True)
        for name in ("reward", "value"):
            if name in roles:
                scoring += forward(roles[name].facts, rows, False)
        seconds["scoring"] = scoring
        section = config.ppo if plan.stage == "ppo" else config.grpo
        rollout = rows * plan.processes
        steps = section.epochs * max(1, rollout // section.minibatch_size)
        per_step_rows = math.ceil(section.minibatch_size / plan.processes)
        update = steps * 3 * forward(f, per_step_rows, True)
        if s.reuse_old_pass:
            update -= forward(f, per_step_rows, True)
        if "value" in roles:
            update += steps * 3 * forward(roles["value"].facts, per_step_rows, False)
        trained = sum(r.trainable for r in plan.roles)
        update += steps * trained * cal.adam_seconds
        seconds["update"] = update
        note_rows = f"{rows} sampled rows, {steps} optimizer steps"
    else:
        pair = 2 if plan.stage in ("rm", "dpo") else 1
        rows = s.update_rows * pair * math.ceil(config.train.batch_size / plan.processes / s.update_rows)
        length = lengths.sequence or total
        seconds["update"] = 3 * forward(f, rows, plan.stage != "rm", length) + policy.trainable * cal.adam_seconds
        note_rows = f"{rows} sequences per step"
    note = (
        f"from a {cal.seconds:.1f} s calibration on {cal.threads} threads ({note_rows}): matmuls at "
        f"{speed / 1e9:.0f} GFLOP/s for width {f.hidden}, weights streamed at {cal.stream_bytes / 1e9:.1f} GB/s "
        f"while decoding, {cal.layer_seconds * 1e3:.2f} ms per layer call; backward = 2 x forward. Every response "
        "taken at full length, so runs whose responses end early take less. Measured error: docs/plan.md."
    )
    return seconds, note
