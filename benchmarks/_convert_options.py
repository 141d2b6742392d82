"""``--set METHOD.OPTION=VALUE`` for the converter benchmarks (convert_speed.py, dit_quality.py): parsing and
validation against ``visionlin.convert``'s options, one place for both."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from typing import Any


def method_option(methods: Iterable[str], example: str = "sla.sparsity=0.9") -> Callable[[str], tuple[str, str, Any]]:
    """An argparse ``type`` for ``METHOD.OPTION=VALUE`` (the value JSON if it parses, else the bare string)."""
    allowed = [m for m in methods if m != "dense"]

    def parse(text: str) -> tuple[str, str, Any]:
        key, sep, raw = text.partition("=")
        method, dot, opt = key.partition(".")
        if not sep or not dot or method not in allowed or not opt:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not METHOD.OPTION=VALUE with METHOD one of {', '.join(allowed)} (e.g. {example})"
            )
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare string ("code", "elu")
        return method, opt, value

    return parse


def resolve_options(
    parser: argparse.ArgumentParser, defaults: dict[str, dict], set_options: list[tuple[str, str, Any]]
) -> dict[str, dict]:
    """``defaults`` with the ``--set`` values applied, each method's options validated by the converter (a bad one
    exits through ``parser.error``)."""
    from visionlin.convert._methods import validate_options

    options = {m: dict(o) for m, o in defaults.items()}
    for method, opt, value in set_options:
        options.setdefault(method, {})[opt] = value
    for method, opts in options.items():
        try:
            validate_options(method, opts)
        except ValueError as e:
            parser.error(f"argument --set: {e}")
    return options
