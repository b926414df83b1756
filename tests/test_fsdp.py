"""model.fsdp on two gloo CPU processes (torchrun), through the harness of tests/test_distributed.py:
every stage, sharded, takes the steps one unsharded process takes, full fine-tuning and LoRA,
float32 and bfloat16; its sharded step checkpoints resume bit for bit on the same process count and
on another; its final folders load in plain transformers and peft. And the pieces, with real
generation: the policy gathered once per generate call, the norm of sharded gradients, a non-finite
shard seen by every process.

Four launches (plain one process; two sharded; one sharded; two sharded), about a minute and a half
on a 2-core machine. Bitwise means every logged metric equal (==) and every final tensor equal
(torch.equal). Where a step clips the gradient (train.max_grad_norm below the norm), the clip
coefficient of a sharded norm differs in the last bit, so those runs are compared to 1e-6.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_distributed import NONDETERMINISTIC, final_weights, launch, write_task_files
from tether.roles.reward import NORMALIZATION_KEY
from tether.run.log import read_jsonl

BITWISE = ["sft", "rm", "dpo", "ppo", "ppo-head", "ppo-rm", "grpo"]
BF16 = ["sft-bf16", "ppo-bf16", "grpo-bf16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """Plain runs in one process (one/), sharded runs in two (two/) and the resumes across counts."""
    folder = tmp_path_factory.mktemp("fsdp")
    prefs, sft = write_task_files(folder)
    # model.fsdp turns speed.shared_prefix off (one forward pass or two, per process's rows): the
    # plain runs do the same, so both run the same passes.
    common = [f"model.name={tiny_llama}", "train.lr_schedule=constant", "speed.shared_prefix=false", "train.lr=1e-3"]
    offline = [*common, "train.batch_size=4", "train.micro_batch_size=2", "train.steps=2", "train.save_every=1"]
    offline = [*offline, "train.eval_every=1", f"data.train={prefs[0]}", f"data.eval={prefs[1]}"]
    online = [
        *common,
        f"data.prompts={folder / 'prompts.jsonl'}",
        f"data.eval={folder / 'prompts.jsonl'}",
        "train.batch_size=4",
        "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=6",
        "eval.num_prompts=2",
        "eval.every=2",
        "train.save_every=1",
        "train.micro_batch_size=4",
    ]
    function = f"reward.function={folder / 'reward.py'}:good_share"
    ppo_any = [*online, "ppo.minibatch_size=8", "ppo.epochs=2", "ppo.kl_target=1.0", "ppo.whiten_rewards=true"]
    ppo_any = [*ppo_any, "train.max_grad_norm=null"]  # bitwise: no clip coefficient from a sharded norm
    ppo = [*ppo_any, function]
    lora = "model.lora={r: 4, alpha: 8}"
    grpo = [*online, function, "grpo.minibatch_size=8", "grpo.epochs=2", lora]
    reward_model = folder / "one" / "rm" / "checkpoints" / "final"  # the plain run's rm, written first
    sft_data = [f"data.train={sft[0]}", f"data.eval={sft[1]}"]

    def jobs(tag: str, fsdp: list[str]) -> list[list]:
        run = folder / tag
        return [
            ["rm", str(run / "rm"), [*offline, lora, *fsdp], False],
            ["sft", str(run / "sft"), [*offline, *sft_data, *fsdp], False],
            ["sft", str(run / "sft-bf16"), [*offline, *sft_data, "model.dtype=bfloat16", *fsdp], False],
            ["dpo", str(run / "dpo"), [*offline, *fsdp], False],
            ["ppo", str(run / "ppo"), [*ppo, "train.steps=3", *fsdp], False],
            ["ppo", str(run / "ppo-clip"), [*ppo, "train.steps=2", "train.max_grad_norm=1.0", *fsdp], False],
            ["ppo", str(run / "ppo-bf16"), [*ppo, "train.steps=2", "model.dtype=bfloat16", *fsdp], False],
            ["ppo", str(run / "ppo-head"), [*ppo, "train.steps=2", "model.critic=head", *fsdp], False],
            ["ppo", str(run / "ppo-rm"), [*ppo_any, "train.steps=2", f"reward.model={reward_model}", *fsdp], False],
            ["grpo", str(run / "grpo"), [*grpo, "train.steps=2", *fsdp], False],
            ["grpo", str(run / "grpo-bf16"), [*grpo, "train.steps=2", "model.dtype=bfloat16", *fsdp], False],
        ]

    sharded = ["model.fsdp=true"]
    replicate = ["model.fsdp=true", "model.fsdp_frozen=replicate"]
    two = [
        [stage, run, [*overrides, *(replicate if run.endswith("ppo-head") else [])], resume]
        for stage, run, overrides, resume in jobs("two", sharded)
    ]
    part = [*ppo, "train.steps=2", *sharded]
    launch(jobs("one", []), folder, 1)
    launch(
        [
            *two,
            ["ppo", str(folder / "two" / "ppo-again"), part, False],  # 2 steps, then 1 more in the same count
            ["ppo", str(folder / "two" / "ppo-again"), [*ppo, "train.steps=3", *sharded], True],
            ["ppo", str(folder / "two" / "ppo-to-one"), part, False],
            ["grpo", str(folder / "two" / "grpo-to-one"), [*grpo, "train.steps=1", *sharded], False],
            ["fsdp-pieces", str(folder / "pieces"), [str(tiny_llama)], False],
        ],
        folder,
        2,
    )
    launch(
        [
            ["ppo", str(folder / "two" / "ppo-to-one"), [*ppo, "train.steps=3", *sharded], True],
            ["grpo", str(folder / "two" / "grpo-to-one"), [*grpo, "train.steps=2", *sharded], True],
            ["ppo", str(folder / "one-sharded" / "ppo-to-two"), part, False],
            [
                "sft",
                str(folder / "one-sharded" / "sft-bf16"),
                [*offline, *sft_data, "model.dtype=bfloat16", *sharded],
                False,
            ],
        ],
        folder,
        1,
    )
    launch([["ppo", str(folder / "one-sharded" / "ppo-to-two"), [*ppo, "train.steps=3", *sharded], True]], folder, 2)
    return folder


def metrics(run: Path) -> list[dict]:
    return [
        {k: v for k, v in row.items() if not k.startswith(NONDETERMINISTIC)}
        for row in read_jsonl(run / "metrics.jsonl")
    ]


def assert_bitwise(a: Path, b: Path, rows: int) -> None:
    """Every metric equal, but a logged gradient norm to 1e-6: a sharded norm sums per-shard squares,
    so its last bit may differ from the whole gradient's (it is only logged: no clip bites here)."""
    ma, mb = metrics(a), metrics(b)
    assert len(ma) == len(mb) == rows
    for row_a, row_b in zip(ma, mb, strict=True):
        norms = [k for k in row_a if k.endswith("grad_norm")]
        for key in norms:
            assert row_b.pop(key) == pytest.approx(row_a.pop(key), rel=1e-6), key
        assert row_a == row_b, {k: (row_a[k], row_b.get(k)) for k in row_a if row_a[k] != row_b.get(k)}
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


def assert_close(a: Path, b: Path, rows: int, rel: float, weights: float) -> None:
    ma, mb = metrics(a), metrics(b)
    assert len(ma) == len(mb) == rows
    for row_a, row_b in zip(ma, mb, strict=True):
        assert row_a.keys() == row_b.keys()
        for key in row_a:
            assert row_b[key] == pytest.approx(row_a[key], rel=rel, abs=rel), (row_a["step"], key)
    wa, wb = final_weights(a), final_weights(b)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=weights, atol=weights, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("stage", BITWISE)
def test_two_sharded_processes_take_the_steps_of_one_plain_process(runs: Path, stage: str):
    """The same global batch and seed, one plain process against two FSDP processes: every logged
    metric (losses, grad norms, KL, eval) and every final weight equal to the bit. sft, dpo, ppo:
    full fine-tuning (ppo's value model and reference sharded); rm, grpo: LoRA (grpo's reference is the
    policy with its adapter off); ppo-head: a value head whole in each process, the reference
    replicated (model.fsdp_frozen=replicate); ppo-rm: a sharded frozen reward model, and the value
    model started from it."""
    rows = {"ppo": 3}.get(stage, 2)
    assert_bitwise(runs / "one" / stage, runs / "two" / stage, rows)


def test_a_clipped_step_differs_only_by_the_clip_coefficient_rounding(runs: Path):
    """With train.max_grad_norm biting, the sharded norm's clip coefficient differs in the last bit."""
    assert_close(runs / "one" / "ppo-clip", runs / "two" / "ppo-clip", rows=2, rel=1e-6, weights=1e-6)


@pytest.mark.parametrize("stage", BF16)
def test_bfloat16_is_fsdp_mixed_precision(runs: Path, stage: str, tiny_llama: Path):
    """model.dtype=bfloat16 under model.fsdp computes with bfloat16 parameters (FSDP's mixed precision;
    gradients reduced and applied in float32), where one plain process runs float32 weights under
    autocast: the same training to bfloat16's precision. Every metric to 2% (or 2e-3 absolute, for
    the KL near 0), and the weights moved as the plain run moved them, to 10% of the update
    (measured: 0.1-6%; Adam's per-element steps turn bfloat16 rounding into such differences)."""
    ma, mb = metrics(runs / "one" / stage), metrics(runs / "two" / stage)
    assert len(ma) == len(mb) == 2
    for row_a, row_b in zip(ma, mb, strict=True):
        assert row_a.keys() == row_b.keys()
        for key in row_a:
            assert row_b[key] == pytest.approx(row_a[key], rel=2e-2, abs=2e-3), (row_a["step"], key)
    start = load_file(tiny_llama / "model.safetensors")
    wa, wb = final_weights(runs / "one" / stage), final_weights(runs / "two" / stage)
    apart = moved = 0.0
    for key, a in wa.items():
        origin = start.get(key.split(":", 1)[1])
        origin = origin if origin is not None and origin.shape == a.shape else torch.zeros_like(a)
        apart += float((a - wb[key]).pow(2).sum())
        moved += float((a - origin).pow(2).sum())
    assert moved > 0 and (apart / moved) ** 0.5 < 0.1


def test_bfloat16_sharded_over_two_equals_one_sharded_process(runs: Path):
    """The mixed-precision numbers do not depend on how many processes share the model: sft in
    bfloat16, FSDP on one process and on two, equal to the bit."""
    assert_bitwise(runs / "one-sharded" / "sft-bf16", runs / "two" / "sft-bf16", rows=2)


@pytest.mark.parametrize(
    ("run", "reference"),
    [
        ("two/ppo-again", "two/ppo"),  # 2 sharded steps, resumed on 2 processes
        ("two/ppo-to-one", "two/ppo"),  # written by 2, resumed on 1
        ("one-sharded/ppo-to-two", "two/ppo"),  # written by 1, resumed on 2
        ("two/grpo-to-one", "two/grpo"),  # LoRA: the adapters and their optimizer state only
    ],
)
def test_sharded_checkpoints_resume_bit_for_bit_on_any_process_count(runs: Path, run: str, reference: str):
    """A sharded step checkpoint (DCP: models, optimizer; trainer_state.pt: scheduler, sampler, guard,
    KL controller, every process's random state) continues the run exactly: the same metrics and
    final weights as the uninterrupted run, on the process count that wrote it and on another."""
    rows = 3 if "ppo" in run else 2
    assert_bitwise(runs / reference, runs / run, rows)


def test_a_sharded_step_checkpoint_holds_shards_and_no_model_folder(runs: Path):
    step = runs / "two" / "ppo" / "checkpoints" / "step-000003"
    names = {p.name for p in step.iterdir()}
    assert names == {"sharded", "trainer_state.pt", "checkpoint.json"}
    assert {p.name for p in (step / "sharded").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    listed = json.loads((step / "checkpoint.json").read_text())["files"]
    assert "sharded/__1_0.distcp" in listed  # every process's shard is in the manifest


def test_final_models_load_in_plain_transformers_and_peft(runs: Path, tiny_llama: Path):
    """The final folder of a sharded run is a plain Hugging Face model (the critic in value/, a
    sequence classifier; rm's merged with its normalisation) or a peft adapter, loaded by
    from_pretrained alone, with the weights the run trained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    final = runs / "two" / "ppo" / "checkpoints" / "final"
    policy = AutoModelForCausalLM.from_pretrained(final)
    assert type(policy).__name__ == "LlamaForCausalLM"
    saved = final_weights(runs / "two" / "ppo")
    for name, tensor in policy.state_dict().items():
        assert torch.equal(tensor, saved[f"model.safetensors:{name}"]), name
    value = AutoModelForSequenceClassification.from_pretrained(final / "value")
    assert type(value).__name__ == "LlamaForSequenceClassification"
    rm = AutoModelForSequenceClassification.from_pretrained(runs / "two" / "rm" / "checkpoints" / "final")
    assert getattr(rm.config, NORMALIZATION_KEY)["gain"] > 0
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    adapted = PeftModel.from_pretrained(base, runs / "two" / "grpo" / "checkpoints" / "final")
    lora = {k: v for k, v in adapted.state_dict().items() if "lora_" in k}
    assert lora and all(v.abs().sum() > 0 for k, v in lora.items() if "lora_A" in k)


def pieces(runs: Path) -> list[dict]:
    return [json.loads((runs / "pieces" / f"pieces-rank{rank}.json").read_text()) for rank in range(2)]


def test_generation_gathers_the_policy_once_per_call(runs: Path):
    """Real generation with the sharded policy, each process its own prompts and process 0 stopping
    after one token while the other runs to the limit: the unsharded model's tokens, one all-gather
    per FSDP unit for the whole call (not one per unit per token), and no deadlock."""
    results = pieces(runs)
    assert all(r["tokens_equal"] and r["masks_equal"] for r in results)
    assert [r["response_width"] for r in results] == [1, 12]  # the processes stopped apart
    assert all(r["all_gathers"] == r["units"] == 3 for r in results)  # 2 decoder layers + the root


def test_sharded_gradients_clip_and_guard_like_whole_ones(runs: Path):
    """The norm of sharded gradients is the whole gradient's, in every process; a non-finite value in
    one process's shard makes it non-finite in both, and both skip the update."""
    results = pieces(runs)
    for r in results:
        assert r["sharded_norm"] == pytest.approx(r["plain_norm"], rel=1e-6)
        assert r["nonfinite_norm"] == float("inf") and r["skipped_updates"] == 1 and r["weights_unchanged"]


def test_fsdp_with_vllm_and_uneven_shares_are_refused(tiny_llama: Path, tmp_path: Path, capsys):
    from tests.test_distributed import online_overrides
    from tether.cli import main

    args = ["grpo", *online_overrides(tiny_llama, tmp_path), "train.device=cpu", "model.fsdp=true"]
    assert main([*args, "rollout.engine=vllm", "--output", str(tmp_path / "a")]) == 2
    assert "model.fsdp=true samples with rollout.engine=hf" in capsys.readouterr().err
    assert main([*args, "grpo.dynamic_sampling=true", "--output", str(tmp_path / "b")]) == 2
    assert "grpo.dynamic_sampling" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
