"""Softmax (dense) attention, non-causal (bidirectional), heads-last ``[B, N, H, D]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_heads_last, fp32_reference, is_floating, reference_dtype
from ._dispatch import Op

__all__ = ["softmax_attention", "softmax_attention_reference"]


def softmax_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    attn_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Specification: ``softmax(scale * Q K^T + bias) V`` per head, materialised, in float32.

    Args:
        q: Queries ``[B, N, H, D]``.
        k: Keys ``[B, M, H, D]``.
        v: Values ``[B, M, H, Dv]``.
        scale: Score multiplier; ``None`` means ``D ** -0.5``.
        attn_bias: Additive bias broadcastable to ``[B, H, N, M]``.
        dropout_p: Dropout probability on the attention weights (pass 0 in eval mode).

    Returns:
        ``[B, N, H, Dv]`` in the dtype of ``q``.
    """
    check_heads_last("softmax_attention", q, k, v, same_length=False)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dt = reference_dtype(q.dtype)
    with fp32_reference(q.device):
        s = torch.einsum("bnhd,bmhd->bhnm", q.to(dt), k.to(dt)) * scale  # [B, H, N, M]
        if attn_bias is not None:
            s = s + attn_bias.to(dt)
        w = F.dropout(s.softmax(dim=-1), p=dropout_p) if dropout_p else s.softmax(dim=-1)
        out = torch.einsum("bhnm,bmhe->bnhe", w, v.to(dt))
    return out.to(q.dtype)


def _sdpa(q, k, v, *, scale=None, attn_bias=None, dropout_p=0.0):
    # SDPA wants [B, H, N, D]; the transposes are views.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=None if attn_bias is None else attn_bias.to(q.dtype),
        dropout_p=dropout_p,
        scale=scale,
    )
    return out.transpose(1, 2)


def _sdpa_supports(q, k, v, **kwargs):
    return is_floating(q, k, v)


_op = Op("softmax_attention")
_op.register("sdpa", _sdpa, _sdpa_supports)
_op.register("reference", softmax_attention_reference)


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    attn_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Dense softmax attention; see :func:`softmax_attention_reference` for the math.

    Backends: ``"sdpa"`` (``torch.nn.functional.scaled_dot_product_attention``: flash / memory-efficient / cuDNN on
    GPU) and ``"reference"``.
    """
    check_heads_last("softmax_attention", q, k, v, same_length=False)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{dropout_p=} must lie in [0, 1)")
    return _op(q, k, v, scale=scale, attn_bias=attn_bias, dropout_p=dropout_p, backend=backend)
