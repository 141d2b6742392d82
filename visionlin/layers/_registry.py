"""Registry of token-mixer (attention) layers, looked up by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["ATTN_LAYERS", "create_attn", "register_attn"]

ATTN_LAYERS: dict[str, type[nn.Module]] = {}


def register_attn(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding a token mixer to :data:`ATTN_LAYERS` under ``name``."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in ATTN_LAYERS and ATTN_LAYERS[name] is not cls:
            raise ValueError(f"attention layer {name!r} is already registered by {ATTN_LAYERS[name].__name__}")
        ATTN_LAYERS[name] = cls
        cls.attn_name = name
        return cls

    return wrap


def create_attn(name: str, dim: int, num_heads: int = 8, **kwargs: Any) -> nn.Module:
    """Build the token mixer registered as ``name``.

    Raises:
        ValueError: ``name`` is not registered (the message lists the registered names).
    """
    if name not in ATTN_LAYERS:
        raise ValueError(f"unknown attention layer {name!r}; choose one of {sorted(ATTN_LAYERS)}")
    cls = ATTN_LAYERS[name]
    accepted = _keywords(cls)
    unknown = sorted(set(kwargs) - accepted) if accepted is not None else []
    if unknown:
        allowed = sorted(accepted - {"self", "dim", "num_heads"})
        raise ValueError(f"attention layer {name!r} ({cls.__name__}) takes no keyword(s) {unknown}; it takes {allowed}")
    return cls(dim, num_heads=num_heads, **kwargs)


def _keywords(cls: type) -> set[str] | None:
    """The keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up the MRO (``None``: cannot tell)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
    return None
