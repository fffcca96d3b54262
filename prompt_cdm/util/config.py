"""Dataclass configs: self-validating, TOML/JSON round trip, type-checked `--set key=value` overrides.

A config is a (possibly nested) dataclass. `from_dict` refuses unknown keys and names the valid
ones; `apply_overrides(cfg, ["train.lr=1e-4"])` walks dotted keys, parses the value as TOML and
checks it against the field's type. Validation lives in each class's `__post_init__`.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is wrong; the message says what and how to fix it."""


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(v, args[0], key) for v in value)
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_check_type(v, a, key) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return origin(_check_type(v, inner, key) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a dict, refusing unknown keys (named with the valid ones)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a table, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys here: {', '.join(prefix + n for n in names)}"
        )
    kwargs = {k: _check_type(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def to_dict(cfg) -> dict:
    """Plain dict (tuples become lists) suitable for JSON/TOML."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def _strip_none(d):
    if isinstance(d, dict):
        return {k: _strip_none(v) for k, v in d.items() if v is not None}
    return d


def to_toml(cfg) -> str:
    import tomli_w

    return tomli_w.dumps(_strip_none(to_dict(cfg)))


def to_json(cfg) -> str:
    return json.dumps(to_dict(cfg), indent=2)


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"recipe {path} does not exist; see recipes/ for the shipped ones")
    if not path.is_file():
        raise ConfigError(f"recipe {path} is not a file; pass a TOML recipe (see recipes/)")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe {path} is not valid TOML ({e}); fix the syntax and retry") from None
    except RecursionError:
        raise ConfigError(f"recipe {path} is nested too deeply to be a recipe; fix it and retry") from None


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        return text  # bare words are strings: --set data.domain=stars


def apply_overrides(cfg: T, overrides: list[str] | None) -> T:
    """Return a copy of `cfg` with `key.sub=value` overrides applied, each type-checked."""
    if not overrides:
        return cfg
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. unet.lr=1e-4)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node, cls = data, type(cfg)
        for i, p in enumerate(parts):
            names = [f.name for f in dataclasses.fields(cls)]
            if p not in names:
                where = ".".join(parts[:i])
                valid = ", ".join(f"{where}.{n}" if where else n for n in names)
                raise ConfigError(
                    f"unknown config key {key!r} ({p!r} is not a field of {where or 'the top level'}); "
                    f"valid keys here: {valid}"
                )
            if i == len(parts) - 1:
                node[p] = _parse_value(text.strip())
            else:
                tp = _hints(cls)[p]
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"config key {'.'.join(parts[: i + 1])!r} is a value, not a section")
                node, cls = node[p], tp
    return from_dict(type(cfg), data)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
         smoke: bool = False) -> T:
    """Load `cls` from a TOML recipe, then apply overrides.

    A recipe's `[smoke]` table is a tiny version of the run (what tests execute); with
    `smoke=True` it is merged over the recipe. Without it, the table is ignored."""
    data: dict = {}
    if path is not None:
        data = read_toml(path)
        smoke_table = data.pop("smoke", None)
        if smoke:
            if smoke_table is None:
                raise ConfigError(f"recipe {path} has no [smoke] section")
            data = _deep_merge(data, smoke_table)
    cfg = from_dict(cls, data)
    return apply_overrides(cfg, overrides)
