"""Backend tables for the functional attention ops.

Every op (``linear_attention``, ``focused_linear_attention``, ...) owns an :class:`Op` with an ordered list of
backends. A backend declares ``supports(*args, **kwargs) -> list[str]``: the reasons it cannot run this call (an
empty list means it can). ``backend=None`` picks the first backend that can run and logs each rejection once at
DEBUG level; an explicit backend that cannot run raises :class:`NotImplementedError` with its reasons.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Backend", "Op", "get_op", "list_ops"]

_logger = logging.getLogger(__name__)
_OPS: dict[str, Op] = {}


def _always(*args: Any, **kwargs: Any) -> list[str]:
    return []


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    Attributes:
        name: Short name users pass as ``backend=``.
        fn: The implementation; same signature as the op.
        supports: Returns the reasons this backend cannot run a call (empty = can run).
    """

    name: str
    fn: Callable[..., Any]
    supports: Callable[..., list[str]] = _always


class Op:
    """An attention op with an ordered backend table."""

    def __init__(self, name: str) -> None:
        if name in _OPS:
            raise ValueError(f"op {name!r} is already registered")
        self.name = name
        self.backends: dict[str, Backend] = {}
        self._logged: set[tuple[str, tuple[str, ...]]] = set()
        _OPS[name] = self

    def register(self, name: str, fn: Callable[..., Any], supports: Callable[..., list[str]] = _always) -> None:
        """Append a backend; earlier registrations are preferred by automatic selection."""
        if name in self.backends:
            raise ValueError(f"backend {name!r} is already registered for op {self.name!r}")
        self.backends[name] = Backend(name, fn, supports)

    def select(self, *args: Any, backend: str | None = None, caller: str | None = None, **kwargs: Any) -> Backend:
        """Return the backend that will run this call; ``caller`` (a public function that runs on this op) names the
        call in the messages, with the op.

        Raises:
            ValueError: ``backend`` names no registered backend.
            NotImplementedError: the named backend (or, with ``backend=None``, every backend) cannot run the call.
        """
        where = self.name if caller is None else f"{caller} (op {self.name})"
        if backend is not None:
            if not isinstance(backend, str) or backend not in self.backends:  # (a list: "unhashable type")
                raise ValueError(f"{where}: unknown backend {backend!r}; choose one of {sorted(self.backends)}")
            chosen = self.backends[backend]
            reasons = chosen.supports(*args, **kwargs)
            if reasons:
                raise NotImplementedError(f"{where}: backend {backend!r} cannot run this call: {'; '.join(reasons)}")
            return chosen
        rejected = []
        for candidate in self.backends.values():
            reasons = candidate.supports(*args, **kwargs)
            if not reasons:
                return candidate
            rejected.append((candidate.name, tuple(reasons)))
            key = (candidate.name, tuple(reasons))
            # Logged in eager mode only: under torch.compile the log call is a graph break and the growing set a
            # guard that recompiles (the eager run, or the first compiled one, has logged it already).
            if not torch.compiler.is_compiling() and key not in self._logged:
                self._logged.add(key)
                _logger.debug("%s: backend %r rejected: %s", self.name, candidate.name, "; ".join(reasons))
        detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in rejected)
        raise NotImplementedError(f"{where}: no backend can run this call ({detail})")

    def __call__(self, *args: Any, backend: str | None = None, caller: str | None = None, **kwargs: Any) -> Any:
        return self.select(*args, backend=backend, caller=caller, **kwargs).fn(*args, **kwargs)

    def supports(self, *args: Any, backend: str, **kwargs: Any) -> list[str]:
        """Reasons ``backend`` cannot run this call (empty if it can)."""
        if backend not in self.backends:
            return [f"unknown backend {backend!r}; choose one of {sorted(self.backends)}"]
        return self.backends[backend].supports(*args, **kwargs)


def get_op(name: str) -> Op:
    """Return the registered op called ``name``."""
    if not isinstance(name, str) or name not in _OPS:
        raise ValueError(f"unknown op {name!r}; choose one of {sorted(_OPS)}")
    return _OPS[name]


def list_ops() -> dict[str, list[str]]:
    """Map each op name to its backend names, in preference order."""
    return {name: list(op.backends) for name, op in sorted(_OPS.items())}
