"""Rank-augmented linear attention token mixer (RALA / RAVLT), with every part of the authors' module.

Parts (the authors' ``GateLinearAttentionNoSilu``): fused ``qkvo`` projection (q, k, v and an output gate ``o``, one
``C -> 4C`` 1x1 projection); ``lepe``, a depthwise ``k x k`` convolution of the grid tokens' value map; the 2-D RoPE
built from ``feat_size`` inside the layer; :func:`visionlin.kernels.rank_augmented_linear_attention` (KV-buffer rank
augmentation); ``proj((attention + lepe) * o)`` (output rank augmentation: the gate has no activation, despite the
authors' class name). Prefix (class) tokens take part in the attention and its means, but get no rotation and no
``lepe``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..kernels.rank_augmented import rank_augmented_linear_attention
from ._base import check_tokens, merge_heads, split_heads
from ._registry import register_attn
from .magnitude import RoPELePEMixer, conv1x1_to_linear

__all__ = ["RankAugmentedAttention"]


@register_attn("rala")
class RankAugmentedAttention(RoPELePEMixer):
    """RALA: rank-augmented linear attention with 2-D RoPE, LePE and a linear output gate.

    Args:
        dim: Channels ``C``.
        num_heads: Heads ``H`` (``C / H`` a multiple of 4).
        qkv_bias: Bias on ``qkvo`` (the authors: ``True``).
        qk_norm: Not supported (``NotImplementedError``).
        attn_drop: Must be 0 (no attention matrix exists).
        proj_drop: Dropout after ``proj``.
        norm_layer: Unused unless ``qk_norm``.
        lepe_kernel: Depthwise ``lepe`` kernel size (the authors: 5).
        rope_theta: RoPE frequency base (the authors: 10000).
        scale: Temperature of the key re-weighting softmax; ``None`` means ``head_dim ** -0.5`` (the authors).
        eps: Added to the denominator (the authors: 1e-6).
        device: Parameter device.
        dtype: Parameter dtype.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        *,
        lepe_kernel: int = 5,
        rope_theta: float = 10000.0,
        scale: float | None = None,
        eps: float = 1e-6,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            dim,
            num_heads,
            qk_norm=qk_norm,
            attn_drop=attn_drop,
            lepe_kernel=lepe_kernel,
            rope_theta=rope_theta,
            device=device,
            dtype=dtype,
        )
        dd = {"device": device, "dtype": dtype}
        self.scale = scale
        self.eps = eps
        self.qkvo = nn.Linear(dim, 4 * dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        """``[B, prefix + H*W, C] -> [B, prefix + H*W, C]`` (grid tokens row-major)."""
        check_tokens(x, feat_size, num_prefix_tokens, type(self).__name__)
        q, k, v, o = self.qkvo(x).chunk(4, dim=-1)
        rope = self.rope_tables(feat_size, num_prefix_tokens, x.device, x.dtype)
        out = rank_augmented_linear_attention(
            *(split_heads(t, self.num_heads) for t in (q, k, v)),
            rope=rope,
            scale=self.scale,
            eps=self.eps,
            backend=self.backend,
        )
        out = (merge_heads(out) + self.lepe_tokens(v, feat_size, num_prefix_tokens)) * o
        return self.proj_drop(self.proj(out))

    @classmethod
    def convert_official_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The authors' ``GateLinearAttentionNoSilu``: 1x1 ``Conv2d`` weights of ``qkvo``/``proj`` become Linear."""
        return conv1x1_to_linear(state_dict, ("qkvo", "proj"))
