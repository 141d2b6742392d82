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

Backends, in order of preference: ``"natten"`` (NATTEN's fused CUDA kernels, only where ``libnatten`` can run the
call: no bias, no dropout, head dims multiple of 8, CUDA), ``"triton"`` (our 1-D / 2-D kernels,
:mod:`visionlin.kernels.triton.neighborhood`: CUDA, with ``rpb``, forward and backward, no dropout or additional
keys), ``"flex"`` (PyTorch's FlexAttention on CUDA: 1-D / 2-D / 3-D, ``rpb`` as a ``score_mod``, additional keys,
forward and backward, no dropout; the window is a block-sparse ``mask_mod``, so the fused kernels skip key blocks
outside every window), ``"chunked"`` (the reference's math over chunks of the queries, each gathering at most
:data:`CHUNK_BYTES`, checkpointed under autograd: everything the reference takes in bounded memory; the automatic
choice on the CPU and for what the others refuse, e.g. dropout) and ``"reference"`` (plain PyTorch, gathers all
``[B, N, K, H, D]`` keys at once). Math: ``docs/mechanisms/neighborhood.md``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import numbers
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

try:  # imported here: under torch.compile an import inside the backend would be a graph break
    from torch.nn.attention import flex_attention as _flex_attention
except ImportError:  # torch < 2.5; the "flex" backend says so
    _flex_attention = None

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
def _check_axis(fn: str, length: Any, kernel_size: Any, dilation: Any) -> None:
    """The public per-axis helpers' arguments: ``length`` an int >= 0, ``kernel_size`` an odd int >= 1, ``dilation``
    an int >= 1 (the rules :func:`neighborhood_attention` applies per axis). Symbolic sizes pass unchecked."""
    for name, value, low in (("length", length, 0), ("kernel_size", kernel_size, 1), ("dilation", dilation, 1)):
        if isinstance(value, torch.SymInt):
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{fn}: {name}={value!r} must be an integer >= {low}")
    if not isinstance(kernel_size, torch.SymInt) and kernel_size % 2 == 0:
        raise ValueError(f"{fn}: kernel_size={kernel_size!r} must be odd (NAT/DiNAT windows are centred)")


def effective_window(length: int, kernel_size: int, dilation: int) -> tuple[int, int]:
    """The ``(kernel_size, dilation)`` actually used along an axis of ``length`` positions.

    * ``kernel_size * dilation <= length`` (everything NATTEN accepts): unchanged.
    * ``kernel_size >= length``: ``(length, 1)``, every query attends to the whole axis.
    * otherwise: ``(kernel_size, length // kernel_size)``: the largest dilation whose window fits.

    Raises:
        ValueError: ``length`` not an integer >= 0, ``kernel_size`` not an odd integer >= 1 or ``dilation`` not an
            integer >= 1.
    """
    _check_axis("effective_window", length, kernel_size, dilation)
    return _effective_window(length, kernel_size, dilation)


def _effective_window(length: int, kernel_size: int, dilation: int) -> tuple[int, int]:
    # effective_window without its checks, for callers whose arguments are already checked (every forward calls it).
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

    Raises:
        ValueError: as :func:`effective_window`.
    """
    _check_axis("neighborhood_indices", length, kernel_size, dilation)
    return _neighborhood_indices(length, kernel_size, dilation, device)


def _neighborhood_indices(
    length: int, kernel_size: int, dilation: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    k, d = _effective_window(length, kernel_size, dilation)
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
        nb, bi = _neighborhood_indices(spatial[ax], kernel_size[ax], dilation[ax], device)
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
        or any(isinstance(x, bool) or not isinstance(x, int) or not 1 <= x < 2**31 for x in values)
    ):  # (an int past int64 raised OverflowError inside the op)
        raise ValueError(
            f"{_OP}: {name}={value!r} must be {kind} below 2**31 or a tuple of {nd} such (one per spatial axis)"
        )
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
    return _na_math(q, k, v, kernel_size, dilation, rpb, scale, dropout_p, additional_keys, additional_values, False)


def _na_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    rpb: torch.Tensor | None,
    scale: float | None,
    dropout_p: float,
    additional_keys: torch.Tensor | None,
    additional_values: torch.Tensor | None,
    chunked: bool,
) -> torch.Tensor:
    """The reference's math on checked arguments: all queries at once (the specification), or with ``chunked`` in
    chunks of the flat queries that gather at most :data:`CHUNK_BYTES` each (:func:`_na_chunk`). With several chunks and
    autograd recording, every chunk runs under non-reentrant activation checkpointing, so the backward recomputes one
    chunk's gathers at a time (dropout masks are replayed: the RNG state is restored)."""
    nd = q.ndim - 3
    spatial = tuple(q.shape[1 : 1 + nd])
    b, h, dv = q.shape[0], q.shape[-2], v.shape[-1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dt = reference_dtype(q.dtype)
    flat, bias_index = _flat_windows(spatial, kernel_size, dilation, q.device)  # [N, K]
    n, n_win = flat.shape
    n_extra = 0 if additional_keys is None else additional_keys.shape[1]
    chunk = _chunk_queries(q, v, n_win, n_extra, torch.empty((), dtype=dt).element_size()) if chunked else n
    with fp32_reference(q.device):
        qf = q.to(dt).flatten(1, nd) * scale  # [B, N, H, D]
        kf, vf = k.to(dt).flatten(1, nd), v.to(dt).flatten(1, nd)
        table = linear = None
        if rpb is not None:  # rpb as [H, prod(2k - 1)], indexed by [N, K] row-major positions in the table
            table = rpb.to(dt).flatten(1)
            linear = torch.zeros((), dtype=torch.int64, device=q.device)
            for ks, index in zip(kernel_size, bias_index, strict=True):
                linear = linear * (2 * ks - 1) + index
            linear = linear.reshape(n, n_win)
        extra_k = None if additional_keys is None else additional_keys.to(dt)
        extra_v = None if additional_values is None else additional_values.to(dt)
        checkpointed = chunk < n and torch.is_grad_enabled()
        outs = []
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            args = (qf[:, rows], kf, vf, flat[rows], table, None if linear is None else linear[rows], extra_k, extra_v)
            if checkpointed:
                outs.append(torch.utils.checkpoint.checkpoint(_na_chunk, *args, dropout_p, use_reentrant=False))
            else:
                outs.append(_na_chunk(*args, dropout_p))
        out = torch.cat(outs, dim=1) if len(outs) != 1 else outs[0]
    return out.reshape(b, *spatial, h, dv).to(q.dtype)


def _na_chunk(
    qf: torch.Tensor,
    kf: torch.Tensor,
    vf: torch.Tensor,
    flat: torch.Tensor,
    table: torch.Tensor | None,
    bias_index: torch.Tensor | None,
    extra_k: torch.Tensor | None,
    extra_v: torch.Tensor | None,
    dropout_p: float,
) -> torch.Tensor:
    """The reference's math for the queries ``qf`` ``[B, n, H, D]`` (already scaled, compute dtype) whose neighbours
    are ``flat`` ``[n, K]`` in the flat keys / values ``kf`` / ``vf``, with the bias ``table[:, bias_index]`` (``rpb``
    flattened to ``[H, T]``, ``bias_index`` ``[n, K]``); returns ``[B, n, H, Dv]``."""
    s = torch.einsum("bnhd,bnkhd->bnhk", qf, kf[:, flat])  # [B, n, H, K]
    if table is not None:
        s = s + table[:, bias_index].transpose(0, 1)  # [n, H, K]
    n_win = s.shape[-1]
    if extra_k is not None:
        s = torch.cat([s, torch.einsum("bnhd,behd->bnhe", qf, extra_k)], dim=-1)  # [B, n, H, K + E]
    w = s.softmax(dim=-1)
    if dropout_p:
        w = F.dropout(w, p=dropout_p)
    out = torch.einsum("bnhk,bnkhe->bnhe", w[..., :n_win], vf[:, flat])  # [B, n, H, Dv]
    if extra_k is not None:
        out = out + torch.einsum("bnhe,behf->bnhf", w[..., n_win:], extra_v)
    return out


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
    windows = [_effective_window(n, ks, d) for n, ks, d in zip(q.shape[1 : 1 + nd], kernel_size, dilation, strict=True)]
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
    from .triton import head_dim_reasons, heads_grid_reasons, triton_unavailable

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
    reasons += head_dim_reasons(q, v) + heads_grid_reasons(q)
    if nd in (1, 2):
        windows = [
            _effective_window(n, ks, d) for n, ks, d in zip(q.shape[1 : 1 + nd], kernel_size, dilation, strict=True)
        ]
        if max(w[0] for w in windows) > _TRITON_MAX_KERNEL:
            reasons.append(
                f"effective kernel sizes {tuple(w[0] for w in windows)} exceed the Triton kernels' "
                f"{_TRITON_MAX_KERNEL} (allowed: odd 1 to {_TRITON_MAX_KERNEL} per axis)"
            )
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
    one_d, window, bias = _triton_window(q.shape[1:-2], kernel_size, dilation, rpb)
    if one_d:  # [B, L, H, D] -> [B, 1, L, H, D]
        return na2d_triton(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), window, rpb=bias, scale=scale).squeeze(1)
    return na2d_triton(q, k, v, window, rpb=bias, scale=scale)


def _triton_window(
    spatial: Sequence[int], kernel_size: tuple[int, ...], dilation: tuple[int, ...], rpb: torch.Tensor | None
) -> tuple[bool, tuple[tuple[int, int], tuple[int, int]], torch.Tensor | None]:
    """``(one_d, window, rpb)`` of a 1-D or 2-D call for the 2-D Triton kernels: the effective windows
    ``((kx, dx), (ky, dy))``; 1-D runs as one row of a 2-D map, its bias table ``[H, 2k-1]`` as ``[H, 1, 2k-1]``."""
    if len(spatial) == 1:
        window = ((1, 1), _effective_window(spatial[0], kernel_size[0], dilation[0]))
        return True, window, None if rpb is None else rpb.unsqueeze(1)
    window = tuple(_effective_window(n, ks, d) for n, ks, d in zip(spatial, kernel_size, dilation, strict=True))
    return False, window, rpb


# Chunked backend ----------------------------------------------------------------------------------------------------
#: Memory budget, in bytes, of one chunk of the ``"chunked"`` backend: the gathered neighbour keys and values of the
#: chunk's queries (``[B, chunk, K, H, D + Dv]``) plus its logits and weights (``[B, chunk, H, K + E]``, twice), in the
#: compute dtype (float32; float64 stays float64). 512 MiB of float32 = 128 Mi numbers: a Wan2.1 layer (``K = 343``,
#: 12 heads, head dim 128, 512 text keys, batch 1) runs 123 queries at a time instead of gathering 64 GiB at once.
CHUNK_BYTES = 512 * 2**20


def _size_hint(size: int | torch.SymInt) -> int:
    """A size as an int without a guard: a symbolic size (``torch.export`` / dynamic ``torch.compile``) gives its
    traced value, so the chunking is fixed in the graph (right for every size, sized for the traced one)."""
    if isinstance(size, int):
        return size
    hint = getattr(size.node, "hint", None)
    return int(hint) if hint is not None else 1


def _chunk_queries(q: torch.Tensor, v: torch.Tensor, n_window: int, n_extra: int | torch.SymInt, itemsize: int) -> int:
    """Queries per chunk so that one chunk's gathers and logits stay within :data:`CHUNK_BYTES` (at least 1)."""
    b, h, d, dv = (_size_hint(x) for x in (q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]))
    per_query = b * h * (n_window * (d + dv) + 3 * (n_window + _size_hint(n_extra))) * itemsize
    return max(1, CHUNK_BYTES // max(per_query, 1))


def _chunked(
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
    """``"chunked"`` backend: :func:`neighborhood_attention_reference`'s math (:func:`_na_math`) over chunks of the flat
    queries, each gathering at most :data:`CHUNK_BYTES`, checkpointed under autograd when there are several."""
    return _na_math(q, k, v, kernel_size, dilation, rpb, scale, dropout_p, additional_keys, additional_values, True)


# FlexAttention backend ----------------------------------------------------------------------------------------------
_FLEX_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLEX_HEAD_DIMS = (16, 256)  # tl.dot needs >= 16 (inductor's flex template refuses less); 256: largest tested
_FLEX_BLOCK = 128  # FlexAttention's default sparse block size (query and key blocks)


def _flex_module() -> ModuleType | None:
    """``torch.nn.attention.flex_attention`` (torch >= 2.5), or ``None``."""
    return _flex_attention


#: Recompilations of the compiled ``flex_attention`` allowed while the backend calls it (dynamo's default is 8 per
#: code object; every grid, kernel, dtype, head count and head dim is one compilation).
_FLEX_RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=1)
def _flex_compiled() -> Any:
    """``torch.compile(flex_attention, dynamic=False, fullgraph=True)``: the fused Triton kernels in eager mode.
    ``fullgraph``: past the recompile limit dynamo raises instead of running FlexAttention uncompiled, which
    materializes every ``[N, N + E]`` score (the memory this backend exists to avoid)."""
    return torch.compile(_flex_module().flex_attention, dynamic=False, fullgraph=True)


def _flex_fused(q: torch.Tensor) -> bool:
    """Whether an eager call on ``q``'s device goes through the compiled (fused) FlexAttention."""
    return q.device.type == "cuda"


def _axis_coords(idx: torch.Tensor, spatial: Sequence[int]) -> list[torch.Tensor]:
    """Per-axis coordinates of row-major flat indices."""
    coords = []
    for length in reversed(spatial):
        coords.insert(0, idx % length)
        idx = idx // length
    return coords


def _flex_mods(
    spatial: tuple[int, ...],
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    rpb: torch.Tensor | None,
    coords: list[torch.Tensor] | None = None,
) -> tuple[Any, Any]:
    """FlexAttention's ``(mask_mod, score_mod)`` for the queries ``[0, N)`` and keys ``[0, N + E)`` (the grid's ``N``
    keys, then the additional keys), the grid's tokens in row-major order or, with ``coords`` (per axis, ``[N]``: the
    coordinate of the token at each position), in that order.

    ``mask_mod`` is :func:`neighborhood_indices`' window per axis (dilation group ``i % d``, start
    ``clamp(i // d - k // 2, 0, n_g - k)``, ``k`` group positions) on the effective windows, and true for every
    additional key. ``score_mod`` adds ``rpb[h, *((j - i) // d + kernel_size - 1)]`` to the grid keys (``None`` without
    ``rpb``); the index is clamped to the table, it only matters for allowed keys where it is in range."""
    n = math.prod(spatial)
    axes = [
        (length, *_effective_window(length, ks, d), ks)
        for length, ks, d in zip(spatial, kernel_size, dilation, strict=True)
    ]

    def coords_of(idx):
        if coords is None:
            return _axis_coords(idx, spatial)
        idx = torch.clamp(idx, 0, n - 1)  # additional keys (and FlexAttention's padding) read a valid entry
        return [c[idx] for c in coords]

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = kv_idx < n
        pairs = zip(axes, coords_of(q_idx), coords_of(kv_idx), strict=True)
        for (length, kw, d, _), i, j in pairs:
            group = i % d
            start = torch.minimum(torch.clamp(i // d - kw // 2, min=0), (length - group + d - 1) // d - kw)
            pos = j // d
            allowed = allowed & (j % d == group) & (pos >= start) & (pos < start + kw)
        return allowed | (kv_idx >= n)

    if rpb is None:
        return mask_mod, None

    def score_mod(score, b, h, q_idx, kv_idx):
        pairs = zip(axes, coords_of(q_idx), coords_of(kv_idx), strict=True)
        index = [torch.clamp((j - i) // d + ks - 1, 0, 2 * ks - 2) for (_, _, d, ks), i, j in pairs]
        return torch.where(kv_idx < n, score + rpb[(h, *index)], score)

    return mask_mod, score_mod


#: Token orders the ``"flex"`` backend tries for its blocks of 128 tokens (besides row-major): tiles of 128 grid
#: positions, tiles in row-major order and row-major inside each (smaller at the far edges). A 3-D window on a
#: row-major order spans whole rows of the grid; a tile's neighbours fall in fewer key blocks (Wan2.1's 21 x 30 x 52
#: grid, kernel 7: 22 key blocks per query block with 8 x 4 x 4 tiles, 33 row-major).
_FLEX_TILES = {
    2: [(8, 16), (16, 8), (4, 32), (32, 4)],
    3: [(8, 4, 4), (4, 8, 4), (4, 4, 8), (2, 8, 8), (8, 2, 8), (8, 8, 2), (16, 4, 2), (2, 4, 16), (4, 2, 16)],
}
_AUTO = "auto"


def _tile_order(spatial: tuple[int, ...], tile: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``perm`` ``[N]``: the row-major index of the token at each position of the tiled order."""
    coords = _axis_coords(torch.arange(math.prod(spatial), device=device), spatial)
    tile_id = inner = torch.zeros((), dtype=torch.int64, device=device)
    for c, t, length in zip(coords, tile, spatial, strict=True):
        tile_id = tile_id * -(-length // t) + c // t
        inner = inner * t + c % t
    return torch.argsort(tile_id * math.prod(tile) + inner)


def _permuted_windows(flat: torch.Tensor, perm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(windows, inv)``: the neighbours ``[N, K]`` of each position of the order ``perm`` as positions of that order,
    and the position of each row-major token (``None``, ``flat`` itself for row-major)."""
    if perm is None:
        return flat, None
    inv = torch.argsort(perm)
    return inv[flat[perm]], inv


def _visited_blocks(windows: torch.Tensor, block: int) -> int:
    """How many (query block, key block) pairs hold an allowed grid pair."""
    n = windows.shape[0]
    kv_blocks = -(-n // block)
    pairs = ((torch.arange(n, device=windows.device) // block)[:, None] * kv_blocks + windows // block).flatten()
    marks = torch.zeros(-(-n // block) * kv_blocks, dtype=torch.bool, device=windows.device)
    marks[pairs] = True
    return int(marks.sum())


_FLEX_TILE_CACHE: dict[tuple[tuple[int, ...], ...], tuple[int, ...] | None] = {}


@torch.compiler.assume_constant_result
def _flex_tile(
    spatial: tuple[int, ...], kernel_size: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[int, ...] | None:
    """The token order of the ``"flex"`` backend: ``None`` (row-major) or the tile of :data:`_FLEX_TILES` (fitting
    the grid) with the fewest visited blocks, counted on the CPU once per configuration (a constant to
    ``torch.compile``, which runs it while tracing)."""
    key = (spatial, kernel_size, dilation)
    if key not in _FLEX_TILE_CACHE:
        cpu = torch.device("cpu")
        flat, _ = _flat_windows(spatial, kernel_size, dilation, cpu)
        best, fewest = None, _visited_blocks(flat, _FLEX_BLOCK)
        for tile in _FLEX_TILES.get(len(spatial), []):
            if all(t <= length for t, length in zip(tile, spatial, strict=True)):
                visited = _visited_blocks(_permuted_windows(flat, _tile_order(spatial, tile, cpu))[0], _FLEX_BLOCK)
                if visited < fewest:
                    best, fewest = tile, visited
        if len(_FLEX_TILE_CACHE) >= 64:
            _FLEX_TILE_CACHE.clear()
        _FLEX_TILE_CACHE[key] = best
    return _FLEX_TILE_CACHE[key]


def _flex_layout(
    spatial: tuple[int, ...],
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    n_extra: int,
    device: torch.device,
    block: int = _FLEX_BLOCK,
    tile: tuple[int, ...] | None | str = _AUTO,
) -> tuple[Any, torch.Tensor | None, torch.Tensor | None, list[torch.Tensor] | None]:
    """``(block_mask, perm, inv, coords)``: the token order (``tile``, by default :func:`_flex_tile`'s; ``perm`` /
    ``inv`` / ``coords`` ``None`` for row-major), its :class:`BlockMask` and the per-axis coordinates of its positions
    (for :func:`_flex_mods`).

    The block mask is built from :func:`_flat_windows` without evaluating the ``N x (N + E)`` mask: the allowed pairs
    are counted per (query block, key block), a block is full when all its ``block ** 2`` pairs are allowed and
    partial when some are (``create_block_mask``'s rule, which pads the last blocks with masked pairs). Shared by
    every batch element and head."""
    flex = _flex_module()
    if tile == _AUTO:
        tile = _flex_tile(spatial, kernel_size, dilation)
    flat, _ = _flat_windows(spatial, kernel_size, dilation, device)  # [N, K]
    perm = None if tile is None else _tile_order(spatial, tile, device)
    windows, inv = _permuted_windows(flat, perm)
    coords = None if perm is None else [c.contiguous() for c in _axis_coords(perm, spatial)]
    mask_mod, _ = _flex_mods(spatial, kernel_size, dilation, None, coords)
    n = flat.shape[0]
    n_kv = n + n_extra
    q_blocks, kv_blocks = -(-n // block), -(-n_kv // block)
    query_block = torch.arange(n, device=device) // block
    pair_block = (query_block[:, None] * kv_blocks + windows // block).flatten()
    counts = torch.zeros(q_blocks * kv_blocks, dtype=torch.int64, device=device)
    counts.index_add_(0, pair_block, torch.ones_like(pair_block))
    counts = counts.view(q_blocks, kv_blocks)
    if n_extra:  # every query attends to every additional key
        per_q_block = torch.zeros(q_blocks, dtype=torch.int64, device=device)
        per_q_block.index_add_(0, query_block, torch.ones_like(query_block))
        extra_block = torch.arange(n, n_kv, device=device) // block
        per_kv_block = torch.zeros(kv_blocks, dtype=torch.int64, device=device)
        per_kv_block.index_add_(0, extra_block, torch.ones_like(extra_block))
        counts = counts + per_q_block[:, None] * per_kv_block[None, :]
    full = counts == block * block
    partial = (counts > 0) & ~full

    def ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dense = dense.to(torch.int32)[None, None]  # [1, 1, Q blocks, KV blocks]
        order = torch.argsort(dense, dim=-1, descending=True, stable=True)
        return dense.sum(-1).to(torch.int32), order.to(torch.int32)

    block_mask = flex.BlockMask.from_kv_blocks(
        *ordered(partial), *ordered(full), BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(n, n_kv)
    )
    return block_mask, perm, inv, coords


@functools.lru_cache(maxsize=16)
def _flex_layout_cached(*args: Any) -> tuple[Any, torch.Tensor | None, torch.Tensor | None, list[torch.Tensor] | None]:
    """:func:`_flex_layout` by ``(spatial, kernel_size, dilation, E, device, block, tile)`` (a few layers'
    configurations at a time). Built outside inference mode: a layout first built under ``torch.inference_mode()``
    would hold inference tensors, which a later call with autograd on cannot save for backward (the permutation
    indexes the inputs)."""
    with torch.inference_mode(False):
        return _flex_layout(*args)


def _flex_supports(
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
    reasons = []
    if q.device.type != "cuda":
        reasons.append(
            f"FlexAttention's fused kernels need CUDA tensors, got {q.device.type} (its CPU path is unfused and "
            "forward only)"
        )
    if not hasattr(_flex_module(), "flex_attention"):
        reasons.append(f"torch {torch.__version__} has no torch.nn.attention.flex_attention (torch >= 2.5)")
    if dropout_p:
        reasons.append(f"FlexAttention has no attention dropout ({dropout_p=})")
    tensors = [q, k, v] + [t for t in (additional_keys, additional_values) if t is not None]
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        reasons.append("mixed dtypes " + ", ".join(sorted(str(d) for d in dtypes)) + " (FlexAttention takes one)")
    elif q.dtype not in _FLEX_DTYPES:
        reasons.append(f"dtype {q.dtype} (FlexAttention's kernels take float32, float16, bfloat16)")
    low, high = _FLEX_HEAD_DIMS
    if not (low <= q.shape[-1] <= high and low <= v.shape[-1] <= high):
        reasons.append(f"head dims must be in [{low}, {high}] for FlexAttention, got D={q.shape[-1]}, Dv={v.shape[-1]}")
    if q.numel() == 0 or v.numel() == 0:
        reasons.append(f"empty input {tuple(q.shape)}")
    return reasons


def _flex(
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
    """``"flex"`` backend: FlexAttention over the grid's tokens (row-major or in tiles, :func:`_flex_tile`; the
    additional keys appended after them) with the window as a block-sparse ``mask_mod`` and ``rpb`` as a
    ``score_mod``. Eager calls on CUDA go through a compiled ``flex_attention`` (the fused kernels); inside
    ``torch.compile`` the plain one is traced into the graph; on other devices the plain one runs FlexAttention's
    unfused forward (used by the CPU tests)."""
    assert not dropout_p, "supports() refuses dropout"
    flex = _flex_module()
    nd = q.ndim - 3
    spatial = tuple(q.shape[1 : 1 + nd])
    b, h, dv = q.shape[0], q.shape[-2], v.shape[-1]
    n_extra = 0 if additional_keys is None else additional_keys.shape[1]
    compiling = torch.compiler.is_compiling()
    build = _flex_layout if compiling else _flex_layout_cached
    tile = _flex_tile(spatial, kernel_size, dilation)
    block_mask, perm, inv, coords = build(spatial, kernel_size, dilation, n_extra, q.device, _FLEX_BLOCK, tile)
    _, score_mod = _flex_mods(spatial, kernel_size, dilation, rpb, coords)
    qf, kf, vf = q.flatten(1, nd), k.flatten(1, nd), v.flatten(1, nd)  # [B, N, H, D]
    if perm is not None:  # the tiled order
        qf, kf, vf = qf[:, perm], kf[:, perm], vf[:, perm]
    if additional_keys is not None:
        kf, vf = torch.cat([kf, additional_keys], dim=1), torch.cat([vf, additional_values], dim=1)
    args = (qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2))
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=q.shape[-1] ** -0.5 if scale is None else scale)
    if compiling or not _flex_fused(q):
        out = flex.flex_attention(*args, **kwargs)  # [B, H, N, Dv]
    else:
        limit = max(torch._dynamo.config.recompile_limit, _FLEX_RECOMPILE_LIMIT)
        try:
            with torch._dynamo.config.patch(recompile_limit=limit):
                out = _flex_compiled()(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            warnings.warn(
                f"{_OP}: the compiled FlexAttention hit dynamo's recompile limit ({limit} configurations); this call "
                f"(grid {spatial}, kernel {kernel_size}, {q.dtype}) runs the chunked reference instead",
                RuntimeWarning,
                stacklevel=2,
            )
            return _chunked(
                q, k, v, kernel_size, dilation, rpb=rpb, scale=scale,
                additional_keys=additional_keys, additional_values=additional_values,
            )  # fmt: skip
    out = out.transpose(1, 2)  # [B, N, H, Dv]
    if inv is not None:
        out = out[:, inv]
    return out.reshape(b, *spatial, h, dv)


_op = Op(_OP)
_op.register("natten", _natten, _natten_supports)
_op.register("triton", _triton, _triton_supports)
_op.register("flex", _flex, _flex_supports)
_op.register("chunked", _chunked, supports_floating)
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
    head dims up to 128, no dropout or additional keys), ``"flex"`` (FlexAttention on CUDA: 1-D / 2-D / 3-D, ``rpb``,
    additional keys, one dtype among float32 / float16 / bfloat16, head dims 16 to 256, no dropout), ``"chunked"``
    (the reference's math in chunks of at most :data:`CHUNK_BYTES` gathered, any floating dtypes and devices) and
    ``"reference"`` (the same math in one piece, forward and backward). ``get_op("neighborhood_attention")
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


def neighborhood_attention_qkv(
    qkv: torch.Tensor,
    kernel_size: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    *,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """:func:`neighborhood_attention` of ``q, k, v = qkv.unbind(-3)`` for a packed ``qkv`` ``[B, *spatial, 3, H, D]``
    (one projection's output, as ``flash_attn_qkvpacked_func`` takes it): the same result and backends; the
    ``"triton"`` backend's backward then writes one packed gradient instead of three that autograd concatenates
    (a copy of the projection's whole output per call, 0.32 ms over NAT-T's 18 stage-3 calls in a compiled step).

    Raises:
        ValueError: ``qkv`` not a tensor ``[B, *spatial, 3, H, D]`` with 1 to 3 spatial axes (the message names its
            shape), and everything :func:`neighborhood_attention` refuses.
        NotImplementedError: ``backend`` cannot run the call (with its reasons).
    """
    if not isinstance(qkv, torch.Tensor):
        raise ValueError(f"neighborhood_attention_qkv: qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.ndim not in (5, 6, 7) or qkv.shape[-3] != 3:
        raise ValueError(
            "neighborhood_attention_qkv: qkv must be [B, *spatial, 3, H, D] with 1 to 3 spatial axes (q, k, v "
            f"along dim -3); got shape {tuple(qkv.shape)}"
        )
    q, k, v = qkv.unbind(-3)
    try:
        kernel_size, dilation = _check_args(q, k, v, kernel_size, dilation, rpb, scale, dropout_p, None, None)
    except ValueError as e:  # named as this function's call
        raise ValueError(
            f"neighborhood_attention_qkv (q, k, v = qkv.unbind(-3)): {str(e).removeprefix(_OP + ': ')}"
        ) from None
    chosen = _op.select(
        q, k, v, kernel_size, dilation, rpb=rpb, scale=scale, dropout_p=dropout_p, backend=backend,
        caller="neighborhood_attention_qkv",
    )  # fmt: skip
    if chosen.name == "triton":
        return _triton_qkv(qkv, kernel_size, dilation, rpb=rpb, scale=scale)
    return chosen.fn(q, k, v, kernel_size, dilation, rpb=rpb, scale=scale, dropout_p=dropout_p)


def _triton_qkv(
    qkv: torch.Tensor,
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    *,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`_triton` of ``qkv.unbind(-3)`` with one packed gradient (``triton/neighborhood.py``'s
    ``na2d_triton_qkv``)."""
    from .triton.neighborhood import na2d_triton_qkv

    one_d, window, bias = _triton_window(qkv.shape[1:-3], kernel_size, dilation, rpb)
    if one_d:  # [B, L, 3, H, D] -> [B, 1, L, 3, H, D]
        return na2d_triton_qkv(qkv.unsqueeze(1), window, rpb=bias, scale=scale).squeeze(1)
    return na2d_triton_qkv(qkv, window, rpb=bias, scale=scale)
