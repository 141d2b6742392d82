"""Norm-aware linear attention token mixer (NaLa / NaLaFormer), with every part of the authors' module.

Parts (the authors' ``NormAwareLinearAttn``): fused ``qkvg`` Linear (q, k, v and a gate ``g``, ``C -> 4C``); ``lepe``,
a depthwise ``k x k`` convolution of the grid tokens' value map; the 2-D RoPE built from ``feat_size`` inside the
layer; :func:`visionlin.kernels.norm_aware_linear_attention` (float32 inside); then
``out_proj(LayerNorm(attention + lepe) * SiLU(g))``, norm and gate in one :func:`visionlin.kernels.gated_layer_norm`
call. Prefix (class) tokens take part in the attention and its means, but get no rotation and no ``lepe``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..kernels.gated_norm import gated_layer_norm
from ..kernels.norm_aware import norm_aware_linear_attention
from ._base import check_tokens, merge_heads, split_heads
from ._registry import register_attn
from .magnitude import RoPELePEMixer, conv1x1_to_linear

__all__ = ["NormAwareAttention"]


@register_attn("nala")
class NormAwareAttention(RoPELePEMixer):
    """NaLa: norm-aware linear attention with 2-D RoPE, LePE, an output LayerNorm and a SiLU gate.

    Args:
        dim: Channels ``C``.
        num_heads: Heads ``H`` (``C / H`` a multiple of 4).
        qkv_bias: Bias on ``qkvg`` (the authors: ``True``).
        qk_norm: Not supported (``NotImplementedError``).
        attn_drop: Must be 0 (no attention matrix exists).
        proj_drop: Dropout after ``out_proj``.
        norm_layer: Unused unless ``qk_norm``; the output norm ``ln`` is always ``nn.LayerNorm(C, eps=ln_eps)``.
        lepe_kernel: Depthwise ``lepe`` kernel size (the authors: 5).
        rope_theta: RoPE frequency base (the authors: 10000).
        eps: Added to the denominator (the authors: 1e-6).
        norm_eps: Added to ``||q||`` where it divides the query. The authors have none (0, the default): an
            all-zero query gives NaN; any value > 0 fixes that.
        ln_eps: Epsilon of ``ln`` (the authors: PyTorch's default 1e-5, not the blocks' 1e-6).
        device: Parameter device.
        dtype: Parameter dtype.
    """

    kernel_ops = ("norm_aware_linear_attention",)

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
        eps: float = 1e-6,
        norm_eps: float = 0.0,
        ln_eps: float = 1e-5,
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
        if norm_eps < 0:
            raise ValueError(f"{type(self).__name__}: {norm_eps=} must be >= 0")
        dd = {"device": device, "dtype": dtype}
        self.eps = eps
        self.norm_eps = norm_eps
        self.qkvg = nn.Linear(dim, 4 * dim, bias=qkv_bias, **dd)
        self.ln = nn.LayerNorm(dim, eps=ln_eps, **dd)
        self.out_proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        """``[B, prefix + H*W, C] -> [B, prefix + H*W, C]`` (grid tokens row-major)."""
        check_tokens(x, feat_size, num_prefix_tokens, type(self).__name__, self.dim)
        q, k, v, g = self.qkvg(x).chunk(4, dim=-1)
        rope = self.rope_tables(feat_size, num_prefix_tokens, x.device, x.dtype)
        out = norm_aware_linear_attention(
            *(split_heads(t, self.num_heads) for t in (q, k, v)),
            rope=rope,
            eps=self.eps,
            norm_eps=self.norm_eps,
            backend=self.backend,
        )
        out = self.add_lepe(merge_heads(out), v, feat_size, num_prefix_tokens)
        out = self.gate_norm(out, g)
        return self.proj_drop(self.out_proj(out))

    def gate_norm(self, out: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``ln(out) * SiLU(g)`` in one call (:func:`visionlin.kernels.gated_layer_norm`, with ``ln``'s parameters):
        float32 statistics, autocast's dtype out under autocast."""
        ln = self.ln
        return gated_layer_norm(out, g, ln.weight, ln.bias, ln.eps, backend=self.helper_backend("gated_layer_norm"))

    @classmethod
    def convert_official_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The authors' ``NormAwareLinearAttn`` already uses our names and Linear layers (1x1 convs also accepted)."""
        return conv1x1_to_linear(state_dict, ("qkvg", "out_proj"))
