"""README.md documents everything a user touches: every config key and every metric key."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_cli import CONTRACT_METRICS
from tether.config import DPOConfig, GRPOConfig, PPOConfig, RMConfig, SFTConfig, field_help

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_lists_every_config_key_with_its_default():
    for config in (PPOConfig, RMConfig, SFTConfig, DPOConfig, GRPOConfig):
        missing = [key for key, _, _ in field_help(config) if f"`{key}`" not in README]
        assert not missing, f"README.md does not document {config.__name__}: {missing} (run scripts/config_table.py)"


def test_readme_shows_the_offline_stages_defaults():
    """The sft/rm table is its own: train.lr and train.adam_eps differ from ppo's defaults."""
    for key, default, _ in field_help(RMConfig) + field_help(DPOConfig):
        row = f"| `{key}` | `{json.dumps(default)}` |"
        assert row in README, f"README.md has no row {row!r} (run scripts/config_table.py rm)"


def test_readme_shows_the_grpo_defaults():
    for key, default, _ in field_help(GRPOConfig):
        if key.startswith("grpo."):
            row = f"| `{key}` | `{json.dumps(default)}` |"
            assert row in README, f"README.md has no row {row!r} (run scripts/config_table.py grpo)"


def test_readme_explains_every_contract_metric():
    missing = [key for key in CONTRACT_METRICS if f"`{key}`" not in README]
    assert not missing, f"README.md does not explain: {missing}"


def test_readme_starts_with_the_two_setup_commands():
    first_block = README.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
