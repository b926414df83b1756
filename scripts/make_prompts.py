"""Write the prompt sets that ship with tether: tether/assets/prompts.jsonl and eval_prompts.jsonl.

    python scripts/make_prompts.py

Every prompt is written here by hand (topics x request templates); nothing is downloaded. The eval
set uses topics that never appear in the training prompts, so before/after comparisons show
behaviour that generalises rather than memorised answers. The output is deterministic.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TRAIN_TOPICS = [
    "photosynthesis",
    "black holes",
    "the water cycle",
    "vaccines",
    "compound interest",
    "inflation",
    "the French Revolution",
    "the printing press",
    "plate tectonics",
    "DNA",
    "machine learning",
    "the internet",
    "electric cars",
    "climate change",
    "the immune system",
    "volcanoes",
    "the Roman Empire",
    "recycling",
    "solar panels",
    "earthquakes",
    "the moon landing",
    "bees",
    "coffee",
    "sleep",
    "meditation",
    "chess",
    "the stock market",
    "rainbows",
    "gravity",
    "antibiotics",
    "the Great Wall of China",
    "honey",
    "password security",
    "budgeting",
    "learning a new language",
    "public speaking",
    "time management",
    "houseplants",
    "marathons",
    "bread baking",
]
EVAL_TOPICS = [
    "tides",
    "the heart",
    "glaciers",
    "cryptography",
    "the Renaissance",
    "composting",
    "jet engines",
    "octopuses",
    "interest rates",
    "the Olympic Games",
    "lightning",
    "tea",
]
TEMPLATES = [
    "What is {topic}?",
    "Explain {topic} to a ten-year-old.",
    "Tell me something interesting about {topic}.",
    "Why should people care about {topic}?",
    "Give me one practical tip related to {topic}.",
    "Summarize what you know about {topic}.",
]


def prompts_for(topics: list[str]) -> list[dict[str, str]]:
    return [{"prompt": template.format(topic=topic)} for topic in topics for template in TEMPLATES]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "tether" / "assets"
    out.mkdir(parents=True, exist_ok=True)
    train = prompts_for(TRAIN_TOPICS)
    evaluation = prompts_for(EVAL_TOPICS)
    random.Random(0).shuffle(train)
    random.Random(1).shuffle(evaluation)
    write_jsonl(out / "prompts.jsonl", train)
    write_jsonl(out / "eval_prompts.jsonl", evaluation)
    print(f"wrote {len(train)} training and {len(evaluation)} eval prompts to {out}")


if __name__ == "__main__":
    main()
