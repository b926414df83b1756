"""`tether sft` on a tiny random Llama: it lowers the held-out loss, its loss covers response tokens
(EOS included) and nothing else, micro-batching does not change an update, `messages` records
encode like prompt/response ones, a LoRA run saves an adapter, and PPO starts from the final folder
of either mode with its reference equal to the SFT model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from tests.test_ppo import PROMPTS, REWARD_FILE, tiny_config
from tether.cli import main
from tether.config import SFTConfig, load_config
from tether.data import DataError, Prompt, load_sft_examples
from tether.loading.models import eos_token_ids, load_causal_lm, load_tokenizer
from tether.roles.policy import response_logprobs
from tether.run.log import read_jsonl
from tether.speed import FAST
from tether.stages.offline import Encoder
from tether.stages.ppo import PPOTrainer
from tether.stages.sft import EncodedExample, SFTTask, SFTTrainer

PROMPT_WORDS = ["hello", "world", "why", "what", "how", "tell", "me", "about", "please", "thanks", "cat", "dog", "sun"]
COLOURS = ["red", "blue", "green"]
ENDINGS = ["", " and good", " and very very good"]


def sft_records(count: int, seed: int) -> list[dict[str, str]]:
    """A learnable toy task: "the <last prompt word> is <colour>[ and ...good]" (responses of 4 to 9
    words, so token-weighted and example-weighted means differ)."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        words = [rng.choice(PROMPT_WORDS) for _ in range(rng.randint(2, 5))]
        response = f"the {words[-1]} is {rng.choice(COLOURS)}{rng.choice(ENDINGS)}"
        records.append({"prompt": " ".join(words), "response": response})
    return records


def as_messages(record: dict[str, str]) -> dict:
    return {
        "messages": [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
    }


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_sft_data(folder: Path, messages: bool = False) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    wrap = as_messages if messages else (lambda r: r)
    return (
        write_jsonl(folder / "train.jsonl", [wrap(r) for r in sft_records(64, seed=0)]),
        write_jsonl(folder / "eval.jsonl", [wrap(r) for r in sft_records(16, seed=1)]),
    )


def sft_overrides(model: Path, data: tuple[Path, Path], *extra: str) -> list[str]:
    return [f"model.name={model}", f"data.train={data[0]}", f"data.eval={data[1]}", *extra]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_sft_data(tmp_path_factory.mktemp("sft-data"))


@pytest.fixture(scope="module")
def trained_sft(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, sft_data) -> Path:
    """One full fine-tuning run through the command line; returns its run directory."""
    run = tmp_path_factory.mktemp("sft") / "run"
    extra = ("train.epochs=3", "train.lr=1e-3", "train.batch_size=4", "train.lr_schedule=constant")
    assert main(["sft", *sft_overrides(tiny_llama, sft_data, *extra), "--output", str(run)]) == 0
    return run


@pytest.fixture
def ppo_task(tmp_path: Path) -> Path:
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return tmp_path


def _encoder_and_task(model: Path, data: tuple[Path, Path]) -> tuple[Encoder, SFTTask]:
    config = load_config(SFTConfig, None, sft_overrides(model, data))
    tokenizer = load_tokenizer(str(model))
    return Encoder(tokenizer, config, eos_token_ids(tokenizer)[0]), SFTTask(int(tokenizer.pad_token_id), config.speed)


# --- training ----------------------------------------------------------------------------------


def test_sft_cli_lowers_the_held_out_loss(trained_sft, tiny_llama, sft_data, tmp_path):
    """The run directory holds config, metrics, tb, a full final model and eval/eval.json, whose
    eval/loss is far below the held-out loss of the same model before training (measured on the
    same encoded held-out examples by a trainer that never steps)."""
    run = trained_sft
    final = run / "checkpoints" / "final"
    assert (run / "config.yaml").is_file() and list((run / "tb").glob("events.out.tfevents.*"))
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    assert not (final / "adapter_config.json").exists()
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 49))  # 3 epochs x 64 examples / batch 4
    assert all("loss/sft" in r and "sft/tokens" in r for r in rows)

    document = json.loads((run / "eval" / "eval.json").read_text())
    assert document["stage"] == "sft" and document["eval_examples"] == 16
    trained = document["metrics"]["eval/loss"]
    assert document["metrics"]["eval/perplexity"] == pytest.approx(torch.tensor(trained).exp().item(), rel=1e-5)

    untrained_trainer = SFTTrainer(load_config(SFTConfig, None, sft_overrides(tiny_llama, sft_data)), tmp_path / "u")
    untrained = untrained_trainer.evaluate()["eval/loss"]
    untrained_trainer.run.runlog.close()
    assert untrained > 3.0, untrained  # ~log(44): a random model over the vocabulary
    assert trained < 0.7 * untrained, (untrained, trained)
    early = sum(r["loss/sft"] for r in rows[:4]) / 4
    late = sum(r["loss/sft"] for r in rows[-4:]) / 4
    assert late < early - 1.0, (early, late)


def test_micro_batching_does_not_change_an_sft_update(tiny_llama, sft_data, tmp_path):
    """One step over 8 examples of different response lengths, whole or in micro-batches of 2 or 1:
    each micro-batch's loss is normalised by the whole batch's response-token count, so the summed
    loss, the accumulated gradient and its norm are the same. (Gradients, not the updated weights,
    are compared: Adam's first step is ~lr * sign(g), which turns float noise on a near-zero
    gradient entry into a full lr-sized difference.)"""
    grads, metrics = {}, {}
    for micro in (8, 2, 1):
        extra = ("train.steps=1", "train.lr=1e-2", f"train.micro_batch_size={micro}")
        config = load_config(SFTConfig, None, sft_overrides(tiny_llama, sft_data, *extra))
        trainer = SFTTrainer(config, tmp_path / str(micro))
        trainer.run.step = 1
        metrics[micro] = trainer.iteration()[0]
        trainer.run.runlog.close()
        grads[micro] = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    lengths = {len(e.response) for e in trainer.train_examples}
    assert len(lengths) > 1, "all responses equally long: token and example means would coincide"
    largest = max(float(g.abs().max()) for g in grads[8].values())
    assert largest > 1e-2, "no gradient: the comparison would be vacuous"
    for micro in (2, 1):
        assert metrics[micro]["loss/sft"] == pytest.approx(metrics[8]["loss/sft"], abs=1e-5)
        assert metrics[micro]["sft/tokens"] == metrics[8]["sft/tokens"]
        assert metrics[micro]["train/grad_norm"] == pytest.approx(metrics[8]["train/grad_norm"], rel=1e-5)
        for name, grad in grads[8].items():
            torch.testing.assert_close(grads[micro][name], grad, atol=1e-7, rtol=1e-5, msg=name)


# --- what the loss covers -----------------------------------------------------------------------


def _hand_nll(model, prompt: list[int], response: list[int]) -> tuple[float, float]:
    """From one plain, unpadded forward over prompt + response: the mean -log p of the response
    tokens (each predicted by the position before it), and the mean over every predicted token."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # (L, V)
    targets = ids[0, 1:]
    per_token = -logprobs[:-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # predicts token t + 1
    return float(per_token[len(prompt) - 1 :].mean()), float(per_token.mean())


def test_sft_loss_counts_response_tokens_only(tiny_llama, sft_data, tmp_path):
    """SFTTask.loss of one example equals the mean NLL of its response tokens plus EOS, computed by
    hand from a plain forward; it is not the mean over the prompt too. The number of tokens in the
    loss is len(response words) + 1 whatever the prompt, and batching examples with prompts of
    different lengths (left padding) gives the token-weighted mean of the single-example losses."""
    encoder, task = _encoder_and_task(tiny_llama, sft_data)
    tokenizer = encoder.tokenizer
    model = load_causal_lm(str(tiny_llama), tokenizer)
    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "hello world", "response": "the cat is red"}])
    [example] = load_sft_examples(one)
    encoded = task.encode(example, encoder)
    assert tokenizer.convert_ids_to_tokens(encoded.response) == ["the", "cat", "is", "red", "<eos>"]
    assert tokenizer.convert_ids_to_tokens(encoded.prompt) == ["<|user|>", "hello", "world", "<|assistant|>"]

    with torch.no_grad():
        loss, stats = task.loss(model, [encoded], task.count([encoded]))
    response_only, everything = _hand_nll(model, encoded.prompt, encoded.response)
    assert float(loss) == pytest.approx(response_only, abs=1e-5)
    assert abs(response_only - everything) > 1e-3, "prompt and response NLL coincide: the check would be vacuous"
    assert float(stats["sft/tokens"]) == 5  # four response words + EOS

    # Another prompt, longer and with other words: the same five tokens count.
    other_prompts = ["why is the big dog blue please tell me", "a"]
    examples = [encoded]
    for text in other_prompts:
        prompt = encoder.prompt(Prompt(({"role": "user", "content": text},), text))
        examples.append(EncodedExample(prompt, encoded.response))
    for e in examples:
        assert task.count([e]) == 5.0
    # One batch of four: those three (prompts of 4, 10 and 3 tokens, so left padding differs) and a
    # longer response (9 tokens, so the response side is right-padded for the others).
    examples.append(EncodedExample(encoded.prompt, encoder.response("the sun is green and very very good")))
    hand = [(_hand_nll(model, e.prompt, e.response)[0], len(e.response)) for e in examples]
    expected = sum(nll * n for nll, n in hand) / sum(n for _, n in hand)
    with torch.no_grad():
        batched, stats = task.loss(model, examples, task.count(examples))
    assert float(batched) == pytest.approx(expected, abs=1e-5)
    assert float(stats["sft/tokens"]) == 5 + 5 + 5 + 9


def test_messages_records_encode_like_prompt_and_response(tiny_llama, sft_data, tmp_path):
    """A two-turn {"messages"} record gives exactly the prompt and response ids of the same
    {"prompt", "response"} record; in a longer conversation everything before the final assistant
    turn is the prompt (chat template and generation prompt included)."""
    encoder, task = _encoder_and_task(tiny_llama, sft_data)
    plain = sft_records(4, seed=9)
    conversation = {
        "messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "tell me more"},
            {"role": "assistant", "content": "the dog is big"},
        ]
    }
    path = write_jsonl(tmp_path / "m.jsonl", [as_messages(r) for r in plain] + [conversation])
    loaded = load_sft_examples(path)
    reference = load_sft_examples(write_jsonl(tmp_path / "p.jsonl", plain))
    for a, b in zip(loaded[:4], reference, strict=True):
        assert task.encode(a, encoder) == task.encode(b, encoder)
    last = task.encode(loaded[4], encoder)
    assert loaded[4].prompt.text == "tell me more" and loaded[4].response == "the dog is big"
    words = encoder.tokenizer.convert_ids_to_tokens(last.prompt)
    assert words == ["<|user|>", "hello", "<|assistant|>", "yes", "<|user|>", "tell", "me", "more", "<|assistant|>"]
    assert encoder.tokenizer.convert_ids_to_tokens(last.response) == ["the", "dog", "is", "big", "<eos>"]


@pytest.mark.parametrize(
    "messages",
    [
        [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "why"},
        ],
        [{"role": "assistant", "content": "yes"}],  # nothing to condition on
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "  "}],
    ],
)
def test_messages_not_ending_in_an_assistant_turn_is_a_data_error(tmp_path, messages):
    """The error names the file and the line of the bad record."""
    path = write_jsonl(tmp_path / "bad.jsonl", [as_messages(sft_records(1, 0)[0]), {"messages": messages}])
    with pytest.raises(DataError, match="assistant") as caught:
        load_sft_examples(path)
    assert str(path) in str(caught.value) and "line 2" in str(caught.value)


def test_sft_cli_reports_a_bad_messages_file_with_exit_code_2(tiny_llama, sft_data, tmp_path, capsys):
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [as_messages(r) for r in sft_records(2, 0)] + [{"messages": [{"role": "user", "content": "hello"}]}],
    )
    code = main(["sft", *sft_overrides(tiny_llama, (bad, sft_data[1])), "--output", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and "line 3" in err and "Traceback" not in err, err


# --- handing over to PPO ------------------------------------------------------------------------


def test_full_sft_model_starts_ppo_with_zero_kl(trained_sft, tiny_llama, ppo_task):
    """model.name = the full SFT final folder: PPO's policy and reference are the SFT weights (not
    the base's), so the first iteration's KL to the reference is exactly 0."""
    final = trained_sft / "checkpoints" / "final"
    trainer = PPOTrainer(tiny_config(final, ppo_task, "train.steps=1", "ppo.epochs=1"), ppo_task / "run")
    sft_model = load_causal_lm(str(final), trainer.tokenizer)
    base = load_causal_lm(str(tiny_llama), trainer.tokenizer)
    policy = trainer.policy.state_dict()
    for name, tensor in sft_model.state_dict().items():
        assert torch.equal(policy[name], tensor), name
    assert any(not torch.equal(policy[k], v) for k, v in base.state_dict().items()), "SFT did not change weights"
    trainer.run.step = 1
    metrics, _ = trainer.iteration()
    assert metrics["objective/kl"] == 0.0
    assert abs(metrics["policy/ratio_mean"] - 1.0) < 1e-6


@pytest.fixture(scope="module")
def lora_sft(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """A LoRA SFT run through the command line, trained on a messages-form file; its final folder."""
    folder = tmp_path_factory.mktemp("lora-sft")
    data = write_sft_data(folder / "data", messages=True)
    extra = ("model.lora={r: 4, alpha: 8}", "train.steps=3", "train.lr=1e-2")
    assert main(["sft", *sft_overrides(tiny_llama, data, *extra), "--output", str(folder / "run")]) == 0
    return folder / "run" / "checkpoints" / "final"


def test_lora_sft_saves_an_adapter_of_the_trained_model(lora_sft, tiny_llama):
    """The final folder of a LoRA run is the adapter alone (plus tokenizer), pointing at its base,
    and base + adapter gives other log-probs than the base: the adapter trained."""
    final = lora_sft
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert (final / "tokenizer_config.json").is_file()
    assert not (final / "model.safetensors").exists()
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_llama)
    assert adapter_config["task_type"] == "CAUSAL_LM" and adapter_config["r"] == 4
    tokenizer = load_tokenizer(str(final))
    merged = load_causal_lm(str(final), tokenizer)  # tether's loader merges the adapter into its base
    adapted = PeftModel.from_pretrained(load_causal_lm(str(tiny_llama), tokenizer), str(final)).eval()
    base = load_causal_lm(str(tiny_llama), tokenizer)
    probe = torch.tensor([[4, 28, 29, 5, 6, 16, 9, 20, 3]])  # <|user|> hello world <|assistant|> the cat is red <eos>
    mask = torch.ones_like(probe, dtype=torch.bool)
    with torch.no_grad():
        (merged_lp,) = response_logprobs(merged, probe, mask, 4, 1.0, speed=FAST)
        (adapted_lp,) = response_logprobs(adapted, probe, mask, 4, 1.0, speed=FAST)
        (base_lp,) = response_logprobs(base, probe, mask, 4, 1.0, speed=FAST)
    torch.testing.assert_close(merged_lp, adapted_lp, atol=1e-5, rtol=0)
    assert not torch.allclose(merged_lp, base_lp, atol=1e-4), "the adapter did not move the model"


def test_ppo_starts_from_a_lora_sft_adapter(lora_sft, tiny_llama, ppo_task):
    """PPO takes the LoRA SFT folder as model.name (reward: a function only, so its value model also
    starts from model.name): the policy gives the adapted model's log-probs, the reference is that
    same adapted model, and the first iteration has KL exactly 0."""
    final = lora_sft
    trainer = PPOTrainer(tiny_config(final, ppo_task, "train.steps=1", "ppo.epochs=1"), ppo_task / "run")
    tokenizer = trainer.tokenizer
    adapted = PeftModel.from_pretrained(load_causal_lm(str(tiny_llama), tokenizer), str(final)).eval()
    prompt = trainer.prompt_ids[0]
    probe = torch.tensor([prompt + tokenizer("the cat is red", add_special_tokens=False)["input_ids"] + [3]])
    mask = torch.ones_like(probe, dtype=torch.bool)
    with torch.no_grad():
        (policy_lp,) = response_logprobs(trainer.policy, probe, mask, len(prompt), 1.0, speed=FAST)
        (adapted_lp,) = response_logprobs(adapted, probe, mask, len(prompt), 1.0, speed=FAST)
    torch.testing.assert_close(policy_lp, adapted_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        trainer.reference.logprobs(probe, mask, len(prompt), 1.0, speed=FAST), policy_lp, atol=0, rtol=0
    )
    trainer.run.step = 1
    metrics, _ = trainer.iteration()
    assert metrics["objective/kl"] == 0.0


def test_a_model_loaded_from_an_adapter_folder_is_trainable(tiny_llama, tmp_path):
    """Merging an adapter must not leave the merged weights frozen: full fine-tuning (sft, rm or
    ppo with model.name = an adapter folder) would otherwise silently train nothing."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from tether.loading.models import load_causal_lm, load_scalar_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_llama))
    adapted = get_peft_model(
        load_causal_lm(str(tiny_llama), tokenizer), PeftLoraConfig(r=2, target_modules="all-linear")
    )
    adapted.peft_config["default"].base_model_name_or_path = str(tiny_llama)
    adapted.save_pretrained(tmp_path / "adapter")
    for model in (
        load_causal_lm(str(tmp_path / "adapter"), tokenizer),
        load_scalar_model(str(tmp_path / "adapter"), tokenizer),
    ):
        assert all(p.requires_grad for p in model.parameters())
