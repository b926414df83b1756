"""`tether rm` on tiny random models: it learns a separable toy preference, writes the run
directory, saves a merged, normalised sequence classifier that plain transformers loads and that
reloads to identical scores, resumes exactly, feeds PPO as reward.model, and refuses bad input
with a message naming the file, the line and the field.

The toy preference: the chosen response contains "good", the rejected one "bad". The two bodies
are drawn independently, so a random model ranks the pairs by chance (with identical bodies a
random network's sign for "good" vs "bad" is the same for every pair, and accuracy starts at 0
or 1); only a model that learned "good" beats "bad" ranks them right.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from tests.test_ppo import PROMPTS, tiny_config
from tether.cli import main
from tether.config import RMConfig, load_config
from tether.data import load_preferences
from tether.loading.models import eos_token_ids, load_scalar_model, load_tokenizer, scalar_head
from tether.roles.reward import NORMALIZATION_KEY, last_token_scores, sequence_scores
from tether.run.log import read_jsonl
from tether.sampling import left_pad
from tether.speed import FAST
from tether.stages.offline import Encoder
from tether.stages.ppo import PPOTrainer
from tether.stages.rm import RewardModelTask, RMTrainer

PROMPT_WORDS = ["hello", "world", "why", "what", "how", "tell", "me", "about", "please", "thanks", "is", "the"]
BODY_WORDS = ["the", "a", "cat", "dog", "sun", "moon", "red", "blue", "green", "one", "two", "big", "small"]
NONDETERMINISTIC = ("time/",)


def preference_records(count: int, seed: int) -> list[dict[str, str]]:
    """Pairs whose only systematic difference is "good" (chosen) vs "bad" (rejected)."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        prompt = " ".join(rng.choice(PROMPT_WORDS) for _ in range(rng.randint(2, 5)))
        texts = {}
        for field, word in (("chosen", "good"), ("rejected", "bad")):
            body = [rng.choice(BODY_WORDS) for _ in range(rng.randint(2, 6))]
            body.insert(rng.randint(0, len(body)), word)
            texts[field] = " ".join(body)
        records.append({"prompt": prompt, **texts})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_preferences(folder: Path, train: int = 64, held_out: int = 32) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return (
        write_jsonl(folder / "train.jsonl", preference_records(train, seed=0)),
        write_jsonl(folder / "eval.jsonl", preference_records(held_out, seed=1)),
    )


def rm_overrides(model: Path, prefs: tuple[Path, Path], *extra: str) -> list[str]:
    return [f"model.name={model}", f"data.train={prefs[0]}", f"data.eval={prefs[1]}", *extra]


@pytest.fixture(scope="module")
def prefs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_preferences(tmp_path_factory.mktemp("prefs"))


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, prefs) -> Path:
    """One `tether rm` run through the command line (3 epochs of 64 pairs), shared by the tests that
    only read what it wrote. Returns the run directory."""
    run = tmp_path_factory.mktemp("rm") / "run"
    code = main(["rm", *rm_overrides(tiny_llama, prefs, "train.epochs=3", "train.lr=1e-3"), "--output", str(run)])
    assert code == 0
    return run


def held_out_sequences(model: Path, prefs: tuple[Path, Path]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of every held-out pair as the reward model reads them: prompt + response + EOS."""
    config = load_config(RMConfig, None, rm_overrides(model, prefs))
    tokenizer = load_tokenizer(str(model))
    task = RewardModelTask(config, int(tokenizer.pad_token_id))
    encoder = Encoder(tokenizer, config, eos_token_ids(tokenizer)[0])
    encoded = [task.encode(p, encoder) for p in task.load(str(prefs[1]), "eval")]
    assert all(e is not None for e in encoded)
    return [e.chosen for e in encoded], [e.rejected for e in encoded]


def batch_scores(model, sequences: list[list[int]], pad_id: int, normalised: bool = True) -> torch.Tensor:
    ids, mask = left_pad(sequences, pad_id)
    with torch.no_grad():
        return (
            sequence_scores(model, ids, mask, speed=FAST)
            if normalised
            else last_token_scores(model, ids, mask, speed=FAST)
        )


# --- the command line and what it writes --------------------------------------------------------


def test_rm_cli_writes_the_run_directory_and_learns_the_preference(trained_rm, tiny_llama, prefs, tmp_path):
    """Exit 0 (checked by the fixture), the run directory of docs/run-directory.md, metrics with the rm keys,
    and held-out accuracy >= 0.9 where the very same initialisation (same seed, same fresh head),
    evaluated before any step, ranks the held-out pairs about by chance with loss ~ log 2."""
    run = trained_rm
    assert (run / "config.yaml").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    final = run / "checkpoints" / "final"
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    assert (final / "tokenizer_config.json").is_file()

    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 25))  # 3 epochs x 64 pairs / batch 8
    for key in ("loss/rm", "rm/accuracy", "rm/margin", "rm/chosen_score", "rm/rejected_score", "train/grad_norm"):
        assert all(key in r for r in rows), f"metric {key} missing"

    document = json.loads((run / "eval" / "eval.json").read_text())
    assert document["stage"] == "rm" and document["step"] == 24 and document["eval_examples"] == 32
    trained = document["metrics"]
    assert set(trained) == {"eval/loss", "eval/accuracy", "eval/margin"}
    assert trained["eval/accuracy"] >= 0.9, trained
    assert trained["eval/loss"] < 0.2 and trained["eval/margin"] > 2.0, trained

    untrained = RMTrainer(load_config(RMConfig, None, rm_overrides(tiny_llama, prefs)), tmp_path / "untrained")
    before = untrained.evaluate()
    untrained.run.runlog.close()
    assert before["eval/accuracy"] <= 0.75, before
    assert before["eval/loss"] > 0.6, before
    assert trained["eval/accuracy"] - before["eval/accuracy"] >= 0.25


def test_saved_normalisation_gives_held_out_scores_mean_0_std_1(trained_rm, tiny_llama, prefs):
    """config.json carries {gain, bias} under NORMALIZATION_KEY (the same numbers eval.json reports);
    with them, the scores of all 64 held-out responses (chosen and rejected, prompt + response +
    EOS) have mean 0 and (unbiased) std 1, while the raw scores do not."""
    final = trained_rm / "checkpoints" / "final"
    saved = json.loads((final / "config.json").read_text())[NORMALIZATION_KEY]
    reported = json.loads((trained_rm / "eval" / "eval.json").read_text())["normalization"]
    assert reported["responses"] == 64
    assert saved == {"gain": reported["gain"], "bias": reported["bias"]}

    tokenizer = load_tokenizer(str(final))
    model = load_scalar_model(str(final), tokenizer)
    chosen, rejected = held_out_sequences(tiny_llama, prefs)
    sequences = chosen + rejected
    scores = batch_scores(model, sequences, tokenizer.pad_token_id)  # one batch: other padding than training's
    assert abs(float(scores.mean())) < 1e-3, float(scores.mean())
    # 1e-3, not looser: the biased std of 64 values is 0.8% off the unbiased one (torch's default,
    # which normalization() uses), so this also pins down which of the two is stored.
    assert abs(float(scores.std()) - 1.0) < 1e-3, float(scores.std())
    assert abs(float(scores.std(unbiased=False)) - 1.0) > 5e-3
    raw = batch_scores(model, sequences, tokenizer.pad_token_id, normalised=False)
    torch.testing.assert_close(scores, raw * saved["gain"] + saved["bias"], atol=1e-5, rtol=0)
    assert abs(float(raw.std()) - 1.0) > 0.1, "raw scores already standardised: the check would be vacuous"
    # Normalisation is affine with a positive gain: the ranking of every pair is unchanged.
    assert bool((scores[:32] > scores[32:]).float().mean() >= 0.9)


def _short_run(model: Path, prefs, run_dir: Path, *extra: str) -> RMTrainer:
    config = load_config(RMConfig, None, rm_overrides(model, prefs, "train.steps=3", "train.lr=1e-2", *extra))
    trainer = RMTrainer(config, run_dir)
    trainer.train()
    return trainer


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_final_model_reloads_to_identical_scores_and_transformers_agrees(request, arch, prefs, tmp_path):
    """The scores of the model in memory at the end of training equal those of the saved final model
    loaded by tether, twice; and transformers' own AutoModelForSequenceClassification gives, on one
    unpadded sequence, exactly tether's raw (unnormalised) score at the last token."""
    model_dir = request.getfixturevalue(arch)
    trainer = _short_run(model_dir, prefs, tmp_path / "run")
    final = tmp_path / "run" / "checkpoints" / "final"
    pad_id = trainer.tokenizer.pad_token_id
    chosen, rejected = held_out_sequences(model_dir, prefs)
    probe = chosen[:3] + rejected[:3]

    in_memory = batch_scores(trainer.model, probe, pad_id)
    tokenizer = load_tokenizer(str(final))
    first = batch_scores(load_scalar_model(str(final), tokenizer), probe, pad_id)
    second = batch_scores(load_scalar_model(str(final), tokenizer), probe, pad_id)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, in_memory, atol=1e-5, rtol=0)
    assert float(first.std()) > 1e-3, "all probe scores equal: the comparison would be vacuous"

    tether_model = load_scalar_model(str(final), tokenizer)
    plain = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert plain.config.num_labels == 1 and plain.config.pad_token_id == pad_id
    for sequence in probe[:2]:
        ids = torch.tensor([sequence])
        with torch.no_grad():
            hf_logit = plain(input_ids=ids).logits[0, 0].item()
            raw = last_token_scores(tether_model, ids, torch.ones_like(ids, dtype=torch.bool), speed=FAST).item()
        assert hf_logit == pytest.approx(raw, abs=1e-5)
    # transformers finds the last token from pad_token_id (saved by tether), so right padding works there too.
    width = max(len(s) for s in probe)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in probe])
    mask = ids != pad_id
    with torch.no_grad():
        torch.testing.assert_close(
            plain(input_ids=ids, attention_mask=mask.long()).logits[:, 0],
            last_token_scores(tether_model, ids, mask, speed=FAST),
            atol=1e-5,
            rtol=0,
        )


def test_lora_rm_saves_a_full_merged_model(tiny_llama, prefs, tmp_path):
    """With model.lora the final folder is a plain merged sequence classifier (no adapter), the
    trained head included: its scores equal the LoRA model's scores just before merging."""
    config = load_config(
        RMConfig,
        None,
        rm_overrides(tiny_llama, prefs, "train.steps=3", "train.lr=1e-2", "model.lora={r: 4, alpha: 8}"),
    )
    trainer = RMTrainer(config, tmp_path / "run")
    head_before = scalar_head(trainer.model).weight.detach().clone()
    for trainer.run.step in (1, 2, 3):
        trainer.iteration()[0]
    chosen, rejected = held_out_sequences(tiny_llama, prefs)
    probe = chosen[:3] + rejected[:3]
    pad_id = trainer.tokenizer.pad_token_id
    before_merge = batch_scores(trainer.model, probe, pad_id, normalised=False)
    trained_head = scalar_head(trainer.model).weight.detach().clone()
    assert not torch.equal(trained_head, head_before), "the head did not train under LoRA"
    final = trainer.finish()
    trainer.run.runlog.close()

    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    assert not (final / "adapter_config.json").exists() and not (final / "adapter_model.safetensors").exists()
    assert not any("lora" in name for name in load_file(final / "model.safetensors"))
    plain = AutoModelForSequenceClassification.from_pretrained(final).eval()
    torch.testing.assert_close(plain.score.weight, trained_head, atol=0, rtol=0)
    with torch.no_grad():
        for i, sequence in enumerate(probe):
            ids = torch.tensor([sequence])
            assert plain(input_ids=ids).logits[0, 0].item() == pytest.approx(float(before_merge[i]), abs=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_rm_resume_is_exact(tiny_llama, prefs, tmp_path, lora):
    """4 steps straight equal 2 steps, then `--resume` to 4 steps: the same metrics rows and
    bit-identical final weights. A batch of 24 over 64 pairs makes step 3 cross the epoch
    boundary, so the resumed run must also restore the data order. Under LoRA the step checkpoint
    is an adapter plus the trained head, and the fresh base head drawn on resume must not leak in."""
    common = rm_overrides(
        tiny_llama, prefs, "train.lr_schedule=constant", "train.save_every=2", "train.batch_size=24", "train.lr=1e-2"
    ) + (["model.lora={r: 4, alpha: 8}"] if lora else [])
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["rm", *common, "train.steps=4", "--output", str(straight)]) == 0
    assert main(["rm", *common, "train.steps=2", "--output", str(resumed)]) == 0
    assert main(["rm", "--resume", "train.steps=4", "--output", str(resumed)]) == 0

    rows_a = read_jsonl(straight / "metrics.jsonl")
    rows_b = read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(NONDETERMINISTIC)} for r in rows]  # noqa: E731
    assert strip(rows_b) == strip(rows_a)
    assert rows_a[2]["train/epoch"] > 1.0  # step 3 did cross into the second pass
    a = load_file(straight / "checkpoints" / "final" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    assert (
        json.loads((straight / "eval" / "eval.json").read_text())["metrics"]
        == json.loads((resumed / "eval" / "eval.json").read_text())["metrics"]
    )


def test_trained_rm_is_ppos_reward_model_and_starts_its_value_model(trained_rm, tiny_llama, tmp_path):
    """reward.model = the rm run's final folder (no reward function): PPO scores with it (normalised),
    its value model starts from it (head included), and one iteration logs finite model scores."""
    final = trained_rm / "checkpoints" / "final"
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    config = tiny_config(tiny_llama, tmp_path, f"reward.model={final}", "reward.function=null", "train.steps=1")
    assert config.reward.function is None
    trainer = PPOTrainer(config, tmp_path / "ppo")
    assert trainer.roles.rewards.function is None and trainer.roles.rewards.model_tokenizer is None
    torch.testing.assert_close(
        scalar_head(trainer.value_model).weight, scalar_head(trainer.roles.rewards.model).weight, atol=0, rtol=0
    )
    assert getattr(trainer.roles.rewards.model.config, NORMALIZATION_KEY)["gain"] > 0
    trainer.run.step = 1
    metrics, samples = trainer.iteration()
    assert "objective/model_scores" in metrics and "objective/function_scores" not in metrics
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    assert metrics["objective/model_scores"] == pytest.approx(sum(s["model_score"] for s in samples) / len(samples))


# --- bad input -----------------------------------------------------------------------------------


def test_a_pair_without_rejected_is_a_clear_error(tiny_llama, prefs, tmp_path, capsys):
    """Exit code 2, no traceback, and the message names the file, the line and the missing field."""
    records = preference_records(3, seed=5)
    del records[1]["rejected"]
    bad = write_jsonl(tmp_path / "bad.jsonl", records)
    code = main(
        [
            "rm",
            f"model.name={tiny_llama}",
            f"data.train={bad}",
            f"data.eval={prefs[1]}",
            "--output",
            str(tmp_path / "r"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert str(bad) in err and "line 2" in err and "'rejected'" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_margin_on_needs_a_margin_field(tiny_llama, prefs, tmp_path, capsys):
    """rm.margin=true with a record lacking 'margin': the error names the file, line and field;
    load_preferences with margins reads them when present."""
    records = preference_records(3, seed=6)
    records[0]["margin"] = 1.5
    records[2]["margin"] = 0.5  # line 2 has none
    bad = write_jsonl(tmp_path / "margins.jsonl", records)
    code = main(["rm", *rm_overrides(tiny_llama, (bad, prefs[1])), "rm.margin=true", "--output", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert str(bad) in err and "line 2" in err and "'margin'" in err, err

    records[1]["margin"] = 2
    pairs = load_preferences(write_jsonl(tmp_path / "good.jsonl", records), with_margin=True)
    assert [p.margin for p in pairs] == [1.5, 2.0, 0.5]
    assert [p.margin for p in load_preferences(tmp_path / "good.jsonl")] == [0.0, 0.0, 0.0]  # off: ignored
