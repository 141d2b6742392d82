"""Parameter-derived tensors kept between inference forwards.

Several layers turn parameters into the tensors their kernels take on every forward: a cast to the activations'
dtype, a softplus, a per-head repeat, a resampled bias table. Each is a few microseconds of GPU work and one or more
kernel launches: on the H200 host where the 224 px forwards were host-bound (``benchmarks/results/h200/
host_overhead_infer_1866462.log``: InfViT-S 18.5 ms eager against 8.9 ms replayed from a CUDA graph, FLatten-DeiT-S
29.8 against 13.0), every launch costs ~40-70 us of host time. Without gradients, in plain eager mode, such a tensor
is kept on its module and reused while its sources are unchanged.

A key names every source tensor by identity, storage address, version counter (bumped by every in-place update: an
optimizer step, ``load_state_dict``, ``param.data.copy_``), device and dtype, plus whatever else the value depends on
(the target dtype, a grid size). Nothing is kept while gradients are on (the value must be part of the autograd
graph), while compiling, exporting or tracing, for fake / meta / functorch tensors, or during CUDA-graph capture.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

import torch
from torch import nn

from ..kernels._common import values_are_checkable

__all__ = ["cached", "frozen_key"]

T = TypeVar("T")


def frozen_key(*tensors: torch.Tensor | None, extra: tuple[Hashable, ...] = ()) -> tuple | None:
    """A key that identifies the current values of ``tensors`` (``None`` entries allowed) and ``extra``, or ``None``
    where nothing may be cached (see the module docstring)."""
    if torch.is_grad_enabled():
        return None
    real = [t for t in tensors if t is not None]
    if any(type(t) is not nn.Parameter and type(t) is not torch.Tensor for t in real):
        return None  # subclasses (FX proxies' tensors, DTensor, ...) keep the plain path
    if not values_are_checkable(*real):
        return None
    try:
        ids = tuple(None if t is None else (id(t), t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)
    except RuntimeError:  # inference tensors have no version counter
        return None
    return (torch.is_inference_mode_enabled(), *extra, *ids)


def cached(module: nn.Module, name: str, key: tuple | None, build: Callable[[], T]) -> T:
    """``build()``, or the value kept on ``module`` under ``name`` when it was built for ``key``. One value per name is
    kept (the latest key's); a ``None`` key builds and drops what was kept (a training step frees it)."""
    if key is None:
        if not torch.compiler.is_compiling():  # (a traced program must not mutate the module)
            module.__dict__.get("_derived_cache", {}).pop(name, None)
        return build()
    store = module.__dict__.setdefault("_derived_cache", {})
    hit = store.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = build()
    store[name] = (key, value)
    return value
