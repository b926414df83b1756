"""Print the Markdown tables of every config key, its default and meaning (pasted into README.md).

    .venv/bin/python scripts/config_table.py ppo     # tether ppo (and eval, compare)
    .venv/bin/python scripts/config_table.py rm      # tether rm; tether sft reads the same keys but rm.*
    .venv/bin/python scripts/config_table.py dpo     # tether dpo: the rm keys but rm.*, plus dpo.*
    .venv/bin/python scripts/config_table.py grpo    # tether grpo: its grpo.* keys (the rest are ppo's)

tests/test_docs.py checks that README.md lists every key these print, so the two cannot drift.
"""

from __future__ import annotations

import json
import sys

from tether.config import DPOConfig, GRPOConfig, PPOConfig, RMConfig, field_help

TABLES = {"ppo": PPOConfig, "rm": RMConfig, "dpo": DPOConfig, "grpo": GRPOConfig}


def main() -> None:
    stage = sys.argv[1] if len(sys.argv) > 1 else "ppo"
    print("| key | default | meaning |")
    print("| --- | --- | --- |")
    for key, default, help_text in field_help(TABLES[stage]):
        if stage == "grpo" and not key.startswith("grpo."):
            continue  # grpo shares every other section with ppo, whose table lists them
        print(f"| `{key}` | `{json.dumps(default)}` | {help_text} |")


if __name__ == "__main__":
    main()
