"""Focused linear attention token mixer (FLatten), with every part of the authors' module.

Parts: fused ``qkv``; a learned absolute positional encoding added to the keys of the grid tokens
(``positional_encoding``, ``[1, H*W, C]`` for ``pos_size = (H, W)``, resampled when the grid differs); a per-channel
learnable scale (``softplus(scale)`` divides q and k); the focusing map with norms over all heads jointly; the
depthwise convolution ``dwc`` on the value map with ONE ``head_dim``-channel kernel shared by every head; ``proj``.
Prefix tokens (a class token) attend and are attended, but get no positional encoding and no ``dwc`` term.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from ..kernels.conv import token_depthwise_conv2d
from ..kernels.focused import focused_linear_attention
from ._base import TokenMixer, check_tokens, depthwise_taps, merge_heads, split_heads
from ._cache import cached, frozen_key
from ._registry import register_attn

__all__ = ["FocusedLinearAttention"]


@register_attn("flatten")
class FocusedLinearAttention(TokenMixer):
    """FLatten focused linear attention.

    Args:
        dim: Channels ``C``.
        num_heads: Heads ``H``.
        qkv_bias: Bias on ``qkv``.
        qk_norm: Not supported (``NotImplementedError``).
        attn_drop: Must be 0 (no attention matrix exists).
        proj_drop: Dropout after ``proj``.
        norm_layer: Unused unless ``qk_norm``.
        focusing_factor: The power ``p`` (the authors: 3).
        dwc_kernel: Kernel size of the shared depthwise convolution (the authors: 5).
        pos_size: Grid ``(H, W)`` of the learned key positional encoding; ``None`` leaves it out.
        joint_heads: Focusing norms over all heads (the authors) or per head.
    """

    kernel_ops = ("focused_linear_attention",)

    size_dependent = True
    grid_kwarg = "pos_size"

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
        focusing_factor: float = 3.0,
        dwc_kernel: int = 5,
        pos_size: tuple[int, int] | None = None,
        joint_heads: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_heads)
        if qk_norm:
            raise NotImplementedError("FocusedLinearAttention does not support qk_norm=True")
        if attn_drop:
            raise NotImplementedError(f"FocusedLinearAttention does not support attention dropout ({attn_drop=})")
        if dwc_kernel < 1 or dwc_kernel % 2 == 0:
            raise ValueError(f"{dwc_kernel=} must be a positive odd integer")
        if not focusing_factor > 0:
            raise ValueError(f"{focusing_factor=} must be > 0")
        dd = {"device": device, "dtype": dtype}
        self.focusing_factor = focusing_factor
        self.joint_heads = joint_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        hd = self.head_dim
        self.dwc = nn.Conv2d(hd, hd, dwc_kernel, padding=dwc_kernel // 2, groups=hd, **dd)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim, **dd))
        self.pos_size = None if pos_size is None else tuple(pos_size)
        if self.pos_size is not None:
            self.positional_encoding = nn.Parameter(torch.zeros(1, self.pos_size[0] * self.pos_size[1], dim, **dd))
        else:
            self.register_parameter("positional_encoding", None)

    def key_pos_embed(self, feat_size: tuple[int, int]) -> torch.Tensor | None:
        """The key positional encoding for a ``feat_size`` grid, ``[1, H*W, C]`` (resampled if needed)."""
        pe = self.positional_encoding
        if pe is None or tuple(feat_size) == self.pos_size:
            return pe
        return resample_abs_pos_embed(pe, new_size=list(feat_size), old_size=list(self.pos_size), num_prefix_tokens=0)

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        """``[B, prefix + H*W, C] -> [B, prefix + H*W, C]``."""
        check_tokens(x, feat_size, num_prefix_tokens, type(self).__name__, self.dim)
        qkv = self.qkv(x)
        h, dt = self.num_heads, qkv.dtype
        # Tensors derived from parameters alone are kept between inference forwards (layers._cache): ~7 launches
        # per layer that cost more host time than GPU time at 224 px.
        if self.positional_encoding is not None:
            # The grid keys' positional encoding. Cast: under autocast qkv is bf16/fp16 and an fp32 table would
            # promote it (and the kernel) to fp32.
            key = frozen_key(self.positional_encoding, extra=(tuple(feat_size), dt))
            pe = cached(self, "pos", key, lambda: self.key_pos_embed(feat_size).to(dt))
            if torch.is_grad_enabled() and (qkv.requires_grad or pe.requires_grad):
                # Training: out of place over the projection's whole width (the table padded with zeros for the q
                # and v columns and the prefix rows). In place into the key slice, autograd's backward of an in-place
                # op on a view (the Linear's output is one) copied the whole projection gradient several times a layer
                # (clone, new_zeros, three copy_ eager; slice_scatters forward and backward once compiled: 8.3 -> 5.2
                # GB of op outputs in FLatten-DeiT-S's compiled backward at batch 128, benchmarks/graph_audit.py); an
                # out-of-place k + pe would keep a second key tensor a layer for the backward.
                qkv = qkv + F.pad(pe, (self.dim, self.dim, num_prefix_tokens, 0))
            else:  # no autograd: in place into the key slice, a third of the traffic
                qkv[:, num_prefix_tokens:, self.dim : 2 * self.dim].add_(pe)
        q, k, v = (split_heads(t, h) for t in qkv.chunk(3, dim=-1))
        channel_scale = cached(
            self, "scale", frozen_key(self.scale), lambda: F.softplus(self.scale).view(h, self.head_dim)
        )
        out = focused_linear_attention(
            q,
            k,
            v,
            focusing_factor=self.focusing_factor,
            channel_scale=channel_scale,
            joint_heads=self.joint_heads,
            backend=self.backend,
            check_values=False,  # softplus is positive: no host sync per forward to re-check it
        )
        # One depthwise conv shared by the heads over each head's (H, W, D) value map: as a per-channel kernel of the
        # merged channels (channel = head * D + j takes kernel j), added to the attention output in one pass.
        # the kernel in the values' dtype, as autocast gives a Conv2d
        weight, bias = depthwise_taps(self, self.dwc, dt, repeat=h, name="dwc")
        out = token_depthwise_conv2d(
            merge_heads(v),
            weight,
            bias,
            feat_size=(int(feat_size[0]), int(feat_size[1])),
            num_prefix_tokens=num_prefix_tokens,
            residual=merge_heads(out),
            backend=self.helper_backend("token_depthwise_conv2d"),
        )
        return self.proj_drop(self.proj(out))

    def adapt_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], old_grid: tuple[int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Resample a loaded ``positional_encoding`` from ``old_grid`` (or, when not given, a square grid, as the
        authors') to ``pos_size``.

        Raises:
            ValueError: the table's token count matches neither ``old_grid`` nor a square grid.
        """
        sd = dict(state_dict)
        pe = sd.get("positional_encoding")
        if pe is None or self.pos_size is None:
            return sd
        n = pe.shape[1]
        if old_grid is not None and old_grid[0] * old_grid[1] == n:
            old = tuple(old_grid)
        elif n == self.pos_size[0] * self.pos_size[1] and old_grid is None:
            old = tuple(self.pos_size)
        else:
            side = int(round(n**0.5))
            if side * side != n:
                raise ValueError(
                    f"cannot infer the grid of a positional_encoding with {n} tokens ({old_grid=}, "
                    f"pos_size={self.pos_size})"
                )
            old = (side, side)
        if old != tuple(self.pos_size):
            sd["positional_encoding"] = resample_abs_pos_embed(
                pe, new_size=list(self.pos_size), old_size=list(old), num_prefix_tokens=0, verbose=False
            )
        return sd

    @classmethod
    def convert_official_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Identity for the Swin form; the PVT form's ``q`` + ``kv`` Linears are fused into ``qkv``."""
        sd = dict(state_dict)
        if "q.weight" in sd and "kv.weight" in sd:
            for kind in ("weight", "bias"):
                if f"q.{kind}" in sd:
                    sd[f"qkv.{kind}"] = torch.cat([sd.pop(f"q.{kind}"), sd.pop(f"kv.{kind}")], dim=0)
        return sd
