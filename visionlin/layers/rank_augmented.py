"""Rank-augmented linear attention token mixer (RALA / RAVLT), with every part of the authors' module.

Parts (the authors' ``GateLinearAttentionNoSilu``): fused ``qkvo`` projection (q, k, v and an output gate ``o``, one
``C -> 4C`` 1x1 projection); ``lepe``, a depthwise ``k x k`` convolution of the grid tokens' value map; the 2-D RoPE
built from ``feat_size`` inside the layer; :func:`visionlin.kernels.rank_augmented_linear_attention` (KV-buffer rank
augmentation); ``proj((attention + lepe) * o)`` (output rank augmentation: the gate has no activation, despite the
authors' class name). Prefix (class) tokens take part in the attention and its means, but get no rotation and no
``lepe``.
"""

from __future__ import annotations

from ..kernels.rank_augmented import rank_augmented_linear_attention
from ._registry import register_attn
from .magnitude import GatedRoPELinearAttention

__all__ = ["RankAugmentedAttention"]


@register_attn("rala")
class RankAugmentedAttention(GatedRoPELinearAttention):
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

    kernel = staticmethod(rank_augmented_linear_attention)
    kernel_ops = ("rank_augmented_linear_attention",)
