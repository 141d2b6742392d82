"""Neighborhood attention (NAT / DiNAT) as a token mixer, with NAT's parameter names (``qkv``, ``rpb``, ``proj``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from ..kernels.neighborhood import neighborhood_attention, neighborhood_attention_qkv
from ..kernels.softmax import softmax_attention
from ._base import TokenMixer, check_tokens, merge_heads, split_heads
from ._registry import register_attn

#: Process-wide switches: ``qkv_packed`` hands the projection's output to :func:`neighborhood_attention_qkv` packed
#: (one gradient in the Triton backward instead of three concatenated) where the layer has no prefix tokens or q / k
#: norms; off, the split call. On since s50: its GPU tests passed (op at s49, NAT-T's model parity at s50, H100) and
#: NAT-T / DiNAT-T CUDA-graph training steps took 1.022x / 1.025x on it (``benchmarks/toggle_speed.py``, config
#: ``na_split`` against ``default``: ``benchmarks/results/h100/s50/``).
FAST_PATHS: dict[str, bool] = {"qkv_packed": True}

__all__ = ["NeighborhoodAttention"]


def _pair(name: str, value: int | Sequence[int], odd: bool) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, Sequence)
        or len(pair) != 2
        or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 or (odd and x % 2 == 0) for x in pair)
    ):
        kind = "an odd integer >= 1" if odd else "an integer >= 1"
        raise ValueError(f"NeighborhoodAttention: {name}={value!r} must be {kind} or a pair of such")
    return int(pair[0]), int(pair[1])


@register_attn("neighborhood")
class NeighborhoodAttention(TokenMixer):
    """2-D neighborhood attention over the token grid (NAT; DiNAT with ``dilation > 1``).

    Each grid token attends to a ``kernel_size`` window around it (shifted inwards at the borders), with optional
    relative positional bias ``rpb`` ``[H, 2k-1, 2k-1]``; see ``visionlin.kernels.neighborhood_attention`` for the
    math and for grids smaller than ``kernel_size * dilation`` (the window is clamped to the grid, never refused).
    Prefix tokens (class / register tokens, when used inside an isotropic ViT) attend to every token, and every grid
    token also attends to them (NATTEN's ``additional_keys``), without bias.

    Args:
        dim: Channels ``C``.
        num_heads: Heads ``H`` (``C % H == 0``).
        qkv_bias: Bias on the fused ``qkv`` projection (NAT uses one).
        qk_norm: Normalise q and k per head with ``norm_layer`` before the dot product.
        attn_drop: Dropout on the attention weights in training.
        proj_drop: Dropout after the output projection.
        norm_layer: Norm used by ``qk_norm``.
        kernel_size: Window size, odd, an int or ``(kh, kw)``.
        dilation: Window dilation, an int or ``(dh, dw)``.
        rel_pos_bias: Learn NAT's relative positional bias ``rpb``.
    """

    kernel_ops = ("neighborhood_attention",)

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        kernel_size: int | Sequence[int] = 7,
        dilation: int | Sequence[int] = 1,
        rel_pos_bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_heads)
        dd = {"device": device, "dtype": dtype}
        self.kernel_size = _pair("kernel_size", kernel_size, odd=True)
        self.dilation = _pair("dilation", dilation, odd=False)
        norm_layer = norm_layer or nn.LayerNorm
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        if rel_pos_bias:
            kh, kw = self.kernel_size
            self.rpb = nn.Parameter(torch.empty(num_heads, 2 * kh - 1, 2 * kw - 1, **dd))
            trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.rpb = None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, dilation={self.dilation}, rel_pos_bias={self.rpb is not None}"

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        """Tokens ``[B, num_prefix_tokens + H*W, C]`` (grid row-major) in and out."""
        check_tokens(x, feat_size, num_prefix_tokens, type(self).__name__, self.dim)
        drop = self.attn_drop if self.training else 0.0
        p = num_prefix_tokens
        plain_qk = isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)
        if not p and plain_qk and FAST_PATHS["qkv_packed"]:  # q, k, v as the projection made them
            qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unflatten(1, tuple(feat_size))
            out = neighborhood_attention_qkv(
                qkv, self.kernel_size, self.dilation, rpb=self.rpb, dropout_p=drop, backend=self.backend
            )  # [B, X, Y, H, D]
            return self.proj_drop(self.proj(merge_heads(out.flatten(1, 2))))
        q, k, v = split_heads(self.qkv(x), 3 * self.num_heads).chunk(3, dim=2)  # [B, N, H, D] each
        q, k = self.q_norm(q), self.k_norm(k)
        grid = [t[:, p:].unflatten(1, tuple(feat_size)) for t in (q, k, v)]  # [B, X, Y, H, D]
        out = neighborhood_attention(
            *grid,
            self.kernel_size,
            self.dilation,
            rpb=self.rpb,
            dropout_p=drop,
            additional_keys=k[:, :p] if p else None,
            additional_values=v[:, :p] if p else None,
            backend=self.backend,
        ).flatten(1, 2)
        if p:
            # Prefix queries attend to every token: dense attention, automatic backend.
            out = torch.cat([softmax_attention(q[:, :p], k, v, dropout_p=drop), out], dim=1)
        return self.proj_drop(self.proj(merge_heads(out)))

    def adapt_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], old_grid: tuple[int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Resize a checkpoint's ``rpb`` to this layer's kernel size (bicubic, as DiNAT's 11x11 checkpoints were made
        from the 7x7 ones); the grid does not matter to this layer."""
        out = dict(state_dict)
        rpb = out.get("rpb")
        if rpb is not None and self.rpb is not None and rpb.ndim == 3 and rpb.shape[1:] != self.rpb.shape[1:]:
            out["rpb"] = F.interpolate(
                rpb[None].float(), size=tuple(self.rpb.shape[1:]), mode="bicubic", align_corners=False
            )[0].to(rpb.dtype)
        return out
