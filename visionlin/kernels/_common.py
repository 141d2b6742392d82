"""Shared input checks and precision helpers for the functional ops.

Every op validates its arguments with these helpers, in its public function and in its reference alike, before any
backend runs:

* :func:`check_heads_last`: ranks, matching batch / heads / head dims / lengths, devices, floating dtypes, and the
  degenerate sizes (``M = 0`` keys or ``D = 0`` channels raise; ``B = 0``, ``N = 0``, ``H = 0`` and ``Dv = 0`` give
  an empty output of the right shape).
* :func:`check_real` and :func:`check_flag`: Python hyper-parameters (``eps``, ``scale``, ``dropout_p``, ...).
* :func:`check_side_tensor`: side tensors (biases, per-channel scales, tables): type, dtype, device, broadcasting.
* :func:`check_tensor_values`: the only check that reads tensor VALUES. It needs a host sync, so it runs in eager
  mode only and is skipped while ``torch.compile`` / ``torch.export`` / FX / ``vmap`` trace (see
  :func:`values_are_checkable`); keeping every value check behind it lets a later speed change revisit all of them
  in one place. Shape, dtype and device checks are free and always run.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch._guards import detect_fake_mode

__all__ = [
    "as_sdpa_mask",
    "check_flag",
    "check_heads_last",
    "check_real",
    "check_side_tensor",
    "check_tensor_values",
    "fp32_reference",
    "is_floating",
    "may_keep_tensors",
    "pow2_floor",
    "reference_dtype",
    "same_floating_dtype",
    "sdpa",
    "supports_floating",
    "capturing",
    "real_plain_tensor",
    "tracing",
    "values_are_checkable",
]


def check_heads_last(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, same_length: bool = True) -> None:
    """Validate heads-last ``[B, N, H, D]`` query/key/value tensors.

    ``B = 0`` (no batch), ``N = 0`` (no queries), ``H = 0`` (no heads) and ``Dv = 0`` (no value channels) are valid
    and give an empty output. ``M = 0`` (no keys) raises: a query attending to an empty key set has no defined value
    (the normalisations divide by zero), whatever the op. ``D = 0`` raises too: scores need at least one channel
    (and the default scales ``D ** -0.5`` / ``1 / D`` are undefined).

    Raises:
        ValueError: naming the offending shapes, dtypes or devices.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{op}: expected heads-last [B, N, H, D] tensors, got {q.shape=}, {k.shape=}, {v.shape=}")
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        raise ValueError(
            f"{op}: q, k and v must be floating point (float16, bfloat16, float32 or float64), "
            f"got {q.dtype=}, {k.dtype=}, {v.dtype=}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k and v must be on one device, got {q.device=}, {k.device=}, {v.device=}")
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
    if k.shape[1] == 0:
        raise ValueError(
            f"{op}: no keys ({k.shape[1]=}, i.e. M = 0): attention over an empty key set is undefined; "
            f"M must be >= 1 (got {q.shape=}, {k.shape=}, {v.shape=})"
        )
    if q.shape[-1] == 0:
        raise ValueError(f"{op}: query/key head dim D = {q.shape[-1]} must be >= 1 (got {q.shape=}, {k.shape=})")


_FLOAT_MAX = sys.float_info.max


def check_real(
    op: str,
    name: str,
    value: Any,
    *,
    low: float | None = 0.0,
    low_open: bool = False,
    high: float | None = None,
    high_open: bool = True,
    optional: bool = False,
) -> None:
    """Validate a scalar hyper-parameter: a finite real Python number inside ``[low, high)`` (by default ``>= 0``).

    Bools, strings, tensors and other objects are refused. ``low=None`` / ``high=None`` leave that side open;
    ``low_open`` / ``high_open`` exclude the bound itself. ``optional`` accepts ``None``. Symbolic numbers
    (``torch.SymInt`` / ``torch.SymFloat`` under ``torch.compile`` with dynamic shapes) pass unchecked.

    Raises:
        ValueError: naming the value and the allowed range.
    """
    if value is None and optional:
        return
    if type(value) is not float and type(value) is not int:  # (plain numbers, the per-forward case, skip both)
        if isinstance(value, (torch.SymInt, torch.SymFloat)):
            return
        # numpy's numbers work with tensors; other Reals (Fraction) did not ("unsupported operand type")
        numpy_real = isinstance(value, numbers.Real) and type(value).__module__ == "numpy"  # (not np.bool_ / complex)
        if isinstance(value, bool) or not (isinstance(value, int | float) or numpy_real):
            raise ValueError(
                f"{op}: {name}={value!r} must be {_allowed(low, low_open, high, high_open, optional)}, "
                f"got {type(value).__name__}"
            )
    if type(value) is not float and isinstance(value, int) and not -_FLOAT_MAX <= value <= _FLOAT_MAX:
        # (an int past float64's range passed the comparisons below and raised OverflowError in the op)
        raise ValueError(f"{op}: {name}={value!r} must be {_allowed(low, low_open, high, high_open, optional)}")
    # Comparisons, not math.isfinite: Dynamo traces them for a float it keeps symbolic (torch 2.11 does so for a float
    # read from a dict default argument, and math.isfinite then breaks a fullgraph compile).
    ok = -math.inf < value < math.inf
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{op}: {name}={value!r} must be {_allowed(low, low_open, high, high_open, optional)}")


def _allowed(low: float | None, low_open: bool, high: float | None, high_open: bool, optional: bool) -> str:
    """:func:`check_real`'s allowed range in words (built only for an error message)."""
    lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
    allowed = (
        "a finite real number" + (f" {lo}" if lo else "") + (" and" if lo and hi else "") + (f" {hi}" if hi else "")
    )
    return allowed + " (or None)" if optional else allowed


def check_flag(op: str, name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``value`` unless it is ``True`` or ``False`` (a truthy string is not a flag)."""
    if not isinstance(value, bool):
        raise ValueError(f"{op}: {name}={value!r} must be True or False, got {type(value).__name__}")


def check_channel_rows(op: str, rows: dict[str, Any], vectors: dict[str, Any], norm: str) -> int:
    """Validate the activations of a per-row normalisation and its per-channel parameters; returns ``C``.

    Args:
        op: Op name for the messages.
        rows: Name -> activation: floating ``[..., C]`` tensors of one shape on one device, ``C >= 1``.
        vectors: Name -> parameter (weight, bias): ``None`` or a floating ``[C]`` tensor on the activations' device.
        norm: What needs a channel, for the ``C = 0`` message (``"a LayerNorm"``).

    Raises:
        ValueError: naming the argument, its value and what is allowed.
    """
    for name, t in rows.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor [..., C], got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be floating point, got {name}.dtype={t.dtype}")
        if t.ndim == 0:
            raise ValueError(f"{op}: {name} must have a channel dim [..., C], got a 0-d tensor")
    names = list(rows)
    together = f"{', '.join(names[:-1])} and {names[-1]}"
    first = rows[names[0]]
    if any(tuple(t.shape) != tuple(first.shape) for t in rows.values()):
        shapes = ", ".join(f"{n}.shape={tuple(t.shape)}" for n, t in rows.items())
        raise ValueError(f"{op}: {together} must have one shape, got {shapes}")
    if any(t.device != first.device for t in rows.values()):
        devices = ", ".join(f"{n}.device={t.device}" for n, t in rows.items())
        raise ValueError(f"{op}: {together} must be on one device, got {devices}")
    c = first.shape[-1]
    if c == 0:
        raise ValueError(f"{op}: C = 0 channels ({names[0]}.shape={tuple(first.shape)}): {norm} needs C >= 1")
    for name, t in vectors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating [C] tensor or None, got {t!r:.80}")
        if tuple(t.shape) != (c,):
            raise ValueError(
                f"{op}: {name} of shape {tuple(t.shape)} must be [C] = ({c},) for {names[0]}.shape={tuple(first.shape)}"
            )
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {names[0]} is on {first.device}")
    return c


def check_side_tensor(
    op: str,
    name: str,
    t: Any,
    like: torch.Tensor,
    target: tuple[int, ...],
    layout: str,
) -> None:
    """Validate a side tensor (bias, per-channel scale, table) that must broadcast to ``target``.

    Args:
        op: Op name for the message.
        name: Argument name for the message.
        t: The tensor.
        like: The query tensor: ``t`` must be on its device.
        target: The shape ``t`` must broadcast to, WITHOUT growing it (``broadcast_shapes(t.shape, target) ==
            target``).
        layout: ``target`` in words for the message, e.g. ``"[B, H, N, M]"``.

    Raises:
        ValueError: ``t`` is not a floating-point tensor on ``like``'s device, or does not broadcast to ``target``.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(
            f"{op}: {name} must be a floating-point torch.Tensor broadcastable to {layout}={target}, "
            f"got {type(t).__name__}"
        )
    if not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be floating point, got {name}.dtype={t.dtype}")
    if t.device != like.device and (t.ndim > 0 or t.device.type != "cpu"):  # (a CPU scalar goes anywhere)
        raise ValueError(f"{op}: {name} is on {t.device} but the queries are on {like.device}")
    # broadcasts without growing: each trailing dim 1 or equal (torch.broadcast_shapes is a Python reference
    # implementation with symbolic-shape guards: ~50 us of host time per call, and these checks run every forward)
    shape, target = tuple(t.shape), tuple(target)
    tail = target[len(target) - len(shape) :] if len(shape) <= len(target) else None
    if tail is None or any(s != 1 and s != d for s, d in zip(shape, tail, strict=True)):
        raise ValueError(f"{op}: {name} of shape {tuple(t.shape)} is not broadcastable to {layout}={tuple(target)}")


def as_sdpa_mask(bias: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """An additive bias (checked by :func:`check_side_tensor`) as SDPA's float mask: q's device and dtype, and 4-D
    (SDPA's CPU path rejects a broadcastable 1-D mask with an IndexError)."""
    if bias is None:
        return None
    if q.dtype == torch.float16 and bias.dtype != torch.float16:
        # finite values past float16's range saturate instead of becoming inf (a +inf logit made the row NaN or 0);
        # -inf (a masked key) stays -inf
        top = torch.finfo(torch.float16).max
        bias = torch.where(torch.isinf(bias), bias, bias.clamp(-top, top))
    bias = bias.to(device=q.device, dtype=q.dtype)
    return bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))


# PyTorch's fused CPU attention kernel returns 0 instead of NaN for a query row holding a NaN when there are fewer keys
# than this (seen on torch 2.11 to 2.14, float64 / float32 / bfloat16, any query count and head dim; with 16 keys or
# more the NaN comes through). pytorch/pytorch#141128 reported the same symptom at 16 keys on torch 2.5.
_CPU_FUSED_SDPA_MIN_KEYS = 16


def _cpu_half_hides_inf(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
    """A CPU call the fused kernel would run in float16 / bfloat16 (the inputs' dtype or CPU autocast's) whose q, k or
    mask holds a non-finite value; False while tracing (values are not readable there)."""
    half = (torch.float16, torch.bfloat16)
    runs_half = q.dtype in half or (
        torch.is_autocast_enabled("cpu") and q.dtype == torch.float32 and torch.get_autocast_dtype("cpu") in half
    )
    if not runs_half or not values_are_checkable(q, k):
        return False
    if not (bool(torch.isfinite(q).all()) and bool(torch.isfinite(k).all())):
        return True
    return attn_mask is not None and attn_mask.dtype != torch.bool and bool(torch.isposinf(attn_mask).any())


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on ``[B, H, L, D]`` tensors with a float ``attn_mask`` (or none), except on
    the CPU with fewer than 16 keys, or in half precision with a non-finite q, k or +inf mask value (eager): there
    PyTorch's fused kernel hides a NaN query or a +inf score (it returns 0), so the same softmax runs unfused in
    float32, which costs nothing at the small size and is taken only for broken inputs otherwise. A row whose every
    key is masked gets 0, as from SDPA (:func:`masked_softmax`); a NaN anywhere in a row's scores gives NaN, as from
    the references. Under CPU autocast the result has autocast's dtype, as SDPA's (which autocast runs in it; float64
    inputs are left alone)."""
    # the fused CPU kernel hides a NaN query below 16 keys, and in float16 / bfloat16 turns a row with a +inf score
    # into 0 (float32 gives NaN): such calls (the latter eager only: the check reads values) run unfused
    if q.device.type != "cpu" or (k.shape[-2] >= _CPU_FUSED_SDPA_MIN_KEYS and not _cpu_half_hides_inf(q, k, attn_mask)):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dt = reference_dtype(q.dtype)
    s = torch.matmul(q.to(dt), k.to(dt).transpose(-2, -1)) * scale
    if attn_mask is not None:
        s = s + attn_mask.to(dt)
    w = masked_softmax(s)
    if dropout_p:
        w = torch.nn.functional.dropout(w, p=dropout_p)
    out_dtype = q.dtype
    if torch.is_autocast_enabled("cpu") and q.dtype in (torch.float32, torch.float16, torch.bfloat16):
        out_dtype = torch.get_autocast_dtype("cpu")
    return torch.matmul(w, v.to(dt)).to(out_dtype)


def may_keep_tensors() -> bool:
    """Whether a tensor built now may be kept for later forwards (a host-side cache of an index, mask or table): False
    while compiling or exporting (the tensor would be a traced constant or a fake tensor), under a fake-tensor mode, and
    while a CUDA graph is being captured on the current stream (a tensor made then lives in the graph's private pool:
    kept alive, it makes ``torch.compile``'s CUDA graphs refuse to run, and a later replay may overwrite it)."""
    if torch.compiler.is_compiling() or detect_fake_mode() is not None:
        return False
    return not capturing()


def _fx_tracing_probe():
    """The cheapest reliable "is FX symbolically tracing now" of this torch: the tracer's thread-local flag read
    through its ``__dict__`` (torch >= 2.12; ``getattr`` with a default on a thread-local costs ~1 us when unset) or
    its module flag (older), else the public function (``is_fx_tracing`` warns on new versions)."""
    fx = torch.fx._symbolic_trace
    tls, getter = getattr(fx, "_is_fx_tracing_tls", None), getattr(fx, "_get_is_fx_tracing", None)
    if tls is not None and callable(getter) and isinstance(getattr(tls, "__dict__", None), dict):
        return lambda: tls.__dict__.get("flag", False)
    if isinstance(getattr(fx, "_is_fx_tracing_flag", None), bool):
        return lambda: fx._is_fx_tracing_flag
    return getattr(fx, "is_fx_symbolic_tracing", fx.is_fx_tracing)


fx_tracing = _fx_tracing_probe()
#: The exact types of eager tensors (fake, functional and other tensors are subclasses).
PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def real_plain_tensor(t: Any) -> bool:
    """``t`` is an exact ``Tensor`` / ``Parameter`` (no subclass), neither meta nor wrapped by a functorch transform:
    a tensor with real values in eager mode, checked without ``isinstance`` or ``is_fake`` (this runs per forward)."""
    return type(t) in PLAIN_TENSOR_TYPES and not t.is_meta and not _wrapped(t)


def tracing() -> bool:
    """``torch.compile`` / ``torch.export`` (dynamo or non-strict), FX symbolic tracing or ``torch.jit`` tracing is
    under way: nothing data-dependent or stateful may happen on the host."""
    return torch.compiler.is_compiling() or fx_tracing() or torch._C._get_tracing_state() is not None


def capturing() -> bool:
    """A CUDA graph is being captured on the current stream (False without an initialised CUDA context)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def values_are_checkable(*tensors: torch.Tensor) -> bool:
    """Whether tensor VALUES may be inspected now: eager mode on real tensors.

    False under ``torch.compile`` / ``torch.export`` (dynamo or non-strict), FX symbolic tracing, ``torch.jit``
    tracing, CUDA-graph capture, for fake / meta tensors and inside functorch transforms (``vmap``, ``grad``): there a
    data-dependent ``if`` is a graph break, an error or meaningless. Cheap for plain tensors (it runs per forward in
    the layers' caches): fake and functional tensors are subclasses, so an exact ``Tensor`` / ``Parameter`` needs only
    the meta and functorch checks.
    """
    if tracing() or capturing():  # a host sync would break a capture
        return False
    for t in tensors:
        if real_plain_tensor(t):
            continue
        if type(t) in PLAIN_TENSOR_TYPES:  # meta or functorch-wrapped
            return False
        from torch._subclasses.fake_tensor import is_fake

        if isinstance(t, torch.fx.Proxy) or t.device.type == "meta" or is_fake(t) or _wrapped(t):
            return False
    return True


def check_tensor_values(op: str, name: str, t: torch.Tensor, *, positive: bool = True) -> None:
    """Eager-only value check: every entry of ``t`` finite (and ``> 0`` if ``positive``).

    One host sync per call in eager mode; skipped (the values are not inspected) while tracing or compiling, see
    :func:`values_are_checkable`. This is the only place the kernels read tensor values to validate them.

    Raises:
        ValueError: naming the offending entries' count and the smallest value.
    """
    if t.numel() == 0 or not values_are_checkable(t):
        return
    with torch.no_grad():
        ok = torch.isfinite(t)
        if positive:
            ok = ok & (t > 0)
        if bool(ok.all()):
            return
        bad = t[~ok]
    what = "positive and finite" if positive else "finite"
    raise ValueError(
        f"{op}: every entry of {name} must be {what}; {bad.numel()} of {t.numel()} are not "
        f"(e.g. {bad.flatten()[:4].tolist()})"
    )


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


def pow2_floor(x: torch.Tensor) -> torch.Tensor:
    """The power of two at or below each positive entry of ``x`` (1 where ``x`` is 0 or not finite).

    Native half-precision paths rescale by such factors: multiplying by a power of two is exact in binary floating
    point (outside underflow / overflow), so the rescaled values round exactly as the unscaled ones would.
    """
    p = torch.exp2(torch.floor(torch.log2(x)))
    return torch.where((x > 0) & torch.isfinite(p) & (p > 0), p, torch.ones_like(p))


def masked_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, with 0 weights in a row whose every logit is ``-inf`` (every key masked: softmax
    gives 0 / 0 there), as PyTorch's SDPA returns for such a query, so references and fused backends agree; a NaN
    logit still gives NaN. Such a row's softmax runs on zeros, so its gradient is 0 too (a softmax of the ``-inf``
    row is NaN, and NaN times the 0 gradient ``where`` passes it is still NaN)."""
    dead = torch.isneginf(logits).all(dim=-1, keepdim=True)
    return torch.where(dead, 0.0, torch.where(dead, 0.0, logits).softmax(dim=-1))


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype references compute in: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def fp32_reference(device: torch.device) -> Iterator[None]:
    """Disable autocast for the enclosed reference math (it runs in float32 or float64)."""
    if device.type == "meta":  # (no autocast exists for it: "unsupported scalarType")
        yield
        return
    with torch.autocast(device_type=device.type, enabled=False):
        yield
