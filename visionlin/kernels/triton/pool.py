"""Adaptive average pooling of a token grid in Triton, forward and backward; the math is
:func:`visionlin.kernels.pool.token_adaptive_avg_pool2d_reference`.

Forward: one program per (row of output cells, block of channels, sample) reads the grid rows of its bin row as
``[BLOCK_W, BLOCK_C]`` tiles (channels contiguous in the token layout) and sums each tile's columns into the output
cells by one matrix product with the cells' 0 / 1 column indicators (float32 accumulation), then stores the means
once in ``x``'s dtype. (A program per output cell, summing its bin alone, ran at 0.2x the mean over a view for
Agent-DeiT-S's 2 x 2 bins at 224 px: 75 k programs of two tiny loads each, ``pool_op`` at cbb5d5b.) Where the
programs are too few to fill the GPU (few agents over a large grid at a small batch) each bin row's grid rows are
split over ``splits`` programs that store float32 partial means, summed by torch. Backward: one program per (block of
tokens, block of channels, sample) adds ``G / count`` of the (at most ``SPAN_Y x SPAN_X``) bins that hold each token:
every input-gradient element is written once, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._eager import eager_call, eager_op
from ._launch import cdiv, launch, next_pow2
from .linear import _num_sms

__all__ = ["token_adaptive_avg_pool2d_triton"]


@triton.jit
def _pool_fwd_kernel(
    X, OUT, HH, WW, OH, OW, NCH, splits, per, sx_b, sx_n, sx_c, so_s, so_b, so_n,
    BLOCK_O: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """``OUT[s, b, oy * OW + ox, c]``: the sum over rows ``s * per`` to ``(s + 1) * per - 1`` of bin row ``oy``
    (counted from its first row) of each cell ``ox``'s columns, divided by the cell's token count; with one split,
    the means themselves in ``OUT``'s dtype. A grid row's ``[BLOCK_W, BLOCK_C]`` tiles go through one matrix product
    with the cells' column indicators ``[BLOCK_O, BLOCK_W]`` (0 / 1: exact in any dtype; float32 sums, IEEE products
    for float32 inputs), so every output column of the bin row comes from one pass over its grid rows."""
    oy, pid_c, pid_bs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    s = pid_bs % splits
    b = (pid_bs // splits).to(tl.int64)  # offsets in int64: a tensor may span more than 2^31 elements
    ys, ye = (oy * HH) // OH, ((oy + 1) * HH + OH - 1) // OH
    o = tl.arange(0, BLOCK_O)
    xs, xe = (o * WW) // OW, ((o + 1) * WW + OW - 1) // OW  # each output column's grid columns [xs, xe)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < NCH
    acc = tl.zeros([BLOCK_O, BLOCK_C], dtype=tl.float32)
    for y in range(ys + s * per, tl.minimum(ye, ys + (s + 1) * per)):
        row = X + b * sx_b + (y * WW).to(tl.int64) * sx_n + c[None, :] * sx_c
        for x0 in range(0, WW, BLOCK_W):
            xx = x0 + tl.arange(0, BLOCK_W)
            tile = tl.load(row + xx[:, None].to(tl.int64) * sx_n, mask=(xx < WW)[:, None] & cmask[None, :], other=0.0)
            cells = ((xx[None, :] >= xs[:, None]) & (xx[None, :] < xe[:, None])).to(tile.dtype)
            if IEEE:  # noqa: SIM108 (a constexpr branch: each kernel compiles one product)
                acc = tl.dot(cells, tile, acc, input_precision="ieee")
            else:
                acc = tl.dot(cells, tile, acc)
    count = ((ye - ys) * (xe - xs)).to(tl.float32)
    omask = o < OW
    mean = acc / tl.where(omask, count, 1.0)[:, None]
    out = OUT + s * so_s + b * so_b + (oy * OW + o)[:, None].to(tl.int64) * so_n + c[None, :]
    tl.store(out, mean.to(OUT.dtype.element_ty), mask=omask[:, None] & cmask[None, :])


@triton.jit
def _pool_bwd_kernel(
    G, DX, HH, WW, OH, OW, NCH, sg_b, sg_n, sdx_b, sdx_n,
    SPAN_Y: tl.constexpr, SPAN_X: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``DX[b, t, c] = sum over the bins holding token t of G[b, bin, c] / count(bin)``: the bins holding row ``y``
    are ``floor(y oh / H)`` to ``floor(((y + 1) oh - 1) / H)`` (at most ``SPAN_Y``; columns alike)."""
    pid_t, pid_c = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    tmask, cmask = t < HH * WW, c < NCH
    y, x = t // WW, t % WW
    iy0, iy1 = (y * OH) // HH, ((y + 1) * OH - 1) // HH
    ix0, ix1 = (x * OW) // WW, ((x + 1) * OW - 1) // WW
    g_ptr = G + b * sg_b + c[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for dy in tl.static_range(SPAN_Y):
        oy = iy0 + dy
        ok_y = tmask & (oy <= iy1)
        count_y = ((oy + 1) * HH + OH - 1) // OH - (oy * HH) // OH
        for dx in tl.static_range(SPAN_X):
            ox = ix0 + dx
            ok = ok_y & (ox <= ix1)
            count = count_y * (((ox + 1) * WW + OW - 1) // OW - (ox * WW) // OW)
            g = tl.load(g_ptr + (oy * OW + ox)[:, None].to(tl.int64) * sg_n, mask=ok[:, None] & cmask[None, :],
                        other=0.0)  # fmt: skip
            acc += g.to(tl.float32) / tl.where(ok, count, 1).to(tl.float32)[:, None]
    dx_ptr = DX + b * sdx_b + t[:, None].to(tl.int64) * sdx_n + c[None, :]
    tl.store(dx_ptr, acc.to(DX.dtype.element_ty), mask=tmask[:, None] & cmask[None, :])


#: Launch settings: forward tiles of ``block_w`` grid columns (at most; fewer for narrower grids, at least 16) x
#: ``block_c`` channels, backward tiles of ``block_t`` tokens x ``block_c`` channels (``block_c`` is capped by the
#: next power of two of the channel count, at least 16), warps per program; ``per_sm``: the forward splits bin rows
#: until its programs fill the GPU about this many times over. (Backward: 32 tokens spilled 556 bytes for sm_90.)
TUNING: dict[str, int] = {"block_w": 32, "block_c": 64, "block_t": 16, "warps": 4, "per_sm": 4}


def _block_c(c: int) -> int:
    return min(TUNING["block_c"], max(16, next_pow2(c)))


def _span(n: int, out: int) -> int:
    """The most bins of ``out`` (adaptive bins over ``n`` positions) that hold one position."""
    return 1 if n % out == 0 else (out - 1) // n + 2


def _row_splits(programs: int, bin_rows: int, device: torch.device) -> tuple[int, int]:
    """(splits, rows per split) of each bin row so that the forward's programs fill the GPU ``per_sm`` times over."""
    want = min(bin_rows, max(1, cdiv(TUNING["per_sm"] * _num_sms(device), max(programs, 1))))
    per = cdiv(bin_rows, want)
    return cdiv(bin_rows, per), per


@torch.library.custom_op("visionlin::token_pool_fwd", mutates_args=())
def token_pool_fwd(x: torch.Tensor, hh: int, ww: int, oh: int, ow: int) -> torch.Tensor:
    """The pooled tokens ``[B, oh*ow, C]`` in ``x``'s dtype."""
    b, _, c = x.shape
    out = torch.empty(b, oh * ow, c, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    if hh * ww == 0:
        raise ValueError("token_pool_fwd: an empty grid has no bins")  # the public op's checks refuse it first
    bc = _block_c(c)
    splits, per = _row_splits(b * oh * cdiv(c, bc), cdiv(hh, oh) + 1, x.device)
    dest = out if splits == 1 else torch.empty(splits, b, oh * ow, c, device=x.device, dtype=torch.float32)
    so_s = 0 if splits == 1 else dest.stride(0)
    launch(_pool_fwd_kernel, (oh, cdiv(c, bc), b * splits),
        x, dest, hh, ww, oh, ow, c, splits, per, *x.stride(), so_s, dest.stride(-3), dest.stride(-2),
        BLOCK_O=max(16, next_pow2(ow)), BLOCK_W=min(TUNING["block_w"], max(16, next_pow2(ww))), BLOCK_C=bc,
        IEEE=x.dtype == torch.float32, num_warps=TUNING["warps"],
    )  # fmt: skip
    if splits > 1:
        out.copy_(dest.sum(0))
    return out


@token_pool_fwd.register_fake
def _(x, hh, ww, oh, ow):
    return x.new_empty(x.shape[0], oh * ow, x.shape[2])


@torch.library.custom_op("visionlin::token_pool_bwd", mutates_args=())
def token_pool_bwd(g: torch.Tensor, hh: int, ww: int, oh: int, ow: int) -> torch.Tensor:
    """The gradient ``[B, H*W, C]`` of the pooled tokens' inputs, in ``g``'s dtype."""
    b, _, c = g.shape
    dx = torch.empty(b, hh * ww, c, device=g.device, dtype=g.dtype)
    if dx.numel() == 0:
        return dx
    g = g if g.stride(-1) == 1 else g.contiguous()
    bc, bt = _block_c(c), TUNING["block_t"]
    launch(_pool_bwd_kernel, (cdiv(hh * ww, bt), cdiv(c, bc), b),
        g, dx, hh, ww, oh, ow, c, g.stride(0), g.stride(1), dx.stride(0), dx.stride(1),
        SPAN_Y=_span(hh, oh), SPAN_X=_span(ww, ow), BLOCK_T=bt, BLOCK_C=bc, num_warps=TUNING["warps"],
    )  # fmt: skip
    return dx


@token_pool_bwd.register_fake
def _(g, hh, ww, oh, ow):
    return g.new_empty(g.shape[0], hh * ww, g.shape[2])


def _setup(ctx, inputs, output):
    ctx.sizes = inputs[1:]


def _backward(ctx, g):
    return _token_pool_bwd_call(g, *ctx.sizes), None, None, None, None


token_pool_fwd.register_autograd(_backward, setup_context=_setup)
_token_pool_bwd_call = eager_call(token_pool_bwd)
_token_pool_fwd_call = eager_op(token_pool_fwd, _setup, _backward)


def token_adaptive_avg_pool2d_triton(
    x: torch.Tensor, feat_size: tuple[int, int], out_size: tuple[int, int]
) -> torch.Tensor:
    """The ``"triton"`` backend of :func:`visionlin.kernels.pool.token_adaptive_avg_pool2d`."""
    (hh, ww), (oh, ow) = feat_size, out_size
    return _token_pool_fwd_call(x, int(hh), int(ww), int(oh), int(ow))
