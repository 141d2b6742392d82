"""Isotropic (DeiT-shaped) vision transformers with an efficient-attention token mixer per block.

One skeleton, the mechanism is a constructor argument (``attn_layer``, per block if a sequence). The named
entrypoints pin the published configurations:

* InfViT (Roffo & Palmer, 2026, arXiv 2603.00175): Linear-InfSA in every block (``infvit_*``) and the quadratic
  twins (``infvit_pure_*``), DeiT widths.
* FLatten-DeiT (Han et al., ICCV 2023, arXiv 2308.00442): focused linear attention in every block.
* Agent-DeiT (Han et al., ECCV 2024, arXiv 2312.08874): agent attention in every block (T/S, 49 agents) or the first
  four (B, 81 agents), softmax elsewhere.
* InLine-DeiT (Han et al., NeurIPS 2024, arXiv 2412.06590): injective linear attention in every block; S and B are
  narrower models trained at 288 and 448 px.

Resolution is not locked: with ``dynamic_img_size=True`` (the entrypoints' default) any input whose sides are
multiples of the patch size runs; the absolute position embedding and each layer's grid-sized tables are resampled.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from timm.layers import DropPath, LayerScale, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import ATTN_LAYERS, TokenMixer, as_patch_conv, as_pre_norm, create_attn
from ._common import (
    AllOrNothingLoad,
    assign_tensors,
    check_bool,
    check_head_input,
    check_image,
    check_int,
    check_pair,
    check_positive,
    check_rate,
    grid_layer_paths,
    grid_pos_embed,
    pretrained_cfg,
    record_input_size,
    relayout_grid_layers,
    take_indices,
    token_grid,
)
from ._pretrained import build_with_weights, resolve_cfg

__all__ = ["Block", "EfficientVisionTransformer", "checkpoint_filter_fn"]


# Keywords a block passes to its mixer itself (not to be given again in attn_kwargs).
_BLOCK_ATTN_KEYS = {
    "num_heads",
    "qkv_bias",
    "qk_norm",
    "attn_drop",
    "proj_drop",
    "norm_layer",
    "dim",
    "device",
    "dtype",
}


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (optional LayerScale)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        attn_layer: str = "softmax",
        attn_kwargs: Mapping[str, Any] | None = None,
        mlp_layer: Callable[..., nn.Module] = Mlp,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        taken = sorted(set(attn_kwargs or {}) & _BLOCK_ATTN_KEYS)
        if taken:  # (a TypeError: "create_attn() got multiple values for keyword argument 'qkv_bias'")
            raise ValueError(
                f"attn_kwargs {taken} are set by the model (its own arguments: qkv_bias=..., num_heads=...); pass "
                "them to the model, not in attn_kwargs"
            )
        self.norm1 = as_pre_norm(norm_layer(dim, **dd))  # feeds only the mixer's projections
        self.attn: TokenMixer = create_attn(
            attn_layer,
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            norm_layer=norm_layer,
            **dict(attn_kwargs or {}),
            **dd,
        )
        self.ls1 = LayerScale(dim, init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = as_pre_norm(norm_layer(dim, **dd))  # feeds only the MLP's first Linear
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        """Tokens ``[B, num_prefix_tokens + H*W, C]`` in and out."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), feat_size, num_prefix_tokens)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class EfficientVisionTransformer(AllOrNothingLoad, nn.Module):
    """DeiT-shaped vision transformer whose token mixer is chosen per block.

    Args:
        img_size: Nominal input size (sets the position-embedding grid and the grid of size-dependent layers).
        patch_size: Patch size.
        in_chans: Input channels.
        num_classes: Classifier outputs (0 = no classifier).
        global_pool: ``"token"`` (class token), ``"avg"`` (mean of grid tokens), ``"avgmax"``, ``"max"`` or ``""``.
        embed_dim: Width ``C``.
        depth: Number of blocks.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width / ``C``.
        qkv_bias: Bias on q/k/v projections.
        qk_norm: Normalise q and k (mechanisms that cannot raise ``NotImplementedError``).
        init_values: LayerScale init (``None`` = no LayerScale).
        class_token: Prepend a class token.
        reg_tokens: Number of register tokens.
        no_embed_class: Position embedding covers the grid tokens only.
        dynamic_img_size: Accept any input whose sides are multiples of ``patch_size``.
        dynamic_img_pad: Pad inputs to a multiple of ``patch_size`` instead of raising.
        fc_norm: Norm after pooling instead of before (default: with ``"avg"`` pooling).
        drop_rate: Dropout before the classifier.
        pos_drop_rate: Dropout after adding position embeddings.
        proj_drop_rate: Dropout after attention / MLP projections.
        attn_drop_rate: Attention dropout (mechanisms without an attention matrix must get 0).
        drop_path_rate: Stochastic depth, linearly increasing over blocks.
        norm_layer: Norm (default ``LayerNorm(eps=norm_eps)``).
        norm_eps: LayerNorm epsilon when ``norm_layer`` is not given.
        act_layer: MLP activation (default GELU).
        attn_layer: Registered token-mixer name, or one per block.
        attn_kwargs: Keywords for the token mixer, or one dict per block.
        embed_layer: Patch embedding (timm's ``PatchEmbed`` signature and attributes; output ``NHWC``).
        mlp_layer: Block MLP, called ``(dim, hidden_features, act_layer=, drop=)`` (timm's ``Mlp``).
        device: Parameter device.
        dtype: Parameter dtype.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        class_token: bool = True,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        dynamic_img_size: bool = True,
        dynamic_img_pad: bool = False,
        fc_norm: bool | None = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[..., nn.Module] | None = None,
        norm_eps: float = 1e-6,
        act_layer: Callable[..., nn.Module] | None = None,
        attn_layer: str | Sequence[str] = "softmax",
        attn_kwargs: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        embed_layer: Callable[..., nn.Module] = PatchEmbed,
        mlp_layer: Callable[..., nn.Module] = Mlp,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        img_size = check_pair("img_size", img_size)
        patch_size = check_pair("patch_size", patch_size)
        if img_size[0] < patch_size[0] or img_size[1] < patch_size[1]:
            raise ValueError(f"{img_size=} is smaller than one patch ({patch_size=}): the token grid would be empty")
        if not dynamic_img_pad and (img_size[0] % patch_size[0] or img_size[1] % patch_size[1]):
            raise ValueError(  # (built, then failed at the first forward)
                f"{img_size=} is not a multiple of {patch_size=}: the model could not run an input of its own size; "
                "use sides that are multiples of the patch size, or dynamic_img_pad=True"
            )
        for name, value in (
            ("in_chans", in_chans),
            ("embed_dim", embed_dim),
            ("depth", depth),
            ("num_heads", num_heads),
        ):
            check_int(name, value, minimum=1)
        check_int("num_classes", num_classes, minimum=0)
        check_int("reg_tokens", reg_tokens, minimum=0)
        check_positive("mlp_ratio", mlp_ratio)
        check_positive("norm_eps", norm_eps)
        for name, value in (
            ("drop_rate", drop_rate),
            ("pos_drop_rate", pos_drop_rate),
            ("proj_drop_rate", proj_drop_rate),
            ("attn_drop_rate", attn_drop_rate),
            ("drop_path_rate", drop_path_rate),
        ):
            check_rate(name, value)
        for name, value in (
            ("qkv_bias", qkv_bias),
            ("qk_norm", qk_norm),
            ("class_token", class_token),
            ("no_embed_class", no_embed_class),
            ("dynamic_img_size", dynamic_img_size),
            ("dynamic_img_pad", dynamic_img_pad),
        ):
            check_bool(name, value)
        if init_values is not None:
            check_positive("init_values", init_values)
        if int(embed_dim * mlp_ratio) < 1:
            raise ValueError(f"{mlp_ratio=} gives an empty MLP for {embed_dim=}")
        if global_pool not in ("", "avg", "avgmax", "max", "token"):
            raise ValueError(f"{global_pool=} is not one of '', 'avg', 'avgmax', 'max', 'token'")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if embed_dim % num_heads:
            raise ValueError(f"{embed_dim=} is not divisible by {num_heads=}")
        if isinstance(attn_layer, str):
            attn_layers = [attn_layer] * depth
        elif isinstance(attn_layer, Sequence) and all(isinstance(a, str) for a in attn_layer):
            attn_layers = list(attn_layer)
        else:
            raise ValueError(f"{attn_layer=} must be a registered attention-layer name or one name per block")
        if attn_kwargs is None or isinstance(attn_kwargs, Mapping):
            per_block_kwargs = [dict(attn_kwargs or {}) for _ in range(depth)]
        elif isinstance(attn_kwargs, Sequence) and all(isinstance(a, Mapping) for a in attn_kwargs):
            per_block_kwargs = [dict(a) for a in attn_kwargs]
        else:
            raise ValueError(f"{attn_kwargs=} must be a dict of keywords or one dict per block")
        if len(attn_layers) != depth or len(per_block_kwargs) != depth:
            raise ValueError(
                f"attn_layer / attn_kwargs need one entry per block ({depth=}), "
                f"got {len(attn_layers)} and {len(per_block_kwargs)}"
            )
        unknown = sorted({name for name in attn_layers if name not in ATTN_LAYERS})
        if unknown:
            raise ValueError(f"unknown attention layer(s) {unknown}; choose one of {sorted(ATTN_LAYERS)}")
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=norm_eps)
        act_layer = act_layer or nn.GELU
        use_fc_norm = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.num_reg_tokens = reg_tokens
        self.has_class_token = class_token
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.patch_size = patch_size[0] if patch_size[0] == patch_size[1] else patch_size
        self.in_chans = in_chans

        self.patch_embed = embed_layer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            bias=True,
            strict_img_size=not dynamic_img_size,
            dynamic_img_pad=dynamic_img_pad,
            output_fmt="NHWC",
            **dd,
        )
        as_patch_conv(getattr(self.patch_embed, "proj", None))  # FAST_PATHS["patch_gemm"]
        grid = tuple(self.patch_embed.grid_size)
        num_patches = grid[0] * grid[1]
        # The grid the position embedding (and every grid-sized table) is laid out on, saved with the weights: a
        # checkpoint's token count alone cannot tell an H x W grid from W x H (see _load_from_state_dict).
        self.register_buffer("pos_embed_grid", torch.tensor(grid, dtype=torch.int64, device=device))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim, **dd)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, embed_len, embed_dim, **dd) * 0.02)
        self.pos_drop = nn.Dropout(p=pos_drop_rate)

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        blocks = []
        # the mixers whose grid-sized tables take the model's grid (not one given in attn_kwargs): set_input_size
        # lays them out anew
        self._grid_layers: list[str] = []
        for i, (name, kw) in enumerate(zip(attn_layers, per_block_kwargs, strict=True)):
            layer_cls = ATTN_LAYERS[name]
            if getattr(layer_cls, "grid_kwarg", None):
                if layer_cls.grid_kwarg not in kw:
                    self._grid_layers.append(f"blocks.{i}.attn")
                kw.setdefault(layer_cls.grid_kwarg, grid)
            if getattr(layer_cls, "prefix_kwarg", None):
                kw.setdefault(layer_cls.prefix_kwarg, self.num_prefix_tokens)
            blocks.append(
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_norm=qk_norm,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    init_values=init_values,
                    drop_path=dpr[i],
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                    attn_layer=name,
                    attn_kwargs=kw,
                    mlp_layer=mlp_layer,
                    **dd,
                )
            )
        self.blocks = nn.Sequential(*blocks)
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=self.patch_size) for i in range(depth)
        ]
        self.norm = norm_layer(embed_dim, **dd) if not use_fc_norm else nn.Identity()
        self.fc_norm = norm_layer(embed_dim, **dd) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # timm contract: optimisation helpers -----------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position embeddings, prefix tokens and the mechanisms' positional / bias / scalar parameters."""
        table = re.compile(r"\.attn\.(positional_encoding|scale|rho_logit|temperature|\w+_bias)$")
        skip = {"pos_embed", "cls_token", "reg_token"} & {n for n, _ in self.named_parameters()}
        skip |= {n for n, _ in self.named_parameters() if table.search(n)}
        return skip

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay."""
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed|^reg_token",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (identical outputs, less memory)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier; ``num_classes=0`` keeps pooled features, ``global_pool=''`` disables pooling."""
        check_int("num_classes", num_classes, minimum=0)
        if global_pool is not None:
            if global_pool not in ("", "avg", "avgmax", "max", "token"):
                raise ValueError(f"{global_pool=} is not one of '', 'avg', 'avgmax', 'max', 'token'")
            if global_pool == "token" and self.cls_token is None:
                raise ValueError("global_pool='token' needs a class token")
        if global_pool is not None:
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.pos_embed
        self.head = (
            nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )

    @torch.jit.ignore
    def set_input_size(
        self, img_size: int | tuple[int, int] | None = None, patch_size: int | tuple[int, int] | None = None
    ) -> None:
        """Set the nominal input size, as timm's ``VisionTransformer.set_input_size``: the position embedding and
        every grid-sized table (FLatten's positional encodings, Agent's biases) are resampled to the new token grid,
        as loading this model's weights through :func:`checkpoint_filter_fn` into a model built at ``img_size`` would
        (the same outputs at every input size); with ``dynamic_img_size=False`` the model then takes that size only.
        Resized parameters are new ``nn.Parameter`` objects (build the optimizer afterwards).

        Raises:
            ValueError: ``img_size`` is not a pair of positive ints, is smaller than one patch, or (without
                ``dynamic_img_pad``) not a multiple of the patch size; nothing is changed then.
            NotImplementedError: ``patch_size`` differs from the model's (resampling the patch projection is not
                supported), or the patch embedding has no ``set_input_size``.
        """
        patch = tuple(self.patch_embed.patch_size)
        if patch_size is not None and check_pair("patch_size", patch_size) != patch:
            raise NotImplementedError(
                f"set_input_size: changing patch_size ({patch} -> {check_pair('patch_size', patch_size)}) is not "
                "supported; build the model with the new patch_size and load its weights through checkpoint_filter_fn"
            )
        if img_size is None:
            return
        img_size = check_pair("img_size", img_size)
        if img_size[0] < patch[0] or img_size[1] < patch[1]:
            raise ValueError(f"set_input_size: {img_size=} is smaller than one patch ({patch=})")
        if not self.patch_embed.dynamic_img_pad and (img_size[0] % patch[0] or img_size[1] % patch[1]):
            raise ValueError(
                f"set_input_size: {img_size=} is not a multiple of the patch size {patch}: the model could not run an "
                "input of that size; use multiples of it (or build the model with dynamic_img_pad=True)"
            )
        if not callable(getattr(self.patch_embed, "set_input_size", None)):
            raise NotImplementedError(
                f"set_input_size: the patch embedding ({type(self.patch_embed).__name__}) has no set_input_size"
            )
        old, grid = tuple(self.patch_embed.grid_size), (img_size[0] // patch[0], img_size[1] // patch[1])
        tensors: dict[str, torch.Tensor] = {}  # everything computed before anything changes
        if grid != old:
            prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            tensors["pos_embed"] = resample_abs_pos_embed(
                self.pos_embed.detach(),
                new_size=list(grid),
                old_size=list(old),
                num_prefix_tokens=prefix,
                verbose=False,
            )
            tensors["pos_embed_grid"] = torch.tensor(grid, dtype=torch.int64)
        set_grids = relayout_grid_layers(self, [(path, grid) for path in grid_layer_paths(self)], tensors)
        assign_tensors(self, tensors)  # (checks every target, then replaces them)
        self.patch_embed.set_input_size(img_size=img_size)
        set_grids()
        record_input_size(self, img_size)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        """Refuse weights laid out on another grid; fill in the grid of older or foreign checkpoints where the
        position embedding's shape makes it unambiguous (same token count on a square grid)."""
        key = prefix + "pos_embed_grid"
        grid = tuple(self.patch_embed.grid_size)
        if key in state_dict:
            refuse_other_grid(
                state_dict[key], grid, "token grid", tuple(self.patch_embed.img_size),
                "visionlin.models.vit.checkpoint_filter_fn, which resamples position embeddings and grid-sized tables",
            )  # fmt: skip
        elif prefix + "pos_embed" in state_dict:
            pos = state_dict[prefix + "pos_embed"]
            if tuple(pos.shape) == tuple(self.pos_embed.shape) and grid[0] != grid[1]:
                raise ValueError(
                    f"checkpoint has no pos_embed_grid and this model's grid {grid} is not square: its "
                    f"{pos.shape[1]}-row pos_embed could be laid out {grid} or {grid[::-1]}; add "
                    "state_dict['pos_embed_grid'] = torch.tensor([H, W]) with the grid it was trained on and load it "
                    "through checkpoint_filter_fn"
                )
            state_dict[key] = self.pos_embed_grid.clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    # Forward ----------------------------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` itself once checked (returned, so FX dead-code elimination cannot drop the check)."""
        return check_image(
            x,
            self.in_chans,
            tuple(self.patch_embed.patch_size),
            tuple(self.patch_embed.img_size),
            next(self.patch_embed.parameters()).dtype,
            self.dynamic_img_size,
            self.patch_embed.dynamic_img_pad,
        )

    def _pos_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``[B, H, W, C]`` patches -> ``[B, prefix + H*W, C]`` tokens with position embeddings, and ``(H, W)``."""
        feat_size = token_grid(x)
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        pos_embed = grid_pos_embed(self.pos_embed, x, tuple(self.patch_embed.grid_size), prefix)
        x = x.flatten(1, 2)
        prefix_tokens = []
        if self.cls_token is not None:
            prefix_tokens.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            prefix_tokens.append(self.reg_token.expand(x.shape[0], -1, -1))
        if self.no_embed_class:
            x = torch.cat([*prefix_tokens, x + pos_embed], dim=1)
        else:
            x = torch.cat([*prefix_tokens, x], dim=1) + pos_embed
        return self.pos_drop(x), feat_size

    def _run_block(self, blk: nn.Module, x: torch.Tensor, feat_size: tuple[int, int]) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(blk, x, feat_size, self.num_prefix_tokens, use_reentrant=False)
        return blk(x, feat_size, self.num_prefix_tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C_in, H, W]`` -> normalised tokens ``[B, prefix + H/p * W/p, C]`` (unpooled)."""
        x = self._check_input(x)
        x, feat_size = self._pos_embed(self.patch_embed(x))
        for blk in self.blocks:
            x = self._run_block(blk, x, feat_size)
        return self.norm(x)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        """Pool tokens ``[B, N, C] -> [B, C]`` (or pass them through for ``''``)."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "token":
            # a compact copy: the slice keeps the tokens' row stride (the token count times the width), past 2**31
            # elements from 40,960 px at width 384, and cuBLAS then refuses the head's product
            # (CUBLAS_STATUS_NOT_SUPPORTED). ``.contiguous()`` would not do at batch 1: a size-1 dimension's stride
            # does not count for contiguity, so it returns the slice, stride and all.
            return x[:, 0].clone(memory_format=torch.contiguous_format)
        grid_tokens = x[:, self.num_prefix_tokens :]
        if pool_type == "avg":
            return grid_tokens.mean(dim=1)
        if pool_type == "max":
            return grid_tokens.amax(dim=1)
        if pool_type == "avgmax":
            return 0.5 * (grid_tokens.mean(dim=1) + grid_tokens.amax(dim=1))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens ``[B, N, C]`` -> logits ``[B, num_classes]`` (or pooled features ``[B, C]`` with ``pre_logits``)."""
        pooled = self.global_pool in ("avg", "max", "avgmax")
        x = check_head_input(x, self.num_features, min_tokens=self.num_prefix_tokens + 1 if pooled else 1)
        x = self.fc_norm(self.pool(x))
        x = self.head_drop(x)
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
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[Any]]:
        """Block outputs as feature maps (timm's ``forward_intermediates`` contract).

        Args:
            x: Images ``[B, C_in, H, W]``.
            indices: Take the last ``n`` blocks if an int, these block indices if a list, all if ``None``.
            return_prefix_tokens: Pair each map with its prefix tokens ``[B, prefix, C]``.
            norm: Apply the final norm to each intermediate.
            stop_early: Stop after the last requested block (only with ``intermediates_only``).
            output_fmt: ``"NCHW"`` (maps ``[B, C, H/p, W/p]``) or ``"NLC"`` (grid tokens ``[B, H/p*W/p, C]``).
            intermediates_only: Return only the intermediates.

        Returns:
            The intermediates, or ``(final forward_features output, intermediates)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"{output_fmt=} must be 'NCHW' or 'NLC'")
        x = self._check_input(x)
        wanted, max_index = take_indices(len(self.blocks), indices)
        b = x.shape[0]
        x, feat_size = self._pos_embed(self.patch_embed(x))
        blocks = self.blocks if not (stop_early and intermediates_only) else self.blocks[: max_index + 1]
        intermediates = []
        for i, blk in enumerate(blocks):
            x = self._run_block(blk, x, feat_size)
            if i in wanted:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [
                y.reshape(b, feat_size[0], feat_size[1], y.shape[-1]).permute(0, 3, 1, 2).contiguous()
                for y in intermediates
            ]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix, strict=True))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop blocks (and optionally norm / head) not needed for the requested intermediates."""
        wanted, max_index = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if hasattr(self, "_grid_layers"):  # (older objects have no record)
            self._grid_layers = [p for p in self._grid_layers if int(p.split(".")[1]) <= max_index]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return wanted


# Checkpoint conversion ------------------------------------------------------------------------------------------------
_INFSA_EXAMPLE = [
    (r"^encoder\.layers\.(\d+)\.ff\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layers\.(\d+)\.ff\.3\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.layers\.(\d+)\.", r"blocks.\1."),
    (r"^encoder\.norm\.", "norm."),
    (r"^patch_embed\.(weight|bias)$", r"patch_embed.proj.\1"),
]


def _unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    """The tensors of a checkpoint: a ``model_ema`` / ``model`` / ``state_dict`` wrapper removed, values checked."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"expected a checkpoint mapping of parameter names to tensors (or a {{'model': ...}} wrapper), got "
            f"{type(state_dict).__name__}"
        )
    for key in ("model_ema", "state_dict_ema", "model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            state_dict = state_dict[key]
            break
    bad = [(k, v) for k, v in state_dict.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        shown = ", ".join(
            f"{k!r}: {type(v).__name__}" if isinstance(k, str) else f"{k!r} ({type(k).__name__} key)"
            for k, v in bad[:10]
        )
        raise ValueError(f"checkpoint entries must map str names to tensors; these do not: {shown}")
    return state_dict


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: EfficientVisionTransformer, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Map the authors' checkpoints onto :class:`EfficientVisionTransformer`.

    Handles DeiT-style checkpoints (Agent-DeiT, InLine-DeiT: ``{'model': ...}`` with ``blocks.i.attn.*``), the InfSA
    example classifier (``encoder.layers.i.*``, ``q_proj/k_proj/v_proj/out_proj``) and our own. Each block's attention
    keys go through its layer's ``convert_official_state_dict`` and ``adapt_state_dict`` (grid-sized tables resampled
    to the model's grid); the position embedding is resampled to the model's grid. With ``strict`` (the default) the
    result must hold every key of ``model`` with its shape (``ValueError`` naming the rest); ``strict=False`` returns
    what could be mapped (initialising a distillation student from a teacher of another family, say).
    """
    state_dict = dict(_unwrap(state_dict))
    if any(k.startswith("encoder.layers.") for k in state_dict):
        renamed = {}
        for k, v in state_dict.items():
            for pattern, repl in _INFSA_EXAMPLE:
                k, n = re.subn(pattern, repl, k)
                if n:
                    break
            renamed[k] = v
        state_dict = renamed
    state_dict.pop("head_dist.weight", None)
    state_dict.pop("head_dist.bias", None)
    old_grid = _checkpoint_grid(state_dict, model)
    grid = tuple(model.patch_embed.grid_size)
    if "pos_embed" in state_dict and (state_dict["pos_embed"].shape != model.pos_embed.shape or old_grid != grid):
        state_dict["pos_embed"] = _adapt_pos_embed(state_dict, model, old_grid)
    state_dict["pos_embed_grid"] = model.pos_embed_grid.detach().clone()
    state_dict.pop("dist_token", None)
    if model.cls_token is None:
        state_dict.pop("cls_token", None)
    if isinstance(model.norm, nn.Identity) and "norm.weight" in state_dict and "fc_norm.weight" not in state_dict:
        # The model pools before its final norm (fc_norm): the checkpoint's final norm moves there.
        for kind in ("weight", "bias"):
            if f"norm.{kind}" in state_dict:
                state_dict[f"fc_norm.{kind}"] = state_dict.pop(f"norm.{kind}")

    out: dict[str, torch.Tensor] = {}
    per_block: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in state_dict.items():
        m = re.match(r"^blocks\.(\d+)\.attn\.(.+)$", k)
        if m and int(m.group(1)) < len(model.blocks):
            per_block.setdefault(int(m.group(1)), {})[m.group(2)] = v
            continue
        if k == "patch_embed.proj.weight" and v.ndim < 4:
            v = v.reshape(model.patch_embed.proj.weight.shape)
        out[k] = v
    for i, sub in per_block.items():
        attn = model.blocks[i].attn
        sub = attn.convert_official_state_dict(sub)
        sub = attn.adapt_state_dict(sub, old_grid=old_grid)
        out.update({f"blocks.{i}.attn.{k}": v for k, v in sub.items()})
    if strict:  # every key present and of the right shape (False: map what can be mapped, e.g. for distillation)
        _check_matches(out, model)
    return out


def _prefix_rows(state_dict: Mapping[str, torch.Tensor], model: EfficientVisionTransformer) -> int:
    """How many leading rows of the checkpoint's ``pos_embed`` belong to prefix tokens (class, distillation,
    registers); 0 when the checkpoint embeds only the grid (``no_embed_class``)."""
    pos = state_dict["pos_embed"]
    n_reg = state_dict["reg_token"].shape[1] if "reg_token" in state_dict else 0
    n_prefix = int("cls_token" in state_dict) + int("dist_token" in state_dict) + n_reg
    grid = tuple(model.patch_embed.grid_size)
    if model.no_embed_class and "pos_embed_grid" in state_dict:  # (a no_embed_class checkpoint of another grid)
        saved = _saved_grid(state_dict["pos_embed_grid"])
        if pos.shape[1] == saved[0] * saved[1]:
            return 0
    if pos.shape[1] - n_prefix <= 0 or (pos.shape[1] == grid[0] * grid[1] and model.no_embed_class):
        return 0
    return n_prefix


def _saved_grid(value: Any) -> tuple[int, int]:
    """A checkpoint's ``pos_embed_grid`` as ``(H, W)``.

    Raises:
        ValueError: it does not hold two positive integers.
    """
    saved = torch.as_tensor(value).reshape(-1)
    if saved.numel() != 2 or saved.is_floating_point() or bool((saved < 1).any()):
        raise ValueError(f"checkpoint pos_embed_grid must hold two integers (H, W), got {saved.tolist()}; both >= 1")
    return int(saved[0]), int(saved[1])


def refuse_other_grid(saved: Any, grid: tuple[int, int], what: str, img_size: tuple, loader: str) -> None:
    """``ValueError`` when a checkpoint's grid record ``saved`` is not the model's ``grid`` (``what``: which grid, for
    the message; ``loader``: the filter that resamples such a checkpoint, and what it resamples)."""
    theirs = _saved_grid(saved)
    if theirs != grid:
        raise ValueError(
            f"checkpoint was saved for a {theirs[0]} x {theirs[1]} {what}, this model has {grid[0]} x {grid[1]} "
            f"(img_size={img_size}); load it through {loader}, or build the model at the checkpoint's img_size"
        )


def _checkpoint_grid(state_dict: Mapping[str, torch.Tensor], model: EfficientVisionTransformer) -> tuple[int, int]:
    """The token grid a checkpoint's position embedding and grid-sized tables are laid out on.

    Read from ``pos_embed_grid`` (saved by our models) and checked against the ``pos_embed`` rows; otherwise
    inferred: the model's grid when the row count matches it and it is square, else a square grid.

    Raises:
        ValueError: the saved grid does not match the rows, or the grid cannot be told from the rows alone.
    """
    grid = tuple(model.patch_embed.grid_size)
    pos = state_dict.get("pos_embed")
    n_grid = None if pos is None else pos.shape[1] - _prefix_rows(state_dict, model)
    if "pos_embed_grid" in state_dict:
        old = _saved_grid(state_dict["pos_embed_grid"])
        if n_grid is not None and old[0] * old[1] != n_grid:
            raise ValueError(f"checkpoint pos_embed_grid {old} does not match its pos_embed's {n_grid} grid rows")
        return old
    if n_grid is None:
        return grid
    if n_grid == grid[0] * grid[1]:
        if grid[0] == grid[1]:
            return grid
        hint = f"the model's grid {grid} is not square, so the rows could be laid out {grid} or {grid[::-1]}"
    else:
        side = round(n_grid**0.5)
        if side * side == n_grid:
            return side, side
        hint = f"{n_grid} is not a square number and differs from the model's grid {grid}"
    raise ValueError(
        f"cannot tell the grid of a checkpoint pos_embed with {n_grid} grid rows ({hint}); add "
        "state_dict['pos_embed_grid'] = torch.tensor([H, W]) with the grid it was trained on"
    )


def _adapt_pos_embed(
    state_dict: Mapping[str, torch.Tensor], model: EfficientVisionTransformer, old_grid: tuple[int, int]
) -> torch.Tensor:
    """A checkpoint's ``pos_embed`` fitted to ``model``: prefix rows matched (a distillation row dropped, a class row
    dropped for a model without class token) and the grid part resampled from ``old_grid`` to the model's grid.

    Raises:
        ValueError: the model needs prefix rows the checkpoint lacks.
    """
    pos = state_dict["pos_embed"]
    has_cls, has_dist = "cls_token" in state_dict, "dist_token" in state_dict
    n_reg = state_dict["reg_token"].shape[1] if "reg_token" in state_dict else 0
    grid = tuple(model.patch_embed.grid_size)
    n_prefix = _prefix_rows(state_dict, model)
    rows = {}
    if n_prefix:
        names = ["cls"] * has_cls + ["dist"] * has_dist + ["reg"] * n_reg
        for i, name in enumerate(names):
            rows.setdefault(name, []).append(pos[:, i : i + 1])
    want = [] if model.no_embed_class else ["cls"] * model.has_class_token + ["reg"] * model.num_reg_tokens
    if any(len(rows.get(name, [])) < want.count(name) for name in set(want)):
        raise ValueError(
            f"checkpoint pos_embed has prefix rows {sorted(rows)} (of {pos.shape[1]} rows); the model needs {want}"
        )
    prefix = ([rows["cls"][0]] if "cls" in want else []) + rows.get("reg", [])[: want.count("reg")]
    grid_pos = pos[:, n_prefix:]
    if tuple(old_grid) != grid:
        grid_pos = resample_abs_pos_embed(
            grid_pos, new_size=list(grid), old_size=list(old_grid), num_prefix_tokens=0, verbose=False
        )
    return torch.cat([*prefix, grid_pos], dim=1)


def _check_matches(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Raise ``ValueError`` naming every key that is unknown, missing or of the wrong shape (classifier excepted)."""
    ours = model.state_dict()
    classifier = ("head.",)
    unexpected = sorted(k for k in state_dict if k not in ours)
    missing = sorted(k for k in ours if k not in state_dict and not k.startswith(classifier))
    wrong = {
        k: (tuple(v.shape), tuple(ours[k].shape))
        for k, v in state_dict.items()
        if k in ours and not k.startswith(classifier) and tuple(v.shape) != tuple(ours[k].shape)
    }
    # Only the input-channel count differs: timm's loader adapts the first conv (adapt_input_conv) after filtering,
    # the conv its pretrained_cfg names (every family's stem: "stem.proj.0", "stem.conv_down.0", ...).
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv") or "patch_embed.proj"
    for name in [first] if isinstance(first, str) else first:
        key = f"{name}.weight"
        if key in wrong and wrong[key][0][:1] + wrong[key][0][2:] == wrong[key][1][:1] + wrong[key][1][2:]:
            del wrong[key]
    if unexpected or missing or wrong:
        parts = []
        if wrong:
            parts.append(
                "shape mismatches (checkpoint, model): " + ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in wrong.items())
            )
        if unexpected:
            parts.append(f"unexpected keys: {unexpected[:20]}")
        if missing:
            parts.append(f"missing keys: {missing[:20]}")
        raise ValueError(f"checkpoint does not match {type(model).__name__}: " + "; ".join(parts))


# Configurations -------------------------------------------------------------------------------------------------------
_cfg = partial(pretrained_cfg, first_conv="patch_embed.proj")


_INFVIT = {"paper_ids": "arXiv:2603.00175", "origin_url": "https://github.com/giorgioroffo/infinite-self-attention"}
_FLATTEN = {"paper_ids": "arXiv:2308.00442", "origin_url": "https://github.com/LeapLabTHU/FLatten-Transformer"}
_AGENT = {"paper_ids": "arXiv:2312.08874", "origin_url": "https://github.com/LeapLabTHU/Agent-Attention"}
_INLINE = {"paper_ids": "arXiv:2412.06590", "origin_url": "https://github.com/LeapLabTHU/InLine"}
_UNTRAINED = "No released ImageNet weights; architecture only."
# The authors' ImageNet-1k checkpoints (direct-download share links; the files hold {'model': state_dict, ...}).
_TSINGHUA = "https://cloud.tsinghua.edu.cn/f/{}/?dl=1"

default_cfgs = generate_default_cfgs(
    {
        "infvit_tiny.untrained": _cfg(notes=_UNTRAINED, **_INFVIT),
        "infvit_small.untrained": _cfg(notes=_UNTRAINED, **_INFVIT),
        "infvit_base.untrained": _cfg(notes=_UNTRAINED, **_INFVIT),
        "infvit_pure_tiny.untrained": _cfg(notes=_UNTRAINED, **_INFVIT),
        "infvit_pure_small.untrained": _cfg(notes=_UNTRAINED, **_INFVIT),
        "infvit_pure_base.untrained": _cfg(notes=_UNTRAINED, **_INFVIT),
        "flatten_deit_tiny.untrained": _cfg(notes=_UNTRAINED, **_FLATTEN),
        "flatten_deit_small.untrained": _cfg(notes=_UNTRAINED, **_FLATTEN),
        "agent_deit_tiny.in1k": _cfg(_TSINGHUA.format("57e0904221824ee7b7af"), **_AGENT),
        "agent_deit_small.in1k": _cfg(_TSINGHUA.format("fdd43304372541db8ea7"), **_AGENT),
        "agent_deit_small.in1k_448": _cfg(
            _TSINGHUA.format("a228f86241c445f1969b"), input_size=(3, 448, 448), crop_pct=1.0, **_AGENT
        ),
        "agent_deit_base.in1k": _cfg(_TSINGHUA.format("5115f15fdd7e4ab58fbc"), **_AGENT),
        "inline_deit_tiny.in1k": _cfg(_TSINGHUA.format("1d6b8191ad6d4114b291"), **_INLINE),
        "inline_deit_small.in1k": _cfg(
            _TSINGHUA.format("2f3898b07e9247f3beb3"), input_size=(3, 288, 288), crop_pct=1.0, **_INLINE
        ),
        "inline_deit_base.in1k": _cfg(
            _TSINGHUA.format("10bdd726d4b0435eb34e"), input_size=(3, 448, 448), crop_pct=1.0, **_INLINE
        ),
    }
)


def _create_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> EfficientVisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    depth = kwargs.get("depth", 12)
    if kwargs.get("features_only") and isinstance(depth, int) and not isinstance(depth, bool) and depth >= 1:
        take_indices(depth, out_indices)  # a ValueError naming bad out_indices (timm would assert)
    if "img_size" not in kwargs:  # a tag trained at another resolution (e.g. '.in1k_448') builds at that resolution
        kwargs["img_size"] = tuple(resolve_cfg(variant, kwargs)["input_size"][-2:])
    return build_with_weights(
        EfficientVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _widths(size: str) -> dict[str, Any]:
    return {
        "tiny": dict(embed_dim=192, depth=12, num_heads=3),
        "small": dict(embed_dim=384, depth=12, num_heads=6),
        "base": dict(embed_dim=768, depth=12, num_heads=12),
    }[size]


def _defaults(kwargs: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    """An entrypoint's published settings, each overridable by the caller's keywords."""
    return {**defaults, **kwargs}


def _agent(size: str, agent_num: int, agent_blocks: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Agent-DeiT settings: agent attention in the first ``agent_blocks`` blocks, softmax after. Per-block layers and
    their keywords follow the caller's ``depth``; a caller's ``attn_layer`` replaces the layout; blocks that use agent
    attention get ``agent_num`` and a caller's single ``attn_kwargs`` dict (a list gives every block its own)."""
    args = {**_widths(size), **kwargs}
    depth = args["depth"]
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        return args  # the model's own checks name the bad depth
    if "attn_layer" not in kwargs:
        args["attn_layer"] = ["agent" if i < agent_blocks else "softmax" for i in range(depth)]
    layers = args["attn_layer"]
    given = kwargs.get("attn_kwargs")
    if given is None or isinstance(given, Mapping):  # one dict: for the agent blocks, on top of their agent_num
        names = [layers] * depth if isinstance(layers, str) else layers
        if isinstance(names, Sequence) and all(isinstance(n, str) for n in names):
            agent = {"agent_num": agent_num, **(given or {})}
            args["attn_kwargs"] = [dict(agent) if n == "agent" else {} for n in names]
    return args


# Entrypoints ----------------------------------------------------------------------------------------------------------
@register_model
def infvit_tiny(pretrained: bool = False, **kwargs: Any) -> EfficientVisionTransformer:
    """InfViT-Tiny: Linear-InfSA in all 12 blocks, DeiT-T widths (192, 3 heads)."""
    return _create_vit("infvit_tiny", pretrained, **_defaults(kwargs, **_widths("tiny"), attn_layer="infsa"))


@register_model
def infvit_small(pretrained: bool = False, **kwargs: Any) -> EfficientVisionTransformer:
    """InfViT-Small: Linear-InfSA in all 12 blocks, DeiT-S widths (384, 6 heads)."""
    return _create_vit("infvit_small", pretrained, **_defaults(kwargs, **_widths("small"), attn_layer="infsa"))


@register_model
def infvit_base(pretrained: bool = False, **kwargs: Any) -> EfficientVisionTransformer:
    """InfViT-Base: Linear-InfSA in all 12 blocks, DeiT-B widths (768, 12 heads)."""
    return _create_vit("infvit_base", pretrained, **_defaults(kwargs, **_widths("base"), attn_layer="infsa"))


@register_model
def infvit_pure_tiny(pretrained: bool = False, **kwargs: Any) -> EfficientVisionTransformer:
    """Pure (quadratic) InfViT-Tiny: pure InfSA in all 12 blocks, DeiT-T widths."""
    return _create_vit("infvit_pure_tiny", pretrained, **_defaults(kwargs, **_widths("tiny"), attn_layer="infsa_pure"))


@register_model
def infvit_pure_small(pretrained: bool = False, **kwargs: Any) -> EfficientVisionTransformer:
    """Pure (quadratic) InfViT-Small: pure InfSA in all 12 blocks, DeiT-S widths."""
    return _create_vit(
        "infvit_pure_small", pretrained, **_defaults(kwargs, **_widths("small"), attn_layer="infsa_pure")
    )


@register_model
def infvit_pure_base(pretrained: bool = False, **kwargs: Any) -> EfficientVisionTransformer:
    """Pure (quadratic) InfViT-Base: pure InfSA in all 12 blocks, DeiT-B widths."""
    return _create_vit("infvit_pure_base", pretrained, **_defaults(kwargs, **_widths("base"), attn_layer="infsa_pure"))


@register_model
def flatten_deit_tiny(pretrained: bool = False, **kwargs: Any) -> EfficientVisionTransformer:
    """FLatten-DeiT-Tiny: focused linear attention (p=3, 5x5 shared DWC, key PE) in all blocks, DeiT-T widths."""
    return _create_vit("flatten_deit_tiny", pretrained, **_defaults(kwargs, **_widths("tiny"), attn_layer="flatten"))


@register_model
def flatten_deit_small(pretrained: bool = False, **kwargs: Any) -> EfficientVisionTransformer:
    """FLatten-DeiT-Small: focused linear attention in all blocks, DeiT-S widths."""
    return _create_vit("flatten_deit_small", pretrained, **_defaults(kwargs, **_widths("small"), attn_layer="flatten"))


@register_model
def agent_deit_tiny(pretrained: bool = False, **kwargs: Any) -> EfficientVisionTransformer:
    """Agent-DeiT-Tiny: agent attention (49 agents) in all 12 blocks, DeiT-T widths."""
    return _create_vit("agent_deit_tiny", pretrained, **_agent("tiny", 49, 12, kwargs))


@register_model
def agent_deit_small(pretrained: bool = False, **kwargs: Any) -> EfficientVisionTransformer:
    """Agent-DeiT-Small: agent attention (49 agents) in all 12 blocks, DeiT-S widths."""
    return _create_vit("agent_deit_small", pretrained, **_agent("small", 49, 12, kwargs))


@register_model
def agent_deit_base(pretrained: bool = False, **kwargs: Any) -> EfficientVisionTransformer:
    """Agent-DeiT-Base: agent attention (81 agents) in the first 4 blocks, softmax in the other 8, DeiT-B widths."""
    return _create_vit("agent_deit_base", pretrained, **_agent("base", 81, 4, kwargs))


@register_model
def inline_deit_tiny(pretrained: bool = False, **kwargs: Any) -> EfficientVisionTransformer:
    """InLine-DeiT-Tiny: injective linear attention in all blocks; 192 wide, 6 heads of 32, 224 px."""
    args = _defaults(kwargs, embed_dim=192, depth=12, num_heads=6, attn_layer="inline")
    return _create_vit("inline_deit_tiny", pretrained, **args)


@register_model
def inline_deit_small(pretrained: bool = False, **kwargs: Any) -> EfficientVisionTransformer:
    """InLine-DeiT-Small: injective linear attention in all blocks; 320 wide, 10 heads, 288 px."""
    args = _defaults(kwargs, embed_dim=320, depth=12, num_heads=10, attn_layer="inline", img_size=288)
    return _create_vit("inline_deit_small", pretrained, **args)


@register_model
def inline_deit_base(pretrained: bool = False, **kwargs: Any) -> EfficientVisionTransformer:
    """InLine-DeiT-Base: injective linear attention in all blocks; 384 wide, 12 heads, 448 px."""
    args = _defaults(kwargs, embed_dim=384, depth=12, num_heads=12, attn_layer="inline", img_size=448)
    return _create_vit("inline_deit_base", pretrained, **args)
