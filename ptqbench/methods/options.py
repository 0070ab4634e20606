"""Method configurations: one frozen dataclass per method, its `paper` and `fast` instances, fields
set by name from the command line or YAML, and the configuration's identity in the store.

A method class carries `presets = {"paper": Config(...), "fast": Config(...)}`; the harness takes
the run's preset, applies the user's options (`with_options`: `--method-option saqsam.pcc.max_prompts=8`,
or a `method_options:` block in YAML) and builds the method from the result. Every stored row
records that effective configuration (`config_json`) and the leaderboard shows its short hash
(`config_id`), so two configurations of one method are two rows. This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from typing import Any

from ptqbench.config import PRESETS
from ptqbench.errors import ConfigError

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The configuration of a method without settings (its two presets are the same)."""


NO_OPTIONS_PRESETS: Mapping[str, NoOptions] = {"paper": NoOptions(), "fast": NoOptions()}


def check_at_least(config: Any, minimum: float, *names: str) -> None:
    """ConfigError unless each named field of `config` is None or at least `minimum` (for the
    `__post_init__` of a method configuration)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise ConfigError(f"{type(config).__name__}.{name} must be at least {minimum:g}, got {value}")


def preset_config(method: type, preset: str) -> Any:
    """The configuration of `method` (a registered class with `presets`) under `preset`."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: use {' or '.join(repr(p) for p in PRESETS)}")
    return method.presets[preset]


def option_names(config: Any) -> list[str]:
    """Every settable field of `config`, nested dataclass fields as dotted names, e.g. 'par.max_prompts'."""
    names = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            names += [f"{field.name}.{name}" for name in option_names(value)]
        else:
            names.append(field.name)
    return names


def with_options(config: Any, options: Mapping[str, object], owner: str) -> Any:
    """`config` with the fields named in `options` set: {"pcc.max_prompts": "8", "par.max_prompts": 4}.

    Values may be strings (the command line: "8", "0.5", "true", "none") or already typed (YAML);
    each is checked against the field's type. owner: the method's name, for the error message.
    Raises ConfigError naming the option for an unknown field or a value of the wrong type.
    """
    for name, value in options.items():
        config = _set(config, name.split("."), value, owner, name)
    return config


def _set(config: Any, path: list[str], value: object, owner: str, full_name: str) -> Any:
    hints = typing.get_type_hints(type(config))
    head = path[0]
    if head not in hints or not any(f.name == head for f in dataclasses.fields(config)):
        valid = ", ".join(option_names(config)) or "none"
        raise ConfigError(f"{owner}: unknown option {full_name!r} (options: {valid})")
    current = getattr(config, head)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{owner}: option {'.'.join(path[:1])!r} has no field {path[1]!r}")
        return dataclasses.replace(config, **{head: _set(current, path[1:], value, owner, full_name)})
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"{owner}: {full_name!r} is a group of options; set its fields, e.g. "
                          f"{full_name}.{option_names(current)[0]}=...")
    try:
        return dataclasses.replace(config, **{head: _coerce(value, hints[head])})
    except ValueError as exc:
        raise ConfigError(f"{owner}: option {full_name}={value!r}: {exc}") from exc


def _coerce(value: object, hint: object) -> object:
    """`value` as the type `hint` (bool, int, float, str, a Literal, tuple[X, ...] from a list or
    a comma-separated string, or X | None)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = [k for k in typing.get_args(hint)] if union else [hint]
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in kinds:
            return None
        raise ValueError("may not be none")
    for kind in (k for k in kinds if k is not type(None)):
        coerced = _as_kind(value, kind)
        if coerced is not None:
            return coerced
    raise ValueError(f"expected {_describe(hint)}")


def _as_kind(value: object, kind: object) -> object | None:
    """`value` as `kind`, or None when it is not one."""
    text = value.strip().lower() if isinstance(value, str) else None
    if kind is bool:
        if isinstance(value, bool):
            return value
        return True if text in _TRUE else False if text in _FALSE else None
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        return int(text) if text is not None and text.lstrip("+-").isdigit() else None
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(text) if text is not None else None
        except ValueError:
            return None
    if typing.get_origin(kind) is typing.Literal:
        return value if value in typing.get_args(kind) else None
    if typing.get_origin(kind) is tuple:
        item_kind, *rest = typing.get_args(kind)
        items = [item.strip() for item in value.split(",")] if isinstance(value, str) else value
        if rest != [Ellipsis] or not isinstance(items, (list, tuple)) or not items:
            return None
        coerced = [_as_kind(item, item_kind) for item in items]
        return None if any(item is None for item in coerced) else tuple(coerced)
    if kind is str:
        return value if isinstance(value, str) else None
    return None


def _describe(hint: object) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(k) for k in typing.get_args(hint))
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return "none" if hint is type(None) else getattr(hint, "__name__", str(hint))


def config_json(config: Any) -> str:
    """The configuration as canonical JSON (sorted keys, no spaces), as stored with every row."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True, separators=(",", ":"))


NO_OPTIONS_JSON = config_json(NoOptions())
"""The stored configuration of the FP row and of methods without settings."""


def config_id(config_text: str) -> str:
    """The short identity of a stored configuration (`config_json`): 8 hex digits of its sha256."""
    return hashlib.sha256(config_text.encode("utf-8")).hexdigest()[:8]


def parse_method_options(items: list[str]) -> tuple[tuple[str, str, str], ...]:
    """`--method-option` arguments ("saqsam.pcc.max_prompts=8", repeatable) as (method, option,
    value) triples, in order (a later one wins)."""
    triples = []
    for item in items:
        target, sep, value = item.partition("=")
        method, dot, name = target.strip().partition(".")
        if not sep or not dot or not method or not name:
            raise ConfigError(f"--method-option {item!r}: expected METHOD.OPTION=VALUE, e.g. saqsam.pcc.max_prompts=8")
        triples.append((method.lower(), name, value.strip()))
    return tuple(triples)


def options_by_method(triples: tuple[tuple[str, str, object], ...]) -> dict[str, dict[str, object]]:
    """(method, option, value) triples as {method: {option: value}}, a later triple winning."""
    grouped: dict[str, dict[str, object]] = {}
    for method, name, value in triples:
        grouped.setdefault(method, {})[name] = value
    return grouped
