"""Kernelised linear attention, non-causal (bidirectional), heads-last ``[B, N, H, D]``.

With a feature map ``phi`` and ``M`` keys, the score of query ``i`` for key ``j`` is
``a_ij = s * phi(q_i).phi(k_j) / M``.
Three normalisations turn scores into weights:

* ``"divide"`` (the usual one): ``w_ij = a_ij / (sum_j a_ij + eps)``, rows sum to ~1, weights are non-negative when
  ``phi`` is.
* ``"subtract"`` (InLine, injective): ``w_ij = a_ij - mean_j a_ij + 1/M``, rows sum to exactly 1, weights may be
  negative.
* ``"none"``: ``w_ij = M * a_ij = s * phi(q_i).phi(k_j)`` (cosine attention style). Un-normalised: the output
  grows with ``M``, and at long sequences its true value can exceed the float16 range (a float16 output is then
  ``inf``).

All three are computed in ``O(N D^2)`` through the ``D x D`` state ``sum_j phi(k_j) v_j^T``; the test suite proves each
equals its materialised ``O(N^2)`` form.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._common import (
    check_heads_last,
    check_real,
    fp32_reference,
    pow2_floor,
    reference_dtype,
    same_floating_dtype,
    supports_floating,
)
from ._dispatch import Op

__all__ = [
    "FEATURE_MAPS",
    "NORMALIZATIONS",
    "apply_feature_map",
    "efficient_attention",
    "efficient_attention_reference",
    "feature_dtype",
    "linear_attention",
    "linear_attention_reference",
    "scaled_linear_attention",
]

FeatureMap = str | Callable[[torch.Tensor], torch.Tensor]


def _elu1(x: torch.Tensor) -> torch.Tensor:
    # ELU(x) + 1 = x + 1 for x > 0 and exp(x) otherwise, written without the cancellation of (exp(x) - 1) + 1, which
    # returns 0 (not exp(x)) once exp(x) falls below the dtype's resolution at 1 (x < -17 in float32, -8 in float16).
    return torch.where(x > 0, x + 1.0, torch.exp(x.clamp(max=0.0)))


def _cosine(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "relu": F.relu,
    "elu": _elu1,  # ELU(x) + 1 (Katharopoulos et al.)
    "sigmoid": torch.sigmoid,
    "cosine": _cosine,  # unit-norm head vectors (Cottention)
}
NORMALIZATIONS = ("divide", "subtract", "none")
_OP = "linear_attention"


def apply_feature_map(x: torch.Tensor, feature_map: FeatureMap) -> torch.Tensor:
    """Apply a named (see :data:`FEATURE_MAPS`) or callable feature map over the last dim."""
    if callable(feature_map):
        return feature_map(x)
    if not isinstance(feature_map, str) or feature_map not in FEATURE_MAPS:
        raise ValueError(f"unknown {feature_map=}; choose one of {sorted(FEATURE_MAPS)} or pass a callable")
    return FEATURE_MAPS[feature_map](x)


def _features(
    q: torch.Tensor, k: torch.Tensor, feature_map: FeatureMap, op: str = _OP
) -> tuple[torch.Tensor, torch.Tensor]:
    """``phi(q)``, ``phi(k)``; a callable map must keep the token layout and give q and k the same width."""
    fq, fk = apply_feature_map(q, feature_map), apply_feature_map(k, feature_map)
    for name, x, f in (("q", q, fq), ("k", k, fk)):
        if not isinstance(f, torch.Tensor) or f.shape[:-1] != x.shape[:-1] or not f.is_floating_point():
            got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(
                f"{op}: feature_map must map {name} {tuple(x.shape)} to a floating [B, L, H, D'] tensor, got {got}"
            )
    if fq.shape[-1] != fk.shape[-1]:
        raise ValueError(f"{op}: feature_map gave q and k different widths: {fq.shape[-1]=} vs {fk.shape[-1]=}")
    for name, x, f in (("q", q, fq), ("k", k, fk)):  # (a meta result gave uninitialised memory)
        if f.device != x.device:
            raise ValueError(f"{op}: feature_map must keep {name}'s device ({x.device}), got {f.device}")
    # the inputs' dtype (a float64 map crashed the reference; under CUDA autocast exp / norm give float32 for bf16)
    return fq.to(q.dtype), fk.to(k.dtype)


def _check_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map, normalize, scale, eps) -> None:
    check_heads_last(_OP, q, k, v, same_length=False)
    if not isinstance(normalize, str) or normalize not in NORMALIZATIONS:
        raise ValueError(f"{_OP}: unknown {normalize=}; choose one of {NORMALIZATIONS}")
    if not callable(feature_map) and (not isinstance(feature_map, str) or feature_map not in FEATURE_MAPS):
        raise ValueError(f"{_OP}: unknown {feature_map=}; choose one of {sorted(FEATURE_MAPS)} or pass a callable")
    # "divide" divides by s * sum_j phi(q_i).phi(k_j) + eps: a scale <= 0 sends that denominator through zero.
    check_real(_OP, "scale", scale, low=0.0 if normalize == "divide" else None, low_open=True, optional=True)
    check_real(_OP, "eps", eps)


def _default_scale(normalize: str, head_dim: int) -> float:
    return head_dim**-0.5 if normalize == "subtract" else 1.0


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: FeatureMap = "elu",
    normalize: str = "divide",
    scale: float | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Specification of :func:`linear_attention`, in float32 with autocast disabled.

    Args:
        q: Queries ``[B, N, H, D]``.
        k: Keys ``[B, M, H, D]``.
        v: Values ``[B, M, H, Dv]``.
        feature_map: Name in :data:`FEATURE_MAPS` or a callable applied to q and k over the last dim.
        normalize: ``"divide"``, ``"subtract"`` or ``"none"`` (module docstring).
        scale: Score multiplier ``s`` (finite; ``> 0`` for ``"divide"``); ``None`` means ``D ** -0.5`` for
            ``"subtract"`` and ``1`` otherwise.
        eps: Added to the denominator of ``"divide"`` (finite, ``>= 0``).

    Returns:
        ``[B, N, H, Dv]`` in the dtype of ``q``.
    """
    _check_args(q, k, v, feature_map, normalize, scale, eps)
    s = _default_scale(normalize, q.shape[-1]) if scale is None else scale
    m = k.shape[1]
    dt = reference_dtype(q.dtype)
    with fp32_reference(q.device):
        fq, fk = _features(q.to(dt), k.to(dt), feature_map)
        v = v.to(dt)
        kv = torch.einsum("bmhd,bmhe->bhde", fk, v) / m  # [B, H, D, Dv]: mean_j phi(k_j) v_j^T
        num = torch.einsum("bnhd,bhde->bnhe", fq, kv) * s  # [B, N, H, Dv]
        if normalize == "none":
            out = num * m
        else:
            k_mean = fk.mean(dim=1)  # [B, H, D]
            row_sum = torch.einsum("bnhd,bhd->bnh", fq, k_mean).unsqueeze(-1) * s  # [B, N, H, 1] = sum_j a_ij
            if normalize == "divide":
                out = num / (row_sum + eps)
            else:  # subtract: sum_j (a_ij - mean_j a_ij + 1/M) v_j = num - row_sum * mean_j v_j + mean_j v_j
                out = num + (1.0 - row_sum) * v.mean(dim=1, keepdim=True)
    return out.to(q.dtype)


def feature_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype native paths compute feature maps in: float32 for float16 inputs (whose range is too narrow for
    ``exp``-type maps and powers: ``exp(-18)`` underflows, ``30 ** 3`` overflows), the input dtype otherwise."""
    return torch.float32 if dtype == torch.float16 else dtype


def scaled_linear_attention(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    *,
    normalize: str = "divide",
    scale: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The native ``O(N D Dv)`` core shared by every linear form: the key-side reduction in ``v``'s dtype (the
    ``"none"`` form's in float32), the rest in float32.

    Args:
        fq: Query features ``[B, N, H, D]``, in ``v``'s dtype or wider (:func:`feature_dtype`).
        fk: Key features ``[B, M, H, D]``, same dtype as ``fq``.
        v: Values ``[B, M, H, Dv]``: the dtype of the key-side product.
        normalize: ``"divide"``, ``"subtract"`` or ``"none"`` (module docstring); the features are used as given.
        scale: ``s``.
        eps: Added to the ``"divide"`` denominator, in float32.

    Returns:
        ``[B, N, H, Dv]`` in float32 (float64 for float64 ``v``): callers finish in that precision and cast.

    The long reduction, the ``D x Dv`` state ``sum_j phi(k_j) v_j^T`` over all ``M`` keys, runs in ``v``'s dtype with
    float32 accumulation. In half precision (float16: 11 bits, normal range 6e-5..65504) its textbook forms break: the
    sum overflows at long sequences, and the mean form's ``M^-1/2``-scaled features underflow (at ``M = 65536`` the
    focused or relu features were mostly subnormal: 36-54% error for FLatten at D = 8). Here each key channel is
    divided by its mean magnitude ``g_d`` and each value channel by its largest magnitude ``h_e``, then both by
    ``M^1/2``, so every state entry is a sum of ``M`` terms of size ``O(1/M)``. ``g``, ``h`` and ``M^-1/2`` are powers
    of two (rescaling by them rounds nothing), exact (``phi(q) . phi(k)`` is unchanged when channel ``d`` of ``phi(k)``
    is divided and that of ``phi(q)`` multiplied by ``g_d``; the output is linear in ``v``), undone in float32 and
    constants for autograd. For ``"divide"`` the key sum of the denominator is one more value column, so numerator and
    denominator share one product and their opposing gradient contributions meet in float32.

    The query side (``phi(q) . state``, a skinny product with ``K = D``), the denominator, ``eps`` and the division run
    in float32: ``eps`` next to a float16 denominator is rounded away or flushed (``eps / M`` is 1.5e-11 for per-query
    InfSA: a non-positive query gave 0 / 0), and a numerator and denominator rounded to half separately give noisy
    query gradients (a row with one active relu channel has a ratio independent of its scale). The un-normalised
    ``"none"`` form runs its textbook sum in float32 (in half precision the state overflowed where the output fits):
    a rescaling would carry its inverse (``M`` or the feature magnitudes) into the backward. Memory stays ``O(N D)``.
    """
    acc = reference_dtype(v.dtype)
    dtype = v.dtype
    m = fk.shape[1]
    if normalize == "none":
        # Un-normalised: s * phi(q_i) . sum_j phi(k_j) v_j^T, every product and the state in float32. In the inputs'
        # half dtype the state overflowed where the output fits (a small s: 16k keys of values ~4, s = 1/N, gave inf
        # for a true 52), and inf - inf in the query product gave NaN where the output is inf; now a float16 output is
        # inf only where the true value is past its range. No rescaling by powers of two as below: its inverse would
        # carry large factors (M, or the feature magnitudes) into the backward.
        num = torch.einsum("bnhd,bhde->bnhe", fq.to(acc), torch.einsum("bmhd,bmhe->bhde", fk.to(acc), v.to(acc)))
        return num * scale
    r = 2.0 ** math.floor(math.log2(m) / -2)  # ~M^-1/2 as a power of two
    if normalize == "subtract":
        # Exact centred form: sum_j w_ij v_j = s * phi(q_i) . mean_j (phi(k_j) - kbar)(v_j - vbar)^T + vbar. The
        # uncentred form (num - row_sum * vbar + vbar) cancels two large terms (~10% error in bf16 when q, k have a
        # mean); centring v too keeps the rounding of kbar from leaking in as kbar_error * vbar.
        v_mean = v.mean(dim=1, keepdim=True, dtype=acc)  # [B, 1, H, Dv]
        vc = v.to(acc) - v_mean
        fk = fk.to(acc) - fk.mean(dim=1, keepdim=True, dtype=acc)
    else:
        vc = v.to(acc)
    with torch.no_grad():
        g = pow2_floor(fk.abs().mean(dim=1, keepdim=True, dtype=acc))  # [B, 1, H, D]
        h = pow2_floor(vc.abs().amax(dim=1, keepdim=True))  # [B, 1, H, Dv]
    fk_s = (fk.to(acc) * (r / g)).to(dtype)  # mean |.| in [1, 2) * r per channel
    v_s = (vc * (r / h)).to(dtype)  # |.| < 2 r
    if normalize == "divide":
        # The denominator's key sum rides along as one more value column (r * 1): numerator and denominator come out
        # of one product, and the backward sums their opposing contributions to phi(k) in float32, rounding once.
        v_s = torch.cat([v_s, v_s.new_full((*v_s.shape[:-1], 1), r)], dim=-1)
        h = torch.cat([h, h.new_ones((*h.shape[:-1], 1))], dim=-1)
    state = torch.einsum("bmhd,bmhe->bhde", fk_s, v_s)  # [B, H, D, Dv(+1)] = r^2 sum_j phi(k_j) v_j^T / (g h)
    # The query side in float32: phi(q) . state is a skinny product (K = D) whose result must not be rounded to half
    # before the division (a row with one active channel has a ratio independent of its scale; a numerator and a
    # denominator rounded separately gave its query gradient half-precision noise, 7x the conditioning floor).
    state = state.to(acc) * (h.transpose(1, 2) / (r * r))  # [B, H, D, Dv(+1)]: sum_j phi(k_j) [v_j, 1]^T / g
    num = torch.einsum("bnhd,bhde->bnhe", fq.to(acc) * g, state)  # g undoes the key channel scaling
    if normalize == "subtract":
        return num * (scale / m) + v_mean
    num, den = num[..., :-1], num[..., -1:]  # phi(q_i) . sum_j phi(k_j) v_j^T and phi(q_i) . sum_j phi(k_j)
    return num * scale / (den * scale + eps * m)  # the reference's means: eps scales by M


def linear_attention_native(q, k, v, *, feature_map="elu", normalize="divide", scale=None, eps=1e-6):
    """``"torch"`` backend: the reference's math with the key-side reduction in the inputs' dtype (accumulating in
    float32), features (float16 inputs), the query side and the normalisation in float32
    (:func:`scaled_linear_attention`)."""
    s = _default_scale(normalize, q.shape[-1]) if scale is None else scale
    fdt = feature_dtype(q.dtype)
    fq, fk = _features(q.to(fdt), k.to(fdt), feature_map)
    return scaled_linear_attention(fq, fk, v, normalize=normalize, scale=s, eps=eps).to(q.dtype)


def triton_linear_supports(q, k, v, *, feature_map="elu", **kwargs) -> list[str]:
    """Reasons the fused Triton linear-attention kernels cannot run these tensors (empty if they can); shared by the
    ops that reduce to them (focused, per-query InfSA)."""
    from .triton import LINEAR_FEATURE_MAPS, head_dim_reasons, heads_grid_reasons, triton_unavailable

    reasons = triton_unavailable(q, k, v)
    if not (isinstance(feature_map, str) and feature_map in LINEAR_FEATURE_MAPS):
        reasons.append(f"feature_map={feature_map!r} is not one the kernels apply themselves {LINEAR_FEATURE_MAPS}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or len({q.dtype, k.dtype, v.dtype}) > 1:
        reasons.append(f"needs one dtype of float16, bfloat16, float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    return reasons + head_dim_reasons(q, v) + heads_grid_reasons(q)


def linear_attention_triton(q, k, v, **kwargs):
    """The ``"triton"`` backend (see :mod:`visionlin.kernels.triton.linear`), importing Triton on first use."""
    from .triton.linear import linear_attention_triton as fused

    return fused(q, k, v, **kwargs)


_op = Op("linear_attention")
_op.register("triton", linear_attention_triton, triton_linear_supports)
_op.register("torch", linear_attention_native, same_floating_dtype)
_op.register("reference", linear_attention_reference, supports_floating)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: FeatureMap = "elu",
    normalize: str = "divide",
    scale: float | None = None,
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    """Kernelised linear attention; the math is in :func:`linear_attention_reference` and the module docstring.

    Backends: ``"triton"`` (CUDA: fused kernels for the named feature maps with a float32 state, see
    :mod:`visionlin.kernels.triton.linear`), ``"torch"`` (native precision: the output and the long key-side
    reduction stay bf16/fp16, with float32 accumulation; the ``O(N D)`` query side and the normalisation run in
    float32, see :func:`scaled_linear_attention`) and ``"reference"`` (float32 throughout).

    Raises:
        ValueError: shapes that do not fit (named in the message), non-floating inputs, an unknown ``feature_map`` or
            ``normalize``, a feature map that breaks the token layout, ``eps`` not finite and ``>= 0``, ``scale`` not
            finite (or not ``> 0`` for ``"divide"``).
    """
    _check_args(q, k, v, feature_map, normalize, scale, eps)
    return _op(q, k, v, feature_map=feature_map, normalize=normalize, scale=scale, eps=eps, backend=backend)


def efficient_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Efficient Attention (Shen et al., WACV 2021): ``softmax_D(Q) (softmax_N(K)^T V)`` per head, float32.

    The query is normalised with a softmax over its ``D`` channels, each key channel with a softmax over the ``M``
    positions; no scaling and no denominator.

    Args:
        q: Queries ``[B, N, H, D]``.
        k: Keys ``[B, M, H, D]``.
        v: Values ``[B, M, H, Dv]``.

    Returns:
        ``[B, N, H, Dv]`` in the dtype of ``q``.
    """
    check_heads_last("efficient_attention", q, k, v, same_length=False)
    dt = reference_dtype(q.dtype)
    with fp32_reference(q.device):
        rq = q.to(dt).softmax(dim=-1)
        rk = k.to(dt).softmax(dim=1)
        ctx = torch.einsum("bmhd,bmhe->bhde", rk, v.to(dt))  # [B, H, D, Dv]
        out = torch.einsum("bnhd,bhde->bnhe", rq, ctx)
    return out.to(q.dtype)


def _efficient_triton_supports(q, k, v, **kwargs) -> list[str]:
    from .triton import rope_linear_reasons

    return rope_linear_reasons(q, k, v)


def _efficient_triton(q, k, v):
    """``"triton"`` backend: both softmaxes fused into the state and read-out passes
    (:mod:`visionlin.kernels.triton.rope_linear`)."""
    from .triton.rope_linear import efficient_attention_triton

    return efficient_attention_triton(q, k, v)


_eff_op = Op("efficient_attention")
_eff_op.register("triton", _efficient_triton, _efficient_triton_supports)  # preferred: GPU tests passed at dee6de5
_eff_op.register("reference", efficient_attention_reference, supports_floating)


def efficient_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Efficient Attention; see :func:`efficient_attention_reference`.

    Backends: ``"triton"`` (CUDA: fused kernels, see :mod:`visionlin.kernels.triton.rope_linear`) and
    ``"reference"``.
    """
    check_heads_last("efficient_attention", q, k, v, same_length=False)
    return _eff_op(q, k, v, backend=backend)
