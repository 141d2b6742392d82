"""Shifted-window softmax attention with a learned relative position bias (Swin, Liu et al., ICCV 2021), as a token
mixer: the window blocks of FLatten-Swin and Agent-Swin.

The grid is zero-padded at the bottom / right to multiples of the window, cyclically shifted (``shift=True``) by half
a window, cut into windows, and each window runs :func:`visionlin.kernels.softmax_attention` with the bias
``relative_position_bias_table[relative offset]`` plus the Swin mask: ``-100`` (added to the logits, as the authors)
between tokens that come from different regions of the shifted map, and from real to padded keys. On grids that fit in
one window the window shrinks to the grid and the shift is dropped, per axis (the authors: both axes, from
``min(grid)``; the same on square grids); a smaller window uses the centre of the table (the offsets it has).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function, trunc_normal_
from torch import nn

from ..kernels._common import may_keep_tensors
from ..kernels.softmax import softmax_attention
from ._base import TokenMixer, check_tokens, merge_heads, split_heads
from ._registry import register_attn

__all__ = ["ShiftedWindowAttention", "window_partition", "window_reverse"]

#: Logit offset of masked pairs (the authors' Swin mask value).
MASK_VALUE = -100.0
#: Index / mask tensors kept between forwards (they depend on sizes only): at most ``_MAX_CACHED`` entries of at most
#: ``_MAX_CACHED_MASK`` elements in all (8M: 16 MiB in bfloat16; Swin-T's masks at 224 px are 0.2M, at 1024 px 4.4M; a
#: 4096 px stage-1 mask, ~50M, is rebuilt per forward instead).
_MAX_CACHED = 32
_MAX_CACHED_MASK = 1 << 23
_cache: dict[tuple, torch.Tensor | None] = {}


def _cached(key: tuple, device: torch.device, build: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
    """``build()``, kept per ``key`` (+ device and inference mode) in plain eager mode. Built anew (and not kept) under
    ``torch.compile`` / export (fake tensors, traced constants), during CUDA-graph capture (a tensor made there lives
    in the graph's pool) and for masks above ``_MAX_CACHED_MASK`` elements (the cache is emptied when an entry would
    take it past that many in all). Tensors made under ``inference_mode`` get their own entry (they cannot be saved
    for a later backward). Built per forward, index and mask took 6.8 ms of host time in a FLatten-Swin-T training
    step on the H200 host (8 window layers; the step is host-bound there:
    ``host_overhead_train_flatten_swin_b3ff539.log``)."""
    if not may_keep_tensors():
        return build()
    key = (*key, device, torch.is_inference_mode_enabled())
    if key in _cache:
        return _cache[key]
    value = build()
    size = 0 if value is None else value.numel()
    if size <= _MAX_CACHED_MASK:
        held = sum(t.numel() for t in _cache.values() if t is not None)
        if len(_cache) >= _MAX_CACHED or held + size > _MAX_CACHED_MASK:
            _cache.clear()
        _cache[key] = value
    return value


def _pair(window: int | tuple[int, int]) -> tuple[int, int]:
    return (window, window) if isinstance(window, int) else (int(window[0]), int(window[1]))


@register_notrace_function
def window_partition(
    x: torch.Tensor,
    grid: tuple[int, int],
    window: int | tuple[int, int],
    shift: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """Tokens ``[B, H*W, C]`` on ``grid`` -> windows ``[B * nH * nW, wh*ww, C]`` (row-major inside a window, windows
    batch-major), zero-padded at the bottom / right to multiples of the window, then rolled by ``-shift``."""
    h, w = grid[0], grid[1]
    wh, ww = _pair(window)
    b, c = x.shape[0], x.shape[-1]
    nh, nw = -(-h // wh), -(-w // ww)
    x = F.pad(x.unflatten(1, (h, w)), (0, 0, 0, nw * ww - w, 0, nh * wh - h))
    if shift[0] or shift[1]:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = x.view(b, nh, wh, nw, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * nh * nw, wh * ww, c)


@register_notrace_function
def window_reverse(
    x: torch.Tensor,
    grid: tuple[int, int],
    window: int | tuple[int, int],
    shift: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: windows -> tokens ``[B, H*W, C]`` on ``grid`` (rolled back, padding
    cropped)."""
    h, w = grid[0], grid[1]
    wh, ww = _pair(window)
    nh, nw = -(-h // wh), -(-w // ww)
    c = x.shape[-1]
    x = x.view(-1, nh, nw, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, nh * wh, nw * ww, c)
    if shift[0] or shift[1]:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w].flatten(1, 2)


def _region_labels(size: int, valid: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Per position of a padded, rolled axis of ``size``: Swin's region (0, 1, 2 split at ``size - window`` and
    ``size - shift``) times 2, plus 1 where the position holds padding (its source ``(i + shift) % size >= valid``)."""
    i = torch.arange(size, device=device)
    region = (i >= size - window).long() + (i >= size - shift).long() if shift else torch.zeros_like(i)
    return region * 2 + ((i + shift) % size >= valid).long()


def window_mask(
    grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], device: torch.device | None = None
) -> torch.Tensor | None:
    """The additive Swin mask ``[nH * nW, 1, N, N]`` (``N = wh * ww``): ``-100`` between tokens of one window that
    come from different regions of the shifted map or where the key is padding and the query is not; ``None`` when
    nothing is masked (no shift, no padding)."""
    (h, w), (wh, ww), (sh, sw) = grid, window, shift
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    if not (sh or sw) and (hp, wp) == (h, w):
        return None
    rows = _region_labels(hp, h, wh, sh, device)
    cols = _region_labels(wp, w, ww, sw, device)
    labels = (rows[:, None] * 6 + cols[None, :]).reshape(1, hp * wp, 1)
    labels = window_partition(labels, (hp, wp), (wh, ww))[..., 0]  # [nW, N]
    different = labels[:, :, None] != labels[:, None, :]
    return (different.float() * MASK_VALUE).unsqueeze(1)


def _to(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if mask is None else mask.to(dtype)


def relative_position_index(window: tuple[int, int], table_window: int, device: torch.device | None = None):
    """Index ``[N, N]`` into a ``((2 * table_window - 1) ** 2)``-row table for the token pairs of a ``window``
    (``wh, ww <= table_window``): Swin's ``(dy + w - 1) * (2w - 1) + dx + w - 1``."""
    wh, ww = window
    ys, xs = torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # [2, N]
    rel = coords[:, :, None] - coords[:, None, :] + (table_window - 1)  # [2, N, N]
    return rel[0] * (2 * table_window - 1) + rel[1]


@register_attn("window")
class ShiftedWindowAttention(TokenMixer):
    """Swin's (shifted) window multi-head softmax attention with relative position bias; the authors' names (``qkv``,
    ``proj``, ``relative_position_bias_table``).

    Args:
        dim: Channels ``C``.
        num_heads: Heads ``h``.
        qkv_bias: Bias on ``qkv``.
        qk_norm: Not supported (``NotImplementedError``).
        attn_drop: Dropout on the attention weights in training.
        proj_drop: Dropout after ``proj``.
        norm_layer: Unused (``qk_norm`` is not supported).
        window_size: Window side ``w`` (the bias table has ``(2w - 1) ** 2`` rows).
        shift: Shift the grid by ``w // 2`` (Swin's odd blocks).
        device: Parameter device.
        dtype: Parameter dtype.
    """

    kernel_ops = ("softmax_attention",)

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        *,
        window_size: int = 7,
        shift: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_heads)
        if qk_norm:
            raise NotImplementedError("ShiftedWindowAttention does not support qk_norm=True")
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"{window_size=} must be a positive integer")
        if not 0.0 <= attn_drop < 1.0:
            raise ValueError(f"{attn_drop=} must be in [0, 1)")
        dd = {"device": device, "dtype": dtype}
        self.window_size = window_size
        self.shift = bool(shift)
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads, **dd))
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def window_and_shift(self, feat_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """The window and shift used on a ``feat_size`` grid: the window clipped to the grid, the shift (``w // 2``)
        only along axes longer than the window."""
        w, s = self.window_size, self.window_size // 2 if self.shift else 0
        window = (min(feat_size[0], w), min(feat_size[1], w))
        return window, (s if feat_size[0] > w else 0, s if feat_size[1] > w else 0)

    def position_bias(self, window: tuple[int, int]) -> torch.Tensor:
        """The relative position bias ``[1, h, N, N]`` of a ``window`` (the index kept between forwards)."""
        device = self.relative_position_bias_table.device
        index = _cached(("index", window, self.window_size), device,
                        lambda: relative_position_index(window, self.window_size, device))  # fmt: skip
        n = window[0] * window[1]
        return self.relative_position_bias_table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        """``[B, P + H*W, C] -> [B, P + H*W, C]`` (prefix tokens first, then the grid row-major). Grid queries attend
        to their window and to the prefix tokens (without bias); prefix queries attend to every token."""
        check_tokens(x, feat_size, num_prefix_tokens, type(self).__name__, self.dim)
        grid, p, b = (int(feat_size[0]), int(feat_size[1])), num_prefix_tokens, x.shape[0]
        window, shift = self.window_and_shift(grid)
        qkv = self.qkv(x)
        windows = window_partition(qkv[:, p:], grid, window, shift)  # [B * nW, N, 3C]
        q, k, v = split_heads(windows, 3 * self.num_heads).chunk(3, dim=2)
        dt = q.dtype
        bias = self.position_bias(window).to(dt)
        mask = _cached(("mask", grid, window, shift, dt), x.device,
                       lambda: _to(window_mask(grid, window, shift, x.device), dt))  # fmt: skip
        if mask is not None:  # windows are batch-major: the nW masks repeat over the batch
            bias = (bias + mask).repeat(b, 1, 1, 1)
        drop = self.attn_drop if self.training else 0.0
        if p:
            qp, kp, vp = split_heads(qkv[:, :p], 3 * self.num_heads).chunk(3, dim=2)
            per_window = -(-grid[0] // window[0]) * -(-grid[1] // window[1])
            k = torch.cat([kp.repeat_interleave(per_window, dim=0), k], dim=1)
            v = torch.cat([vp.repeat_interleave(per_window, dim=0), v], dim=1)
            bias = F.pad(bias, (p, 0))
        out = softmax_attention(
            q, k, v, scale=self.head_dim**-0.5, attn_bias=bias, dropout_p=drop, backend=self.backend
        )
        out = window_reverse(merge_heads(out), grid, window, shift)
        if p:
            # Prefix queries attend to every token: dense attention, automatic backend.
            qg, kg, vg = split_heads(qkv, 3 * self.num_heads).chunk(3, dim=2)
            prefix = softmax_attention(qp, kg, vg, scale=self.head_dim**-0.5, dropout_p=drop)
            out = torch.cat([merge_heads(prefix), out], dim=1)
        return self.proj_drop(self.proj(out))

    def adapt_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], old_grid: tuple[int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Resize a ``relative_position_bias_table`` saved for another window size (bicubic over the ``(2w - 1)``
        offset grid, as timm's Swin); ``old_grid`` is not used.

        Raises:
            ValueError: the table is not ``[s * s, h]`` with ``h`` this layer's heads.
        """
        sd = dict(state_dict)
        table = sd.get("relative_position_bias_table")
        if table is None or table.shape == self.relative_position_bias_table.shape:
            return sd
        side = math.isqrt(table.shape[0]) if table.ndim == 2 else 0
        if table.ndim != 2 or side * side != table.shape[0] or table.shape[1] != self.num_heads:
            raise ValueError(
                f"relative_position_bias_table of shape {tuple(table.shape)} is not [(2w - 1)^2, {self.num_heads}]"
            )
        new = 2 * self.window_size - 1
        grid = table.T.reshape(1, self.num_heads, side, side).float()
        resized = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
        sd["relative_position_bias_table"] = resized.reshape(self.num_heads, new * new).T.to(table.dtype)
        return sd

    @classmethod
    def convert_official_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The authors' Swin ``WindowAttention``: same names; the ``relative_position_index`` buffer is dropped (ours
        is computed for the window in use)."""
        return {k: v for k, v in state_dict.items() if k != "relative_position_index"}
