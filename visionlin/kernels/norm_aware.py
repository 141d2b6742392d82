"""Norm-aware linear attention (NaLa, NaLaFormer, Meng et al.), non-causal (bidirectional), heads-last.

The feature maps restore the query norm the usual kernels discard: with ``n_i = ||q_i||`` per token and head, ``M``
keys and, optionally, the 2-D RoPE ``R`` (:mod:`visionlin.kernels.rope`)::

    p_i     = 3 * (0.5 + tanh(n_i))                               # per-token power in [1.5, 4.5)
    Q_i     = [(relu(q_i) / n_i) ** p_i || (relu(-q_i) / n_i) ** p_i]            # 2D channels
    K_j     = [relu(k_j ** 3) || relu(-k_j ** 3)]                 # cubed keys, never normalised
    Q'_i    = [R(first half of Q_i) || R(second half of Q_i)]     # the D-channel RoPE on each half; K'_j likewise
    z_i     = 1 / (Q_i . mean_j K_j + eps)                        # un-rotated features
    out_i   = Q'_i (1/M sum_j K'_j v_j^T) * z_i

Only same-sign coordinates interact, so without RoPE the weights ``z_i / M * <Q_i, K_j>`` are non-negative and rows
sum to 1 (``eps = 0``). Everything runs in float32 (``k ** 3`` overflows half precision quickly), as the authors cast.

The authors divide by ``||q||`` with no epsilon: an all-zero query gives NaN. ``norm_eps > 0`` divides by
``||q|| + norm_eps`` instead (an all-zero query then yields a zero output); the default 0 reproduces the authors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_real, fp32_reference, reference_dtype, supports_floating
from ._dispatch import Op
from .rope import RopeTables, check_rope_attention_args, maybe_apply_rope

__all__ = ["norm_aware_feature_maps", "norm_aware_linear_attention", "norm_aware_linear_attention_reference"]


def norm_aware_feature_maps(
    q: torch.Tensor, k: torch.Tensor, *, norm_eps: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """NaLa's split feature maps (module docstring), in the dtype they are given.

    Args:
        q: Raw queries ``[B, N, H, D]``.
        k: Raw keys ``[B, M, H, D]``.
        norm_eps: Added to ``||q||`` where it divides the query.

    Returns:
        ``(q_pos, q_neg, k_pos, k_neg)``: ``[B, N, H, D]`` twice, then ``[B, M, H, D]`` twice.
    """
    n = torch.linalg.vector_norm(q, dim=-1, keepdim=True)  # [B, N, H, 1]
    power = 3.0 * (0.5 + torch.tanh(n))
    q_pos = (F.relu(q) / (n + norm_eps)) ** power
    q_neg = (F.relu(-q) / (n + norm_eps)) ** power
    k3 = k**3
    return q_pos, q_neg, F.relu(k3), F.relu(-k3)


def _check(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: RopeTables | None,
    eps: float,
    norm_eps: float,
) -> None:
    check_rope_attention_args(op, q, k, v, rope, eps)
    check_real(op, "norm_eps", norm_eps)


def norm_aware_linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rope: RopeTables | None = None,
    eps: float = 1e-6,
    norm_eps: float = 0.0,
) -> torch.Tensor:
    """Specification of NaLa (module docstring), in float32 with autocast disabled.

    Args:
        q: Raw queries ``[B, N, H, D]`` (the feature maps are applied here).
        k: Raw keys ``[B, M, H, D]``.
        v: Values ``[B, M, H, Dv]``.
        rope: ``(sin, cos)`` tables ``[N, D]`` rotating each ``D``-channel half of the features (needs ``M == N``),
            or ``None``.
        eps: Added to the denominator.
        norm_eps: Added to ``||q||`` where it divides the query; 0 (the authors) gives NaN for an all-zero query.

    Returns:
        ``[B, N, H, Dv]`` in the dtype of ``q``.
    """
    _check("norm_aware_linear_attention", q, k, v, rope, eps, norm_eps)
    m = k.shape[1]
    dt = reference_dtype(q.dtype)
    with fp32_reference(q.device):
        q_pos, q_neg, k_pos, k_neg = norm_aware_feature_maps(q.to(dt), k.to(dt), norm_eps=norm_eps)
        v = v.to(dt)
        tables = None if rope is None else (rope[0].to(dt), rope[1].to(dt))
        fq = torch.cat([q_pos, q_neg], dim=-1)  # [B, N, H, 2D]
        fk = torch.cat([k_pos, k_neg], dim=-1)  # [B, M, H, 2D]
        rq = torch.cat([maybe_apply_rope(q_pos, tables), maybe_apply_rope(q_neg, tables)], dim=-1)
        rk = torch.cat([maybe_apply_rope(k_pos, tables), maybe_apply_rope(k_neg, tables)], dim=-1)
        z = 1.0 / (torch.einsum("bnhd,bhd->bnh", fq, fk.mean(dim=1)).unsqueeze(-1) + eps)  # [B, N, H, 1]
        kv = torch.einsum("bmhd,bmhe->bhde", rk, v) / m  # [B, H, 2D, Dv]
        out = torch.einsum("bnhd,bhde->bnhe", rq, kv) * z
    return out.to(q.dtype)


def _triton_supports(q, k, v, **kwargs) -> list[str]:
    from .triton import MAX_NORM_AWARE_HEAD_DIM, rope_linear_reasons

    return rope_linear_reasons(q, k, v, max_head_dim=MAX_NORM_AWARE_HEAD_DIM)


def _triton(q, k, v, **kwargs):
    """``"triton"`` backend: feature maps, RoPE and normaliser fused (:mod:`visionlin.kernels.triton.rope_linear`)."""
    from .triton.rope_linear import rope_linear_attention_triton

    return rope_linear_attention_triton("norm_aware", q, k, v, **kwargs)


_op = Op("norm_aware_linear_attention")
_op.register("triton", _triton, _triton_supports)
_op.register("reference", norm_aware_linear_attention_reference, supports_floating)


def norm_aware_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rope: RopeTables | None = None,
    eps: float = 1e-6,
    norm_eps: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Norm-aware linear attention; see :func:`norm_aware_linear_attention_reference`.

    Raises:
        ValueError: shapes do not agree (values in the message), the RoPE tables are not ``[N, D]``, or an epsilon
            is negative, not finite or not a number.
    """
    _check("norm_aware_linear_attention", q, k, v, rope, eps, norm_eps)
    return _op(q, k, v, rope=rope, eps=eps, norm_eps=norm_eps, backend=backend)
