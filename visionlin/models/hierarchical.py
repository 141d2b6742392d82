"""Hierarchical (four-stage, pyramid) backbones with a token mixer chosen per stage or per block.

One skeleton; the family is a set of constructor arguments:

* ``stem_type``: ``"conv"`` (NAT's tokenizer: two 3x3 stride-2 convolutions, then a norm), ``"patch"`` (one 4x4
  stride-4 patch embedding, then a norm, as Swin / PVT; ``stem_kwargs={"patch_size": p}`` for another size) or
  ``"conv_bn"`` (MambaVision: two 3x3 stride-2 convolutions, each followed by BatchNorm and ReLU); all reduce by 4.
* ``downsample_type`` between stages: ``"conv"`` (NAT: 3x3 stride-2 convolution without bias, then a norm),
  ``"conv_nonorm"`` (the same convolution alone, MambaVision), ``"patch"`` (2x2 stride-2 patch embedding, then a
  norm, PVT) or ``"merge"`` (Swin's patch merging); each halves the grid and sets the next stage's width.
  ``embed_norm_layer`` sets the norm of stem and downsamplers where it differs from the blocks' (PVT).
* ``stage_pos_embed``: a learned absolute position embedding per stage, added after its downsampling (PVT).
* ``block_type`` per stage: ``"transformer"`` (below) or ``"conv"`` (MambaVision's residual conv-BN-GELU-conv-BN
  block, no token mixer).
* ``window_size`` per stage: ``None`` (blocks see the whole grid) or ``w``: the stage pads its grid with zeros at the
  bottom / right to multiples of ``w``, runs every block on each ``w x w`` window (padding included, as MambaVision),
  then crops.
* ``attn_layer`` / ``attn_kwargs``: a registered token mixer (``visionlin.ATTN_LAYERS``) and its keywords, one for
  the whole model, one per stage, or one per block of a stage (DiNAT's per-block dilations).
* the pre-norm transformer :class:`~visionlin.models.vit.Block` (shared with the isotropic family): depths, widths,
  heads, MLP ratio, LayerScale and stochastic depth per the published configuration.

Tokens stay ``[B, H*W, C]`` (row-major) inside a stage; ``forward_features`` returns the final normalised tokens
``[B, H/32 * W/32, C]`` (as the isotropic family, without prefix tokens) and ``forward_intermediates`` /
``features_only=True`` return the four stage outputs at strides 4, 8, 16 and 32. Inputs must have sides that are
multiples of 32 (the total stride), or pass ``dynamic_img_pad=True`` to pad them at the bottom / right.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, resample_abs_pos_embed, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import ATTN_LAYERS, PatchConv2d, TokenMixer
from ..layers._base import map_to_tokens, tokens_to_map
from ..layers.norm import stem_memory_format
from ..layers.window import window_partition, window_reverse
from ._common import (
    AllOrNothingLoad,
    assign_tensors,
    check_bool,
    check_depths,
    check_head_input,
    check_image,
    check_int,
    check_pair,
    check_positive,
    check_rate,
    grid_layer_paths,
    grid_pos_embed,
    record_input_size,
    relayout_grid_layers,
    take_indices,
    token_grid,
)
from ._pretrained import build_with_weights, resolve_cfg
from .vit import Block, _check_matches, _saved_grid, _unwrap, refuse_other_grid

__all__ = [
    "ConvBlock",
    "HierarchicalBackbone",
    "HierarchicalStage",
    "PatchMerging",
    "TokenBatchNorm",
    "checkpoint_filter_fn",
    "create_hierarchical",
    "window_partition",
    "window_reverse",
]

_POOLS = ("", "avg", "avgmax", "max")


# Stems and downsampling (channels-last [B, H, W, C] out) ------------------------------------------------------------
class ConvStem(nn.Module):
    """NAT's tokenizer: conv 3x3 s2 (``C/2``) -> conv 3x3 s2 (``C``) -> norm. Images ``[B, C_in, H, W]`` ->
    ``[B, H/4, W/4, C]``."""

    stride = 4

    def __init__(self, in_chans: int, dim: int, norm_layer: Callable[..., nn.Module], **dd: Any) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1, **dd),
            nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1, **dd),
        )
        self.norm = norm_layer(dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(stem_memory_format(x)).permute(0, 2, 3, 1))


class PatchStem(nn.Module):
    """Non-overlapping ``p x p`` patch embedding (Swin / PVT: ``p = 4``) -> norm. Images ``[B, C_in, H, W]`` ->
    ``[B, H/p, W/p, C]``."""

    def __init__(
        self, in_chans: int, dim: int, norm_layer: Callable[..., nn.Module], patch_size: int = 4, **dd: Any
    ) -> None:
        super().__init__()
        self.stride = check_int("patch_size", patch_size, minimum=1)
        self.proj = PatchConv2d(in_chans, dim, patch_size, stride=patch_size, **dd)  # FAST_PATHS["patch_gemm"]
        self.norm = norm_layer(dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsample(nn.Module):
    """NAT's downsampler: conv 3x3 s2 (no bias) -> norm, ``[B, H, W, C_in] -> [B, ceil(H/2), ceil(W/2), C]``."""

    def __init__(self, dim_in: int, dim: int, norm_layer: Callable[..., nn.Module], **dd: Any) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(dim_in, dim, 3, stride=2, padding=1, bias=False, **dd)
        self.norm = norm_layer(dim, **dd)

    @staticmethod
    def output_size(size: tuple[int, int]) -> tuple[int, int]:
        return (size[0] - 1) // 2 + 1, (size[1] - 1) // 2 + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class PatchDownsample(nn.Module):
    """2x2 stride-2 patch embedding -> norm, ``[B, H, W, C_in] -> [B, H/2, W/2, C]`` (even sides)."""

    def __init__(self, dim_in: int, dim: int, norm_layer: Callable[..., nn.Module], **dd: Any) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim_in, dim, 2, stride=2, **dd)
        self.norm = norm_layer(dim, **dd)

    @staticmethod
    def output_size(size: tuple[int, int]) -> tuple[int, int]:
        return size[0] // 2, size[1] // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class ConvBNStem(nn.Module):
    """MambaVision's stem: conv 3x3 s2 (``width``, no bias) -> BN -> ReLU -> conv 3x3 s2 (``C``, no bias) -> BN ->
    ReLU. Images ``[B, C_in, H, W]`` -> ``[B, H/4, W/4, C]``; ``norm_layer`` is not used (BatchNorm is the design).

    Args:
        width: Channels after the first convolution (default ``C / 2``; MambaVision's ``in_dim``).
        bn_eps: BatchNorm epsilon (the authors: 1e-4).
    """

    stride = 4

    def __init__(
        self,
        in_chans: int,
        dim: int,
        norm_layer: Callable[..., nn.Module] | None = None,
        width: int | None = None,
        bn_eps: float = 1e-4,
        **dd: Any,
    ) -> None:
        super().__init__()
        width = dim // 2 if width is None else width  # (0 meant the default, silently)
        check_int("stem width", width, minimum=1)
        self.conv_down = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, stride=2, padding=1, bias=False, **dd),
            nn.BatchNorm2d(width, eps=bn_eps, **dd),
            nn.ReLU(),
            nn.Conv2d(width, dim, 3, stride=2, padding=1, bias=False, **dd),
            nn.BatchNorm2d(dim, eps=bn_eps, **dd),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_down(stem_memory_format(x)).permute(0, 2, 3, 1)


class PlainConvDownsample(nn.Module):
    """MambaVision's downsampler: conv 3x3 s2 without bias and without norm, ``[B, H, W, C_in] -> [B, ceil(H/2),
    ceil(W/2), C]``."""

    output_size = staticmethod(ConvDownsample.output_size)

    def __init__(self, dim_in: int, dim: int, norm_layer: Callable[..., nn.Module] | None = None, **dd: Any) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(dim_in, dim, 3, stride=2, padding=1, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PatchMerging(nn.Module):
    """Swin's downsampler: each 2x2 neighbourhood's tokens concatenated in the order ``(0, 0), (1, 0), (0, 1), (1, 1)``
    (row, column offsets, as the authors') -> norm over ``4 C_in`` -> Linear without bias, ``[B, H, W, C_in] ->
    [B, H/2, W/2, C]`` (even sides)."""

    output_size = staticmethod(PatchDownsample.output_size)

    def __init__(self, dim_in: int, dim: int, norm_layer: Callable[..., nn.Module], **dd: Any) -> None:
        super().__init__()
        self.norm = norm_layer(4 * dim_in, **dd)
        self.reduction = nn.Linear(4 * dim_in, dim, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


STEMS: dict[str, type[nn.Module]] = {"conv": ConvStem, "patch": PatchStem, "conv_bn": ConvBNStem}
DOWNSAMPLES: dict[str, type[nn.Module]] = {
    "conv": ConvDownsample,
    "conv_nonorm": PlainConvDownsample,
    "patch": PatchDownsample,
    "merge": PatchMerging,
}


class TokenBatchNorm(nn.BatchNorm2d):
    """BatchNorm over the channels of tokens ``[B, N, C]`` (statistics over batch and tokens), with
    ``BatchNorm2d``'s parameter names: MambaVision's head norm, applied before pooling."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        pass  # forward builds the 4-D input itself (and FX cannot branch on a traced input's rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)


class ConvBlock(nn.Module):
    """MambaVision's convolutional block on the token grid: ``x + drop_path(gamma * BN(conv(GELU_tanh(BN(conv(x))))))``
    with 3x3 convolutions (bias) and BatchNorm; ``gamma`` (LayerScale) only with ``init_values``.

    Same call as :class:`~visionlin.models.vit.Block`: tokens ``[B, H*W, C]`` and ``feat_size``.
    """

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        init_values: float | None = None,
        kernel_size: int = 3,
        bn_eps: float = 1e-5,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, **dd)
        self.norm1 = nn.BatchNorm2d(dim, eps=bn_eps, **dd)
        self.act1 = nn.GELU(approximate="tanh")
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, **dd)
        self.norm2 = nn.BatchNorm2d(dim, eps=bn_eps, **dd)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values), **dd)) if init_values else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        """Tokens ``[B, H*W, C]`` on grid ``feat_size`` in and out (no prefix tokens)."""
        y = tokens_to_map(x, feat_size)
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(y)))))
        if self.gamma is not None:
            y = y * self.gamma[:, None, None]
        return x + self.drop_path(map_to_tokens(y))


BLOCK_TYPES = ("transformer", "conv")


# Stage ----------------------------------------------------------------------------------------------------------------
class HierarchicalStage(nn.Module):
    """Optional downsampling, then ``depth`` pre-norm blocks on the stage's token grid.

    Args:
        dim_in: Channels entering the stage.
        dim: Channels of the stage (``dim_in`` unless downsampling).
        depth: Number of blocks.
        num_heads: Attention heads.
        downsample: ``None`` or a key of :data:`DOWNSAMPLES`.
        attn_layers: Registered token-mixer name per block.
        attn_kwargs: Mixer keywords per block.
        drop_path: Stochastic-depth rate per block.
        block_type: ``"transformer"`` (:class:`~visionlin.models.vit.Block`) or ``"conv"`` (:class:`ConvBlock`).
        window_size: Run the blocks on zero-padded ``w x w`` windows of the grid (``None``: the whole grid).
        conv_init_values: LayerScale init of conv blocks (``None``: none).
        pos_embed_size: Grid ``(H, W)`` of a learned absolute position embedding added to the tokens after
            downsampling (PVT's per-stage ``pos_embed``), resampled to other grids; ``None``: none.
        embed_norm_layer: Norm of the downsampler (default ``norm_layer``).
        block_kwargs: Remaining :class:`~visionlin.models.vit.Block` keywords (shared by the blocks).
    """

    def __init__(
        self,
        dim_in: int,
        dim: int,
        depth: int,
        num_heads: int,
        downsample: str | None,
        attn_layers: Sequence[str],
        attn_kwargs: Sequence[Mapping[str, Any]],
        drop_path: Sequence[float],
        norm_layer: Callable[..., nn.Module],
        block_type: str = "transformer",
        window_size: int | None = None,
        conv_init_values: float | None = None,
        pos_embed_size: tuple[int, int] | None = None,
        embed_norm_layer: Callable[..., nn.Module] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        embed_norm_layer = embed_norm_layer or norm_layer
        self.downsample = DOWNSAMPLES[downsample](dim_in, dim, embed_norm_layer, **dd) if downsample else None
        self.grad_checkpointing = False
        self.window_size = window_size
        self.pos_embed_size = None if pos_embed_size is None else (int(pos_embed_size[0]), int(pos_embed_size[1]))
        if self.pos_embed_size is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_embed_size[0] * self.pos_embed_size[1], dim, **dd))
            trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.register_parameter("pos_embed", None)
        if block_type == "conv":
            self.blocks = nn.ModuleList(
                ConvBlock(dim, drop_path=drop_path[j], init_values=conv_init_values, **dd) for j in range(depth)
            )
            return
        self.blocks = nn.ModuleList(
            Block(
                dim,
                num_heads,
                drop_path=drop_path[j],
                norm_layer=norm_layer,
                attn_layer=attn_layers[j],
                attn_kwargs=attn_kwargs[j],
                **block_kwargs,
                **dd,
            )
            for j in range(depth)
        )

    def output_size(self, feat_size: tuple[int, int]) -> tuple[int, int]:
        """The stage's token grid for an input grid ``feat_size``."""
        return feat_size if self.downsample is None else self.downsample.output_size(feat_size)

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int]) -> torch.Tensor:
        """Tokens ``[B, H*W, C_in]`` on grid ``feat_size = (H, W)`` -> tokens ``[B, H'*W', C]`` on
        :meth:`output_size`."""
        if self.downsample is not None:
            x = self.downsample(x.unflatten(1, (feat_size[0], feat_size[1]))).flatten(1, 2)
        grid = self.output_size(feat_size)
        if self.pos_embed is not None:
            x = x + grid_pos_embed(self.pos_embed, x.unflatten(1, (grid[0], grid[1])), self.pos_embed_size, 0)
        block_grid = grid
        if self.window_size is not None:
            x = window_partition(x, grid, self.window_size)
            block_grid = (self.window_size, self.window_size)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(blk, x, block_grid, 0, use_reentrant=False)
            else:
                x = blk(x, block_grid, 0)
        if self.window_size is not None:
            x = window_reverse(x, grid, self.window_size)
        return x


# Model --------------------------------------------------------------------------------------------------------------
def _stage_list(name: str, value: Any, num_stages: int, check: Callable[[str, Any], Any]) -> list[Any]:
    """A scalar for every stage or one value per stage, each checked with ``check(name, value)``."""
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * num_stages
    if len(values) != num_stages:
        raise ValueError(f"{name}={value!r} needs one entry per stage ({num_stages} stages, from depths)")
    for i, v in enumerate(values):
        check(f"{name}[{i}]", v)
    return values


def _per_block(name: str, value: Any, depths: Sequence[int], leaf: Callable[[Any], bool]) -> list[list[Any]]:
    """One entry for the model, one per stage or one list per stage with an entry per block -> per-block lists."""
    if leaf(value):
        return [[value] * d for d in depths]
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != len(depths):
        raise ValueError(
            f"{name}={value!r} must be one entry, one per stage or one list per stage ({len(depths)} stages)"
        )
    out = []
    for i, (stage, d) in enumerate(zip(value, depths, strict=True)):
        if leaf(stage):
            out.append([stage] * d)
        elif isinstance(stage, Sequence) and not isinstance(stage, str) and len(stage) == d and all(map(leaf, stage)):
            out.append(list(stage))
        else:
            raise ValueError(f"{name}[{i}]={stage!r} must be one entry or a list of {d} (depths[{i}]={d}) entries")
    return out


class HierarchicalBackbone(AllOrNothingLoad, nn.Module):
    """Four-stage (any number of stages) vision backbone with token mixers chosen per stage or per block.

    Args:
        img_size: Nominal input size (for the pretrained cfg and ``dynamic_img_size=False``).
        in_chans: Input channels.
        num_classes: Classifier outputs (0 = no classifier).
        global_pool: ``"avg"``, ``"max"``, ``"avgmax"`` or ``""`` (tokens out).
        embed_dim: Width of the first stage (doubled at every stage) or one width per stage.
        depths: Blocks per stage.
        num_heads: Attention heads, one for all stages or one per stage.
        mlp_ratio: MLP hidden width / ``C``, one or one per stage.
        qkv_bias: Bias on q/k/v projections.
        qk_norm: Normalise q and k.
        init_values: LayerScale init (``None`` = no LayerScale).
        stem_type: Key of :data:`STEMS`.
        stem_kwargs: Extra stem keywords (``conv_bn``: ``width``, ``bn_eps``).
        downsample_type: Key of :data:`DOWNSAMPLES`.
        block_type: ``"transformer"`` or ``"conv"``, one or one per stage (conv stages ignore the mixer arguments).
        window_size: ``None`` or a window side, one or one per stage (see the module docstring).
        conv_init_values: LayerScale init of conv blocks (``None`` = none).
        stage_pos_embed: A learned absolute position embedding per stage, added after its downsampling (PVT), sized
            for the stage's grid at ``img_size`` and resampled (bicubic) to other grids.
        dynamic_img_size: Accept any input whose sides are multiples of the total stride.
        dynamic_img_pad: Pad inputs at the bottom / right to a multiple of the total stride instead of raising.
        drop_rate: Dropout before the classifier.
        pos_drop_rate: Dropout after the stem.
        proj_drop_rate: Dropout after attention / MLP projections.
        attn_drop_rate: Attention dropout.
        drop_path_rate: Stochastic depth, linearly increasing over all blocks.
        norm_layer: Norm (default ``LayerNorm(eps=norm_eps)``), channels-last.
        norm_eps: LayerNorm epsilon when ``norm_layer`` is not given.
        embed_norm_layer: Norm of the stem and the downsamplers (default ``norm_layer``; PVT: ``LayerNorm(eps=1e-5)``
            there, ``1e-6`` in the blocks).
        head_norm_layer: The final norm before pooling (default ``norm_layer``; MambaVision: :class:`TokenBatchNorm`).
        act_layer: MLP activation (default GELU).
        attn_layer: Registered token-mixer name: one, one per stage, or one list per stage with a name per block.
        attn_kwargs: Mixer keywords, nested the same way (dicts).
        device: Parameter device.
        dtype: Parameter dtype.
    """

    #: Input sides must be multiples of this (``None``: the total stride). Families whose downsamplers round up
    #: (stride-2 convolutions with padding, as MAViT) accept any size: 1.
    input_multiple: int | None = None

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int | Sequence[int] = 64,
        depths: Sequence[int] = (3, 4, 6, 5),
        num_heads: int | Sequence[int] = (2, 4, 8, 16),
        mlp_ratio: float | Sequence[float] = 3.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        stem_type: str = "conv",
        stem_kwargs: Mapping[str, Any] | None = None,
        downsample_type: str = "conv",
        block_type: str | Sequence[str] = "transformer",
        window_size: int | None | Sequence[int | None] = None,
        conv_init_values: float | None = None,
        stage_pos_embed: bool = False,
        dynamic_img_size: bool = True,
        dynamic_img_pad: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[..., nn.Module] | None = None,
        norm_eps: float = 1e-5,
        embed_norm_layer: Callable[..., nn.Module] | None = None,
        head_norm_layer: Callable[..., nn.Module] | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
        attn_layer: str | Sequence[str | Sequence[str]] = "neighborhood",
        attn_kwargs: Mapping[str, Any] | Sequence[Mapping[str, Any] | Sequence[Mapping[str, Any]]] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        img_size = check_pair("img_size", img_size)
        check_int("in_chans", in_chans, minimum=1)
        check_int("num_classes", num_classes, minimum=0)
        depths = check_depths(depths)
        n = len(depths)
        if isinstance(embed_dim, int) and not isinstance(embed_dim, bool):
            check_int("embed_dim", embed_dim, minimum=1)
            dims = [embed_dim * 2**i for i in range(n)]
        else:
            dims = _stage_list("embed_dim", embed_dim, n, partial(check_int, minimum=1))
        heads = _stage_list("num_heads", num_heads, n, partial(check_int, minimum=1))
        mlp_ratios = _stage_list("mlp_ratio", mlp_ratio, n, check_positive)
        for i, (d, h, r) in enumerate(zip(dims, heads, mlp_ratios, strict=True)):
            if d % h:
                raise ValueError(f"stage {i}: width {d} is not divisible by num_heads {h}")
            if int(d * r) < 1:
                raise ValueError(f"stage {i}: mlp_ratio={r} gives an empty MLP for width {d}")
        for name, value in (("qkv_bias", qkv_bias), ("qk_norm", qk_norm), ("dynamic_img_size", dynamic_img_size)):
            check_bool(name, value)
        check_bool("dynamic_img_pad", dynamic_img_pad)
        check_bool("stage_pos_embed", stage_pos_embed)
        for name, value in (
            ("drop_rate", drop_rate),
            ("pos_drop_rate", pos_drop_rate),
            ("proj_drop_rate", proj_drop_rate),
            ("attn_drop_rate", attn_drop_rate),
            ("drop_path_rate", drop_path_rate),
        ):
            check_rate(name, value)
        check_positive("norm_eps", norm_eps)
        if init_values is not None:
            check_positive("init_values", init_values)
        if conv_init_values is not None:
            check_positive("conv_init_values", conv_init_values)

        def check_block_type(name: str, value: Any) -> None:
            if value not in BLOCK_TYPES:
                raise ValueError(f"{name}={value!r} is not one of {BLOCK_TYPES}")

        def check_window(name: str, value: Any) -> None:
            if value is not None:
                check_int(name, value, minimum=1)

        block_types = _stage_list("block_type", block_type, n, check_block_type)
        windows = _stage_list("window_size", window_size, n, check_window)
        conv_windows = [i for i, (b, w) in enumerate(zip(block_types, windows, strict=True)) if b == "conv" and w]
        if conv_windows:
            raise ValueError(
                f"stages {conv_windows} are conv stages (block_type='conv') but have a window_size ({windows}); "
                "conv blocks see the whole grid: give None for them"
            )
        if global_pool not in _POOLS:
            raise ValueError(f"{global_pool=} is not one of {_POOLS}")
        if stem_type not in STEMS:
            raise ValueError(f"{stem_type=} is not one of {sorted(STEMS)}")
        if downsample_type not in DOWNSAMPLES:
            raise ValueError(f"{downsample_type=} is not one of {sorted(DOWNSAMPLES)}")
        layers = _per_block("attn_layer", attn_layer, depths, lambda a: isinstance(a, str))
        kwargs = _per_block("attn_kwargs", attn_kwargs, depths, lambda a: a is None or isinstance(a, Mapping))
        unknown = sorted({name for stage in layers for name in stage if name not in ATTN_LAYERS})
        if unknown:
            raise ValueError(f"unknown attention layer(s) {unknown}; choose one of {sorted(ATTN_LAYERS)}")
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=norm_eps)
        act_layer = act_layer or nn.GELU

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dims = tuple(dims)
        self.num_features = self.head_hidden_size = dims[-1]
        self.num_prefix_tokens = 0
        self.in_chans = in_chans
        self.img_size = img_size
        self.dynamic_img_size = dynamic_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.grad_checkpointing = False

        embed_norm_layer = embed_norm_layer or norm_layer
        self.stem = STEMS[stem_type](in_chans, dims[0], embed_norm_layer, **dict(stem_kwargs or {}), **dd)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.stride = self.stem.stride * 2 ** (n - 1)
        multiple = self.input_multiple or self.stride  # what the forward's input check asks of every side
        if not dynamic_img_pad and (img_size[0] % multiple or img_size[1] % multiple):
            raise ValueError(  # (built, then failed at the first forward)
                f"img_size={img_size} is not a multiple of the stride {multiple}: the model could not run an input "
                f"of its own size; use sides that are multiples of {multiple}, or dynamic_img_pad=True"
            )
        if img_size[0] < multiple or img_size[1] < multiple:  # (with dynamic_img_pad: every input of its size refused)
            raise ValueError(f"img_size={img_size} is smaller than the stride {multiple}: no input of it could run")
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        stages = []
        self._grid_layers: list[str] = []  # mixers on their stage's nominal grid (set_input_size lays them out anew)
        for i in range(n):
            start = sum(depths[:i])
            grid = self._stage_grid(img_size, i)
            stage_kwargs = []
            for j, (name, kw) in enumerate(zip(layers[i], kwargs[i], strict=True)):
                kw, layer_cls = dict(kw or {}), ATTN_LAYERS[name]
                if getattr(layer_cls, "grid_kwarg", None):  # size-dependent mixers: the stage's nominal grid
                    if layer_cls.grid_kwarg not in kw:
                        self._grid_layers.append(f"stages.{i}.blocks.{j}.attn")
                    kw.setdefault(layer_cls.grid_kwarg, grid)
                if getattr(layer_cls, "prefix_kwarg", None):
                    kw.setdefault(layer_cls.prefix_kwarg, 0)
                stage_kwargs.append(kw)
            stages.append(
                HierarchicalStage(
                    dims[i - 1] if i else dims[0],
                    dims[i],
                    depths[i],
                    heads[i],
                    downsample=downsample_type if i else None,
                    attn_layers=layers[i],
                    attn_kwargs=stage_kwargs,
                    drop_path=dpr[start : start + depths[i]],
                    norm_layer=norm_layer,
                    block_type=block_types[i],
                    window_size=windows[i],
                    conv_init_values=conv_init_values,
                    pos_embed_size=grid if stage_pos_embed else None,
                    embed_norm_layer=embed_norm_layer,
                    mlp_ratio=mlp_ratios[i],
                    qkv_bias=qkv_bias,
                    qk_norm=qk_norm,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    init_values=init_values,
                    act_layer=act_layer,
                    **dd,
                )
            )
        self.stages = nn.ModuleList(stages)
        if stage_pos_embed or any(getattr(ATTN_LAYERS[a], "grid_kwarg", None) for stage in layers for a in stage):
            # The stage-0 token grid that the grid-sized tables (stage position embeddings, FLatten's positional
            # encodings) are laid out on, saved with the weights: their token counts alone cannot tell H x W from
            # W x H (a transposed checkpoint loaded silently). Stage i's grid is this one divided by 2**i, rounded up.
            self.register_buffer(
                "pos_embed_grid", torch.tensor(self.pos_embed_grid_size, dtype=torch.int64, device=device)
            )
        self.feature_info = [
            dict(num_chs=dims[i], reduction=self.stem.stride * 2**i, module=f"stages.{i}") for i in range(n)
        ]
        self.norm = (head_norm_layer or norm_layer)(dims[-1], **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes, **dd) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # timm contract: optimisation helpers -----------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The mechanisms' positional / bias / scalar parameters (NAT's ``rpb`` among them) and stage position
        embeddings."""
        table = re.compile(
            r"(\.attn\.(rpb|positional_encoding|scale|rho_logit|temperature|\w+_bias|\w+_bias_table|A_log|D)"
            r"|^stages\.\d+\.pos_embed)$"
        )
        return {n for n, _ in self.named_parameters() if table.search(n)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay."""
        if coarse:
            return dict(stem=r"^stem", blocks=r"^stages\.(\d+)")
        return dict(
            stem=r"^stem",
            blocks=[
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (identical outputs, less memory)."""
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier; ``num_classes=0`` keeps pooled features, ``global_pool=''`` disables pooling."""
        check_int("num_classes", num_classes, minimum=0)
        if global_pool is not None:
            if global_pool not in _POOLS:
                raise ValueError(f"{global_pool=} is not one of {_POOLS}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = next(self.stem.parameters())
        self.head = (
            nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )

    # Forward ----------------------------------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images ``[B, C_in, H, W]`` (checked) -> stem tokens ``[B, H/4 * W/4, C]`` and their grid."""
        x = check_image(
            x,
            self.in_chans,
            (self.input_multiple or self.stride,) * 2,
            self.img_size,
            next(self.stem.parameters()).dtype,
            self.dynamic_img_size,
            self.dynamic_img_pad,
            "stride",
        )
        if self.dynamic_img_pad:
            x = F.pad(x, (0, (-x.shape[-1]) % self.stride, 0, (-x.shape[-2]) % self.stride))
        x = self.stem(x)
        feat_size = token_grid(x)
        return self.pos_drop(x.flatten(1, 2)), feat_size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C_in, H, W]`` -> normalised last-stage tokens ``[B, H/32 * W/32, C]`` (unpooled)."""
        x, feat_size = self._embed(x)
        for stage in self.stages:
            x = stage(x, feat_size)
            feat_size = stage.output_size(feat_size)
        return self.norm(x)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        """Pool tokens ``[B, N, C] -> [B, C]`` (or pass them through for ``''``)."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "avg":
            return x.mean(dim=1)
        if pool_type == "max":
            return x.amax(dim=1)
        if pool_type == "avgmax":
            return 0.5 * (x.mean(dim=1) + x.amax(dim=1))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens ``[B, N, C]`` -> logits ``[B, num_classes]`` (or pooled features ``[B, C]`` with ``pre_logits``)."""
        x = check_head_input(x, self.num_features)
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C_in, H, W]`` -> logits ``[B, num_classes]``."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Any] | tuple[torch.Tensor, list[Any]]:
        """Stage outputs as feature maps (timm's ``forward_intermediates`` contract).

        Args:
            x: Images ``[B, C_in, H, W]``.
            indices: Take the last ``n`` stages if an int, these stage indices if a list, all if ``None``.
            return_prefix_tokens: Pair each output with its (empty, ``[B, 0, C]``) prefix tokens, as the isotropic
                family does.
            norm: Apply the final norm to the last stage's output.
            stop_early: Stop after the last requested stage (only with ``intermediates_only``).
            output_fmt: ``"NCHW"`` (maps ``[B, C, H/s, W/s]``), ``"NHWC"`` or ``"NLC"`` (tokens ``[B, H/s*W/s, C]``).
            intermediates_only: Return only the intermediates.

        Returns:
            The intermediates, or ``(final forward_features output, intermediates)``.
        """
        if output_fmt not in ("NCHW", "NHWC", "NLC"):
            raise ValueError(f"{output_fmt=} must be 'NCHW', 'NHWC' or 'NLC'")
        wanted, max_index = take_indices(len(self.stages), indices)
        x, feat_size = self._embed(x)
        last = len(self.stages) - 1
        stages = self.stages if not (stop_early and intermediates_only) else self.stages[: max_index + 1]
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x, feat_size)
            feat_size = stage.output_size(feat_size)
            if i in wanted:
                y = self.norm(x) if norm and i == last else x
                if output_fmt != "NLC":
                    y = y.unflatten(1, (feat_size[0], feat_size[1]))
                    if output_fmt == "NCHW":
                        y = y.permute(0, 3, 1, 2).contiguous()
                intermediates.append((y, x[:, :0]) if return_prefix_tokens else y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        """Refuse grid-sized tables laid out on another grid; fill in the grid of older or foreign checkpoints where
        the tables' shapes make it unambiguous (this model's grid square, or no grid-sized table given)."""
        if "pos_embed_grid" in self._buffers:
            key = prefix + "pos_embed_grid"
            grid = self.pos_embed_grid_size
            if key in state_dict:
                refuse_other_grid(
                    state_dict[key], grid, "stage-0 token grid", tuple(self.img_size),
                    f"{type(self).__module__}.checkpoint_filter_fn, which resamples the grid-sized tables",
                )  # fmt: skip
            else:
                _refuse_ambiguous_grid(
                    grid, [k for k in state_dict if k.startswith(prefix) and k.endswith(_GRID_TABLES)]
                )
                state_dict[key] = torch.tensor(grid, dtype=torch.int64)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    @property
    def pos_embed_grid_size(self) -> tuple[int, int]:
        """The stage-0 token grid of the nominal ``img_size`` (the grid-sized tables' layout), as Python ints."""
        return self._stage_grid(self.img_size, 0)

    def _stage_grid(self, img_size: tuple[int, int], i: int) -> tuple[int, int]:
        """Stage ``i``'s token grid for an input of ``img_size`` (each reduction rounds up)."""
        reduction = self.stem.stride * 2**i
        return -(-int(img_size[0]) // reduction), -(-int(img_size[1]) // reduction)

    @torch.jit.ignore
    def set_input_size(self, img_size: int | tuple[int, int] | None = None) -> None:
        """Set the nominal input size (as timm's Swin ``set_input_size`` does for its grid-sized parts): the stage
        position embeddings and every grid-sized table (FLatten's positional encodings, Agent's biases) are resampled
        to the new stage grids, as loading this model's weights through the family's ``checkpoint_filter_fn`` into a
        model built at ``img_size`` would (the same outputs); with ``dynamic_img_size=False`` the model then takes
        that size only. Resized parameters are new ``nn.Parameter`` objects (build the optimizer afterwards).

        Raises:
            ValueError: ``img_size`` is not a pair of positive ints, or (without ``dynamic_img_pad``) not a multiple
                of what the model's input check asks; nothing is changed then.
        """
        if img_size is None:
            return
        img_size = check_pair("img_size", img_size)
        multiple = self.input_multiple or self.stride  # (as the constructor and the forward's input check)
        if (
            img_size[0] < multiple
            or img_size[1] < multiple
            or (not self.dynamic_img_pad and (img_size[0] % multiple or img_size[1] % multiple))
        ):
            raise ValueError(
                f"set_input_size: img_size={img_size} is smaller than or not a multiple of the stride {multiple}: the "
                f"model could not run an input of that size; use multiples of {multiple} (other sides >= {multiple} "
                "with dynamic_img_pad=True)"
            )
        tensors: dict[str, torch.Tensor] = {}  # everything computed before anything changes
        grids = [self._stage_grid(img_size, i) for i in range(len(self.stages))]
        for i, stage in enumerate(self.stages):
            size = getattr(stage, "pos_embed_size", None)
            if size is not None and tuple(size) != grids[i]:
                tensors[f"stages.{i}.pos_embed"] = _resample_stage_pos_embed(
                    stage.pos_embed.detach(), grids[i], f"stages.{i}.pos_embed", tuple(size)
                )
        layers = [(path, grids[int(path.split(".")[1])]) for path in grid_layer_paths(self)]
        set_grids = relayout_grid_layers(self, layers, tensors)  # ("stages.<i>.blocks.<j>.attn")
        if "pos_embed_grid" in self._buffers:
            tensors["pos_embed_grid"] = torch.tensor(grids[0], dtype=torch.int64)
        assign_tensors(self, tensors)
        for i, stage in enumerate(self.stages):
            if getattr(stage, "pos_embed_size", None) is not None:
                stage.pos_embed_size = grids[i]
        set_grids()
        self.img_size = img_size
        record_input_size(self, img_size)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop stages (and optionally norm / head) not needed for the requested intermediates, as timm's Swin does:
        when the last kept stage is not the last one, the final norm (sized for the last stage) and the classifier go
        too and ``num_features`` becomes that stage's width, so ``forward`` / ``forward_features`` keep working (they
        failed on the last stage's norm or the head's width)."""
        wanted, max_index = take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if hasattr(self, "_grid_layers"):  # (older objects have no record)
            self._grid_layers = [p for p in self._grid_layers if int(p.split(".")[1]) <= max_index]
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # (MAViT's: the projection head, which set num_features)
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return wanted


# Keys of grid-sized tables (stage position embeddings, FLatten's positional encodings).
_GRID_TABLES = (".pos_embed", ".positional_encoding")


def _refuse_ambiguous_grid(grid: tuple[int, int], tables: list[str]) -> None:
    """``ValueError`` for a checkpoint without ``pos_embed_grid`` holding the grid-sized ``tables`` for a model whose
    stage-0 ``grid`` is not square: their token counts cannot tell ``H x W`` from ``W x H``."""
    if tables and grid[0] != grid[1]:
        raise ValueError(
            f"checkpoint has no pos_embed_grid and this model's stage-0 grid {grid} is not square: its grid-sized "
            f"tables ({tables[0]}, ...) could be laid out {grid} or {grid[::-1]}; add state_dict['pos_embed_grid'] = "
            "torch.tensor([H, W]) with the stage-0 grid it was trained on (img_size / the stem stride) and load it "
            "through checkpoint_filter_fn"
        )


def create_hierarchical(
    variant: str,
    pretrained: bool,
    filter_fn: Callable[..., dict[str, torch.Tensor]],
    model_cls: type[HierarchicalBackbone] | None = None,
    **kwargs: Any,
) -> HierarchicalBackbone:
    """Build a named variant with timm (``features_only`` gives the stages, ``out_indices`` checked with a
    ``ValueError``; ``patch_size`` goes to the patch stem); ``filter_fn`` maps the authors' checkpoints for
    ``pretrained=True``."""
    if "depths" in kwargs:
        kwargs["depths"] = check_depths(kwargs["depths"])
    if "patch_size" in kwargs:  # the patch stem's
        params = inspect.signature(model_cls or HierarchicalBackbone).parameters
        stem = kwargs.get("stem_type", params["stem_type"].default if "stem_type" in params else "conv")
        if stem != "patch":
            raise ValueError(
                f"patch_size={kwargs['patch_size']!r}: {variant} has a {stem!r} stem (convolutions of fixed stride), "
                "not a patch embedding; patch_size applies to the 'patch' stem (Swin, PVT) only"
            )
        kwargs["stem_kwargs"] = {**dict(kwargs.get("stem_kwargs") or {}), "patch_size": kwargs.pop("patch_size")}
    depths = kwargs.get("depths", ())
    out_indices = kwargs.pop("out_indices", tuple(range(len(depths))))
    if kwargs.get("features_only"):
        take_indices(len(depths), out_indices)  # a ValueError naming bad out_indices (timm would assert)
    if "img_size" not in kwargs:  # a tag trained at another resolution (e.g. '.in1k_384') builds at that resolution
        size = tuple(tag_input_size(variant, kwargs))
        if size != (224, 224):
            kwargs["img_size"] = size
    return build_with_weights(
        model_cls or HierarchicalBackbone,
        variant,
        pretrained,
        pretrained_filter_fn=filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def tag_input_size(variant: str, kwargs: Mapping[str, Any]) -> tuple[int, int]:
    """``(H, W)`` of the input size of the pretrained configuration ``timm.create_model`` resolves for ``variant``
    (its tag, e.g. ``'.in1k_384'``, or the default one)."""
    return tuple(resolve_cfg(variant, dict(kwargs))["input_size"][-2:])


# Checkpoint conversion ------------------------------------------------------------------------------------------------
def rename_level_keys(
    state_dict: Mapping[str, torch.Tensor],
    rules: Sequence[tuple[str, str]],
    *,
    downsample: str,
    downsample_to: str,
) -> dict[str, torch.Tensor]:
    """Rename the authors' hierarchical checkpoint keys onto ours.

    A key matching ``downsample`` (a regex whose two groups are the level index and the rest) is the downsampler at the
    END of level ``i``: it moves to the START of stage ``i + 1`` (``downsample_to`` formatted with ``stage`` and
    ``rest``). Any other key is renamed by the first of ``rules`` (``(pattern, replacement)`` for ``re.subn``) that
    matches, or kept.
    """
    out = {}
    for k, v in state_dict.items():
        m = re.match(downsample, k)
        if m:
            k = downsample_to.format(stage=int(m.group(1)) + 1, rest=m.group(2))
        else:
            for pattern, repl in rules:
                k, n = re.subn(pattern, repl, k)
                if n:
                    break
        out[k] = v
    return out


def _resample_stage_pos_embed(
    pe: torch.Tensor, size: tuple[int, int], name: str, old: tuple[int, int] | None = None
) -> torch.Tensor:
    """A stage position embedding ``[1, n, C]`` saved for the grid ``old`` (where the checkpoint records it) or a
    square grid (the authors'), resampled to ``size`` as :func:`~visionlin.models._common.grid_pos_embed` does on the
    fly."""
    if old is not None:
        if old[0] * old[1] != pe.shape[1]:
            raise ValueError(f"{name}: {pe.shape[1]} tokens do not fit the checkpoint's grid {old} (pos_embed_grid)")
    else:
        side = int(round(pe.shape[1] ** 0.5))
        if side * side != pe.shape[1]:
            raise ValueError(
                f"{name}: cannot infer the grid of a position embedding with {pe.shape[1]} tokens ({size=}); a "
                "checkpoint of a non-square model needs its pos_embed_grid"
            )
        old = (side, side)
    return resample_abs_pos_embed(pe, new_size=list(size), old_size=list(old), num_prefix_tokens=0, verbose=False)


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: HierarchicalBackbone, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Fit a checkpoint in our key names to ``model``: each block's attention entries go through its layer's
    ``convert_official_state_dict`` and ``adapt_state_dict`` (e.g. NAT's ``rpb`` resized to another kernel size);
    stage position embeddings saved for another (square) grid are resampled.
    Families map their authors' key names first (``visionlin.models.nat.checkpoint_filter_fn``).

    Raises:
        ValueError: the checkpoint is not a mapping of names to tensors, or (after mapping) has unknown, missing or
            mis-shaped keys (all named).
    """
    out: dict[str, torch.Tensor] = {}
    per_block: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    state_dict = _unwrap(state_dict)
    old_grid0 = _saved_grid(state_dict["pos_embed_grid"]) if "pos_embed_grid" in state_dict else None
    if old_grid0 is None and "pos_embed_grid" in getattr(model, "_buffers", {}):
        grid0 = model.pos_embed_grid_size
        own = model.state_dict()
        same = [k for k in state_dict if k.endswith(_GRID_TABLES) and k in own and
                tuple(getattr(state_dict[k], "shape", ())) == tuple(own[k].shape)]  # fmt: skip
        _refuse_ambiguous_grid(grid0, same)  # (an old non-square checkpoint, transposed or not, loaded silently)
    for k, v in state_dict.items():
        m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.attn\.(.+)$", k)
        if m and int(m.group(1)) < len(model.stages) and int(m.group(2)) < len(model.stages[int(m.group(1))].blocks):
            per_block.setdefault((int(m.group(1)), int(m.group(2))), {})[m.group(3)] = v
        else:
            out[k] = v

    def old_grid(i: int) -> tuple[int, int] | None:  # stage i's grid in the checkpoint, where it says so
        return None if old_grid0 is None else (-(-old_grid0[0] // 2**i), -(-old_grid0[1] // 2**i))

    for (i, j), sub in per_block.items():
        attn: TokenMixer = model.stages[i].blocks[j].attn
        sub = attn.adapt_state_dict(attn.convert_official_state_dict(sub), old_grid=old_grid(i))
        out.update({f"stages.{i}.blocks.{j}.attn.{k}": v for k, v in sub.items()})
    for i, stage in enumerate(model.stages):
        pe = out.get(f"stages.{i}.pos_embed")
        if pe is None or stage.pos_embed is None or pe.ndim != 3:
            continue
        old = old_grid(i)
        if pe.shape != stage.pos_embed.shape or (old is not None and old != tuple(stage.pos_embed_size)):
            out[f"stages.{i}.pos_embed"] = _resample_stage_pos_embed(
                pe, stage.pos_embed_size, f"stages.{i}.pos_embed", old
            )
    if "pos_embed_grid" in getattr(model, "_buffers", {}):
        out["pos_embed_grid"] = model.pos_embed_grid.detach().clone()
    else:
        out.pop("pos_embed_grid", None)
    if strict:  # every key present and of the right shape (False: map what can be mapped, e.g. for distillation)
        _check_matches(out, model)
    return out
