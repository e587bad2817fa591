"""Flags generated from dataclass fields (recall_hf.flags): types, booleans, choices, aliases, unset defaults."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from recall_hf.flags import add_dataclass_args, dataclass_values


@dataclass
class Knobs:
    rank: int | None = field(default=None, metadata={"help": "A rank.", "aliases": ("-r",)})
    scale: float = field(default=0.5, metadata={"help": "A scale."})
    mode: str = field(default="a", metadata={"help": "A mode.", "choices": ("a", "b")})
    prior: bool = field(default=True, metadata={"help": "Use the prior."})
    extra: bool = field(default=False, metadata={"help": "An extra pass."})


def parse(argv, **kwargs):
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Knobs, **kwargs)
    return parser.parse_args(argv)


def test_types_booleans_choices_and_aliases():
    args = parse(["-r", "4", "--scale", "2", "--mode", "b", "--no-prior", "--extra"])
    assert Knobs(**dataclass_values(args, Knobs)) == Knobs(rank=4, scale=2.0, mode="b", prior=False, extra=True)
    assert Knobs(**dataclass_values(parse([]), Knobs)) == Knobs()
    with pytest.raises(SystemExit):
        parse(["--mode", "c"])
    with pytest.raises(SystemExit):
        parse(["--rank", "four"])


def test_only_and_unset_defaults():
    args = parse(["--scale", "3"], only=("scale", "prior"), unset_defaults=True)
    assert dataclass_values(args, Knobs) == {"scale": 3.0}  # what was not given stays unset, for a config file
    assert not hasattr(args, "rank")
    assert dataclass_values(parse(["--no-prior"], unset_defaults=True), Knobs) == {"prior": False}
