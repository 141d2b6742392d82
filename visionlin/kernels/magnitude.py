"""Magnitude-aware linear attention (MALA, Fan et al., ICCV 2025), non-causal (bidirectional), heads-last.

With ``phi(t) = ELU(t) + 1`` applied to the raw q and k inside the op, ``s = D ** -0.5``, ``M`` keys and, optionally,
the 2-D RoPE ``R`` (:mod:`visionlin.kernels.rope`)::

    z_i   = s * phi(q_i) . mean_j phi(k_j)                         # un-rotated features
    out_i = (R phi(q_i)) (s/M sum_j (R phi(k_j)) v_j^T) * (1 + 1/(z_i + eps)) - z_i * mean_j v_j

i.e. weights ``w_ij = (1 + 1/(z_i + eps)) * s/M * <R phi(q_i), R phi(k_j)> - z_i / M``. Without RoPE the rows sum to
exactly 1 (``eps = 0``); the authors compute ``z`` before the rotation, so with RoPE they sum to 1 only approximately
and may be negative. Computed in ``O(N D^2)`` through the ``D x Dv`` state.
"""

from __future__ import annotations

import torch

from ._common import check_real, fp32_reference, reference_dtype, supports_floating
from ._dispatch import Op
from .linear import _elu1
from .rope import RopeTables, check_rope_attention_args, maybe_apply_rope

__all__ = ["magnitude_aware_linear_attention", "magnitude_aware_linear_attention_reference"]

_OP = "magnitude_aware_linear_attention"


def _check(q, k, v, rope, scale, eps) -> None:
    check_rope_attention_args(_OP, q, k, v, rope, eps)
    # z = s * phi(q).mean phi(k) is inverted: a scale <= 0 sends z + eps through zero.
    check_real(_OP, "scale", scale, low=0.0, low_open=True, optional=True)


def magnitude_aware_linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rope: RopeTables | None = None,
    scale: float | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Specification of MALA (module docstring), in float32 with autocast disabled.

    Args:
        q: Raw queries ``[B, N, H, D]`` (the feature map is applied here).
        k: Raw keys ``[B, M, H, D]``.
        v: Values ``[B, M, H, Dv]``.
        rope: ``(sin, cos)`` tables ``[N, D]`` rotating ``phi(q)`` and ``phi(k)`` (needs ``M == N``), or ``None``.
        scale: ``s`` (finite, ``> 0``); ``None`` means ``D ** -0.5``.
        eps: Added to ``z`` before it is inverted.

    Returns:
        ``[B, N, H, Dv]`` in the dtype of ``q``.
    """
    _check(q, k, v, rope, scale, eps)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    m = k.shape[1]
    dt = reference_dtype(q.dtype)
    with fp32_reference(q.device):
        fq = _elu1(q.to(dt))  # [B, N, H, D]: ELU + 1 without the cancellation of (exp(x) - 1) + 1
        fk = _elu1(k.to(dt))  # [B, M, H, D]
        v = v.to(dt)
        tables = None if rope is None else (rope[0].to(dt), rope[1].to(dt))
        z = torch.einsum("bnhd,bhd->bnh", fq, fk.mean(dim=1)).unsqueeze(-1) * s  # [B, N, H, 1]
        kv = torch.einsum("bmhd,bmhe->bhde", maybe_apply_rope(fk, tables), v) * (s / m)  # [B, H, D, Dv]
        num = torch.einsum("bnhd,bhde->bnhe", maybe_apply_rope(fq, tables), kv)  # [B, N, H, Dv]
        out = num * (1.0 + 1.0 / (z + eps)) - z * v.mean(dim=1, keepdim=True)
    return out.to(q.dtype)


def _triton_supports(q, k, v, **kwargs) -> list[str]:
    from .triton import rope_linear_reasons

    return rope_linear_reasons(q, k, v)


def _triton(q, k, v, **kwargs):
    """``"triton"`` backend: feature maps, RoPE and normaliser fused (:mod:`visionlin.kernels.triton.rope_linear`)."""
    from .triton.rope_linear import rope_linear_attention_triton

    return rope_linear_attention_triton("magnitude", q, k, v, **kwargs)


_op = Op(_OP)
_op.register("triton", _triton, _triton_supports)
_op.register("reference", magnitude_aware_linear_attention_reference, supports_floating)


def magnitude_aware_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rope: RopeTables | None = None,
    scale: float | None = None,
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    """Magnitude-aware linear attention; see :func:`magnitude_aware_linear_attention_reference`.

    Raises:
        ValueError: shapes do not agree (values in the message), the RoPE tables are not ``[N, D]``, ``eps`` is not
            finite and ``>= 0`` or ``scale`` not finite and ``> 0``.
    """
    _check(q, k, v, rope, scale, eps)
    return _op(q, k, v, rope=rope, scale=scale, eps=eps, backend=backend)
