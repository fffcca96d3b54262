"""Command-line flags generated from a config dataclass (transformers' HfArgumentParser idea, kept small).

Each field becomes `--field-name` with the field's type, default and `metadata["help"]`; `bool` fields
with a False default become switches; `list[str]` / `tuple[str, ...]` fields take one comma-separated
value; `X | None` takes an X. `--set KEY=VALUE` (type-checked by util.config) then overrides any field,
so every field is reachable even when a command spells some of them by hand.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Iterable, Mapping


def _base(tp):
    """X of `X | None`; the type itself otherwise."""
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _comma_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def add_fields(parser: argparse.ArgumentParser, cls, *, skip: Iterable[str] = (),
               aliases: Mapping[str, Iterable[str]] | None = None, defaults: Mapping[str, Any] | None = None) -> list[str]:
    """Add one flag per field of dataclass `cls` (minus `skip`); `aliases`: extra spellings of a field's flag;
    `defaults`: command-specific defaults. Returns the field names added (their argparse dest)."""
    hints = typing.get_type_hints(cls)
    aliases, defaults, skip = dict(aliases or {}), dict(defaults or {}), set(skip)
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp = _base(hints[f.name])
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        flags = [f"--{f.name.replace('_', '-')}", *aliases.get(f.name, ())]
        kw: dict[str, Any] = {"dest": f.name, "default": default, "help": f.metadata.get("help", "")}
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = "store_true" if not default else argparse.BooleanOptionalAction
        elif origin in (list, tuple):
            kw.update(type=_comma_list, metavar="A,B")
        elif tp in (int, float, str):
            kw["type"] = tp
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for {tp!r}")
        parser.add_argument(*flags, **kw)
        added.append(f.name)
    return added


def request_fields(cls, skip: Iterable[str] = ()) -> list[str]:
    """The init fields of dataclass `cls` other than `skip` (the flags `add_fields` declared for it)."""
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in set(skip)]


def add_set(parser: argparse.ArgumentParser, what: str, example: str = "steps=10") -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a field of the {what} (type-checked; repeatable), e.g. --set {example}")


def build(cls, args: argparse.Namespace, names: Iterable[str], extra: Mapping[str, Any] | None = None):
    """`cls` from the parsed flags `names` plus `extra`, then the `--set` overrides (type-checked)."""
    from ..util.config import apply_overrides

    values = {n: getattr(args, n) for n in names}
    values.update(extra or {})
    hints = typing.get_type_hints(cls)
    for n, v in values.items():  # comma lists arrive as lists; tuple fields take tuples
        if isinstance(v, list) and typing.get_origin(_base(hints[n])) is tuple:
            values[n] = tuple(v)
    return apply_overrides(cls(**values), getattr(args, "overrides", None) or [])
