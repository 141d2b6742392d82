"""Focused linear attention (FLatten, Han et al., ICCV 2023), non-causal (bidirectional), heads-last ``[B, N, H, D]``.

With the authors' post-May-2024 numerics::

    q <- (relu(q) + eps) / c ;  k <- (relu(k) + eps) / c      # c: optional positive per-channel scale [H, D]
    f_p(t) = ||t|| * t**p / ||t**p||                         # norms over all H*D channels of a token (joint_heads)
    out_i = f_p(q_i) . (sum_j f_p(k_j) v_j^T / M) / (f_p(q_i) . mean_j f_p(k_j) + eps)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (
    check_heads_last,
    fp32_reference,
    reference_dtype,
    same_floating_dtype,
    supports_floating,
)
from ._dispatch import Op
from .linear import linear_attention_native

__all__ = ["focus", "focused_linear_attention", "focused_linear_attention_reference"]


def focus(
    x: torch.Tensor,
    focusing_factor: float,
    *,
    channel_scale: torch.Tensor | None = None,
    eps: float = 1e-6,
    joint_heads: bool = True,
) -> torch.Tensor:
    """The focusing feature map on ``[B, N, H, D]`` (module docstring), in the dtype it is given.

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
    xp = x**focusing_factor
    return xp * (
        torch.linalg.vector_norm(x, dim=dims, keepdim=True) / torch.linalg.vector_norm(xp, dim=dims, keepdim=True)
    )


def _check(focusing_factor: float, eps: float) -> None:
    if not focusing_factor > 0:
        raise ValueError(f"{focusing_factor=} must be > 0")
    if eps < 0:
        raise ValueError(f"{eps=} must be >= 0")


def focused_linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    focusing_factor: float = 3.0,
    channel_scale: torch.Tensor | None = None,
    eps: float = 1e-6,
    joint_heads: bool = True,
) -> torch.Tensor:
    """Specification of focused linear attention (module docstring), in float32.

    Args:
        q: Queries ``[B, N, H, D]``.
        k: Keys ``[B, M, H, D]``.
        v: Values ``[B, M, H, Dv]``.
        focusing_factor: The power ``p``.
        channel_scale: Positive divisor broadcastable to ``[H, D]`` applied after ``relu + eps``.
        eps: Used after the ReLU and in the denominator.
        joint_heads: Focusing norms over all heads jointly (the authors) or per head.

    Returns:
        ``[B, N, H, Dv]`` in the dtype of ``q``.
    """
    check_heads_last("focused_linear_attention", q, k, v, same_length=False)
    _check(focusing_factor, eps)
    dt = reference_dtype(q.dtype)
    with fp32_reference(q.device):
        cs = None if channel_scale is None else channel_scale.to(dt)
        fq = focus(q.to(dt), focusing_factor, channel_scale=cs, eps=eps, joint_heads=joint_heads)
        fk = focus(k.to(dt), focusing_factor, channel_scale=cs, eps=eps, joint_heads=joint_heads)
        kv = torch.einsum("bmhd,bmhe->bhde", fk, v.to(dt)) / k.shape[1]  # [B, H, D, Dv]
        num = torch.einsum("bnhd,bhde->bnhe", fq, kv)
        den = torch.einsum("bnhd,bhd->bnh", fq, fk.mean(dim=1)).unsqueeze(-1)
        out = num / (den + eps)
    return out.to(q.dtype)


def _focused_native(q, k, v, *, focusing_factor=3.0, channel_scale=None, eps=1e-6, joint_heads=True):
    """``"torch"`` backend: native precision, except that float16 focusing runs in float32.

    ``t ** p`` of float16 activations can leave the float16 range before the norms bring it back; the focused
    features themselves are norm-preserving (``||f_p(t)|| = ||relu(t) + eps||``), so they are cast back safely.
    """
    fdt = torch.float32 if q.dtype == torch.float16 else q.dtype
    cs = None if channel_scale is None else channel_scale.to(fdt)
    fq = focus(q.to(fdt), focusing_factor, channel_scale=cs, eps=eps, joint_heads=joint_heads).to(q.dtype)
    fk = focus(k.to(fdt), focusing_factor, channel_scale=cs, eps=eps, joint_heads=joint_heads).to(q.dtype)
    return linear_attention_native(fq, fk, v, feature_map="identity", normalize="divide", scale=1.0, eps=eps)


_op = Op("focused_linear_attention")
_op.register("torch", _focused_native, same_floating_dtype)
_op.register("reference", focused_linear_attention_reference, supports_floating)


def focused_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    focusing_factor: float = 3.0,
    channel_scale: torch.Tensor | None = None,
    eps: float = 1e-6,
    joint_heads: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Focused linear attention; see :func:`focused_linear_attention_reference`."""
    check_heads_last("focused_linear_attention", q, k, v, same_length=False)
    _check(focusing_factor, eps)
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
