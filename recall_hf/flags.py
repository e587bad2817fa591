"""Command-line flags generated from a dataclass's fields (HfArgumentParser-style), so each flag's help text,
default and choices live once, in `RecallConfig`. Standard library only: `recall-hf --help` stays fast."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Collection
from typing import Any

TYPES = {"int": int, "float": float, "str": str}


def _value_type(annotation: str) -> tuple[type | None, bool]:
    """`("int | None")` -> `(int, True)`: the scalar type of a field annotation and whether it is optional."""
    parts = [p.strip() for p in str(annotation).split("|")]
    optional = "None" in parts
    scalar = [p for p in parts if p != "None"]
    return (TYPES.get(scalar[0]) if len(scalar) == 1 else None), optional


def add_dataclass_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    only: Collection[str] | None = None,
    unset_defaults: bool = False,
) -> None:
    """One `--flag-name` per field of dataclass `cls` (or the fields in `only`), from its `help`/`choices` metadata.

    A `bool` field defaulting to `True` becomes `--no-<name>`, one defaulting to `False` becomes `--<name>`.
    Metadata `aliases` (as in HfArgumentParser) adds short flags (e.g. `("-k",)`).

    Args:
        unset_defaults: every flag defaults to `None`, so a caller can tell what was given on the command line
            from what was not (the daemon layers flags over a TOML file).
    """
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        help_text = f.metadata.get("help", "")
        flag = "--" + f.name.replace("_", "-")
        aliases = tuple(f.metadata.get("aliases", ()))
        if str(f.type) == "bool":
            negate = f.default is True
            name = f"--no-{f.name.replace('_', '-')}" if negate else flag
            default = None if unset_defaults else f.default
            shown = f"{help_text} On by default; this flag turns it off." if negate else help_text
            parser.add_argument(name, *aliases, dest=f.name, action="store_const", const=not negate,
                                default=default, help=shown)
            continue
        value_type, _ = _value_type(f.type)
        default = None if unset_defaults else f.default
        shown = f" (default {f.default})" if f.default is not None and not unset_defaults else ""
        parser.add_argument(*aliases, flag, dest=f.name, type=value_type, default=default,
                            choices=f.metadata.get("choices"), help=help_text + shown)


def dataclass_values(args: argparse.Namespace, cls: type, only: Collection[str] | None = None) -> dict[str, Any]:
    """The values of `cls`'s fields that `args` holds and that are not `None` (i.e. were given or defaulted)."""
    names = {f.name for f in dataclasses.fields(cls)} & (set(only) if only is not None else set(vars(args)))
    return {n: getattr(args, n) for n in sorted(names) if getattr(args, n, None) is not None}
