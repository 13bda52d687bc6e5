"""Nested dataclasses as typed trees: plain dicts in and out, dotted ``key=value`` assignment, one-line errors.

Nothing here knows ISTR's keys (istr/config.py defines the tree): ``build(Config, {"model": {...}})`` checks
every value against the field's annotation (Literal choices, Optional, tuples, nested dataclasses) and names
the dotted key, its valid choices and the nearest valid key in its ConfigError.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad key or value; its message is one line naming the key and the valid choices."""


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists) suitable for YAML/JSON and hashing."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``hint``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not a valid choice; choose one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_convert(v, a, key) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {hint.__name__} fields, got {value!r}")
        return build(hint, value, key + ".")
    return value


def _unknown_key(prefix: str, name: str, valid: list[str]) -> ConfigError:
    near = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(prefix + n for n in near)}?" if near else ""
    return ConfigError(f"unknown config key '{prefix}{name}'{hint} (valid at this level: {', '.join(valid)})")


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """An instance of dataclass ``cls`` from a (possibly partial) nested dict, every value type-checked."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in data.items():
        if name not in hints:
            raise _unknown_key(prefix, name, names)
        kwargs[name] = _convert(value, hints[name], prefix + name)
    return cls(**kwargs)


def parse_value(text: str) -> Any:
    """A command-line value: YAML scalars and lists (``40``, ``true``, ``null``, ``[480, 512]``)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def set_value(cfg: Any, key: str, value: Any) -> None:
    """Set dotted ``key`` on ``cfg`` in place, type-checked."""
    node: Any = cfg
    parts = key.split(".")
    prefix = ""
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            raise _unknown_key(prefix, part, names)
        hint = _hints(type(node))[part]
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(hint) and not isinstance(value, dict):
                raise ConfigError(f"{prefix}{part} is a section; set one of its keys, e.g. {prefix}{part}.{dataclasses.fields(hint)[0].name}=...")
            if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            setattr(node, part, _convert(value, hint, prefix + part))
        else:
            if not dataclasses.is_dataclass(hint):
                raise ConfigError(f"{prefix}{part} is a value, not a section: '{key}' cannot be set")
            node = getattr(node, part)
            prefix += part + "."


def split_override(text: str) -> tuple[str, Any]:
    """``"a.b=40"`` -> ``("a.b", 40)``."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. model.mask.components=40)")
    key, raw = text.split("=", 1)
    return key.strip(), parse_value(raw)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested plain dict as dotted keys: ``{"a": {"b": 40}}`` -> ``{"a.b": 40}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def get_value(cfg: Any, key: str) -> Any:
    """The value at dotted ``key``."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node
