"""The machinery of typed configuration: documented settings, YAML plus dotted overrides, checks.

A config class is a tree of dataclasses. Every field is declared with `setting(default, help,
check)`: its documentation and its range travel with it, so a section validates itself
(`check_section`) and the docs are generated from the same declarations (`field_help`). Unknown
keys are errors that name the closest valid key; values are checked against the field's type and
range, and the error names the field, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml

from tether.errors import TetherError
from tether.files import atomic_write_text


class ConfigError(TetherError, ValueError):
    """A config file, override or value that cannot be used; the message says which and why."""


# A range check: (value, dotted key) -> None, or ConfigError. Applied to a field's value unless it
# is None (an optional field left unset).
Check = Callable[[Any, str], None]


def positive(value: Any, key: str) -> None:
    if not 0 < value < math.inf:
        raise ConfigError(f"{key} must be a finite number > 0, got {value!r}")


def non_negative(value: Any, key: str) -> None:
    if not 0 <= value < math.inf:
        raise ConfigError(f"{key} must be a finite number >= 0, got {value!r}")


def unit_interval(value: Any, key: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key} must be in [0, 1], got {value}")


def setting(default: Any, help: str, check: Check | None = None) -> Any:
    """A dataclass field with its documentation and its range check attached."""
    metadata = {"help": help, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def redefault(section: type, name: str, default: Any) -> Any:
    """The field `name` of `section` (its help and check) with another default: a stage's section
    that shares a base section's settings but not every one of its defaults."""
    base = next(f for f in dataclasses.fields(section) if f.name == name)
    return setting(default, base.metadata["help"], base.metadata["check"])


def check_section(section: Any, prefix: str = "") -> None:
    """Every field's own range check, then the section's `check(prefix)` for what relates its fields,
    recursively through nested sections (an unset optional section is skipped)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            check_section(value, key + ".")
        elif value is not None and f.metadata.get("check") is not None:
            f.metadata["check"](value, key)
    own = getattr(section, "check", None)
    if own is not None:
        own(prefix)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config class, nested sections expanded (LoRA included)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        section = _dataclass_in(hints[f.name])
        if section is not None:
            keys.extend(all_keys(section, f"{prefix}{f.name}."))
        else:
            keys.append(prefix + f.name)
    return keys


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass inside `tp` (a dataclass or an Optional of one), else None."""
    for candidate in (tp, *typing.get_args(tp)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, root: type) -> Any:
    """`value` as type `tp`, or ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        section = _dataclass_in(tp)
        if section is not None and isinstance(value, dict):  # let the section's own error through
            return _coerce(value, section, key, root)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, root)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {', '.join(all_keys(tp))}, got {value!r}")
        return _build(tp, value, key + ".", root)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", root) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")  # a schema bug, not user input


def _build(cls: type, values: dict[str, Any], prefix: str, root: type) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(_unknown_key_message(cls, prefix, str(key), root))
        kwargs[key] = _coerce(value, hints[key], prefix + key, root)
    return cls(**kwargs)


def _unknown_key_message(cls: type, prefix: str, key: str, root: type) -> str:
    refused: dict[str, str] = getattr(root, "REFUSED_KEYS", {})
    if prefix + key in refused:  # a key of another stage: say whose, and why it has no meaning here
        return f"{prefix + key} {refused[prefix + key]}"
    here = [f.name for f in dataclasses.fields(cls)]
    close = [prefix + c for c in difflib.get_close_matches(key, here, n=1, cutoff=0.5)]
    if not close:  # maybe it belongs in another section: look through every dotted key
        close = difflib.get_close_matches(prefix + key, all_keys(root), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys here: {', '.join(here)}"
    return f"unknown config key {prefix + key!r}{hint}"


def parse_override(text: str) -> tuple[str, Any]:
    """'ppo.kl_coef=0.1' -> ('ppo.kl_coef', 0.1); the value is read as YAML ('null', lists, ...)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({err})") from err
    return key.strip(), value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def read_config_tree(path: Path) -> dict[str, Any]:
    """A config file's mapping of sections (empty for an empty file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}: {err.reason})") from err
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from err
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(loaded).__name__}")
    return loaded or {}


def load_config(
    cls: type,
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    allow_missing: bool = False,
) -> Any:
    """Build config class `cls` from a YAML file (optional) and dotted overrides, then check it.

    Checks: every section's ranges (`check_section`), then the stage's `check()` across sections,
    then `missing()` (settings that have no usable default, such as a reward source), unless
    `allow_missing` (printing a config is how a user learns the keys, so it must work on defaults)."""
    tree = read_config_tree(Path(path)) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    config = _build(cls, tree, "", cls)
    check_section(config)
    if not allow_missing:
        missing = config.missing()
        if missing:
            raise ConfigError("; ".join(missing))
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def field_help(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every field, for the config reference and `--help`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        section = _dataclass_in(hints[f.name])
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if section is not None and default is not None:
            rows.extend(field_help(section, f"{prefix}{f.name}."))
        else:
            rows.append((prefix + f.name, default, f.metadata.get("help", "")))
            if section is not None:  # an optional section (model.lora): document its keys too
                rows.extend(field_help(section, f"{prefix}{f.name}."))
    return rows


def save_config(config: Any, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
