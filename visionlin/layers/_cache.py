"""Parameter-derived tensors kept between inference forwards.

Several layers turn parameters into the tensors their kernels take on every forward: a cast to the activations'
dtype, a softplus, a per-head repeat, a resampled bias table. Each is a few microseconds of GPU work and one or more
kernel launches: on the H200 host where the 224 px forwards were host-bound (``benchmarks/results/h200/
host_overhead_infer_1866462.log``: InfViT-S 18.5 ms eager against 8.9 ms replayed from a CUDA graph, FLatten-DeiT-S
29.8 against 13.0), every launch costs ~40-70 us of host time. Without gradients, in plain eager mode, such a tensor
is kept for its module and reused while its sources are unchanged.

A key names every source tensor by identity, storage address, version counter, device and dtype, plus whatever else
the value depends on (the target dtype, a grid size); the kept entry also holds the sources' storages, so an address
in a key is never reused by another tensor while the entry lives. The version counter moves with every in-place
update through the parameter itself: an optimizer step, ``load_state_dict``, ``with torch.no_grad(): p.copy_(...)``,
EMA updates of ``state_dict()`` tensors. It does **not** move for in-place updates through ``p.data`` (``.data`` is a
new tensor with its own counter): code that edits weights that way must call :func:`clear_derived_cache` before the
next inference forward (or set :data:`KEEP` to ``False``).

Nothing is kept while gradients are on (the value must be part of the autograd graph), while compiling, exporting or
tracing, for fake / meta / functorch / subclass tensors, or during CUDA-graph capture. Entries live in a table keyed
weakly by module: copies, pickles and ``state_dict`` of a model carry none of them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch
from torch import nn

from ..kernels._common import capturing, real_plain_tensor, tracing

__all__ = ["KEEP", "cached", "clear_derived_cache", "frozen_key"]

T = TypeVar("T")

#: Keep derived tensors between inference forwards (``False``: rebuild them on every forward).
KEEP = True
_STORE: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[tuple, Any]]] = weakref.WeakKeyDictionary()


class _Pin:
    """The source tensors' storages, carried in a key so that the kept entry holds them; equal to any other pin (the
    addresses in the key already identify the storages). Built holding the tensors; :func:`cached` swaps them for
    their storages when it keeps the entry (a hit's key is compared and dropped: no storage objects made per call)."""

    __slots__ = ("storages",)

    def __init__(self, sources: list[Any]) -> None:
        self.storages = sources

    def pin(self) -> None:
        self.storages = [t.untyped_storage() if isinstance(t, torch.Tensor) else t for t in self.storages]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Pin)

    def __hash__(self) -> int:
        return 0


def frozen_key(*tensors: torch.Tensor | None, extra: tuple[Hashable, ...] = ()) -> tuple | None:
    """A key that identifies the current values of ``tensors`` (``None`` entries allowed) and ``extra``, or ``None``
    where nothing may be kept (see the module docstring)."""
    if not KEEP or torch.is_grad_enabled() or tracing() or capturing():  # (tracing first: the checks below are
        return None  # C calls that torch.compile cannot trace)
    ids: list[Any] = []
    real = []
    for t in tensors:
        if t is None:
            ids.append(None)
            continue
        if not real_plain_tensor(t):
            return None  # subclasses (fake, functional, DTensor, ...), meta and functorch tensors keep the plain path
        try:
            ids.append((id(t), t.data_ptr(), t._version, t.device, t.dtype))
        except RuntimeError:  # inference tensors have no version counter
            return None
        real.append(t)
    return (torch.is_inference_mode_enabled(), *extra, *ids, _Pin(real))


def cached(module: nn.Module, name: str, key: tuple | None, build: Callable[[], T]) -> T:
    """``build()``, or the value kept for ``module`` under ``name`` when it was built for ``key``. One value per name is
    kept (the latest key's); a ``None`` key builds and drops what was kept (a training step frees it)."""
    if key is None:
        if not torch.compiler.is_compiling():  # (a traced program must not mutate state)
            store = _STORE.get(module)
            if store:
                store.pop(name, None)
        return build()
    store = _STORE.get(module)
    if store is None:
        store = _STORE[module] = {}
    hit = store.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = build()
    for part in key:
        if type(part) is _Pin:
            part.pin()
    store[name] = (key, value)
    return value


def kept(module: nn.Module) -> dict[str, Any]:
    """The values kept for ``module`` by name (for tests and debugging)."""
    return {name: entry[1] for name, entry in _STORE.get(module, {}).items()}


def clear_derived_cache(model: nn.Module | None = None) -> None:
    """Drop the derived tensors kept for ``model`` and its submodules (every module with ``None``): call it after
    editing parameters in place through ``.data``, which their version counters do not see."""
    if model is None:
        _STORE.clear()
        return
    if not isinstance(model, nn.Module):
        raise TypeError(f"clear_derived_cache: model must be an nn.Module or None, got {type(model).__name__}")
    for m in model.modules():
        _STORE.pop(m, None)
