"""The memory terms of a run: bytes per process, each with the role it belongs to, the phases it is
live in, and the assumption behind it.

The peak of a phase is the sum of the terms live in it; the run's peak is the largest phase. That
is right for the CPU because tether keeps freed heap memory for the next tensors
(speed.keep_freed_memory): the resident set levels off at the largest working set, and every
phase reuses the memory the previous one freed. Gradients are never freed between steps (they are
set to None at the *next* step's zero_grad), and AdamW's state lives from the first step on, so
both count in every phase of the steady state.

Activation formulas are counts of the tensors autograd saves for the backward, per token and
layer, in float32 (tests/test_plan.py checks them against a real model's saved tensors):

  llama-style (gated MLP, RMSNorm):  full 6H + 4A + 4I,  LoRA 4H + 4A + 4I   (+ the mask row, T)
  gpt2-style (plain MLP, LayerNorm): 4H + 4A + 5I                            (+ the mask row, T)

with H the hidden size, A = heads x head_dim (keys and values are repeated to every head before
attention), I the MLP width, plus r per adapted module under LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tether.plan.facts import Lengths, ModelFacts

MiB = 2**20
GiB = 2**30

# Measured on the 2-core CPU of benchmarks/README.md (torch 2.13.0+cpu, transformers 5.23):
# `import tether.stages.*` and nothing else: 347-355 MiB resident; the first passes of a run add
# thread pools, oneDNN's primitive cache, the autograd engine and the tokenizer: ~45 MiB more.
CPU_IMPORTS = 352 * MiB
CPU_FIRST_USE = 45 * MiB
# core/logprobs.py: vocabulary entries per chunk of the log-softmax temporaries.
CPU_CHUNK = 2**20
ACCELERATOR_CHUNK = 2**26
# Measured on the CPU: a LoRA model's forward and backward repeated in a loop grows the resident set
# to 2.0-2.6x the saved activations within three passes (1.0x under full fine-tuning): the adapters'
# small gradients, kept to the next step, are carved out of the freed activations. A run whose
# trained models make one pass per iteration, with sampling's large block freed between them,
# grows far less (2.05 -> 2.22 GiB over seven iterations of the embedded model): no growth term.
LORA_HEAP_FACTOR = 2.0
# Fitted on the measured runs of docs/plan.md (the one free constant of the CPU estimate): glibc
# reuses the memory one pass frees for a pass of other tensor sizes only in part; this share of
# the largest working set that shares no term with the peak pass is added.
FRAGMENTATION = 0.75

SAMPLING, SCORING, UPDATE, EVALUATION, REFERENCE = "sampling", "scoring", "update", "evaluation", "reference pass"
ALL = "*"


@dataclass(frozen=True)
class Term:
    role: str  # process, policy, reference, value, reward
    name: str  # weights, gradients, AdamW state, activations, logits, KV cache, ...
    bytes: float
    phases: tuple[str, ...]  # (ALL,) for what lives through the whole run
    assumption: str

    def live_in(self, phase: str) -> bool:
        """Whether the term counts in `phase` (a phase, or a pass within one: 'scoring/reference')."""
        return ALL in self.phases or phase in self.phases or phase.split("/")[0] in self.phases


@dataclass
class Role:
    """A model the run holds: what it is, and how it is trained."""

    name: str  # policy, reference, value, reward
    facts: ModelFacts
    kind: str  # causal or scalar
    trained: str  # full, lora or frozen
    lora_r: int = 0
    lora_targets: Any = "all-linear"
    shares_weights_with: str | None = None  # a role whose weights these are (no copy)
    sharded: int = 1  # FSDP: its parameters, gradients and optimizer state split over this many

    @property
    def params(self) -> int:
        p = self.facts.causal_params if self.kind == "causal" else self.facts.scalar_params
        return p + (self.lora.trainable if self.trained == "lora" else 0)

    @property
    def trainable(self) -> int:
        if self.trained == "full":
            return self.params
        return self.lora.trainable if self.trained == "lora" else 0

    @property
    def lora(self) -> Any:
        return self.facts.lora(self.lora_r, self.lora_targets, self.kind == "scalar")


def saved_floats_per_token(role: Role, context: int) -> tuple[float, float, str]:
    """(floats saved for the backward per token over all layers, floats once per token after the
    last layer, the formula in words) for a with-grad pass of `role` over sequences of `context`
    tokens (the attention mask row)."""
    f = role.facts
    h, a, i = f.hidden, f.heads * f.head_dim, f.intermediate
    lora = role.trained == "lora"
    rank = role.lora.per_layer_rank_floats if lora else 0
    if f.gated_mlp:
        per_layer = (4 if lora else 6) * h + 4 * a + 4 * i + f.heads + 2 + rank + context
        after = 0 if lora else (3 if role.kind == "causal" else 2) * h
        words = f"{'4' if lora else '6'}H + 4A + 4I{' + r per adapter' if lora else ''} + T per layer"
    else:
        per_layer = 4 * h + 4 * a + 5 * i + f.heads + 4 + rank + context
        after = 0 if lora else (2 if role.kind == "causal" else 1) * h
        words = f"4H + 4A + 5I{' + r per adapter' if lora else ''} + T per layer"
    return per_layer * f.layers, after, words


def nograd_floats_per_token(facts: ModelFacts) -> float:
    """A forward pass without grad holds about one layer's tensors at a time: the residual stream,
    the attention inputs, and the MLP's three I-wide tensors (gate, up, their product)."""
    return 3 * facts.hidden + 3 * facts.intermediate + 2 * facts.heads * facts.head_dim


@dataclass
class Shapes:
    """The token counts of every pass, per process."""

    rollout_rows: int  # sequences sampled per iteration in this process
    scoring_rows: int  # sequences per no-grad pass (train.micro_batch_size, else all)
    update_rows: int  # sequences per forward/backward pass
    lengths: Lengths
    reuse_old_pass: bool  # the old log-probs' pass keeps its graph for the first step
    eval_rows: int = 0
    eval_response: int = 0


class Terms:
    """Builds the terms of one run."""

    def __init__(self, device: str, bf16: bool, speed: dict[str, bool]) -> None:
        self.device = device
        self.bf16 = bf16
        self.speed = speed
        self.terms: list[Term] = []
        self.act_bytes = 2 if bf16 else 4  # activations under autocast are mostly bfloat16 matmul outputs

    def add(self, role: str, name: str, nbytes: float, phases: tuple[str, ...], assumption: str) -> None:
        if nbytes > 0:
            self.terms.append(Term(role, name, float(nbytes), phases, assumption))

    # ----------------------------------------------------------------------------------------

    def process(self) -> None:
        if self.device == "cpu":
            self.add(
                "process",
                "Python, torch, transformers, peft, tether",
                CPU_IMPORTS + CPU_FIRST_USE,
                (ALL,),
                "measured: the resident set after importing every stage and loading nothing "
                f"({CPU_IMPORTS / MiB:.0f} MiB), plus {CPU_FIRST_USE / MiB:.0f} MiB the first passes add "
                "(thread pools, oneDNN's kernel cache, the tokenizer); torch 2.13 CPU build",
            )

    def weights(self, role: Role) -> None:
        if role.shares_weights_with:
            extra = role.lora.trainable if role.trained == "lora" else 0
            self.add(
                role.name,
                "adapter weights",
                4 * extra,
                (ALL,),
                f"LoRA r={role.lora_r} on {role.shares_weights_with}'s weights",
            )
            return
        sharded = f", split over {role.sharded} processes (FSDP)" if role.sharded > 1 else ""
        self.add(
            role.name,
            "weights",
            4 * role.params / role.sharded,
            (ALL,),
            f"{role.params / 1e6:.1f}M parameters of {role.facts.architecture}"
            f"{' as a one-output sequence classifier' if role.kind == 'scalar' else ''} ("
            f"{f'LoRA r={role.lora_r}' if role.trained == 'lora' else role.trained}) in float32 "
            f"(tether keeps every weight float32){sharded}",
        )

    def training_state(self, role: Role) -> None:
        n = role.trainable
        if n == 0:
            return
        where = f" / {role.sharded} (FSDP)" if role.sharded > 1 else ""
        self.add(
            role.name,
            "gradients",
            4 * n / role.sharded,
            (ALL,),
            f"{n / 1e6:.2f}M trained parameters x 4 bytes{where}; kept from one step's backward to the next "
            "step's zero_grad, so alive in every phase",
        )
        self.add(
            role.name,
            "AdamW state",
            8 * n / role.sharded,
            (ALL,),
            f"two float32 moments per trained parameter (fused AdamW){where}, from the first step on",
        )

    def gathered(self, role: Role) -> None:
        """model.fsdp (engines/fsdp.py): a sharded model's passes gather one unit at a time; the policy
        is gathered whole for each generate call, and evaluation holds every sharded model whole."""
        if role.sharded <= 1:
            return
        self.add(
            role.name,
            "gathered layer",
            4 * role.facts.layer_params,
            (SCORING, UPDATE, REFERENCE),
            f"FSDP: one decoder layer's full parameters ({role.facts.layer_params / 1e6:.1f}M) gathered at a time",
        )
        whole = (SAMPLING, EVALUATION, "evaluation/sampling") if role.name == "policy" else (EVALUATION,)
        self.add(
            role.name,
            "gathered whole",
            4 * role.params * (1 - 1 / role.sharded),
            whole,
            "FSDP: the other processes' shards, gathered "
            + ("once per generate call and " if role.name == "policy" else "")
            + "while the main process evaluates",
        )

    def prepared_linears(self, role: Role, phases: tuple[str, ...]) -> None:
        """sampling_linears: a copy of every linear weight for the length of a generate call."""
        if not self.speed.get("prepared_linears", True) or self.bf16:
            return
        f = role.facts
        if self.device == "cpu":
            n = f.linear_params  # gpt2's Conv1D layers are no nn.Linear: only its LM head is copied
            what = "every nn.Linear weight in oneDNN's blocked layout (LoRA folded into W + dW)"
        else:
            n = role.lora.targeted if role.trained == "lora" else 0
            what = "W + dW of every LoRA-adapted layer"
        self.add(role.name, "prepared weights", 4 * n / role.sharded, phases, f"{n / 1e6:.1f}M: {what}, while sampling")

    def kv_cache(self, role: Role, rows: int, tokens: int, phase: str) -> None:
        f = role.facts
        per_token = 2 * f.layers * f.kv_heads * f.head_dim * self.act_bytes
        self.add(
            role.name,
            "KV cache",
            rows * tokens * per_token * 1.03,  # + the growing cache's one-layer concatenation
            (phase,),
            f"{rows} rows x {tokens} tokens x 2 x {f.layers} layers x {f.kv_heads} KV heads x {f.head_dim} "
            f"x {self.act_bytes} bytes",
        )

    def sampling_step(self, role: Role, rows: int, prompt: int, phase: str) -> None:
        f = role.facts
        step = rows * f.vocab * (4 + 4 + 4 + 8 + 4)
        prefill = rows * prompt * nograd_floats_per_token(f) * self.act_bytes
        self.add(
            role.name,
            "sampling step",
            max(step, prefill),
            (phase,),
            f"the larger of the prefill's one-layer tensors ({prefill / MiB:.0f} MiB) and one step's "
            f"{rows} x {f.vocab} logits with the sampler's log-softmax, exp and float64 CDF ({step / MiB:.0f} MiB)",
        )

    def _chunk(self, f: ModelFacts, positions: int) -> float:
        elements = CPU_CHUNK if self.device == "cpu" else ACCELERATOR_CHUNK
        rows = max(1, elements // f.vocab)
        return 4 * min(positions, rows) * f.vocab

    def nograd_pass(
        self, role: Role, rows: int, lengths: Lengths, phase: str, logits: bool, what: str, response: int | None = None
    ) -> None:
        f = role.facts
        response = lengths.response if response is None else response
        total = lengths.prompt + response
        tokens = rows * (total - lengths.shared_prefix) + lengths.shared_prefix
        body = tokens * nograd_floats_per_token(f) * self.act_bytes
        out = 0.0
        if logits:
            positions = rows * (response + 1)
            # Two logits-sized tensors, and a third in the first measurements but not in later ones (the
            # cause not found, docs/LOG.md 2026-12-02): 2.5 keeps both within 10%.
            out = positions * f.vocab * 4 * 2.5 + 3 * self._chunk(f, positions)
        else:
            out = rows * total * f.hidden * 4 * 2  # last hidden states, and the score head's input
        self.add(
            role.name,
            what,
            body + out,
            (phase,),
            f"no grad, {rows} rows of {total} tokens: one layer's tensors at a time ({body / MiB:.0f} MiB)"
            + (
                f", 2.5 times the {rows} x {response + 1} x {f.vocab} float32 logits (the logits and their reshaped "
                "copy; a third was measured beside them on 2026-12-01, not on 2026-12-02: taken halfway; the "
                "log-softmax itself runs in small chunks)"
                if logits
                else f", the last hidden states ({out / MiB:.0f} MiB)"
            ),
        )

    def grad_pass(
        self,
        role: Role,
        rows: int,
        lengths: Lengths,
        phases: tuple[str, ...],
        logits: bool,
        what: str = "activations",
        sequence: int | None = None,
        repeated: bool = True,
        accumulating: bool = False,
    ) -> None:
        """A forward and backward pass. repeated: the model runs several such passes in a row (more
        than one per iteration, or an offline stage's steps), which under LoRA grows the heap.
        accumulating: an offline stage's step is several micro-batches whose gradients accumulate,
        which grows the heap under full fine-tuning too."""
        f = role.facts
        total = sequence or (lengths.prompt + lengths.response)
        prefix = lengths.shared_prefix
        tokens = rows * (total - prefix) + prefix
        per_token, after, words = saved_floats_per_token(role, total)
        act = tokens * per_token * self.act_bytes + rows * total * after * self.act_bytes
        backward = tokens * (2 * f.hidden + 2 * f.intermediate) * 4  # one layer's gradients in flight
        self.add(
            role.name,
            what,
            act + backward,
            phases,
            f"with grad, {rows} rows of {total} tokens{f' ({prefix} shared, computed once)' if prefix else ''}: "
            f"the tensors autograd saves, {words} floats per token ({act / MiB:.0f} MiB), plus one layer's "
            "gradients in flight during the backward",
        )
        grows = (role.trained == "lora" and repeated) or (role.trained == "full" and accumulating)
        if grows and self.device == "cpu":
            growth = (LORA_HEAP_FACTOR - 1) * act
            earlier = [t for t in self.terms if t.role == role.name and t.name == "heap growth"]
            if earlier and earlier[0].bytes >= growth:
                return self._logits(role, rows, lengths, phases, logits)
            self.terms = [t for t in self.terms if t not in earlier]
            self.add(
                role.name,
                "heap growth",
                growth,
                (ALL,),
                f"{LORA_HEAP_FACTOR - 1:g} x its activations, in every phase: passes repeated without sampling "
                "between them (under LoRA; under full fine-tuning, micro-batches accumulating into the gradients) "
                "grow the heap that held the activations beyond their size, and it stays grown (measured: the "
                "small gradient tensors made during each backward and kept are carved out of the freed "
                "activations, so the next pass cannot reuse them whole)",
            )
        self._logits(role, rows, lengths, phases, logits)

    def _logits(self, role: Role, rows: int, lengths: Lengths, phases: tuple[str, ...], logits: bool) -> None:
        f = role.facts
        if logits:
            positions = rows * (lengths.response + 1)
            size = positions * f.vocab * self.act_bytes
            self.add(
                role.name,
                "logits",
                size + 3 * self._chunk(f, positions),
                phases,
                f"{rows} x {lengths.response + 1} x {f.vocab} logits, saved for the backward (only the response "
                "positions: logits_to_keep; the log-softmax runs in small chunks)",
            )
            backward_phases = tuple(p for p in phases if p.startswith(UPDATE))
            self.add(
                role.name,
                "logits' backward",
                2 * positions * f.vocab * 4,
                backward_phases,
                "the backward of the log-probs holds two more float32 logits-sized tensors (the reshaped logits "
                "and their gradient) beside the saved ones",
            )
        if self.bf16 and role.trainable:
            self.add(
                role.name,
                "autocast weight copies",
                2 * role.trainable,
                phases,
                "bfloat16 copies of the trained weights autocast caches during a forward pass with grad",
            )


def fragmentation(terms: list[Term], passes: list[str]) -> tuple[float, str]:
    """(bytes, why) of the heap's fragmentation allowance: FRAGMENTATION x the smaller of the two
    largest working sets (a pass's terms beyond the persistent ones) that share no term."""
    live = {p: [t for t in terms if t.live_in(p) and ALL not in t.phases] for p in passes}
    size = {p: sum(t.bytes for t in ts) for p, ts in live.items()}
    if not size:
        return 0.0, ""
    first = max(size, key=size.__getitem__)
    shared = {id(t) for t in live[first]}
    others = {p: v for p, v in size.items() if not any(id(t) in shared for t in live[p])}
    if not others:
        return 0.0, ""
    second = max(others, key=others.__getitem__)
    return FRAGMENTATION * others[second], (
        f"{FRAGMENTATION:g} x the working set of {second} ({others[second] / MiB:.0f} MiB), the largest one beside "
        f"{first}'s: glibc reuses the memory one pass frees for a pass of other tensor sizes only in part "
        "(fitted on the measured runs of docs/plan.md)"
    )
