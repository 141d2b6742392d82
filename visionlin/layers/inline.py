"""InLine attention token mixer (Han et al., NeurIPS 2024): injective linear attention plus a local residual.

Parts: fused ``qkv``; a kernel function on q and k (``identity`` by default); injective linear attention
(:func:`visionlin.kernels.linear_attention` with ``normalize="subtract"``, ``s = head_dim ** -0.5``: weights
``s/N (q_i.k_j - q_i.mean(k)) + 1/N``, rows summing to 1); the local residual, a depthwise ``k x k`` convolution of the
grid tokens' value map whose kernels are predicted per sample from the mean of ALL tokens of the layer input by
``residual = Conv1d(C, C, 1, groups=h) -> GELU -> Conv1d(C, k*k*C, 1, groups=h)``; ``proj``. Prefix (class) tokens
take part in the attention and its means, and in the token mean that predicts the kernels, but get no local residual.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.conv import token_depthwise_conv2d
from ..kernels.linear import linear_attention
from ._base import TokenMixer, check_tokens, merge_heads, split_heads
from ._registry import register_attn

__all__ = ["KERNEL_FUNCS", "InLineAttention", "dynamic_depthwise_conv2d"]


def _leaky_relu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, negative_slope=0.01)  # nn.LeakyReLU() default, as the authors


#: The authors' kernel functions; the linear-attention op applies them to q and k (in its backend's precision).
KERNEL_FUNCS: dict[str, str | Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": "identity",
    "relu": "relu",
    "leakyrelu": _leaky_relu,
    "exp": torch.exp,
}


def _grouped_pointwise(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """``conv(x[..., None])[..., 0]`` for a grouped kernel-size-1 ``Conv1d`` on ``x`` ``[B, C_in]``, as a batched
    matrix product over the groups."""
    g = conv.groups
    weight = conv.weight.reshape(g, conv.out_channels // g, conv.in_channels // g)
    b = x.shape[0]
    out = torch.einsum("bgi,goi->bgo", x.reshape(b, g, conv.in_channels // g), weight).reshape(b, conv.out_channels)
    return out if conv.bias is None else out + conv.bias


def dynamic_depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise convolution with a different kernel per sample and channel, zero padding ``k // 2``, no bias.

    Args:
        x: Maps ``[B, C, H, W]``.
        weight: Kernels ``[B, C, k, k]`` (``k`` odd).

    Returns:
        ``[B, C, H, W]``.
    """
    b, c, hh, ww = x.shape
    k = weight.shape[-1]
    if b * c == 0:  # grouped convolution needs groups >= 1; an empty batch has nothing to convolve
        return x * weight.sum()
    out = F.conv2d(x.reshape(1, b * c, hh, ww), weight.reshape(b * c, 1, k, k), padding=k // 2, groups=b * c)
    return out.reshape(b, c, hh, ww)


@register_attn("inline")
class InLineAttention(TokenMixer):
    """InLine injective linear attention with the authors' dynamic local residual.

    Args:
        dim: Channels ``C``.
        num_heads: Heads ``h``.
        qkv_bias: Bias on ``qkv``.
        qk_norm: Not supported (``NotImplementedError``).
        attn_drop: Must be 0 (no attention matrix exists).
        proj_drop: Dropout after ``proj``.
        norm_layer: Unused (``qk_norm`` is not supported).
        kernel_func: Kernel function on q and k, one of :data:`KERNEL_FUNCS` (the authors: ``"identity"``).
        dwc_kernel: Size ``k`` of the predicted depthwise kernels (the authors: 3).
        device: Parameter device.
        dtype: Parameter dtype.
    """

    kernel_ops = ("linear_attention",)

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
        kernel_func: str = "identity",
        dwc_kernel: int = 3,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_heads)
        if qk_norm:
            raise NotImplementedError("InLineAttention does not support qk_norm=True")
        if attn_drop:
            raise NotImplementedError(f"InLineAttention does not support attention dropout ({attn_drop=})")
        if kernel_func not in KERNEL_FUNCS:
            raise ValueError(f"unknown {kernel_func=}; choose one of {sorted(KERNEL_FUNCS)}")
        if dwc_kernel < 1 or dwc_kernel % 2 == 0:
            raise ValueError(f"{dwc_kernel=} must be a positive odd integer")
        dd = {"device": device, "dtype": dtype}
        self.kernel_func = kernel_func
        self.dwc_kernel = dwc_kernel
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.residual = nn.Sequential(
            nn.Conv1d(dim, dim, 1, groups=num_heads, **dd),
            nn.GELU(),
            nn.Conv1d(dim, dim * dwc_kernel * dwc_kernel, 1, groups=num_heads, **dd),
        )

    def local_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample depthwise kernels ``[B, C, k, k]`` from the token mean of ``x`` ``[B, N, C]``."""
        b, _, c = x.shape
        k = self.dwc_kernel
        first, act, second = self.residual
        # The grouped 1x1 convolutions of a length-1 sequence are block-diagonal matrix products: computed as one
        # batched product each (cuDNN's grouped Conv1d ran this as ~20 tiny kernels per layer).
        w = _grouped_pointwise(act(_grouped_pointwise(x.mean(dim=1), first)), second)
        return w.reshape(b, c, k, k)  # [B, k*k*C]: channel c owns outputs c*k*k .. c*k*k+k*k-1

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        """``[B, P + H*W, C] -> [B, P + H*W, C]``; prefix tokens first, then the grid in row-major order."""
        check_tokens(x, feat_size, num_prefix_tokens, type(self).__name__, self.dim)
        feat_size = (int(feat_size[0]), int(feat_size[1]))
        p = num_prefix_tokens
        q, k, v = split_heads(self.qkv(x), 3 * self.num_heads).chunk(3, dim=2)  # [B, N, h, d] each
        out = linear_attention(
            q,
            k,
            v,
            feature_map=KERNEL_FUNCS[self.kernel_func],
            normalize="subtract",
            scale=self.head_dim**-0.5,
            backend=self.backend,
        )
        out = token_depthwise_conv2d(
            merge_heads(v),
            self.local_kernels(x).to(v.dtype),
            feat_size=feat_size,
            num_prefix_tokens=p,
            residual=merge_heads(out),
            backend=self.helper_backend("token_depthwise_conv2d"),
        )  # attention output + per-sample depthwise conv of the value map (prefix rows: attention output only)
        return self.proj_drop(self.proj(out))
