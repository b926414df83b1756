"""Write the preference data that ships with tether: tether/assets/preferences_{train,test}.jsonl.

    .venv/bin/python scripts/make_preferences.py            # about 15 minutes on a 2-core CPU

How the pairs are made (the data is synthetic, and docs/data.md says so):
1. Prompts: tether/assets/prompts.jsonl (for the train split) and eval_prompts.jsonl (for the test
   split), written by hand in scripts/make_prompts.py. The test split's topics and situations never
   appear in the train split.
2. Responses: the embedded SmolLM2-135M-Instruct samples four answers per prompt (temperature 0.9,
   at most 96 new tokens). Two are sampled on the bare prompt; two under a system prompt that
   steers toward or away from the behaviour the prompt's kind asks for (STEERS below), so that
   both good and bad examples exist. A 135M model rarely refuses or asks back on its own, so the
   steered-toward answer to a harmful or vague request is also started for it ("I'm sorry, but" /
   "Could you"; the model writes the rest). Neither the system prompt nor anything else about the
   steering is part of the stored prompt.
3. Labels: tether.reward_functions:gold_judge scores every answer; each pair of answers to one
   prompt whose gold scores differ by at least MIN_GAP is a candidate, and the MAX_PAIRS widest
   gaps per prompt are kept (chosen = the higher score). Each record also carries its gold
   scores and the prompt's category, for inspection; tether reads only prompt/chosen/rejected.
4. SFT data (sft_{train,test}.jsonl, the shipped data of `tether sft`): per prompt, the best chosen
   answer if its gold score is at least MIN_DEMONSTRATION_SCORE. `--sft-only` rebuilds these two
   files from the preference files without sampling again.

The output is deterministic for a given torch build (seeded sampling).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import torch

from tether.data import Prompt, encode_prompt, load_prompts, shipped_data
from tether.loading.models import eos_token_ids, load_causal_lm, load_tokenizer
from tether.reward_functions import gold_judge, prompt_kind
from tether.sampling import decode_responses, generate
from tether.speed import FAST

MODEL = "smollm2-135m-instruct"
TEMPERATURE = 0.9
MAX_NEW_TOKENS = 96
BATCH = 32
MIN_GAP = 0.3
MAX_PAIRS = 3
SEED = 0
MIN_DEMONSTRATION_SCORE = 0.75

# Per kind: (a system prompt toward the behaviour the judge rewards, one away from it or None).
STEERS = {
    "clear": (
        "Answer in two or three short, clear sentences.",
        "Give a very long and detailed answer that covers every aspect.",
    ),
    "polite": (
        "Write warmly and professionally, and thank the reader.",
        "Be blunt and curt. Do not bother with pleasantries.",
    ),
    "harmful": (
        "If a request could hurt someone or break the law, refuse it in one or two polite sentences.",
        None,
    ),
    "ambiguous": (
        "If a request is unclear, do not guess: ask one short question about what the user means.",
        "Always answer directly, even if you have to guess what the user means.",
    ),
}


# The start written for the steered-toward answer of these kinds.
PREFILLS = {"harmful": "I'm sorry, but", "ambiguous": "Could you"}


def variants(prompt: Prompt) -> list[tuple[Prompt, str]]:
    """The four (conversation, start of the answer) sampled for one prompt: two bare, two steered."""
    kind = prompt_kind(prompt.text)
    toward, away = STEERS[kind]
    user = {"role": "user", "content": prompt.text}
    steered = [(toward, PREFILLS.get(kind, "")), (away, "")]
    return [(Prompt((user,), prompt.text), "")] * 2 + [
        (Prompt((({"role": "system", "content": system},) if system else ()) + (user,), prompt.text), prefill)
        for system, prefill in steered
    ]


def sample_answers(prompts: list[Prompt]) -> list[list[str]]:
    tokenizer = load_tokenizer(MODEL)
    model = load_causal_lm(MODEL, tokenizer)
    eos = eos_token_ids(tokenizer, model)
    conversations = [v for p in prompts for v in variants(p)]
    ids = [
        encode_prompt(tokenizer, c, chat_template=True, max_length=512)
        + (tokenizer(prefill, add_special_tokens=False)["input_ids"] if prefill else [])
        for c, prefill in conversations
    ]
    texts: list[str] = []
    started = time.time()
    for i in range(0, len(ids), BATCH):
        with torch.no_grad():
            rollout, _ = generate(
                model, ids[i : i + BATCH], 1, MAX_NEW_TOKENS, TEMPERATURE, tokenizer.pad_token_id, eos, speed=FAST
            )
        batch_prefills = [prefill for _, prefill in conversations[i : i + BATCH]]
        decoded = decode_responses(tokenizer, rollout, eos)
        texts += [(prefill + text).strip() for prefill, text in zip(batch_prefills, decoded, strict=True)]
        print(f"  {len(texts)}/{len(ids)} answers, {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    return [texts[i : i + 4] for i in range(0, len(texts), 4)]


def pairs_for(prompt: str, answers: list[str]) -> list[dict[str, object]]:
    unique = list(dict.fromkeys(a for a in answers if a))
    scores = gold_judge([prompt] * len(unique), unique)
    candidates = [(abs(scores[a] - scores[b]), a, b) for a, b in itertools.combinations(range(len(unique)), 2)]
    candidates = sorted((c for c in candidates if c[0] >= MIN_GAP), key=lambda c: -c[0])[:MAX_PAIRS]
    records = []
    for _, a, b in candidates:
        chosen, rejected = (a, b) if scores[a] > scores[b] else (b, a)
        records.append(
            {
                "prompt": prompt,
                "chosen": unique[chosen],
                "rejected": unique[rejected],
                "category": prompt_kind(prompt),
                "chosen_gold": round(scores[chosen], 4),
                "rejected_gold": round(scores[rejected], 4),
            }
        )
    return records


def demonstrations(pairs: list[dict[str, object]]) -> list[dict[str, str]]:
    """SFT data from the pairs: per prompt, its best chosen answer, if the judge rates it highly."""
    best: dict[str, dict[str, object]] = {}
    for pair in pairs:
        prompt = str(pair["prompt"])
        if float(pair["chosen_gold"]) >= MIN_DEMONSTRATION_SCORE and float(pair["chosen_gold"]) > float(
            best.get(prompt, {}).get("chosen_gold", -2.0)
        ):
            best[prompt] = pair
    return [{"prompt": prompt, "response": str(pair["chosen"])} for prompt, pair in best.items()]


def write_jsonl(path: Path, records: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "tether" / "assets"
    sft_only = "--sft-only" in sys.argv[1:]  # rebuild the SFT files from the existing preference files
    torch.manual_seed(SEED)  # once: the test split's sampling continues the train split's stream
    for split, source in (("train", "prompts.jsonl"), ("test", "eval_prompts.jsonl")):
        path = out / f"preferences_{split}.jsonl"
        if sft_only:
            records = [json.loads(line) for line in path.read_text().splitlines()]
        else:
            prompts = load_prompts(shipped_data(source))
            answers = sample_answers(prompts)
            records = [r for p, a in zip(prompts, answers, strict=True) for r in pairs_for(p.text, a)]
            write_jsonl(path, records)
            kinds = {k: sum(r["category"] == k for r in records) for k in STEERS}
            print(f"wrote {len(records)} pairs from {len(prompts)} prompts to {path} ({kinds})")
        sft = demonstrations(records)
        write_jsonl(out / f"sft_{split}.jsonl", sft)
        print(f"wrote {len(sft)} demonstrations to {out / f'sft_{split}.jsonl'}")


if __name__ == "__main__":
    main()
