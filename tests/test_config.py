"""Typed config loading (tether/config.py): defaults, YAML + dotted overrides, and the error messages.

Tier: pure Python, no models. Every error must be a ConfigError that names the key, field or file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tether.config import (
    ConfigError,
    DPOConfig,
    GRPOConfig,
    LoraConfig,
    PPOConfig,
    RMConfig,
    SFTConfig,
    all_keys,
    field_help,
    load_config,
    save_config,
)

REWARD = "reward.function=tether.reward_functions:concise"


def load(*overrides: str, path: Path | None = None) -> PPOConfig:
    """A PPOConfig with a reward source, so validate() passes unless the test breaks something."""
    return load_config(PPOConfig, path, [REWARD, *overrides])


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# Defaults and documentation
# --------------------------------------------------------------------------------------------

# The defaults docs/reference/config.md documents, pinned.
CONTRACT_DEFAULTS = {
    "model.name": "smollm2-135m-instruct",
    "model.lora": None,
    "model.dtype": "float32",
    "data.max_prompt_length": 256,
    "reward.model": None,
    "reward.function": None,
    "reward.gold": None,
    "rollout.max_new_tokens": 64,
    "rollout.temperature": 0.7,
    "rollout.samples_per_prompt": 1,
    "rollout.missing_eos_penalty": -1.0,
    "train.steps": 100,
    "train.batch_size": 8,
    "train.lr": 3.0e-6,
    "train.seed": 0,
    "train.save_every": 50,
    "train.keep_last": 3,
    "ppo.epochs": 4,
    "ppo.minibatch_size": 8,
    "ppo.clip_coef": 0.2,
    "ppo.value_clip": 0.2,
    "ppo.vf_coef": 0.1,
    "ppo.gamma": 1.0,
    "ppo.lam": 0.95,
    "ppo.kl_coef": 0.05,
    "ppo.kl_estimator": "k1",
    "ppo.kl_target": None,
    "ppo.kl_horizon": 10000,
    "ppo.whiten_rewards": False,
}


@pytest.mark.parametrize("key", sorted(CONTRACT_DEFAULTS))
def test_default_matches_contract(key):
    config = PPOConfig()
    section, name = key.split(".")
    assert getattr(getattr(config, section), name) == CONTRACT_DEFAULTS[key]


def test_loading_with_no_file_and_only_a_reward_gives_the_defaults():
    config = load()
    expected = PPOConfig()
    expected.reward.function = "tether.reward_functions:concise"
    assert config == expected


def test_every_field_has_a_non_empty_help_string():
    rows = field_help(PPOConfig)
    documented = {key for key, _, _ in rows}
    assert set(all_keys(PPOConfig)) <= documented  # model.lora.* included
    assert "model.lora" in documented
    for key, _, help_text in rows:
        assert isinstance(help_text, str) and help_text.strip(), f"{key} has no help string"


# --------------------------------------------------------------------------------------------
# File plus overrides
# --------------------------------------------------------------------------------------------


def test_file_values_are_read_and_overrides_win_over_the_file(tmp_path):
    path = write(
        tmp_path,
        "train:\n  steps: 7\n  batch_size: 4\nppo:\n  kl_coef: 0.2\n  minibatch_size: 4\n"
        "reward:\n  function: tether.reward_functions:concise\n",
    )
    config = load_config(PPOConfig, path, ["train.steps=20", "ppo.kl_coef=0.1"])
    assert config.train.steps == 20  # override
    assert config.ppo.kl_coef == 0.1  # override
    assert config.train.batch_size == 4  # file, untouched by the overrides
    assert config.ppo.minibatch_size == 4
    assert config.rollout.max_new_tokens == 64  # neither: default


def test_empty_config_file_gives_the_defaults(tmp_path):
    config = load(path=write(tmp_path, "# nothing here\n"))
    assert config.train == PPOConfig().train


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("ppo.value_clip=null", "ppo.value_clip", None),
        ("ppo.whiten_rewards=true", "ppo.whiten_rewards", True),
        ("model.lora.target_modules=[q_proj, v_proj]", "model.lora.target_modules", ["q_proj", "v_proj"]),
        ("train.lr=3e-6", "train.lr", 3e-6),  # YAML 1.1 reads "3e-6" as a string
        ("train.value_lr=1e-5", "train.value_lr", 1e-5),  # the same inside an Optional[float]
        ("ppo.kl_coef=0.1", "ppo.kl_coef", 0.1),
        ("ppo.kl_horizon=500", "ppo.kl_horizon", 500.0),  # an int for a float field
        ("model.name=./my model", "model.name", "./my model"),
        ("reward.function_kwargs={target_words: 12}", "reward.function_kwargs", {"target_words": 12}),
    ],
)
def test_override_value_is_parsed_as_yaml(override, key, expected):
    config = load(override)
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected
    assert type(value) is type(expected)


def test_float_override_in_scientific_notation_is_a_float():
    config = load("train.lr=3e-6", "train.adam_eps=1e-8")
    assert isinstance(config.train.lr, float) and config.train.lr == pytest.approx(3e-6)
    assert isinstance(config.train.adam_eps, float) and config.train.adam_eps == pytest.approx(1e-8)


def test_override_without_equals_sign_is_refused():
    with pytest.raises(ConfigError, match="ppo.kl_coef"):
        load("ppo.kl_coef")


# --------------------------------------------------------------------------------------------
# Unknown keys suggest the closest valid key
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("ppo.kl_cof=0.1", "ppo.kl_coef"),  # a typo inside the right section
        ("kl_coef=0.1", "ppo.kl_coef"),  # the right name, missing its section
        ("model.lora.rank=8", "model.lora.r"),  # inside the optional LoRA section
        ("train.batchsize=4", "train.batch_size"),
        ("rollout.max_new_token=32", "rollout.max_new_tokens"),
    ],
)
def test_unknown_override_key_names_the_closest_valid_key(override, suggestion):
    with pytest.raises(ConfigError) as info:
        load(override)
    message = str(info.value)
    assert repr(override.split("=")[0]) in message
    assert f"did you mean {suggestion!r}" in message


def test_unknown_key_in_a_file_names_the_closest_valid_key(tmp_path):
    path = write(tmp_path, "ppo:\n  kl_cof: 0.1\n")
    with pytest.raises(ConfigError, match=r"'ppo\.kl_cof'.*did you mean 'ppo\.kl_coef'"):
        load(path=path)


def test_unknown_section_lists_the_valid_sections():
    with pytest.raises(ConfigError) as info:
        load("zzzz.x=1")
    for section in ("model", "data", "reward", "rollout", "train", "ppo", "eval"):
        assert section in str(info.value)


# --------------------------------------------------------------------------------------------
# Wrong types
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "expected_words"),
    [
        ("train.steps=ten", "train.steps", "integer"),  # a string for an int
        ("train.steps=2.5", "train.steps", "integer"),  # a fractional float for an int
        ("train.steps=true", "train.steps", "integer"),  # a bool is not an int
        ("ppo.kl_coef=true", "ppo.kl_coef", "number"),  # a bool for a float
        ("ppo.kl_target=false", "ppo.kl_target", "float"),  # a bool for an Optional[float]
        ("model.name=[a, b]", "model.name", "string"),  # a list for a str
        ("ppo.whiten_rewards=yes please", "ppo.whiten_rewards", "true or false"),
        ("reward.function_kwargs=3", "reward.function_kwargs", "mapping"),
        ("model.lora=[1, 2]", "model.lora", "mapping"),
        ("model=foo", "model", "mapping"),
    ],
)
def test_wrong_type_is_a_config_error_naming_the_key(override, key, expected_words):
    with pytest.raises(ConfigError) as info:
        load(override)
    message = str(info.value)
    assert message.startswith(f"{key}:")
    assert expected_words in message


@pytest.mark.parametrize(
    ("override", "key", "choices"),
    [
        ("model.dtype=float16", "model.dtype", ["'float32'", "'bfloat16'"]),
        ("ppo.kl_estimator=k4", "ppo.kl_estimator", ["'k1'", "'k2'", "'k3'"]),
        ("train.lr_schedule=step", "train.lr_schedule", ["'constant'", "'linear'", "'cosine'"]),
        ("data.prompt_overflow=drop", "data.prompt_overflow", ["'truncate'", "'error'"]),
    ],
)
def test_invalid_choice_lists_the_valid_ones(override, key, choices):
    with pytest.raises(ConfigError) as info:
        load(override)
    message = str(info.value)
    assert key in message
    for choice in choices:
        assert choice in message


def test_wrong_type_in_a_file_names_the_key(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: eight\n")
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected an integer, got 'eight'"):
        load(path=path)


# --------------------------------------------------------------------------------------------
# Ranges and cross-field checks (validate)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field_name"),
    [
        (["train.lr=-1e-5"], "train.lr"),
        (["ppo.clip_coef=0"], "ppo.clip_coef"),
        (["ppo.gamma=1.5"], "ppo.gamma"),
        (["ppo.lam=-0.1"], "ppo.lam"),
        (["train.steps=0"], "train.steps"),
        (["ppo.kl_coef=-0.1"], "ppo.kl_coef"),
        (["train.value_lr=0"], "train.value_lr"),
        (["model.critic=head", "model.value_model=somewhere"], "model.value_model"),
        (["model.critic=both"], "model.critic"),
        (["model.lora.r=0"], "model.lora.r"),
        # 8 prompts * 1 sample = 8 sequences: a minibatch of 3 does not divide them
        (["ppo.minibatch_size=3"], "ppo.minibatch_size"),
        (
            ["train.batch_size=4", "rollout.samples_per_prompt=3", "ppo.minibatch_size=8"],
            "ppo.minibatch_size",
        ),
        (["train.micro_batch_size=3"], "train.micro_batch_size"),  # does not divide minibatch 8
    ],
)
def test_out_of_range_value_is_a_config_error_naming_the_field(overrides, field_name):
    with pytest.raises(ConfigError, match=field_name.replace(".", r"\.")):
        load(*overrides)


def test_minibatch_dividing_batch_times_samples_is_accepted():
    config = load(
        "train.batch_size=4",
        "rollout.samples_per_prompt=3",
        "ppo.minibatch_size=6",
        "train.micro_batch_size=2",
    )
    assert (config.ppo.minibatch_size, config.train.micro_batch_size) == (6, 2)


def test_no_reward_source_is_a_config_error_naming_both_options():
    with pytest.raises(ConfigError) as info:
        load_config(PPOConfig, None, [])
    assert "reward.model" in str(info.value) and "reward.function" in str(info.value)


def test_a_reward_model_alone_is_a_reward_source():
    config = load_config(PPOConfig, None, ["reward.model=some/folder"])
    assert config.reward.model == "some/folder"


# --------------------------------------------------------------------------------------------
# Bad config files
# --------------------------------------------------------------------------------------------


def test_missing_config_file_is_a_config_error_naming_the_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load(path=path)


def test_invalid_yaml_is_a_config_error_naming_the_file(tmp_path):
    path = write(tmp_path, "train:\n  steps: [1, 2\n", name="broken.yaml")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load(path=path)


def test_yaml_list_at_top_level_is_a_config_error_naming_the_file(tmp_path):
    path = write(tmp_path, "- train\n- ppo\n", name="listy.yaml")
    with pytest.raises(ConfigError, match="listy.yaml") as info:
        load(path=path)
    assert "mapping" in str(info.value)


# --------------------------------------------------------------------------------------------
# LoRA section
# --------------------------------------------------------------------------------------------


def test_lora_mapping_builds_lora_config_with_defaults_for_missing_keys():
    config = load("model.lora={r: 4, target_modules: [q_proj]}")
    assert config.model.lora == LoraConfig(r=4, alpha=32.0, dropout=0.0, target_modules=["q_proj"])


def test_single_lora_key_override_builds_the_section():
    config = load("model.lora.alpha=8")
    assert config.model.lora == LoraConfig(alpha=8.0)


def test_lora_mapping_in_a_file_builds_lora_config(tmp_path):
    path = write(tmp_path, "model:\n  lora:\n    r: 8\n")
    config = load(path=path)
    assert isinstance(config.model.lora, LoraConfig)
    assert (config.model.lora.r, config.model.lora.alpha, config.model.lora.target_modules) == (
        8,
        32.0,
        "all-linear",
    )


def test_lora_null_keeps_it_none(tmp_path):
    assert load("model.lora=null").model.lora is None
    path = write(tmp_path, "model:\n  lora: {r: 8}\n")
    assert load("model.lora=null", path=path).model.lora is None  # the override wins


def test_unknown_key_inside_lora_mapping_is_refused():
    with pytest.raises(ConfigError, match=r"did you mean 'model\.lora\.r'"):
        load("model.lora={rank: 4}")


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def test_save_then_load_round_trips_to_an_equal_config(tmp_path):
    config = load(
        "model.lora={r: 4, target_modules: [q_proj, v_proj]}",
        "train.lr=3e-6",
        "train.value_lr=1e-5",
        "ppo.kl_target=6.0",
        "ppo.value_clip=null",
        "model.dtype=bfloat16",
        "reward.function_kwargs={target_words: 12}",
        "train.micro_batch_size=2",
    )
    path = tmp_path / "saved.yaml"
    save_config(config, path)
    reloaded = load_config(PPOConfig, path)
    assert reloaded == config
    assert dataclasses.asdict(reloaded) == dataclasses.asdict(config)


def test_save_then_load_round_trips_the_defaults(tmp_path):
    config = load()
    path = tmp_path / "defaults.yaml"
    save_config(config, path)
    assert load_config(PPOConfig, path) == config


CONFIGS = Path(__file__).resolve().parent.parent / "configs"
STAGE_OF = {
    "demo.yaml": PPOConfig,
    "demo-rm.yaml": RMConfig,
    "sft.yaml": SFTConfig,
    "dpo.yaml": DPOConfig,
    "grpo.yaml": GRPOConfig,
    "grpo-arithmetic.yaml": GRPOConfig,
    "grpo-calculator.yaml": GRPOConfig,
}


def test_every_shipped_config_loads_with_its_stage():
    """Each file under configs/ loads as its stage's config (a file gone stale with a renamed key
    fails here, not in a user's first run)."""
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(STAGE_OF)
    for name, config_class in STAGE_OF.items():
        load_config(config_class, CONFIGS / name, allow_missing=True)
