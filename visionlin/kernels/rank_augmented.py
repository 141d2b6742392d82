"""Rank-augmented linear attention (RALA, Fan et al., CVPR 2025), non-causal (bidirectional), heads-last.

With ``phi(t) = ELU(t) + 1`` applied to the raw q and k inside the op, ``s = D ** -0.5``, ``M`` keys and, optionally,
the 2-D RoPE ``R`` (:mod:`visionlin.kernels.rope`), the keys are first re-weighted by a softmax over the tokens
against the global (mean) query, which raises the rank of the key-value state::

    alpha_j = softmax_j(s * mean_i phi(q_i) . phi(k_j))           # over the M keys, per batch and head
    k~_j    = phi(k_j) * alpha_j * M                              # mean weight 1
    z_i     = 1 / (phi(q_i) . mean_j k~_j + eps)                  # un-rotated features
    out_i   = (R phi(q_i)) (1/M sum_j (R k~_j) v_j^T) * z_i

i.e. weights ``w_ij = z_i / M * <R phi(q_i), R k~_j>``, rows summing to 1 without RoPE (``eps = 0``). ``s`` only
sets the softmax temperature. The output rank augmentation (a gate on the output) lives in the layer.
"""

from __future__ import annotations

import torch

from ._common import check_real, fp32_reference, reference_dtype, supports_floating
from ._dispatch import Op
from .linear import _elu1
from .rope import RopeTables, check_rope_attention_args, maybe_apply_rope

__all__ = ["rank_augmented_linear_attention", "rank_augmented_linear_attention_reference"]

_OP = "rank_augmented_linear_attention"


def _check(q, k, v, rope, scale, eps) -> None:
    check_rope_attention_args(_OP, q, k, v, rope, eps)
    check_real(_OP, "scale", scale, low=None, optional=True)  # a softmax temperature: any finite value


def rank_augmented_linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rope: RopeTables | None = None,
    scale: float | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Specification of RALA (module docstring), in float32 with autocast disabled.

    Args:
        q: Raw queries ``[B, N, H, D]`` (the feature map is applied here).
        k: Raw keys ``[B, M, H, D]``.
        v: Values ``[B, M, H, Dv]``.
        rope: ``(sin, cos)`` tables ``[N, D]`` rotating ``phi(q)`` and ``k~`` (needs ``M == N``), or ``None``.
        scale: Temperature ``s`` of the key re-weighting softmax; ``None`` means ``D ** -0.5``.
        eps: Added to the denominator.

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
        # mean_i phi(q_i); with no queries (N = 0) the output is empty and any finite summary will do (a mean over
        # nothing would be NaN and poison the key and value gradients).
        q_global = fq.sum(dim=1) / max(q.shape[1], 1)  # [B, H, D]
        logits = torch.einsum("bhd,bmhd->bmh", q_global, fk) * s  # [B, M, H]
        kt = fk * (logits.softmax(dim=1) * m).unsqueeze(-1)  # [B, M, H, D]
        z = 1.0 / (torch.einsum("bnhd,bhd->bnh", fq, kt.mean(dim=1)).unsqueeze(-1) + eps)  # [B, N, H, 1]
        kv = torch.einsum("bmhd,bmhe->bhde", maybe_apply_rope(kt, tables), v) / m  # [B, H, D, Dv]
        out = torch.einsum("bnhd,bhde->bnhe", maybe_apply_rope(fq, tables), kv) * z
    return out.to(q.dtype)


def _triton_supports(q, k, v, **kwargs) -> list[str]:
    from .triton import rope_linear_reasons

    return rope_linear_reasons(q, k, v)


def _triton(q, k, v, **kwargs):
    """``"triton"`` backend: feature maps, RoPE and normaliser fused (:mod:`visionlin.kernels.triton.rope_linear`)."""
    from .triton.rope_linear import rope_linear_attention_triton

    return rope_linear_attention_triton("rank_augmented", q, k, v, **kwargs)


_op = Op(_OP)
_op.register("triton", _triton, _triton_supports)  # preferred: every GPU test passed at dee6de5 (docs/kernels.md)
_op.register("reference", rank_augmented_linear_attention_reference, supports_floating)


def rank_augmented_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rope: RopeTables | None = None,
    scale: float | None = None,
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    """Rank-augmented linear attention; see :func:`rank_augmented_linear_attention_reference`.

    Raises:
        ValueError: shapes do not agree (values in the message), the RoPE tables are not ``[N, D]``, ``eps`` is not
            finite and ``>= 0`` or ``scale`` not finite.
    """
    _check(q, k, v, rope, scale, eps)
    return _op(q, k, v, rope=rope, scale=scale, eps=eps, backend=backend)
