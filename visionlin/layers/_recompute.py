"""Keep a cheap intermediate out of what autograd saves between the forward and the backward: recompute it there.

:func:`call_recomputing` is for a tensor that the ops after it save (an op's input is often kept for its
backward) but that costs far less to compute again than to hold, such as Agent attention's agents, pooled from the
queries that the attention keeps anyway: 12 ``[B, 49, C]`` tensors over Agent-DeiT-S's layers (55 MiB at batch 128,
bf16), which put its training step above the dense twin's. Eager autograd only: under ``torch.compile`` /
``torch.export`` the partitioner decides what is saved and recomputed, and FX or ``torch.jit`` tracing runs no
autograd, so it is a plain call there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from ..kernels._common import real_plain_tensor, tracing

__all__ = ["call_recomputing", "observe_saved"]


def _outer_pack() -> Callable[[torch.Tensor], torch.Tensor] | None | bool:
    """The saved-tensor hooks active now, in this thread: ``None`` (none), the pack function of an
    :func:`observe_saved` context (the innermost hooks are one), or ``False`` (other hooks, hooks disabled, or a torch
    that cannot tell)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    enabled = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)
    if top is None or enabled is None or not enabled():
        return False
    hooks = top(False)
    if hooks is None:
        return None
    return hooks[0] if getattr(hooks[0], "_visionlin_observer", False) else False


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@contextlib.contextmanager
def observe_saved(look: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Saved-tensor hooks that only look: ``look(t)`` for every tensor autograd saves while the context is open, each
    kept as it is. Unlike other hooks, these let :func:`call_recomputing` inside them keep its recipes (``look`` does
    not see the tensors it recomputes), so a memory measurement sees what a plain training step saves."""

    def pack(t: torch.Tensor) -> torch.Tensor:
        look(t)
        return t

    pack._visionlin_observer = True  # type: ignore[attr-defined]
    with torch.autograd.graph.saved_tensors_hooks(pack, _identity):
        yield


class _Recipe(NamedTuple):
    """A saved view of the recomputed tensor's storage, in place of the tensor."""

    size: torch.Size
    stride: tuple[int, ...]
    offset: int


def call_recomputing(tensor: torch.Tensor, recompute: Callable[[], torch.Tensor], fn: Callable[..., Any], *args: Any,
                     **kwargs: Any) -> Any:  # fmt: skip
    """``fn(*args, **kwargs)``, except that every tensor autograd saves meanwhile that views ``tensor``'s storage
    (``tensor`` itself, its head-split or transposed views) is saved as a view recipe: the backward calls
    ``recompute()`` and takes the same view of its result. ``recompute`` must return ``tensor``'s values again,
    contiguous, in its shape and dtype (a mismatch raises ``RuntimeError`` in the backward instead of giving a wrong
    gradient); it may read tensors the saved graph keeps anyway (the recipe holds ``recompute`` until the backward).
    Each recipe recomputes once per backward (an op that saves two views of ``tensor`` costs two recomputations); a
    view saved after ``tensor`` was written in place is saved as it is.

    A plain call when ``tensor`` does not own a whole storage contiguously (a view of something larger: its storage
    stays alive regardless), when no gradient is recorded, while compiling or tracing (see the module docstring),
    under saved-tensor hooks other than :func:`observe_saved`'s (non-reentrant activation checkpointing, offloading:
    they own what is saved, and their recomputation must see the same saved tensors as their forward), and where
    saved-tensor hooks are disabled.
    """
    if (
        tracing()
        or not torch.is_grad_enabled()
        or (observer := _outer_pack()) is False
        or not real_plain_tensor(tensor)
        or not tensor.is_contiguous()
        or tensor.storage_offset() != 0
        or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()
    ):
        return fn(*args, **kwargs)
    ptr, shape, dtype, device = tensor.untyped_storage().data_ptr(), tensor.shape, tensor.dtype, tensor.device
    # the backward runs outside the forward's autocast region: the recomputation runs inside an equal one
    autocast = {"enabled": torch.is_autocast_enabled(device.type), "dtype": torch.get_autocast_dtype(device.type)}

    observer = observer or _identity
    version = tensor._version

    def pack(t: torch.Tensor) -> torch.Tensor | _Recipe:
        if (
            t.device == device
            and t.dtype == dtype
            and real_plain_tensor(t)
            and t.layout == torch.strided
            and t.untyped_storage().data_ptr() == ptr
            and t._version == version  # written in place since: its values are no longer what recompute() gives
        ):
            return _Recipe(t.size(), t.stride(), t.storage_offset())
        return observer(t)

    def unpack(saved: torch.Tensor | _Recipe) -> torch.Tensor:
        if not isinstance(saved, _Recipe):
            return saved
        with torch.autocast(device.type, **autocast):
            base = recompute()
        if (
            base.shape != shape
            or base.dtype != dtype
            or base.device != device
            or not base.is_contiguous()
            or base.storage_offset() != 0
        ):
            raise RuntimeError(
                f"call_recomputing: the recomputed tensor is {tuple(base.shape)} {base.dtype} on {base.device} "
                f"(contiguous: {base.is_contiguous()}, storage offset {base.storage_offset()}), the forward's was "
                f"{tuple(shape)} {dtype} on {device}, contiguous at offset 0"
            )
        return base.as_strided(saved.size, saved.stride, saved.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return fn(*args, **kwargs)
