"""One way to check a command-line value: the ``type=`` callables of ``visionlin train`` / ``validate`` / ``bench`` are
built on :func:`checked` (their messages name the text given and what is allowed)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["checked"]


def checked(cast: Callable[[Any], Any], text: Any, ok: Callable[[Any], bool], what: str) -> Any:
    """``cast(text)`` if it succeeds, ``text`` is not a bool (nor, for ``int``, a float with a fraction: a recipe's
    ``epochs: 2.9`` was cut to 2) and ``ok`` holds for the value; else ``argparse.ArgumentTypeError("'<text>' is not
    <what>")`` (a usage error naming the value, exit status 2)."""
    try:
        v = cast(text)
    except (TypeError, ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    fraction = cast is int and isinstance(text, float) and not text.is_integer()
    if isinstance(text, bool) or fraction or not ok(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return v
