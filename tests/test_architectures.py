"""Every stage on popular architectures (tests/architectures.py), full fine-tuning and LoRA, both
critics: each runs an optimizer step through the one run loop, and a rollout stage's first
iteration samples the policy itself (KL 0, ratio 1). What an architecture cannot do is refused at
start with exit code 2 and a message, never a traceback. docs/architectures.md is this table in words.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.architectures import save_tiny_architecture
from tether.cli import main

# At least the list: Llama, Qwen2, Qwen3, Mistral (sliding window), Gemma 2 and 3, Phi-3,
# GPT-2, GPT-NeoX, OPT, Falcon, OLMo 2, Cohere and Granite (no classifier class in transformers),
# mixtures of experts, hybrid and state-space models.
ARCHS = [
    "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "opt", "falcon",
    "olmo2", "cohere", "granite", "mixtral", "qwen3_moe", "olmoe", "lfm2", "mamba",
]  # fmt: skip
# (stage, LoRA, critic): every stage with and without LoRA, ppo with both critics.
RUNS = [
    ("sft", False, None), ("sft", True, None), ("rm", False, None), ("rm", True, None),
    ("dpo", False, None), ("dpo", True, None), ("ppo", False, "model"), ("ppo", True, "model"),
    ("ppo", False, "head"), ("ppo", True, "head"), ("grpo", False, None), ("grpo", True, None),
]  # fmt: skip
# What peft refuses: LoRA 'all-linear' on Mamba (its out_proj and conv1d cannot take adapters).
REFUSED = {("mamba", True): "cannot be adapted on"}
SYSTEM = "please tell me about the big red sun and the small blue moon"
USERS = ["hello", "why is the cat very good", "tell me more about the dog"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("arch-data")
    turns = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": u}] for u in USERS]
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"messages": t}) + "\n" for t in turns))
    sft = [{"messages": [*t, {"role": "assistant", "content": "the cat is good"}]} for t in turns]
    (folder / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    pairs = [{"messages": t, "chosen": "yes the cat is good", "rejected": "no"} for t in turns]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (folder / "reward.py").write_text(
        "def good(prompts, responses, **kw):\n    return [float('good' in r) for r in responses]\n"
    )
    return folder


_SAVED: dict[str, Path] = {}


def model_folder(name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if name not in _SAVED:
        _SAVED[name] = save_tiny_architecture(tmp_path_factory.mktemp(f"arch-{name}"), name)
    return _SAVED[name]


def args_for(stage: str, lora: bool, critic: str | None, model: Path, data: Path) -> list[str]:
    words = [f"model.name={model}", "train.steps=1", "train.batch_size=3", "train.save_every=0", "train.lr=1e-3"]
    words += ["model.lora={r: 4, alpha: 8}"] if lora else []
    if stage in ("ppo", "grpo"):
        words += [
            f"reward.function={data / 'reward.py'}:good",
            f"data.prompts={data / 'prompts.jsonl'}",
            f"data.eval={data / 'prompts.jsonl'}",
            "eval.num_prompts=1",
            "rollout.max_new_tokens=6",
            "train.sample_every=0",
        ]
        words += (
            [f"model.critic={critic}", "ppo.epochs=1", "ppo.minibatch_size=3"]
            if stage == "ppo"
            else ["rollout.samples_per_prompt=2", "grpo.minibatch_size=6"]
        )
    else:
        file = data / ("sft.jsonl" if stage == "sft" else "pairs.jsonl")
        words += [f"data.train={file}", f"data.eval={file}"]
    return words


CASES = [(arch, *run) for arch in ARCHS for run in RUNS]


@pytest.mark.parametrize(
    ("arch", "stage", "lora", "critic"),
    CASES,
    ids=[f"{a}-{s}-{'lora' if lo else 'full'}{'-' + c if c else ''}" for a, s, lo, c in CASES],
)
def test_every_stage_runs_or_refuses_clearly(arch, stage, lora, critic, data, tmp_path, tmp_path_factory, capsys):
    model = model_folder(arch, tmp_path_factory)
    run = tmp_path / "run"
    code = main([stage, *args_for(stage, lora, critic, model, data), "--output", str(run)])
    err = capsys.readouterr().err
    refusal = REFUSED.get((arch, lora))
    if refusal is not None:
        assert code == 2 and refusal in err and "Traceback" not in err, err[-2000:]
        return
    assert code == 0, err[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    if stage in ("ppo", "grpo"):
        assert rows[0]["objective/kl"] == 0.0, rows[0]["objective/kl"]
        assert abs(rows[0]["policy/ratio_mean"] - 1.0) < 1e-5
    assert (run / "checkpoints" / "final").is_dir()
