"""Kernelised linear attention, non-causal (bidirectional), heads-last ``[B, N, H, D]``.

With a feature map ``phi`` and ``M`` keys, the score of query ``i`` for key ``j`` is
``a_ij = s * phi(q_i).phi(k_j) / M``.
Three normalisations turn scores into weights:

* ``"divide"`` (the usual one): ``w_ij = a_ij / (sum_j a_ij + eps)``, rows sum to ~1, weights are non-negative when
  ``phi`` is.
* ``"subtract"`` (InLine, injective): ``w_ij = a_ij - mean_j a_ij + 1/M``, rows sum to exactly 1, weights may be
  negative.
* ``"none"``: ``w_ij = M * a_ij = s * phi(q_i).phi(k_j)`` (cosine attention style). Un-normalised: the output
  grows with ``M``, and at long sequences its true value can exceed the float16 range (the computation itself runs
  in float32).

All three are computed in ``O(N D^2)`` through the ``D x D`` state ``sum_j phi(k_j) v_j^T``; the test suite proves each
equals its materialised ``O(N^2)`` form.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._common import (
    check_heads_last,
    check_real,
    fp32_reference,
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
    "linear_attention",
    "linear_attention_reference",
]

FeatureMap = str | Callable[[torch.Tensor], torch.Tensor]


def _elu1(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


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
    return fq, fk


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


def linear_attention_native(q, k, v, *, feature_map="elu", normalize="divide", scale=None, eps=1e-6):
    """``"torch"`` backend: the reference's math in the inputs' dtype (matrix products accumulate in float32).

    The ``D x Dv`` state is formed from ``M^-1/2``-scaled keys and values, so it is a mean, not a sum, and stays
    inside the float16 range at any sequence length.
    """
    s = _default_scale(normalize, q.shape[-1]) if scale is None else scale
    m = k.shape[1]
    fq, fk = _features(q, k, feature_map)
    r = m**-0.5
    k_mean = fk.mean(dim=1, keepdim=True)  # [B, 1, H, D]
    if normalize == "subtract":
        # Exact centred form: sum_j w_ij v_j = s * phi(q_i) . mean_j (phi(k_j) - kbar)(v_j - vbar)^T + vbar. The
        # uncentred form (num - row_sum * vbar + vbar) cancels two large terms (~10% error in bf16 when q, k have a
        # mean); centring v too keeps the rounding of kbar from leaking in as kbar_error * vbar.
        v_mean = v.mean(dim=1, keepdim=True)
        kv = torch.einsum("bmhd,bmhe->bhde", (fk - k_mean) * r, (v - v_mean) * r)
        return torch.einsum("bnhd,bhde->bnhe", fq, kv) * s + v_mean
    if normalize == "none":
        # Un-normalised: the state is the sum it is. Forming a mean and multiplying by M afterwards would scale the
        # backward by M as well (float16 overflow at a few thousand tokens).
        return torch.einsum("bnhd,bhde->bnhe", fq, torch.einsum("bmhd,bmhe->bhde", fk, v) * s)
    kv = torch.einsum("bmhd,bmhe->bhde", fk * r, v * r)  # mean_j phi(k_j) v_j^T
    num = torch.einsum("bnhd,bhde->bnhe", fq, kv)
    row_sum = torch.einsum("bnhd,bhd->bnh", fq, k_mean.squeeze(1)).unsqueeze(-1) * s
    return num * s / (row_sum + eps)


_op = Op("linear_attention")
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

    Backends: ``"torch"`` (native precision: bf16/fp16 inputs stay bf16/fp16, products accumulate in float32) and
    ``"reference"`` (float32 throughout).

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


_eff_op = Op("efficient_attention")
_eff_op.register("reference", efficient_attention_reference, supports_floating)


def efficient_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Efficient Attention; see :func:`efficient_attention_reference`."""
    check_heads_last("efficient_attention", q, k, v, same_length=False)
    return _eff_op(q, k, v, backend=backend)
