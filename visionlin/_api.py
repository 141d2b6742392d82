"""Package-level helpers: the model list and per-model backend selection."""

from __future__ import annotations

import fnmatch

import timm
from torch import nn

from .kernels import list_ops
from .layers import TokenMixer

__all__ = ["list_models", "set_backend"]


def list_models(filter: str = "") -> list[str]:
    """Names of the models visionlin registers with timm (optionally matching a wildcard ``filter``).

    Raises:
        ValueError: ``filter`` is not a string.
    """
    if not isinstance(filter, str):
        raise ValueError(f"filter={filter!r} must be a wildcard string such as 'infvit*' (got {type(filter).__name__})")
    names = [
        n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("visionlin.models.")
    ]
    return sorted(n for n in names if not filter or fnmatch.fnmatch(n, filter))


def set_backend(model: nn.Module, backend: str | None) -> int:
    """Set the kernel backend of every visionlin token mixer in ``model`` (``None`` = automatic choice).

    The choice is per module instance: other models are unaffected. Every mixer's ops must have a backend of that
    name, checked before anything changes (the model is left as it was on error). A backend that exists but cannot
    run a particular call (a dtype, device or option it does not handle) raises ``NotImplementedError`` listing the
    reasons at that forward, never silently falls back.

    Returns:
        The number of token mixers changed.

    Raises:
        ValueError: ``model`` is not an ``nn.Module``, ``backend`` is not a string or ``None``, it names no registered
            backend, or some of the model's mixers call an op without that backend (the message lists them and the
            backends they have).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model must be an nn.Module (e.g. timm.create_model(...)), got {type(model).__name__}: {model!r:.80}"
        )
    if backend is not None and not isinstance(backend, str):
        raise ValueError(f"backend={backend!r} must be a backend name (str) or None")
    mixers = [m for m in model.modules() if isinstance(m, TokenMixer)]
    if backend is not None:
        ops = list_ops()
        known = sorted({b for backends in ops.values() for b in backends})
        if backend not in known:
            raise ValueError(f"unknown backend {backend!r}; registered backends: {known}")
        lacking = sorted(
            {(type(m).__name__, op) for m in mixers for op in m.kernel_ops if backend not in ops.get(op, [])}
        )
        if lacking:
            detail = "; ".join(f"{cls} uses {op} (backends {ops.get(op, [])})" for cls, op in lacking)
            raise ValueError(f"backend {backend!r} is not available for every mixer of this model: {detail}")
    for module in mixers:
        module.backend = backend
    return len(mixers)
