"""A cheap eager path around the Triton custom ops.

Every Triton kernel is reached through a ``torch.library.custom_op`` pair (forward and backward, with fake and
autograd registrations): that is what lets ``torch.compile(fullgraph=True)``, ``torch.export`` and FX see one opaque
node. In eager mode the same dispatch costs a lot of host time: measured on an H200 host, a custom op's forward plus its
registered backward took about 0.6 ms of CPU per call in a training step (``benchmarks/host_overhead.py --train``),
which left ``infvit_small``'s training step host-bound (41 ms wall for 20 ms of kernels).

:func:`eager_op` wraps a forward op so that, when every tensor argument is a plain eager tensor (no compile, export,
FX or functorch tracing, no fake or functional tensors, no tensor subclasses), the call goes straight to the op's
Python implementation through a ``torch.autograd.Function`` built from the op's own ``setup_context`` and backward
formula; anything else takes the custom op, unchanged. Both paths run the same kernels, so their results are
bitwise identical (tested). :func:`eager_call` does the same for ops without autograd (the backward ops).

:func:`direct` tells an op's implementation whether it was reached this way (in this thread). Host-side caches of
device tensors (NA's bias-table index) are kept on that path only: through the dispatcher the op may run inside
``torch.compile``'s CUDA graphs (``mode="reduce-overhead"``), whose warm-up and recording allocate from the graphs'
private pool, and a cached tensor left alive there fails the graphs' liveness check.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from .._common import PLAIN_TENSOR_TYPES, real_plain_tensor, tracing

__all__ = ["direct", "eager_call", "eager_op", "plain_eager"]

_DIRECT = threading.local()  # .depth: direct calls in progress in this thread (the backward runs on autograd's)


def direct() -> bool:
    """True inside an op implementation called directly by :func:`eager_call` / :func:`eager_op` (plain eager
    tensors, no dispatcher), in this thread; False through the dispatcher (compile, export, CUDA graphs, FX, ...)."""
    return getattr(_DIRECT, "depth", 0) > 0


def _direct_call(fn: Callable, *args: Any) -> Any:
    _DIRECT.depth = getattr(_DIRECT, "depth", 0) + 1
    try:
        return fn(*args)
    finally:
        _DIRECT.depth -= 1


def plain_eager(args: tuple[Any, ...]) -> bool:
    """True when the call can bypass the dispatcher: eager mode and every tensor in ``args`` a plain, real tensor."""
    if tracing():
        return False
    for a in args:
        t = type(a)
        if t in PLAIN_TENSOR_TYPES:
            if not real_plain_tensor(a):
                return False
        elif t is not int and t is not float and t is not bool and a is not None and isinstance(a, torch.Tensor):
            return False  # a tensor subclass (fake, functional, DTensor, ...)
    return True


def _impl(op: Any) -> Callable | None:
    """The Python function behind a ``torch.library.custom_op`` (``None`` if this torch hides it)."""
    fn = getattr(op, "_init_fn", None)
    return fn if callable(fn) else None


def eager_call(op: Any) -> Callable:
    """``op`` (a custom op without autograd) called directly on plain eager tensors, else through the dispatcher."""
    impl = _impl(op)
    if impl is None:
        return op

    def call(*args: Any) -> Any:
        return _direct_call(impl, *args) if plain_eager(args) else op(*args)

    call.__name__ = f"eager_{getattr(op, '_name', 'op')}"
    return call


def eager_op(op: Any, setup_context: Callable, backward: Callable) -> Callable:
    """``op`` with a cheap eager path; ``setup_context`` and ``backward`` are the ones given to
    ``op.register_autograd`` (same signatures: ``setup_context(ctx, inputs, output)``, ``backward(ctx, *grads)``
    returning one gradient or ``None`` per input). Gradients of unused outputs arrive as ``None`` (no zero fills; those
    of non-differentiable outputs always do): when every one is ``None`` the eager path answers ``None`` for every input
    without calling ``backward``; otherwise ``backward`` must accept ``None`` for the ones that are."""
    impl = _impl(op)
    if impl is None:
        return op

    def forward(ctx, *args):
        out = _direct_call(impl, *args)
        setup_context(ctx, args, out)
        ctx.set_materialize_grads(False)  # gradients of unused outputs arrive as None (no zero fills)
        ctx.n_inputs = len(args)
        return out

    def backward_(ctx, *grads):
        if all(g is None for g in grads):  # no output used
            return (None,) * ctx.n_inputs
        return backward(ctx, *grads)

    # Named per op (the autograd node shows as ``Eager_<op>Backward`` in profiles and ``grad_fn``).
    function = type(
        f"Eager_{getattr(op, '_name', 'op')}",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward_)},
    )

    def call(*args: Any) -> Any:
        if not plain_eager(args):
            return op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return function.apply(*args)
        return _direct_call(impl, *args)

    call.__name__ = f"eager_{getattr(op, '_name', 'op')}"
    return call
