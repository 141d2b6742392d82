"""Efficient Attention token mixer (Shen et al., WACV 2021), with the parts of the authors' module.

Parts (the authors' ``EfficientAttention``): ``keys``, ``queries`` (``C -> key_dim``) and ``values``
(``C -> value_dim``) projections; per head a softmax over the ``D`` channels of each query and over the ``N``
positions of each key channel, ``out = softmax_D(Q) (softmax_N(K)^T V)`` (:func:`visionlin.kernels.efficient_attention`,
no scaling, no denominator); ``reprojection`` (``value_dim -> C``). Position-free: ``feat_size`` is only validated and
prefix (class) tokens are ordinary tokens.

The authors' module also adds its input (a residual inside the attention); our blocks add the residual themselves, so
``residual=False`` by default. ``residual=True`` reproduces the authors' module output.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..kernels.linear import efficient_attention
from ._base import TokenMixer, check_tokens, merge_heads, split_heads
from ._registry import register_attn
from .magnitude import conv1x1_to_linear

__all__ = ["EfficientAttention"]


@register_attn("efficient")
class EfficientAttention(TokenMixer):
    """Efficient Attention: softmax-normalised queries (over channels) and keys (over positions).

    Args:
        dim: Channels ``C`` of the input and output.
        num_heads: Heads ``H``; ``key_dim`` and ``value_dim`` must be divisible by it.
        qkv_bias: Bias on ``keys``, ``queries`` and ``values`` (the authors: ``True``).
        qk_norm: Not supported (``NotImplementedError``).
        attn_drop: Must be 0 (no attention matrix exists).
        proj_drop: Dropout after ``reprojection``.
        norm_layer: Unused unless ``qk_norm``.
        key_dim: Total key/query channels (the authors' ``key_channels``); ``None`` means ``dim``.
        value_dim: Total value channels (the authors' ``value_channels``); ``None`` means ``dim``.
        residual: Add the input to the output, as the authors' module does. Off by default: visionlin blocks add the
            residual themselves.
        device: Parameter device.
        dtype: Parameter dtype.
    """

    kernel_ops = ("efficient_attention",)

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
        key_dim: int | None = None,
        value_dim: int | None = None,
        residual: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        name = type(self).__name__
        key_dim = dim if key_dim is None else key_dim
        value_dim = dim if value_dim is None else value_dim
        if min(dim, key_dim, value_dim, num_heads) <= 0:
            raise ValueError(f"{name}: sizes must be positive, got {dim=}, {key_dim=}, {value_dim=}, {num_heads=}")
        if key_dim % num_heads or value_dim % num_heads:
            raise ValueError(f"{name}: {key_dim=} and {value_dim=} must be divisible by {num_heads=}")
        super().__init__(key_dim, num_heads)
        self.dim = dim  # TokenMixer validated key_dim; head_dim is the key/query head dim
        if qk_norm:
            raise NotImplementedError(f"{name} does not support qk_norm=True")
        if attn_drop:
            raise NotImplementedError(f"{name} does not support attention dropout ({attn_drop=}): no attention matrix")
        dd = {"device": device, "dtype": dtype}
        self.key_dim = key_dim
        self.value_dim = value_dim
        self.residual = residual
        self.keys = nn.Linear(dim, key_dim, bias=qkv_bias, **dd)
        self.queries = nn.Linear(dim, key_dim, bias=qkv_bias, **dd)
        self.values = nn.Linear(dim, value_dim, bias=qkv_bias, **dd)
        self.reprojection = nn.Linear(value_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        """``[B, prefix + H*W, C] -> [B, prefix + H*W, C]``; ``feat_size`` is only validated (position-free)."""
        check_tokens(x, feat_size, num_prefix_tokens, type(self).__name__, self.dim)
        q, k, v = (split_heads(proj(x), self.num_heads) for proj in (self.queries, self.keys, self.values))
        out = efficient_attention(q, k, v, backend=self.backend)
        out = self.proj_drop(self.reprojection(merge_heads(out)))
        return out + x if self.residual else out

    @classmethod
    def convert_official_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The authors' 1x1 ``Conv2d`` weights of ``keys``/``queries``/``values``/``reprojection`` become Linear."""
        return conv1x1_to_linear(state_dict, ("keys", "queries", "values", "reprojection"))
