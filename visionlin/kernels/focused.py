"""Focused linear attention (FLatten, Han et al., ICCV 2023), non-causal (bidirectional), heads-last ``[B, N, H, D]``.

With the authors' post-May-2024 numerics::

    q <- (relu(q) + eps) / c ;  k <- (relu(k) + eps) / c      # c: optional positive per-channel scale [H, D]
    f_p(t) = ||t|| * t**p / ||t**p||                         # norms over all H*D channels of a token (joint_heads)
    out_i = f_p(q_i) . (sum_j f_p(k_j) v_j^T / M) / (f_p(q_i) . mean_j f_p(k_j) + eps)
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from ._common import (
    check_flag,
    check_heads_last,
    check_real,
    check_side_tensor,
    check_tensor_values,
    fp32_reference,
    reference_dtype,
    same_floating_dtype,
    supports_floating,
)
from ._dispatch import Op
from .linear import feature_dtype, linear_attention_triton, scaled_linear_attention, triton_linear_supports

__all__ = ["focus", "focused_linear_attention", "focused_linear_attention_reference"]

_OP = "focused_linear_attention"


def focus(
    x: torch.Tensor,
    focusing_factor: float,
    *,
    channel_scale: torch.Tensor | float | None = None,
    eps: float = 1e-6,
    joint_heads: bool = True,
) -> torch.Tensor:
    """The focusing feature map on ``[B, N, H, D]`` (module docstring), in the dtype it is given.

    ``f_p`` is invariant to a positive rescaling of ``t``, so ``t`` is first divided by its largest entry (a
    constant for autograd): ``t ** p`` then lies in ``[0, 1]`` with a 1 among the entries, and neither overflows
    (``90 ** 3`` is beyond float16) nor underflows to ``0 / 0`` at any magnitude whose squared norm fits the dtype
    (float32 inputs beyond about ``1e18`` overflow in the norms and in the products that follow). A token that is all
    zero (``eps = 0`` and no positive entry) maps to zero, the limit of ``f_p``.

    Args:
        x: Queries or keys ``[B, N, H, D]``.
        focusing_factor: The power ``p`` (> 0).
        channel_scale: Positive divisor broadcastable to ``[H, D]`` (FLatten's ``softplus(scale)``).
        eps: Added after the ReLU.
        joint_heads: Take the norms over all ``H * D`` channels of a token (the authors) instead of per head.
    """
    x = F.relu(x) + eps
    if channel_scale is not None:
        x = x / channel_scale
    dims = (-2, -1) if joint_heads else (-1,)
    if any(x.shape[d] == 0 for d in dims):
        return x  # no heads: nothing to focus (and no entry to take a maximum over)
    with torch.no_grad():
        top = x.amax(dim=dims, keepdim=True)
        top = torch.where(top > 0, top, torch.ones_like(top))
    xp = (x / top) ** focusing_factor
    # ||xp|| >= 1 unless the token is all zero; then xp = 0 and any divisor will do. (Not clamp_min(1): ||xp|| is
    # often exactly 1, where the clamp would drop its gradient.)
    xp_norm = torch.linalg.vector_norm(xp, dim=dims, keepdim=True)
    xp_norm = torch.where(xp_norm > 0, xp_norm, torch.ones_like(xp_norm))
    return xp * (torch.linalg.vector_norm(x, dim=dims, keepdim=True) / xp_norm)


def _check(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    focusing_factor: float,
    channel_scale: torch.Tensor | float | None,
    eps: float,
    joint_heads: bool,
    check_values: bool = True,
) -> None:
    check_heads_last(op, q, k, v, same_length=False)
    check_real(op, "focusing_factor", focusing_factor, low=0.0, low_open=True)
    check_real(op, "eps", eps)
    check_flag(op, "joint_heads", joint_heads)
    check_flag(op, "check_values", check_values)
    if channel_scale is None:
        return
    if isinstance(channel_scale, torch.Tensor):
        check_side_tensor(op, "channel_scale", channel_scale, q, tuple(q.shape[-2:]), "[H, D]")
        if check_values:
            check_tensor_values(op, "channel_scale", channel_scale, positive=True)
    elif isinstance(channel_scale, numbers.Real) and not isinstance(channel_scale, bool):
        check_real(op, "channel_scale", channel_scale, low=0.0, low_open=True)
    else:
        raise ValueError(
            f"{op}: channel_scale must be None, a positive number or a floating-point torch.Tensor broadcastable to "
            f"[H, D]={tuple(q.shape[-2:])}, got {type(channel_scale).__name__}"
        )


def focused_linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    focusing_factor: float = 3.0,
    channel_scale: torch.Tensor | float | None = None,
    eps: float = 1e-6,
    joint_heads: bool = True,
) -> torch.Tensor:
    """Specification of focused linear attention (module docstring), in float32.

    Args:
        q: Queries ``[B, N, H, D]``.
        k: Keys ``[B, M, H, D]``.
        v: Values ``[B, M, H, Dv]``.
        focusing_factor: The power ``p`` (finite, ``> 0``).
        channel_scale: Positive finite divisor broadcastable to ``[H, D]`` (a tensor or a number) applied after
            ``relu + eps``. Its values are checked in eager mode only (``_common.check_tensor_values``).
        eps: Used after the ReLU and in the denominator (finite, ``>= 0``).
        joint_heads: Focusing norms over all heads jointly (the authors) or per head.

    Returns:
        ``[B, N, H, Dv]`` in the dtype of ``q``.
    """
    _check(_OP, q, k, v, focusing_factor, channel_scale, eps, joint_heads)
    dt = reference_dtype(q.dtype)
    with fp32_reference(q.device):
        cs = channel_scale.to(dt) if isinstance(channel_scale, torch.Tensor) else channel_scale
        fq = focus(q.to(dt), focusing_factor, channel_scale=cs, eps=eps, joint_heads=joint_heads)
        fk = focus(k.to(dt), focusing_factor, channel_scale=cs, eps=eps, joint_heads=joint_heads)
        kv = torch.einsum("bmhd,bmhe->bhde", fk, v.to(dt)) / k.shape[1]  # [B, H, D, Dv]
        num = torch.einsum("bnhd,bhde->bnhe", fq, kv)
        den = torch.einsum("bnhd,bhd->bnh", fq, fk.mean(dim=1)).unsqueeze(-1)
        out = num / (den + eps)
    return out.to(q.dtype)


def _focused_features(q, k, focusing_factor, channel_scale, eps, joint_heads):
    """``f_p(q)``, ``f_p(k)`` as the native paths compute them: in float32 for float16 inputs (their range; see
    :func:`~visionlin.kernels.linear.feature_dtype`), in the input dtype otherwise."""
    fdt = feature_dtype(q.dtype)
    cs = channel_scale.to(fdt) if isinstance(channel_scale, torch.Tensor) else channel_scale
    fq = focus(q.to(fdt), focusing_factor, channel_scale=cs, eps=eps, joint_heads=joint_heads)
    fk = focus(k.to(fdt), focusing_factor, channel_scale=cs, eps=eps, joint_heads=joint_heads)
    return fq, fk


def _focused_native(q, k, v, *, focusing_factor=3.0, channel_scale=None, eps=1e-6, joint_heads=True):
    """``"torch"`` backend: products in the inputs' dtype, focusing in float32 for float16 inputs (their range; see
    :func:`~visionlin.kernels.linear.feature_dtype`), then the shared native core
    (:func:`~visionlin.kernels.linear.scaled_linear_attention`), which keeps the small focused features and ``eps``
    out of float16's subnormal range."""
    fq, fk = _focused_features(q, k, focusing_factor, channel_scale, eps, joint_heads)
    return scaled_linear_attention(fq, fk, v, normalize="divide", scale=1.0, eps=eps).to(q.dtype)


def _focused_triton(q, k, v, *, focusing_factor=3.0, channel_scale=None, eps=1e-6, joint_heads=True):
    """``"triton"`` backend: over all heads (the authors' form) one op (:mod:`visionlin.kernels.triton.focus`: the
    focusing map as one kernel per tensor, then the fused linear-attention kernels on the features, identity map,
    divide, float32 state; the backward recomputes features and state rather than keeping them); per head, the
    features in PyTorch, then the fused linear-attention kernels."""
    if joint_heads:
        from .triton.focus import focused_linear_attention_triton

        return focused_linear_attention_triton(q, k, v, focusing_factor, channel_scale=channel_scale, eps=eps)
    fq, fk = _focused_features(q, k, focusing_factor, channel_scale, eps, joint_heads)
    return linear_attention_triton(
        fq.to(q.dtype), fk.to(q.dtype), v, feature_map="identity", normalize="divide", scale=1.0, eps=eps
    )


def _focused_triton_supports(q, k, v, **kwargs):
    return triton_linear_supports(q, k, v, feature_map="identity")


_op = Op("focused_linear_attention")
_op.register("triton", _focused_triton, _focused_triton_supports)
_op.register("torch", _focused_native, same_floating_dtype)
_op.register("reference", focused_linear_attention_reference, supports_floating)


def focused_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    focusing_factor: float = 3.0,
    channel_scale: torch.Tensor | float | None = None,
    eps: float = 1e-6,
    joint_heads: bool = True,
    backend: str | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """Focused linear attention; see :func:`focused_linear_attention_reference`.

    ``check_values=False`` skips the eager check that a ``channel_scale`` tensor is positive and finite, which reads
    its values (one host sync per call): for callers whose scale is positive by construction, such as the FLatten
    layer's ``softplus`` of a parameter.
    """
    _check(_OP, q, k, v, focusing_factor, channel_scale, eps, joint_heads, check_values)
    return _op(
        q,
        k,
        v,
        focusing_factor=focusing_factor,
        channel_scale=channel_scale,
        eps=eps,
        joint_heads=joint_heads,
        backend=backend,
    )
