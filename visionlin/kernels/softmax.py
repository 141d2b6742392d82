"""Softmax (dense) attention, non-causal (bidirectional), heads-last ``[B, N, H, D]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (
    as_sdpa_mask,
    check_heads_last,
    check_real,
    check_side_tensor,
    fp32_reference,
    masked_softmax,
    reference_dtype,
    same_floating_dtype,
    sdpa,
    supports_floating,
)
from ._dispatch import Op

__all__ = ["softmax_attention", "softmax_attention_reference"]

_OP = "softmax_attention"


def _check_args(q, k, v, scale, attn_bias, dropout_p) -> None:
    check_heads_last(_OP, q, k, v, same_length=False)
    check_real(_OP, "scale", scale, low=None, optional=True)
    check_real(_OP, "dropout_p", dropout_p, high=1.0)
    if attn_bias is not None:
        if isinstance(attn_bias, torch.Tensor) and attn_bias.dtype == torch.bool:
            raise ValueError(
                f"{_OP}: attn_bias is ADDED to the logits and must be floating point; got a bool mask (convert it, "
                "e.g. torch.zeros(mask.shape).masked_fill(~mask, float('-inf')))"
            )
        b, n, h, _ = q.shape
        check_side_tensor(_OP, "attn_bias", attn_bias, q, (b, h, n, k.shape[1]), "[B, H, N, M]")


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
        scale: Score multiplier (finite); ``None`` means ``D ** -0.5``.
        attn_bias: Additive floating-point bias broadcastable to ``[B, H, N, M]`` (``-inf`` masks a key; a query
            whose every key is masked gets 0, as from PyTorch's SDPA).
        dropout_p: Dropout probability on the attention weights, in ``[0, 1)`` (pass 0 in eval mode).

    Returns:
        ``[B, N, H, Dv]`` in the dtype of ``q`` (q, k, v and the bias may have different floating dtypes).
    """
    _check_args(q, k, v, scale, attn_bias, dropout_p)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dt = reference_dtype(q.dtype)
    with fp32_reference(q.device):
        s = torch.einsum("bnhd,bmhd->bhnm", q.to(dt), k.to(dt)) * scale  # [B, H, N, M]
        if attn_bias is not None:
            s = s + attn_bias.to(dt)
        w = F.dropout(masked_softmax(s), p=dropout_p) if dropout_p else masked_softmax(s)
        out = torch.einsum("bhnm,bmhe->bnhe", w, v.to(dt))
    return out.to(q.dtype)


def _sdpa(q, k, v, *, scale=None, attn_bias=None, dropout_p=0.0):
    # SDPA wants [B, H, N, D]; the transposes are views.
    out = sdpa(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=as_sdpa_mask(attn_bias, q),
        dropout_p=dropout_p,
        scale=scale,
    )
    return out.transpose(1, 2)


_op = Op(_OP)
# SDPA needs one dtype for q, k and v (the bias is cast to it); mixed dtypes run in the float32 reference.
_op.register("sdpa", _sdpa, same_floating_dtype)
_op.register("reference", softmax_attention_reference, supports_floating)


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
    GPU; q, k and v of one dtype, ``attn_bias`` cast to it) and ``"reference"`` (any floating dtypes, float32 math,
    output in q's dtype).

    Raises:
        ValueError: shapes that do not fit (named in the message), non-floating inputs, a bool or non-broadcasting
            ``attn_bias``, a non-finite ``scale`` or ``dropout_p`` outside ``[0, 1)``.
    """
    _check_args(q, k, v, scale, attn_bias, dropout_p)
    return _op(q, k, v, scale=scale, attn_bias=attn_bias, dropout_p=dropout_p, backend=backend)
