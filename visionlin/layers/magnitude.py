"""Magnitude-aware linear attention token mixer (MALA / MAViT), with every part of the authors' module.

Parts: fused ``qkvo`` projection (q, k, v and an output gate ``o``, one ``C -> 4C`` 1x1 projection); ``lepe``, a
depthwise ``k x k`` convolution of the grid tokens' value map; the 2-D RoPE built from ``feat_size`` inside the layer;
:func:`visionlin.kernels.magnitude_aware_linear_attention`; ``proj((attention + lepe) * o)`` (the gate has no
activation). Prefix (class) tokens take part in the attention and its means, but get no rotation and no ``lepe``.

Also home of :class:`RoPELePEMixer`, the shared skeleton of the MALA / RALA / NaLa layers (RoPE table cache, LePE).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ..kernels._common import may_keep_tensors
from ..kernels.magnitude import magnitude_aware_linear_attention
from ..kernels.rope import RopeTables, rope_2d_tables
from ._base import (
    TokenDepthwiseConv2d,
    TokenMixer,
    check_tokens,
    merge_heads,
    split_heads,
)
from ._registry import register_attn

__all__ = ["GatedRoPELinearAttention", "MagnitudeAwareAttention", "RoPELePEMixer", "conv1x1_to_linear"]

_MAX_CACHED_TABLES = 8


def conv1x1_to_linear(state_dict: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Reshape the ``[O, I, 1, 1]`` weights of the 1x1 convolutions ``names`` to ``nn.Linear``'s ``[O, I]``.

    Weights already 2-D are left as they are, so converting twice is harmless.
    """
    sd = dict(state_dict)
    for name in names:
        w = sd.get(f"{name}.weight")
        if w is not None and w.ndim == 4:
            if tuple(w.shape[2:]) != (1, 1):
                raise ValueError(f"{name}.weight of shape {tuple(w.shape)} is not a 1x1 convolution")
            sd[f"{name}.weight"] = w.flatten(1)
    return sd


class RoPELePEMixer(TokenMixer):
    """Skeleton shared by the MALA / RALA / NaLa layers: argument checks, 2-D RoPE tables, the ``lepe`` convolution.

    Args:
        dim: Channels ``C``.
        num_heads: Heads ``H``; ``C / H`` must be a multiple of 4 (2-D RoPE).
        qk_norm: Not supported (``NotImplementedError``).
        attn_drop: Must be 0 (no attention matrix exists).
        lepe_kernel: Kernel size of the depthwise ``lepe`` convolution on the value map (odd).
        rope_theta: Frequency base of the 2-D RoPE.
        device: Parameter device.
        dtype: Parameter dtype.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qk_norm: bool,
        attn_drop: float,
        lepe_kernel: int,
        rope_theta: float,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_heads)
        name = type(self).__name__
        if qk_norm:
            raise NotImplementedError(f"{name} does not support qk_norm=True")
        if attn_drop:
            raise NotImplementedError(f"{name} does not support attention dropout ({attn_drop=}): no attention matrix")
        if self.head_dim % 4:
            raise ValueError(
                f"{name}: 2-D RoPE needs head_dim to be a multiple of 4, got head_dim={self.head_dim} "
                f"({dim=}, {num_heads=})"
            )
        if lepe_kernel < 1 or lepe_kernel % 2 == 0:
            raise ValueError(f"{name}: {lepe_kernel=} must be a positive odd integer")
        if not rope_theta > 0:
            raise ValueError(f"{name}: {rope_theta=} must be > 0")
        self.rope_theta = rope_theta
        self.lepe = TokenDepthwiseConv2d(dim, lepe_kernel, device=device, dtype=dtype)
        self._rope_cache: dict[tuple, RopeTables] = {}

    def rope_tables(
        self, feat_size: tuple[int, int], num_prefix_tokens: int, device: torch.device, dtype: torch.dtype
    ) -> RopeTables:
        """The ``(sin, cos)`` tables ``[num_prefix_tokens + H*W, head_dim]`` (identity rows for prefix tokens).

        Float32 (float64 for float64 inputs) whatever the activation dtype: the kernels compute in float32. Cached per
        ``(feat_size, num_prefix_tokens, device, dtype)`` and inference mode (a few entries; not under
        ``torch.compile``, where the tables are traced as constants, nor during CUDA-graph capture:
        :func:`visionlin.kernels._common.may_keep_tensors`).
        """
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32

        def build() -> RopeTables:
            return rope_2d_tables(
                feat_size,
                self.head_dim,
                theta=self.rope_theta,
                num_prefix_tokens=num_prefix_tokens,
                device=device,
                dtype=table_dtype,
            )

        if not may_keep_tensors():
            return build()  # traced, fake or CUDA-graph-pool tables must never reach a later forward
        # Tables made under inference_mode cannot be saved for a later backward: they get their own entry.
        key = (tuple(feat_size), num_prefix_tokens, device, table_dtype, torch.is_inference_mode_enabled())
        tables = self._rope_cache.get(key)
        if tables is None:
            if len(self._rope_cache) >= _MAX_CACHED_TABLES:
                self._rope_cache.clear()
            tables = self._rope_cache[key] = build()
        return tables

    def add_lepe(
        self, out: torch.Tensor, v: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int
    ) -> torch.Tensor:
        """``out + lepe(v)`` on the grid tokens (prefix tokens: ``out``'s), one fused pass on CUDA.

        Args:
            out: Attention output ``[B, num_prefix_tokens + H*W, C]``.
            v: Values ``[B, num_prefix_tokens + H*W, C]`` (channel ``c`` of head ``c // head_dim``).
            feat_size: Grid ``(H, W)``.
            num_prefix_tokens: Leading non-grid tokens.
        """
        return self.lepe(v, feat_size, out, num_prefix_tokens, self.helper_backend("token_depthwise_conv2d"))


class GatedRoPELinearAttention(RoPELePEMixer):
    """Shared body of MALA and RALA: ``proj((kernel(q, k, v, RoPE) + lepe(v)) * o)`` with a fused ``qkvo``.

    Subclasses set :attr:`kernel` (the functional op) and their docstring; everything else is identical in the authors'
    ``AddLinearAttention`` and ``GateLinearAttentionNoSilu``.
    """

    kernel: Callable[..., torch.Tensor]

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
        check_tokens(x, feat_size, num_prefix_tokens, type(self).__name__, self.dim)
        q, k, v, o = self.qkvo(x).chunk(4, dim=-1)
        rope = self.rope_tables(feat_size, num_prefix_tokens, x.device, x.dtype)
        out = self.kernel(
            *(split_heads(t, self.num_heads) for t in (q, k, v)),
            rope=rope,
            scale=self.scale,
            eps=self.eps,
            backend=self.backend,
        )
        out = self.add_lepe(merge_heads(out), v, feat_size, num_prefix_tokens) * o
        return self.proj_drop(self.proj(out))

    @classmethod
    def convert_official_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The authors' 1x1 ``Conv2d`` weights of ``qkvo`` and ``proj`` become Linear ones."""
        return conv1x1_to_linear(state_dict, ("qkvo", "proj"))


@register_attn("mala")
class MagnitudeAwareAttention(GatedRoPELinearAttention):
    """MALA: magnitude-aware linear attention with 2-D RoPE, LePE and a linear output gate.

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
        scale: ``s`` of the kernel; ``None`` means ``head_dim ** -0.5`` (the authors).
        eps: Added to ``z`` before it is inverted (the authors: 1e-6).
        device: Parameter device.
        dtype: Parameter dtype.
    """

    kernel = staticmethod(magnitude_aware_linear_attention)
    kernel_ops = ("magnitude_aware_linear_attention",)
