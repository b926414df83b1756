"""Print the Markdown table of every config key, its default and meaning (pasted into README.md).

    .venv/bin/python scripts/config_table.py

tests/test_docs.py checks that README.md lists every key this prints, so the two cannot drift.
"""

from __future__ import annotations

import json

from tether.config import PPOConfig, field_help


def main() -> None:
    print("| key | default | meaning |")
    print("| --- | --- | --- |")
    for key, default, help_text in field_help(PPOConfig):
        print(f"| `{key}` | `{json.dumps(default)}` | {help_text} |")


if __name__ == "__main__":
    main()
