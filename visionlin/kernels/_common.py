"""Shared input checks and precision helpers for the functional ops."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = [
    "check_heads_last",
    "fp32_reference",
    "is_floating",
    "reference_dtype",
    "same_floating_dtype",
    "supports_floating",
]


def check_heads_last(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, same_length: bool = True) -> None:
    """Validate heads-last ``[B, N, H, D]`` query/key/value tensors.

    Raises:
        ValueError: naming the offending shapes when ranks, batch, heads or lengths do not agree.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{op}: expected heads-last [B, N, H, D] tensors, got {q.shape=}, {k.shape=}, {v.shape=}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"{op}: batch sizes differ: {q.shape=}, {k.shape=}, {v.shape=}")
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        raise ValueError(f"{op}: head counts differ: {q.shape=}, {k.shape=}, {v.shape=}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{op}: query and key head dims differ: {q.shape[-1]=} vs {k.shape[-1]=}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{op}: key and value lengths differ: {k.shape[1]=} vs {v.shape[1]=}")
    if same_length and q.shape[1] != k.shape[1]:
        raise ValueError(f"{op}: self-attention needs equal query and key lengths, got {q.shape[1]=}, {k.shape[1]=}")


def is_floating(*tensors: torch.Tensor) -> list[str]:
    """Reasons (possibly none) why the tensors are not floating point."""
    return [f"dtype {t.dtype} is not floating point" for t in tensors if not t.is_floating_point()]


def supports_floating(*args: object, **kwargs: object) -> list[str]:
    """A backend ``supports()`` for implementations that take any floating dtype: checks the tensor arguments."""
    return is_floating(*(a for a in args if isinstance(a, torch.Tensor)))


def same_floating_dtype(*args: object, **kwargs: object) -> list[str]:
    """A backend ``supports()`` for native-precision implementations: the tensor arguments must be floating point
    and share one dtype (keyword arguments are not inspected)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    reasons = is_floating(*tensors)
    if len({t.dtype for t in tensors}) > 1:
        reasons.append("mixed dtypes " + ", ".join(str(t.dtype) for t in tensors))
    return reasons


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype references compute in: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def fp32_reference(device: torch.device) -> Iterator[None]:
    """Disable autocast for the enclosed reference math (it runs in float32 or float64)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield
