"""Neighborhood attention (NAT / DiNAT), non-causal (bidirectional), heads-last, 1-D / 2-D / 3-D.

Every query attends to a window of ``kernel_size`` keys per spatial axis around it, spaced ``dilation`` apart, with
NATTEN's border rule: at a border the window is shifted inwards (it always holds exactly ``kernel_size`` keys of the
query's dilation group), it is never zero-padded. An optional relative positional bias (NAT's ``rpb``, shape
``[H, 2k-1, 2k-1]`` in 2-D) is added to the logits, indexed by the key's offset from the query in dilated units.

Layouts: 1-D ``[B, L, H, D]``, 2-D ``[B, X, Y, H, D]``, 3-D ``[B, T, X, Y, H, D]`` (NATTEN's).

Small inputs, where NATTEN refuses ``kernel_size * dilation > length``, are defined here per axis of length ``L``
(see :func:`effective_window`): if ``kernel_size >= L`` the window is the whole axis (kernel ``L``, dilation 1);
otherwise the dilation is capped at ``L // kernel_size`` (DiNAT's own rule for choosing dilations, ``d =
resolution // k``). Inputs NATTEN accepts are left unchanged. The bias table keeps its size and is indexed by the
offset in units of the effective dilation.

Backends: ``"natten"`` (NATTEN's fused CUDA kernels, only where ``libnatten`` can run the call: no bias, no dropout,
head dims multiple of 8, CUDA), ``"triton"`` (our 1-D / 2-D kernels, :mod:`visionlin.kernels.triton.neighborhood`:
CUDA, with ``rpb``, forward and backward, no dropout or additional keys) and ``"reference"`` (plain PyTorch, trains
on every device). Math: ``docs/mechanisms/neighborhood.md``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from ._common import check_real, fp32_reference, reference_dtype, supports_floating
from ._dispatch import Op

__all__ = [
    "effective_window",
    "neighborhood_attention",
    "neighborhood_attention_reference",
    "neighborhood_indices",
]

_OP = "neighborhood_attention"
_LAYOUTS = {1: "[B, L, H, D]", 2: "[B, X, Y, H, D]", 3: "[B, T, X, Y, H, D]"}


# Windows ------------------------------------------------------------------------------------------------------------
def effective_window(length: int, kernel_size: int, dilation: int) -> tuple[int, int]:
    """The ``(kernel_size, dilation)`` actually used along an axis of ``length`` positions.

    * ``kernel_size * dilation <= length`` (everything NATTEN accepts): unchanged.
    * ``kernel_size >= length``: ``(length, 1)``, every query attends to the whole axis.
    * otherwise: ``(kernel_size, length // kernel_size)``: the largest dilation whose window fits.
    """
    if kernel_size >= length:
        return length, 1
    return kernel_size, min(dilation, length // kernel_size)


def neighborhood_indices(
    length: int, kernel_size: int, dilation: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The neighbours of every position along one axis, and their bias-table indices.

    With ``k, d = effective_window(length, kernel_size, dilation)``, query ``i`` lies in dilation group ``g = i % d``
    (positions ``g, g + d, ...``, ``n_g`` of them) at group position ``p = i // d``; its window starts at group
    position ``s = clamp(p - k // 2, 0, n_g - k)`` (centred, shifted inwards at the borders) and its neighbours are
    ``(s + a) * d + g`` for ``a = 0 .. k-1``. The bias index of neighbour ``n`` is ``(n - i) / d + kernel_size - 1``
    (NATTEN's ``get_pb_start(i) + a``), in ``[0, 2 * kernel_size - 2]``.

    Returns:
        ``(neighbours, bias_index)``, both int64 ``[length, k]``.
    """
    k, d = effective_window(length, kernel_size, dilation)
    i = torch.arange(length, device=device)
    group, pos = i % d, i // d
    group_len = (length - group + d - 1) // d
    start = torch.minimum((pos - k // 2).clamp(min=0), group_len - k)
    neighbours = (start[:, None] + torch.arange(k, device=device)) * d + group[:, None]
    bias_index = torch.div(neighbours - i[:, None], d, rounding_mode="floor") + kernel_size - 1
    return neighbours, bias_index


def _flat_windows(
    spatial: Sequence[int], kernel_size: Sequence[int], dilation: Sequence[int], device: torch.device
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Flat key index ``[N, K]`` of every query's neighbours (``N = prod(spatial)``, ``K = prod(effective kernels)``,
    both row-major) and, per axis, the bias index broadcast to ``[*spatial, *kernels]``."""
    nd = len(spatial)
    flat = torch.zeros((), dtype=torch.int64, device=device)
    bias_index = []
    stride = 1
    for ax in reversed(range(nd)):
        nb, bi = neighborhood_indices(spatial[ax], kernel_size[ax], dilation[ax], device)
        shape = [1] * (2 * nd)
        shape[ax], shape[nd + ax] = nb.shape
        flat = flat + nb.reshape(shape) * stride
        bias_index.insert(0, bi.reshape(shape))
        stride *= spatial[ax]
    return flat.reshape(math.prod(spatial), -1), bias_index


# Input checks -------------------------------------------------------------------------------------------------------
def _per_dim(name: str, value: Any, nd: int, *, odd: bool) -> tuple[int, ...]:
    """An int or one int per spatial axis, each >= 1 (and odd for kernel sizes), as a tuple."""
    values = (value,) * nd if isinstance(value, int) and not isinstance(value, bool) else value
    kind = "an odd integer >= 1" if odd else "an integer >= 1"
    if (
        not isinstance(values, Sequence)
        or isinstance(values, str)
        or len(values) != nd
        or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in values)
    ):
        raise ValueError(f"{_OP}: {name}={value!r} must be {kind} or a tuple of {nd} such (one per spatial axis)")
    if odd and any(x % 2 == 0 for x in values):
        raise ValueError(f"{_OP}: {name}={value!r} must be odd along every axis (NAT/DiNAT windows are centred)")
    return tuple(int(x) for x in values)


def _check_args(
    q, k, v, kernel_size, dilation, rpb, scale, dropout_p, additional_keys, additional_values
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate a call; return ``kernel_size`` and ``dilation`` as per-axis tuples."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not (q.ndim == k.ndim == v.ndim) or q.ndim not in (4, 5, 6):
        raise ValueError(
            f"{_OP}: expected heads-last tensors of one rank, 1-D {_LAYOUTS[1]}, 2-D {_LAYOUTS[2]} or "
            f"3-D {_LAYOUTS[3]}; got {q.shape=}, {k.shape=}, {v.shape=}"
        )
    nd = q.ndim - 3
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        raise ValueError(f"{_OP}: q, k and v must be floating point, got {q.dtype=}, {k.dtype=}, {v.dtype=}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{_OP}: q, k and v must be on one device, got {q.device=}, {k.device=}, {v.device=}")
    if q.shape[:-1] != k.shape[:-1] or k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"{_OP}: q, k and v must share batch, spatial size and heads ({_LAYOUTS[nd]} apart from the head dims); "
            f"got {q.shape=}, {k.shape=}, {v.shape=}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{_OP}: query and key head dims differ: {q.shape[-1]=} vs {k.shape[-1]=}")
    if q.shape[-1] == 0:
        raise ValueError(f"{_OP}: head dim D = 0 (q.shape={tuple(q.shape)}); scores need at least one channel")
    spatial = tuple(q.shape[1 : 1 + nd])
    if min(spatial) < 1:
        raise ValueError(f"{_OP}: every spatial size must be >= 1, got {spatial} from {q.shape=}")
    kernel_size = _per_dim("kernel_size", kernel_size, nd, odd=True)
    dilation = _per_dim("dilation", dilation, nd, odd=False)
    check_real(_OP, "scale", scale, low=None, optional=True)
    check_real(_OP, "dropout_p", dropout_p, high=1.0)
    heads = q.shape[-2]
    if rpb is not None:
        want = (heads, *(2 * ks - 1 for ks in kernel_size))
        if not isinstance(rpb, torch.Tensor) or not rpb.is_floating_point():
            raise ValueError(f"{_OP}: rpb must be a floating-point tensor of shape {want}, got {rpb!r:.80}")
        if tuple(rpb.shape) != want:
            raise ValueError(
                f"{_OP}: rpb of shape {tuple(rpb.shape)} does not fit {heads=} and {kernel_size=}: expected "
                f"[H, *(2 * kernel_size - 1)] = {want}"
            )
        if rpb.device != q.device:
            raise ValueError(f"{_OP}: rpb is on {rpb.device} but the queries are on {q.device}")
    if (additional_keys is None) != (additional_values is None):
        raise ValueError(f"{_OP}: give additional_keys and additional_values together (or neither)")
    if additional_keys is not None:
        ek, ev = additional_keys, additional_values
        if not isinstance(ek, torch.Tensor) or not isinstance(ev, torch.Tensor):
            raise ValueError(f"{_OP}: additional_keys / additional_values must be tensors [B, E, H, D]")
        ok = (
            ek.ndim == ev.ndim == 4
            and ek.shape[0] == ev.shape[0] == q.shape[0]
            and ek.shape[1] == ev.shape[1]
            and ek.shape[2] == ev.shape[2] == heads
            and ek.shape[3] == q.shape[-1]
            and ev.shape[3] == v.shape[-1]
        )
        if not ok:
            raise ValueError(
                f"{_OP}: additional_keys {tuple(ek.shape)} / additional_values {tuple(ev.shape)} must be "
                f"[B, E, H, D] = [{q.shape[0]}, E, {heads}, {q.shape[-1]}] / [..., {v.shape[-1]}]"
            )
        if not (ek.is_floating_point() and ev.is_floating_point()) or ek.device != q.device or ev.device != q.device:
            raise ValueError(f"{_OP}: additional_keys / additional_values must be floating point on {q.device}")
    return kernel_size, dilation


# Reference ----------------------------------------------------------------------------------------------------------
def neighborhood_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    *,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Specification: per query, ``softmax(scale * q . k_j + rpb[offset_j])`` over its neighbours ``j`` (and the
    additional keys), times their values, in float32 (float64 stays float64).

    The neighbour keys and values are gathered (``[B, N, K, H, D]`` each, ``K`` = window size): memory grows with
    ``N * K``, never with ``N ** 2``. Autograd differentiates it (gather backward is a scatter-add).

    Args:
        q: Queries, heads-last: ``[B, L, H, D]``, ``[B, X, Y, H, D]`` or ``[B, T, X, Y, H, D]``.
        k: Keys, same shape as ``q``.
        v: Values, same shape apart from the head dim ``Dv``.
        kernel_size: Window size, odd, an int or one per spatial axis.
        dilation: Spacing of the window's keys, an int or one per spatial axis (capped on small axes, see
            :func:`effective_window`).
        rpb: Relative positional bias ``[H, 2*k_1 - 1, ..., 2*k_nd - 1]`` (NAT's ``rpb``), added to the logits at
            the key's offset from the query in dilated units; ``None`` for none.
        scale: Logit multiplier; ``None`` means ``D ** -0.5``.
        dropout_p: Dropout on the attention weights, in ``[0, 1)`` (pass 0 in eval mode).
        additional_keys: Keys every query also attends to (e.g. prefix tokens), ``[B, E, H, D]``, no bias (NATTEN's
            ``additional_keys``); the softmax runs over the neighbours and these together.
        additional_values: Their values ``[B, E, H, Dv]``.

    Returns:
        Same layout as ``q`` with head dim ``Dv``, in the dtype of ``q``.
    """
    kernel_size, dilation = _check_args(
        q, k, v, kernel_size, dilation, rpb, scale, dropout_p, additional_keys, additional_values
    )
    nd = q.ndim - 3
    spatial = tuple(q.shape[1 : 1 + nd])
    b, h, dv = q.shape[0], q.shape[-2], v.shape[-1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dt = reference_dtype(q.dtype)
    flat, bias_index = _flat_windows(spatial, kernel_size, dilation, q.device)  # [N, K]
    with fp32_reference(q.device):
        qf = q.to(dt).flatten(1, nd) * scale  # [B, N, H, D]
        kf = k.to(dt).flatten(1, nd)[:, flat]  # [B, N, K, H, D]
        vf = v.to(dt).flatten(1, nd)[:, flat]  # [B, N, K, H, Dv]
        s = torch.einsum("bnhd,bnkhd->bnhk", qf, kf)  # [B, N, H, K]
        if rpb is not None:
            bias = rpb.to(dt)[(slice(None), *bias_index)]  # [H, *spatial, *kernels]
            s = s + bias.reshape(h, flat.shape[0], flat.shape[1]).transpose(0, 1)  # [N, H, K]
        n_win = s.shape[-1]
        if additional_keys is not None:
            s_extra = torch.einsum("bnhd,behd->bnhe", qf, additional_keys.to(dt))  # [B, N, H, E]
            s = torch.cat([s, s_extra], dim=-1)
        w = s.softmax(dim=-1)
        if dropout_p:
            w = F.dropout(w, p=dropout_p)
        out = torch.einsum("bnhk,bnkhe->bnhe", w[..., :n_win], vf)  # [B, N, H, Dv]
        if additional_keys is not None:
            out = out + torch.einsum("bnhe,behf->bnhf", w[..., n_win:], additional_values.to(dt))
    return out.reshape(b, *spatial, h, dv).to(q.dtype)


# NATTEN backend -----------------------------------------------------------------------------------------------------
_NATTEN_MIN = (0, 20)
_NATTEN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def _natten_module() -> ModuleType | None:
    """``natten`` if it is installed (imported on first use only), else ``None``."""
    if importlib.util.find_spec("natten") is None:
        return None
    try:
        return importlib.import_module("natten")
    except Exception:  # a broken install is treated as absent; supports() says so
        return None


def _version(module: ModuleType) -> tuple[int, ...]:
    parts = []
    for piece in str(getattr(module, "__version__", "0")).split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@torch.compiler.assume_constant_result
def _natten_state() -> tuple[tuple[int, ...], bool] | None:
    """``(natten version, has libnatten)``, or ``None`` without natten. A constant to ``torch.compile``, which runs it
    once while tracing instead of tracing the import."""
    natten = _natten_module()
    if natten is None:
        return None
    return _version(natten), bool(getattr(natten, "HAS_LIBNATTEN", False))


def _natten_supports(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    *,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
) -> list[str]:
    state = _natten_state()
    if state is None:
        return ["natten is not installed (pip install natten, with libnatten for CUDA kernels)"]
    version = ".".join(map(str, state[0]))
    if state[0] < _NATTEN_MIN:
        return [f"natten {version} is older than 0.20 (its API differs; upgrade natten)"]
    reasons = []
    if not state[1]:
        reasons.append(
            f"natten {version} has no libnatten (the PyPI wheel ships no kernels; install a libnatten build from "
            "NATTEN's wheel index or from source)"
        )
    if rpb is not None:
        reasons.append("natten >= 0.20 has no relative positional bias (rpb)")
    if dropout_p:
        reasons.append(f"natten has no attention dropout ({dropout_p=})")
    if q.device.type != "cuda":
        reasons.append(f"libnatten's kernels need CUDA tensors, got {q.device.type}")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            reasons.append("natten has no backward on CPU (its CPU path is FlexAttention, forward only)")
    tensors = [q, k, v] + [t for t in (additional_keys, additional_values) if t is not None]
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        reasons.append("mixed dtypes " + ", ".join(sorted(str(d) for d in dtypes)))
    elif q.dtype not in _NATTEN_DTYPES:
        reasons.append(f"dtype {q.dtype} (natten takes float32, float16, bfloat16)")
    if q.shape[-1] % 8 or v.shape[-1] % 8:
        reasons.append(f"head dims must be multiples of 8 for natten, got D={q.shape[-1]}, Dv={v.shape[-1]}")
    return reasons


def _natten(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    *,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
) -> torch.Tensor:
    assert rpb is None and not dropout_p, "supports() refuses these"
    natten = _natten_module()
    nd = q.ndim - 3
    windows = [effective_window(n, ks, d) for n, ks, d in zip(q.shape[1 : 1 + nd], kernel_size, dilation, strict=True)]
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[nd]
    return fn(
        q,
        k,
        v,
        kernel_size=tuple(w[0] for w in windows),
        dilation=tuple(w[1] for w in windows),
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
        additional_keys=additional_keys,
        additional_values=additional_values,
    )


# Triton backend -----------------------------------------------------------------------------------------------------
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_GRID_BH = 65535  # batch * heads runs on the launch grid's second axis


def _triton_supports(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    *,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
) -> list[str]:
    from .triton import head_dim_reasons, triton_unavailable

    reasons = triton_unavailable(q, k, v)
    nd = q.ndim - 3
    if nd not in (1, 2):
        reasons.append(f"the Triton kernels run 1-D and 2-D neighborhoods, got {nd}-D input {tuple(q.shape)}")
    if dropout_p:
        reasons.append(f"no attention dropout in the Triton kernels ({dropout_p=})")
    if additional_keys is not None:
        reasons.append("no additional_keys / additional_values in the Triton kernels")
    dtypes = {q.dtype, k.dtype, v.dtype}
    if len(dtypes) > 1 or q.dtype not in _TRITON_DTYPES:
        reasons.append(
            "needs one dtype of float32, float16, bfloat16 for q, k, v; got "
            + ", ".join(str(t.dtype) for t in (q, k, v))
        )
    if rpb is not None and not rpb.is_floating_point():
        reasons.append(f"rpb dtype {rpb.dtype} is not floating point")
    reasons += head_dim_reasons(q, v)
    if nd in (1, 2):
        windows = [
            effective_window(n, ks, d) for n, ks, d in zip(q.shape[1 : 1 + nd], kernel_size, dilation, strict=True)
        ]
        if max(w[0] for w in windows) > _TRITON_MAX_KERNEL:
            reasons.append(
                f"effective kernel sizes {tuple(w[0] for w in windows)} exceed the Triton kernels' "
                f"{_TRITON_MAX_KERNEL} (allowed: odd 1 to {_TRITON_MAX_KERNEL} per axis)"
            )
    if q.shape[0] * q.shape[-2] > _MAX_GRID_BH:
        reasons.append(f"batch * heads = {q.shape[0] * q.shape[-2]} exceeds the launch grid's {_MAX_GRID_BH}")
    return reasons


#: Largest effective kernel size per axis of the Triton backend (``triton.neighborhood.MAX_KERNEL``, kept here so
#: supports() never imports Triton).
_TRITON_MAX_KERNEL = 13


def _triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    *,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """``"triton"`` backend: :mod:`visionlin.kernels.triton.neighborhood` (1-D runs as 2-D with one row)."""
    from .triton.neighborhood import na2d_triton

    assert not dropout_p and additional_keys is None, "supports() refuses these"
    if q.ndim == 4:  # [B, L, H, D] -> [B, 1, L, H, D]; the bias table [H, 2k-1] -> [H, 1, 2k-1]
        window = ((1, 1), effective_window(q.shape[1], kernel_size[0], dilation[0]))
        bias = None if rpb is None else rpb.unsqueeze(1)
        return na2d_triton(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), window, rpb=bias, scale=scale).squeeze(1)
    window = tuple(effective_window(n, ks, d) for n, ks, d in zip(q.shape[1:3], kernel_size, dilation, strict=True))
    return na2d_triton(q, k, v, window, rpb=rpb, scale=scale)


_op = Op(_OP)
_op.register("natten", _natten, _natten_supports)
_op.register("triton", _triton, _triton_supports)
_op.register("reference", neighborhood_attention_reference, supports_floating)


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    *,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Neighborhood attention; see :func:`neighborhood_attention_reference` for the arguments and the math.

    Backends, in automatic-selection order: ``"natten"`` (fused CUDA kernels of a ``natten >= 0.20`` build with
    ``libnatten``; no ``rpb``, no dropout, one dtype among float32 / float16 / bfloat16, head dims multiple of 8),
    ``"triton"`` (our Triton kernels on CUDA: 1-D and 2-D, with or without ``rpb``, effective kernel sizes up to 13,
    head dims up to 128, no dropout or additional keys) and ``"reference"`` (any floating dtypes and devices, forward
    and backward). ``get_op("neighborhood_attention")
    .supports(..., backend="natten")`` lists why NATTEN cannot run a call.

    Raises:
        ValueError: shapes that do not fit (named in the message), an even or non-positive kernel size, a dilation
            below 1, an ``rpb`` of the wrong shape, a non-finite ``scale``, ``dropout_p`` outside ``[0, 1)``.
        NotImplementedError: ``backend`` cannot run the call (with its reasons).
    """
    kernel_size, dilation = _check_args(
        q, k, v, kernel_size, dilation, rpb, scale, dropout_p, additional_keys, additional_values
    )
    return _op(
        q,
        k,
        v,
        kernel_size,
        dilation,
        rpb=rpb,
        scale=scale,
        dropout_p=dropout_p,
        additional_keys=additional_keys,
        additional_values=additional_values,
        backend=backend,
    )
