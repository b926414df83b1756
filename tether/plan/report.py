"""The Plan: the terms of a run summed by role and phase, rendered as plain text, with the changes
that would bring it under a memory limit, ranked."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from tether.plan.memory import ALL, GiB, MiB, Role, Shapes, Term

PHASE_ORDER = ("sampling", "scoring", "update", "reference pass", "evaluation")
TRAINING_PHASES = ("sampling", "scoring", "update", "reference pass")
ROLE_ORDER = ("process", "policy", "reference", "value", "reward", "reward model")


def gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f}"


@dataclass(frozen=True)
class Suggestion:
    overrides: tuple[str, ...]  # config overrides (and --processes N) that make the change
    peak: float  # the estimated peak with the change, bytes
    why: str  # what the change costs the run

    @property
    def text(self) -> str:
        return " ".join(self.overrides)


@dataclass
class Plan:
    """A run's memory estimate per process (and, after a calibration, its time per step)."""

    stage: str
    device: str
    processes: int
    memory: int | None  # the limit the suggestions aim under, bytes
    memory_source: str
    terms: list[Term]
    roles: list[Role]
    shapes: Shapes
    config: Any = field(repr=False)
    suggestions: list[Suggestion] = field(default_factory=list)
    seconds: dict[str, float] | None = None  # time per step, by phase, from a calibration
    time_note: str = ""

    # ----------------------------------------------------------------------------------------

    def passes(self) -> list[str]:
        """Every phase and pass some term is live in, in run order."""
        names = {p for t in self.terms for p in t.phases if p != ALL}
        for top in PHASE_ORDER:  # a phase named on its own (no passes) is a pass of its own
            if top in names and any(n.startswith(top + "/") for n in names):
                names.discard(top)
        return sorted(names, key=lambda n: (PHASE_ORDER.index(n.split("/")[0]), n))

    def pass_peaks(self) -> dict[str, float]:
        return {p: sum(t.bytes for t in self.terms if t.live_in(p)) for p in self.passes()}

    def phase_peaks(self) -> dict[str, float]:
        """Peak of each phase: the largest of its passes (they run one after the other)."""
        peaks: dict[str, float] = {}
        for name, value in self.pass_peaks().items():
            top = name.split("/")[0]
            peaks[top] = max(peaks.get(top, 0.0), value)
        return peaks

    def _peak_pass(self, top: str) -> str:
        candidates = {n: v for n, v in self.pass_peaks().items() if n.split("/")[0] == top}
        return max(candidates, key=candidates.__getitem__)

    @property
    def peak(self) -> float:
        """The run's estimated peak per process, bytes (the final evaluation included)."""
        return max(self.phase_peaks().values())

    @property
    def training_peak(self) -> float:
        """The peak of the training phases alone: what `memory/peak_gb` shows after each step."""
        return max(v for k, v in self.phase_peaks().items() if k in TRAINING_PHASES)

    @property
    def peak_phase(self) -> str:
        peaks = self.phase_peaks()
        return max(peaks, key=peaks.__getitem__)

    @property
    def fits(self) -> bool:
        return self.memory is None or self.peak <= self.memory

    @property
    def seconds_per_step(self) -> float | None:
        return sum(self.seconds.values()) if self.seconds else None

    def by_role(self) -> dict[str, dict[str, float]]:
        """Bytes of each role in each phase, at the phase's peak pass."""
        table: dict[str, dict[str, float]] = {}
        for top in self.phase_peaks():
            peak_pass = self._peak_pass(top)
            for t in self.terms:
                if t.live_in(peak_pass):
                    table.setdefault(t.role, {}).setdefault(top, 0.0)
                    table[t.role][top] += t.bytes
        return table

    # ----------------------------------------------------------------------------------------

    def summary(self) -> str:
        """One line: the peak, where, and whether it fits."""
        limit = f"{gib(self.memory)} GiB ({self.memory_source})" if self.memory else "no limit given"
        verdict = "fits in" if self.fits else "does NOT fit in"
        line = f"estimated peak {gib(self.peak)} GiB per process, in {self.peak_phase}: {verdict} {limit}"
        if self.seconds_per_step is not None:
            line += (
                f"; about {self.seconds_per_step:.1f} s per {'iteration' if self.stage in ('ppo', 'grpo') else 'step'}"
            )
        return line

    def warning(self) -> str | None:
        """For the start-of-run report: None when the run fits, else what to change (the run starts anyway)."""
        if self.fits:
            return None
        fix = (
            f" The likeliest fix: {self.suggestions[0].text} ({gib(self.suggestions[0].peak)} GiB)."
            if self.suggestions
            else ""
        )
        return (
            f"warning: by tether's estimate this {self.stage} run needs {gib(self.peak)} GiB per process "
            f"({self.peak_phase}), more than the {gib(self.memory or 0)} GiB available ({self.memory_source}).{fix} "
            "Starting anyway: the estimate can be wrong (`tether plan` shows its terms)."
        )

    def render(self) -> str:
        processes = f"{self.processes} process{'es' if self.processes > 1 else ''}"
        lines = [f"tether plan: {self.stage} on {self.device}, {processes}, model.dtype={self.config.model.dtype}"]
        lines += [f"  {line}" for line in self._describe()]
        lines += ["", self.summary(), ""]
        phases = [p for p in PHASE_ORDER if p in self.phase_peaks()]
        table = self.by_role()
        width = max(len(r) for r in [*table, "total"]) + 2
        lines.append("GiB per process".ljust(width) + "".join(p.rjust(16) for p in phases))
        for role in sorted(table, key=lambda r: ROLE_ORDER.index(r) if r in ROLE_ORDER else 99):
            lines.append(
                role.ljust(width)
                + "".join((gib(table[role][p]) if p in table[role] else "-").rjust(16) for p in phases)
            )
        peaks = self.phase_peaks()
        lines.append("total".ljust(width) + "".join(gib(peaks[p]).rjust(16) for p in phases))
        if self.seconds:
            lines.append(
                "seconds".ljust(width)
                + "".join((f"{self.seconds[p]:.1f}" if p in self.seconds else "-").rjust(16) for p in phases)
            )
        lines += ["", "Terms (bytes per process; where each is live; the assumption behind it):"]
        for t in sorted(self.terms, key=lambda t: (ROLE_ORDER.index(t.role) if t.role in ROLE_ORDER else 99, -t.bytes)):
            where = "always" if ALL in t.phases else ", ".join(t.phases)
            lines.append(f"  {t.role:10s} {t.name:28s} {_size(t.bytes):>10s}  [{where}]")
            lines.append(f"  {'':10s}   {t.assumption}")
        lines += ["", "General assumptions:"]
        lines += [f"  - {a}" for a in self._assumptions()]
        if self.seconds is not None:
            lines += ["", f"Time: {self.time_note}"]
        if not self.fits:
            lines += [
                "",
                f"Changes that would bring the peak under {gib(self.memory or 0)} GiB, most preferable first:",
            ]
            if not self.suggestions:
                lines.append("  none of the changes tether knows fits; a machine with more memory is needed")
            for i, s in enumerate(self.suggestions, 1):
                lines.append(f"  {i}. {s.text}  ->  {gib(s.peak)} GiB  ({s.why})")
        return "\n".join(lines)

    def _describe(self) -> list[str]:
        out = []
        for role in self.roles:
            f = role.facts
            how = {"full": "full fine-tuning", "lora": f"LoRA r={role.lora_r}", "frozen": "frozen"}[role.trained]
            share = f", no copy: {role.shares_weights_with}'s weights" if role.shares_weights_with else ""
            out.append(
                f"{role.name}: {f.name} ({f.architecture}, {role.params / 1e6:.1f}M parameters, {f.layers} layers, "
                f"hidden {f.hidden}, vocabulary {f.vocab}; {how}{share})"
            )
        s, n = self.shapes, self.shapes.lengths
        if self.stage in ("ppo", "grpo"):
            out.append(
                f"rows per process: {s.rollout_rows} sampled, {s.scoring_rows} per no-grad pass, {s.update_rows} per "
                f"update pass{' (the first step reuses the old pass)' if s.reuse_old_pass else ''}"
                + (f", {s.eval_rows} eval prompts at once" if s.eval_rows else "")
            )
        else:
            out.append(f"rows per process: {s.update_rows} examples per forward/backward pass")
        out.append(
            f"tokens: prompt {n.prompt}{f' ({n.shared_prefix} shared by every prompt)' if n.shared_prefix else ''}, "
            f"response {n.response} ({n.source})"
        )
        return out

    def _assumptions(self) -> list[str]:
        items = [
            "peak of a phase = everything alive in it; phases reuse each other's freed memory (tether keeps freed "
            "heap memory: speed.keep_freed_memory); the run's peak is the largest phase",
            "every sequence is as long as the longest prompt plus the longest response (a batch of the longest is "
            "the worst case; shorter batches need less)",
            "steady state: gradients and AdamW state exist (they do from the first optimizer step on)",
        ]
        if self.device == "cpu":
            items.append("the CPU figure is the resident set (ru_maxrss), what `memory/peak_gb` logs")
        else:
            items.append(
                "the GPU figure is torch's allocated memory (max_memory_allocated, what `memory/peak_gb` logs); the "
                "CUDA context (~0.3-0.5 GiB) and the caching allocator's slack come on top"
            )
        if self.config.model.dtype == "bfloat16":
            items.append(
                "bfloat16 autocast: activations taken at 2 bytes (not measured; norms and the log-softmax "
                "stay float32, so the truth is somewhat higher)"
            )
        if getattr(self.config.model, "fsdp", False):
            items.append(
                "model.fsdp: the trained models' parameters, gradients and optimizer state divided by the process "
                "count, and the frozen ones' parameters with model.fsdp_frozen=shard; one decoder layer gathered at "
                "a time in a pass, the policy whole for each generate call, every sharded model whole while the main "
                "process evaluates. Checked on CPU processes for the model state (benchmarks/fsdp_memory.py), "
                "not on a GPU"
            )
        if self.processes > 1:
            items.append(
                f"{self.processes} processes: each holds whole models (data parallel) and its share of every batch"
            )
        if self.stage in ("ppo", "grpo"):
            items.append(
                "the final evaluation (eval.num_prompts prompts at once) is a phase of its own; "
                "memory/peak_gb after each step does not include it"
            )
        return items


def _size(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB / 10 else f"{nbytes / MiB:.1f} MiB"


# --------------------------------------------------------------------------------------------
# Changes that bring the peak down
# --------------------------------------------------------------------------------------------


def set_path(config: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    obj = config
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def _halvings(start: int, divides: int) -> list[int]:
    return [m for m in range(start - 1, 0, -1) if divides % m == 0]


def candidate_changes(
    config: Any, stage: str, shapes: Shapes, device: str, processes: int
) -> list[tuple[list[tuple[str, Any]], str, str]]:
    """(assignments, the override text, what it costs the run), cheapest for the run first."""
    from tether.config import LoraConfig

    out: list[tuple[list[tuple[str, Any]], str, str]] = []
    online = stage in ("ppo", "grpo")
    minibatch = (config.ppo if stage == "ppo" else config.grpo).minibatch_size if online else config.train.batch_size
    for micro in _halvings(shapes.update_rows, minibatch):
        out.append(
            (
                [("train.micro_batch_size", micro)],
                f"train.micro_batch_size={micro}",
                "the same updates in smaller passes: slower, same result",
            )
        )
    if shapes.reuse_old_pass and getattr(config, "speed", None) is not None:
        out.append(
            ([("speed.reuse_old_pass", False)], "speed.reuse_old_pass=false", "one more policy forward per iteration")
        )
    if online and config.eval.num_prompts > 8:
        n = config.eval.num_prompts // 2
        out.append(([("eval.num_prompts", n)], f"eval.num_prompts={n}", "a smaller fixed eval set"))
    if stage == "ppo" and getattr(config.model, "critic", "model") == "model":
        out.append(
            (
                [("model.critic", "head"), ("model.value_model", None)],
                "model.critic=head",
                "a value head on the policy instead of a value model: a weaker critic",
            )
        )
    if config.model.lora is None:
        out.append(
            (
                [("model.lora", LoraConfig())],
                "model.lora={r: 16, alpha: 32}",
                "LoRA instead of full fine-tuning: fewer trained parameters, usually a higher train.lr",
            )
        )
    if device == "cuda" and config.model.dtype != "bfloat16":
        out.append(([("model.dtype", "bfloat16")], "model.dtype=bfloat16", "bfloat16 compute (weights stay float32)"))
    if online:
        r = config.rollout.max_new_tokens // 2
        if r >= 8:
            out.append(
                ([("rollout.max_new_tokens", r)], f"rollout.max_new_tokens={r}", "shorter responses: a different task")
            )
        rollout = config.train.batch_size * config.rollout.samples_per_prompt
        b = config.train.batch_size // 2
        if (
            b >= 1
            and (b * config.rollout.samples_per_prompt) % min(minibatch, b * config.rollout.samples_per_prompt) == 0
        ):
            mb = min(minibatch, b * config.rollout.samples_per_prompt)
            section = "ppo" if stage == "ppo" else "grpo"
            if rollout > 1:
                out.append(
                    (
                        [("train.batch_size", b), (f"{section}.minibatch_size", mb)],
                        f"train.batch_size={b} {section}.minibatch_size={mb}",
                        "fewer prompts per iteration: noisier updates",
                    )
                )
    else:
        length = config.data.max_length // 2
        if length > config.data.max_prompt_length:
            out.append(([("data.max_length", length)], f"data.max_length={length}", "longer examples are left out"))
    return out


def _applied(config: Any, changes: list[tuple[list[tuple[str, Any]], str, str]]) -> Any:
    changed = copy.deepcopy(config)
    for assignments, _, _ in changes:
        for key, value in assignments:
            set_path(changed, key, value)
    return changed


def suggest(config: Any, stage: str, plan: Plan, replan: Any) -> list[Suggestion]:
    """Single changes that fit, most preferable first (of the micro-batch sizes, the largest that
    fits); if none fits alone, the cheapest ones together: each kind of change in order of
    preference, the micro-batch at its smallest, until the peak fits, then the micro-batch raised
    back as far as it still fits. `replan(config)` returns the peak of a changed config, bytes."""
    if plan.memory is None or plan.fits:
        return []
    limit = plan.memory
    changes = candidate_changes(config, stage, plan.shapes, plan.device, plan.processes)
    micro = [c for c in changes if c[1].startswith("train.micro_batch_size")]  # largest first
    others = [c for c in changes if c not in micro]
    fitting: list[Suggestion] = []
    fitting_micro = [c for c in micro if replan(_applied(config, [c])) <= limit]
    if fitting_micro:
        best = fitting_micro[0]
        fitting.append(Suggestion((best[1],), replan(_applied(config, [best])), best[2]))
    for change in others:
        peak = replan(_applied(config, [change]))
        if peak <= limit:
            fitting.append(Suggestion((change[1],), peak, change[2]))
    if fitting:
        return fitting[:5]
    chosen: list[tuple[list[tuple[str, Any]], str, str]] = [micro[-1]] if micro else []
    for change in others:
        if replan(_applied(config, chosen)) <= limit:
            break
        chosen.append(change)
    if replan(_applied(config, chosen)) > limit:
        return []
    if micro:  # the largest micro-batch that still fits beside the other changes
        rest = chosen[1:]
        for candidate in micro:
            if replan(_applied(config, [candidate, *rest])) <= limit:
                chosen = [candidate, *rest]
                break
        if replan(_applied(config, rest)) <= limit:  # no micro-batch needed at all
            chosen = rest
    whys = list(dict.fromkeys(why.split(":")[0] for _, _, why in chosen))
    return [Suggestion(tuple(text for _, text, _ in chosen), replan(_applied(config, chosen)), "; ".join(whys))]
