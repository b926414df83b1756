"""`tether plan`: the estimator's counts against the models themselves (instant), its arithmetic, its
report and command line, and its bound against measured peaks of tiny random-init runs (each in a
fresh process; benchmarks/plan_check.py holds the full table)."""

from __future__ import annotations

import importlib.util
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tether.config import GRPOConfig, PPOConfig, SFTConfig, load_config
from tether.plan import parse_memory, plan_for, start_of_run_report
from tether.plan.facts import model_facts
from tether.plan.memory import GiB, saved_floats_per_token
from tether.plan.report import set_path

REPO = Path(__file__).resolve().parent.parent


def _plan_check():
    spec = importlib.util.spec_from_file_location("plan_check", REPO / "benchmarks" / "plan_check.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def check():
    return _plan_check()


@pytest.fixture(scope="module")
def models(tmp_path_factory, check) -> Path:
    return tmp_path_factory.mktemp("plan-models")


@pytest.fixture(scope="module")
def llama_m(models, check) -> Path:
    return check.build_model("llama-m", models / "llama-m")


@pytest.fixture(scope="module")
def gpt2_m(models, check) -> Path:
    return check.build_model("gpt2-m", models / "gpt2-m")


def ppo_config(model: Path, prompts: Path, *overrides: str) -> PPOConfig:
    return load_config(
        PPOConfig,
        None,
        [
            f"model.name={model}",
            f"data.prompts={prompts}",
            "reward.function=tether.reward_functions:concise",
            "train.batch_size=8",
            "ppo.minibatch_size=4",
            "rollout.max_new_tokens=24",
            "eval.num_prompts=0",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def prompts(models, check) -> Path:
    return check.prompt_file(models)


# --------------------------------------------------------------------------------------------
# Counts against the models themselves
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama_m", "gpt2_m", "tiny_llama", "tiny_gpt2"])
def test_parameter_counts_are_those_of_the_model_built_from_the_config(request, name):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = request.getfixturevalue(name)
    facts = model_facts(str(folder))
    causal = AutoModelForCausalLM.from_pretrained(folder)
    assert facts.causal_params == sum(p.numel() for p in causal.parameters())
    assert facts.linear_params == sum(
        m.weight.numel() + (0 if m.bias is None else m.bias.numel())
        for m in causal.modules()
        if type(m) is torch.nn.Linear
    )
    config = AutoConfig.from_pretrained(folder)
    config.num_labels = 1
    scalar = AutoModelForSequenceClassification.from_config(config)
    assert facts.scalar_params == sum(p.numel() for p in scalar.parameters())
    layer = max((m for m in causal.modules() if isinstance(m, torch.nn.ModuleList)), key=len)[0]
    assert facts.layer_params == sum(p.numel() for p in layer.parameters())


@pytest.mark.parametrize("name", ["llama_m", "gpt2_m"])
@pytest.mark.parametrize("scalar", [False, True])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "c_attn"]])
def test_lora_counts_are_peft_s(request, name, scalar, targets):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = request.getfixturevalue(name)
    facts = model_facts(str(folder))
    config = AutoConfig.from_pretrained(folder)
    config.num_labels = 1
    cls = AutoModelForSequenceClassification if scalar else AutoModelForCausalLM
    model = cls.from_config(config)
    if not any(t in n for n, _ in model.named_modules() for t in (targets if isinstance(targets, list) else ["."])):
        pytest.skip("no such module in this architecture")
    task = TaskType.SEQ_CLS if scalar else TaskType.CAUSAL_LM
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task))
    assert facts.lora(4, targets, scalar).trainable == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def _saved_floats(model, rows: int, length: int) -> float:
    """Floats autograd saves for the backward of one forward pass (parameters excluded, every
    storage once), as tether's policy pass runs it: padding on the left, logits for the last 5."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 40, (rows, length))
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, :3] = 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=5)
    logits = out.logits.numel()
    return sum(seen.values()) / 4 - (logits if out.logits.untyped_storage().data_ptr() in seen else 0)


@pytest.mark.parametrize("name", ["llama_m", "gpt2_m"])
@pytest.mark.parametrize("lora", [False, True])
def test_saved_activation_formula_matches_autograd(request, name, lora):
    """The per-token formula of memory.py against the tensors a real forward pass saves."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tether.plan.memory import Role

    folder = request.getfixturevalue(name)
    facts = model_facts(str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if lora:
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    rows, length = 4, 60
    measured = _saved_floats(model, rows, length)
    role = Role("policy", facts, "causal", "lora" if lora else "full", 8, "all-linear")
    per_token, after, _ = saved_floats_per_token(role, length)
    estimated = rows * length * (per_token + after)
    assert abs(estimated - measured) / measured < 0.03, (estimated, measured)


# --------------------------------------------------------------------------------------------
# The arithmetic of the terms
# --------------------------------------------------------------------------------------------


def test_a_phase_is_the_sum_of_its_live_terms_and_the_peak_the_largest_phase(llama_m, prompts):
    plan = plan_for(ppo_config(llama_m, prompts), "ppo", memory=64 * GiB)
    peaks = plan.pass_peaks()
    for name, value in peaks.items():
        assert value == pytest.approx(sum(t.bytes for t in plan.terms if t.live_in(name)))
    assert plan.peak == pytest.approx(max(peaks.values()))
    for phase, value in plan.phase_peaks().items():
        by_role = sum(row.get(phase, 0.0) for row in plan.by_role().values())
        assert by_role == pytest.approx(value)
    assert plan.fits and not plan.suggestions


def test_weights_gradients_and_adamw_state_follow_the_parameter_counts(llama_m, prompts):
    facts = model_facts(str(llama_m))
    full = plan_for(ppo_config(llama_m, prompts), "ppo", memory=64 * GiB)
    named = {(t.role, t.name): t.bytes for t in full.terms}
    assert named[("policy", "weights")] == 4 * facts.causal_params
    assert named[("reference", "weights")] == 4 * facts.causal_params
    assert named[("value", "weights")] == 4 * facts.scalar_params
    assert named[("policy", "gradients")] == 4 * facts.causal_params
    assert named[("policy", "AdamW state")] == 8 * facts.causal_params
    lora = plan_for(ppo_config(llama_m, prompts, "model.lora={r: 8, alpha: 16}"), "ppo", memory=64 * GiB)
    named = {(t.role, t.name): t.bytes for t in lora.terms}
    adapter = facts.lora(8, "all-linear", False).trainable
    assert named[("policy", "weights")] == 4 * (facts.causal_params + adapter)
    assert ("reference", "weights") not in named  # the LoRA policy's reference is its base: no copy
    assert named[("policy", "AdamW state")] == 8 * adapter
    head = plan_for(ppo_config(llama_m, prompts, "model.critic=head"), "ppo", memory=64 * GiB)
    assert not any(t.role == "value" and t.name == "weights" for t in head.terms)


def test_a_lora_value_model_from_the_reward_model_lends_it_its_base(llama_m, prompts, models, check):
    rm = check.build_model("llama-m", models / "llama-m-rm", kind="scalar")
    plan = plan_for(ppo_config(llama_m, prompts, f"reward.model={rm}", "model.lora={r: 8, alpha: 16}"), "ppo")
    assert not any(t.role == "reward" and t.name == "weights" for t in plan.terms)
    full = plan_for(ppo_config(llama_m, prompts, f"reward.model={rm}"), "ppo")
    assert any(t.role == "reward" and t.name == "weights" for t in full.terms)


def test_more_processes_split_the_batch_and_fsdp_the_trained_state(llama_m, prompts):
    one = plan_for(ppo_config(llama_m, prompts), "ppo", memory=64 * GiB)
    two = plan_for(ppo_config(llama_m, prompts), "ppo", memory=64 * GiB, processes=2)
    assert two.shapes.rollout_rows == one.shapes.rollout_rows // 2 and two.shapes.update_rows == 2
    config = ppo_config(llama_m, prompts)
    config.model.fsdp = True  # the trained state split, one layer gathered in a pass, the policy whole to sample
    sharded = plan_for(config, "ppo", memory=64 * GiB, processes=4)
    terms = {(t.role, t.name): t for t in sharded.terms}
    facts = model_facts(str(llama_m))
    assert terms[("policy", "AdamW state")].bytes == 8 * facts.causal_params / 4
    assert terms[("policy", "gathered layer")].bytes == 4 * facts.layer_params
    assert terms[("policy", "gathered whole")].bytes == 4 * facts.causal_params * 3 / 4
    assert terms[("policy", "gathered whole")].live_in("sampling")
    assert not terms[("policy", "gathered whole")].live_in("update")
    assert terms[("reference", "weights")].bytes == 4 * facts.causal_params / 4  # model.fsdp_frozen=shard
    assert "fsdp" in sharded.render().lower()
    config.model.fsdp_frozen = "replicate"
    replicated = plan_for(config, "ppo", memory=64 * GiB, processes=4)
    assert {(t.role, t.name): t.bytes for t in replicated.terms}[("reference", "weights")] == 4 * facts.causal_params


def test_micro_batches_shrink_the_update_and_longer_responses_grow_it(llama_m, prompts):
    base = plan_for(ppo_config(llama_m, prompts), "ppo", memory=64 * GiB).phase_peaks()["update"]
    micro = plan_for(ppo_config(llama_m, prompts, "train.micro_batch_size=1"), "ppo", memory=64 * GiB)
    longer = plan_for(ppo_config(llama_m, prompts, "rollout.max_new_tokens=96"), "ppo", memory=64 * GiB)
    assert micro.phase_peaks()["update"] < base < longer.phase_peaks()["update"]


def test_parse_memory():
    assert parse_memory("24GiB") == 24 * 2**30
    assert parse_memory("24G") == 24 * 2**30
    assert parse_memory("24GB") == 24 * 10**9
    assert parse_memory("512 MiB") == 512 * 2**20
    assert parse_memory("1.5TiB") == int(1.5 * 2**40)
    assert parse_memory("1000") == 1000
    with pytest.raises(ValueError, match="amount of memory"):
        parse_memory("lots")


# --------------------------------------------------------------------------------------------
# Suggestions, the report and the command line
# --------------------------------------------------------------------------------------------


def test_suggestions_fit_under_the_limit_and_say_what_they_cost(llama_m, prompts):
    config = ppo_config(llama_m, prompts)
    plan = plan_for(config, "ppo")
    limit = int(plan.peak * 0.95)
    tight = plan_for(config, "ppo", memory=limit)
    assert not tight.fits and tight.suggestions
    for suggestion in tight.suggestions:
        assert suggestion.peak <= limit and suggestion.why
        overrides = [
            f"model.name={llama_m}",
            f"data.prompts={prompts}",
            "reward.function=tether.reward_functions:concise",
            "train.batch_size=8",
            "ppo.minibatch_size=4",
            "rollout.max_new_tokens=24",
            "eval.num_prompts=0",
            *suggestion.overrides,
        ]
        again = plan_for(load_config(PPOConfig, None, overrides), "ppo", memory=limit)
        assert again.peak == pytest.approx(suggestion.peak) and again.fits
    text = tight.render()
    assert "does NOT fit" in text and tight.suggestions[0].text in text
    assert "warning" in tight.warning() and tight.suggestions[0].text in tight.warning()


def test_the_report_has_the_table_the_terms_and_their_assumptions(llama_m, prompts):
    text = plan_for(ppo_config(llama_m, prompts, "model.lora={r: 8, alpha: 16}"), "ppo", memory=64 * GiB).render()
    for word in (
        "sampling",
        "scoring",
        "update",
        "policy",
        "reference",
        "value",
        "process",
        "total",
        "KV cache",
        "AdamW state",
        "logits",
        "General assumptions",
        "fits in",
    ):
        assert word in text, word
    assert "no copy" in text  # the LoRA reference


@pytest.mark.parametrize(
    ("stage", "cls", "overrides"),
    [
        ("grpo", GRPOConfig, ["rollout.samples_per_prompt=4", "grpo.minibatch_size=8", "train.batch_size=2"]),
        ("sft", SFTConfig, ["train.batch_size=4"]),
    ],
)
def test_every_stage_gets_a_plan(llama_m, prompts, stage, cls, overrides):
    config = load_config(
        cls,
        None,
        [f"model.name={llama_m}", *overrides]
        + ([f"data.prompts={prompts}", "reward.function=tether.reward_functions:concise"] if stage == "grpo" else []),
    )
    plan = plan_for(config, stage, memory=64 * GiB)
    assert plan.peak > 0.3 * GiB and "update" in plan.phase_peaks()
    assert ("value" not in plan.by_role()) and plan.render()


def test_the_plan_command_line(llama_m, prompts, capsys, tmp_path):
    from tether.plan import main

    config = tmp_path / "run.yaml"
    config.write_text(
        f"model:\n  name: {llama_m}\ndata:\n  prompts: {prompts}\n"
        "reward:\n  function: tether.reward_functions:concise\neval:\n  num_prompts: 0\n"
    )
    assert (
        main(["ppo", "--config", str(config), "train.batch_size=4", "ppo.minibatch_size=4", "--memory", "64GiB"]) == 0
    )
    out = capsys.readouterr().out
    assert "estimated peak" in out and "fits in 64.00 GiB" in out
    assert main(["ppo", "--config", str(config), "--memory", "100MiB"]) == 1  # does not fit: exit 1
    assert "Changes that would bring" in capsys.readouterr().out
    assert main(["ppo", "--config", str(config), "ppo.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_an_adapter_folder_is_planned_as_its_base(llama_m, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = get_peft_model(
        AutoModelForCausalLM.from_pretrained(llama_m), LoraConfig(r=4, target_modules="all-linear")
    )
    adapter.peft_config["default"].base_model_name_or_path = str(llama_m)
    adapter.save_pretrained(tmp_path / "adapter")
    facts = model_facts(str(tmp_path / "adapter"))
    assert facts.causal_params == model_facts(str(llama_m)).causal_params
    assert facts.adapter == str(tmp_path / "adapter")


def test_the_start_of_run_report_warns_and_never_raises(llama_m, prompts, monkeypatch):
    import tether.plan as plan_module

    config = ppo_config(llama_m, prompts)
    monkeypatch.setattr(plan_module, "machine_memory", lambda device, processes=1: (100 * 2**20, "a test's 100 MiB"))
    text = start_of_run_report(config, "ppo")
    assert "warning: by tether's estimate" in text and "Starting anyway" in text
    set_path(config, "model.name", str(llama_m / "missing"))
    assert start_of_run_report(config, "ppo").startswith("tether plan: no estimate")


def test_a_hub_id_whose_config_is_cached_is_planned_without_weights(llama_m, prompts, tmp_path, monkeypatch):
    """A hub id answers from the Hugging Face cache alone: config.json (and the tokenizer) in a
    snapshot folder, no weights, no network."""
    import shutil

    import huggingface_hub.constants as hub

    snapshot = tmp_path / "hub" / "models--someone--tiny-llama" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (llama_m / name).is_file():
            shutil.copy(llama_m / name, snapshot / name)
    (tmp_path / "hub" / "models--someone--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-llama" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_facts.cache_clear()
    config = ppo_config(llama_m, prompts)
    config.model.name = "someone/tiny-llama"
    plan = plan_for(config, "ppo", memory=64 * GiB)
    named = {(t.role, t.name): t.bytes for t in plan.terms}
    assert named[("policy", "weights")] == 4 * model_facts(str(llama_m)).causal_params
    assert "someone/tiny-llama" in plan.render()


# --------------------------------------------------------------------------------------------
# The bound: estimates within 15% of the peaks measured in fresh processes
# --------------------------------------------------------------------------------------------

BOUND = 0.15
QUICK_CASES = ["ppo-llama-m-full-model", "ppo-gpt2-m-lora-head", "ppo-llama-v-lora-head"]


def _error(check, models: Path, name: str, steps: int) -> tuple[float, float, float]:
    case = {**next(c for c in check.CASES if c["name"] == name), "steps": steps}
    # One thread each: the three processes run side by side on a 2-core machine without spinning
    # OpenMP threads waiting for each other (which is what makes a contended run slow).
    overrides = [*check.case_overrides(case, models), "train.num_threads=1"]
    estimate = plan_for(check.load_case_config(case["stage"], overrides), case["stage"]).training_peak
    measured = check.run_case_process(case["stage"], overrides, timeout=600)["peak_gib"] * GiB
    return (estimate - measured) / measured, estimate, measured


def _assert_within_bound(check, models: Path, names: list[str], steps: int) -> None:
    for name in names:  # the models are built here, once, before the processes start
        check.case_overrides(next(c for c in check.CASES if c["name"] == name), models)
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(names, pool.map(lambda n: _error(check, models, n, steps), names), strict=True))
    bad = {
        n: f"{e:+.1%} (estimated {est / GiB:.3f}, measured {m / GiB:.3f} GiB)"
        for n, (e, est, m) in results.items()
        if not math.isfinite(e) or abs(e) > BOUND
    }
    assert not bad, f"estimates off by more than {BOUND:.0%}: {json.dumps(bad, indent=1)}"


def test_estimates_are_within_15_percent_of_measured_peaks(check, models):
    """Three tiny random-init runs (llama full with its value model; gpt2 LoRA with a value head;
    llama LoRA with the embedded model's 49k vocabulary), two PPO iterations each, measured in
    fresh processes side by side, one thread each."""
    _assert_within_bound(check, models, QUICK_CASES, steps=2)


@pytest.mark.slow
def test_every_tiny_case_of_the_benchmark_is_within_15_percent(check, models):
    """The whole tiny matrix of benchmarks/plan_check.py: three llama sizes and two gpt2 sizes, full
    and LoRA, both critics, grpo, sft, rm and dpo (minutes)."""
    names = [c["name"] for c in check.CASES if c["group"] == "tiny"]
    _assert_within_bound(check, models, names, steps=3)
