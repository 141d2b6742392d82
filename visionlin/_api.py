"""Package-level helpers: the model list and per-model backend selection."""

from __future__ import annotations

import fnmatch

import timm
from torch import nn

from .kernels import list_ops
from .layers import TokenMixer

__all__ = ["list_models", "set_backend"]


def list_models(filter: str = "") -> list[str]:
    """Names of the models visionlin registers with timm (optionally matching a wildcard ``filter``)."""
    names = [
        n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("visionlin.models.")
    ]
    return sorted(n for n in names if not filter or fnmatch.fnmatch(n, filter))


def set_backend(model: nn.Module, backend: str | None) -> int:
    """Set the kernel backend of every visionlin token mixer in ``model`` (``None`` = automatic choice).

    The choice is per module instance: other models are unaffected. A mechanism whose op has no such backend raises
    ``NotImplementedError`` (listing the reasons) at its next forward, never silently falls back.

    Returns:
        The number of token mixers changed.

    Raises:
        ValueError: ``backend`` is not the name of any registered backend.
    """
    if backend is not None:
        known = sorted({b for backends in list_ops().values() for b in backends})
        if backend not in known:
            raise ValueError(f"unknown backend {backend!r}; registered backends: {known}")
    count = 0
    for module in model.modules():
        if isinstance(module, TokenMixer):
            module.backend = backend
            count += 1
    return count
