"""Dense softmax multi-head attention (timm ``Attention`` twin) as a token mixer."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.softmax import softmax_attention
from ._base import TokenMixer, check_tokens, merge_heads, split_heads
from ._registry import register_attn

__all__ = ["SoftmaxAttention"]


@register_attn("softmax")
class SoftmaxAttention(TokenMixer):
    """Multi-head softmax attention over all tokens; parameter names match timm's ``Attention``.

    Args:
        dim: Channels ``C``.
        num_heads: Heads ``H`` (``C % H == 0``).
        qkv_bias: Bias on the fused ``qkv`` projection.
        qk_norm: Normalise q and k per head with ``norm_layer`` before the dot product.
        attn_drop: Dropout on the attention weights in training (SDPA applies it fused).
        proj_drop: Dropout after the output projection.
        norm_layer: Norm used by ``qk_norm``.
    """

    kernel_ops = ("softmax_attention",)

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_heads)
        dd = {"device": device, "dtype": dtype}
        norm_layer = norm_layer or nn.LayerNorm
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        """Attend over ``x`` ``[B, N, C]``; ``feat_size`` is only validated (softmax attention is position-free)."""
        check_tokens(x, feat_size, num_prefix_tokens, type(self).__name__, self.dim)
        q, k, v = split_heads(self.qkv(x), 3 * self.num_heads).chunk(3, dim=2)
        q, k = self.q_norm(q), self.k_norm(k)
        drop = self.attn_drop if self.training else 0.0
        out = softmax_attention(q, k, v, dropout_p=drop, backend=self.backend)
        return self.proj_drop(self.proj(merge_heads(out)))
