"""Depthwise 2-D convolution of a token grid, fused with bias and residual, in Triton (forward and backward); the math
is :func:`visionlin.kernels.conv.token_depthwise_conv2d_reference`.

Forward (shipped, ``TUNING["conv"] = "strip"``): one program per (block of ``BLOCK_R`` strips of ``S`` neighbouring
tokens of a grid row, block of channels, sample); each thread holds its strips' ``S`` outputs and sums the ``k * k``
taps in float32, loading each input column of a kernel row once for the row's ``k`` taps (loads along channels are
contiguous in the token layout), adds bias and residual and writes the output rows. The tile kernel (``"tile"``)
sums ``k * k`` shifted tiles of raster-order tokens instead. Backward: the input gradient is the same kernel on the
output gradient with the kernel flipped (``FLIP``); the kernel (and bias) gradient sums ``dout * shifted x`` over the
tokens of each sample in a second kernel, by strips as the forward (``TUNING["weight_grad"] = "strip"``; the one-pass
tile, stacked-rows and per-tap kernels stay selectable), split over strip tiles that meet by float32 atomic adds
(sums may differ between runs in the last bits). The residual's gradient is the output gradient itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._eager import eager_call, eager_op
from ._launch import cdiv, launch, tuned
from .linear import _splits

__all__ = ["token_depthwise_conv2d_triton"]


@triton.jit
def _conv_kernel(
    X, W, BIAS, RES, OUT, HH, WW, NCH, P, sx_b, sx_n, sx_c, sw_b, sr_b, sr_n, sr_c, so_b, so_n, so_c,
    K: tl.constexpr, FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``OUT[b, P + t, c] = RES[b, P + t, c] + BIAS[c] + sum_taps W[b, c, tap] * X[b, P + neighbour(t, tap), c]``;
    ``W`` is float32 ``[Bw, K*K, C]``, tap-major (``sw_b = 0`` shares it over the batch)."""
    pid_t, pid_c = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # offsets in int64: a tensor may span more than 2^31 elements
    t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    tmask, cmask = t < HH * WW, c < NCH
    y, x = t // WW, t % WW
    # Pointers to the output token's own input row, once: a tap is that row shifted by a scalar number of tokens,
    # so each tap costs one pointer add and its bounds test per token (the per-tap address arithmetic of every
    # element, in int64, was ~10 integer instructions per multiply-add: the kernel was bound by them, not memory).
    x_ptr = X + b * sx_b + (P + t)[:, None] * sx_n + c[None, :] * sx_c
    w_ptr = W + b * sw_b + c  # a tap's weights are NCH contiguous floats: one line per 32 channels
    cm = cmask[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    # Rows of taps in a loop, taps of a row unrolled: fully unrolled, the compiler hoists all K * K tile loads and
    # spills (ptxas for sm_90: 2.4 KB at k = 5, 17 KB at k = 7); this way at most K tiles are live.
    for dy in range(K):
        yy = y + (dy - K // 2)
        row_ok = tmask & (yy >= 0) & (yy < HH)
        row_ptr = x_ptr + ((dy - K // 2) * WW) * sx_n
        for dx in tl.static_range(K):
            xx = x + (dx - K // 2)
            ok = row_ok & (xx >= 0) & (xx < WW)
            xv = tl.load(row_ptr + (dx - K // 2) * sx_n, mask=ok[:, None] & cm, other=0.0)
            tap = (K - 1 - dy) * K + (K - 1 - dx) if FLIP else dy * K + dx
            wv = tl.load(w_ptr + tap * NCH, mask=cmask, other=0.0)
            acc += xv.to(tl.float32) * wv[None, :]
    mask = tmask[:, None] & cmask[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        res = tl.load(RES + b * sr_b + (P + t)[:, None] * sr_n + c[None, :] * sr_c, mask=mask, other=0.0)
        acc += res.to(tl.float32)
    tl.store(OUT + b * so_b + (P + t)[:, None] * so_n + c[None, :] * so_c, acc.to(OUT.dtype.element_ty), mask)


@triton.jit
def _weight_grad_taps_kernel(
    G, X, DW, DB, HH, WW, NCH, P, per, sg_b, sg_n, sg_c, sx_b, sx_n, sx_c, sdw_b,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Adds ``sum_t G[b, P + t, c] * X[b, P + neighbour(t, tap), c]`` of its token chunk to ``DW[b, tap, c]`` (and
    ``sum_t G`` to ``DB[c]``). Taps are the outer loop: a chunk's ``G`` tiles are re-read from L1 / L2 once per tap
    instead of holding ``K * K`` accumulators in registers."""
    pid_s, pid_c = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # offsets in int64: a tensor may span more than 2^31 elements
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < NCH
    for tap in range(K * K):
        dy, dx = tap // K - K // 2, tap % K - K // 2
        # Products summed per (token row, channel) over the chunk, reduced across tokens once per tap (a cross-warp
        # reduction per tile was most of the kernel's time).
        acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for i in range(per):
            t = ((pid_s * per + i) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
            tmask = t < HH * WW
            y, x = t // WW, t % WW
            g = tl.load(
                G + b * sg_b + (P + t)[:, None] * sg_n + c[None, :] * sg_c,
                mask=tmask[:, None] & cmask[None, :],
                other=0.0,
            ).to(tl.float32)
            yy, xx = y + dy, x + dx
            ok = tmask & (yy >= 0) & (yy < HH) & (xx >= 0) & (xx < WW)
            ptr = X + b * sx_b + (P + yy * WW + xx)[:, None] * sx_n + c[None, :] * sx_c
            xv = tl.load(ptr, mask=ok[:, None] & cmask[None, :], other=0.0)
            acc += g * xv.to(tl.float32)
            if HAS_BIAS:  # noqa: SIM102 (a constexpr branch around a runtime one)
                if tap == 0:
                    acc_b += g
        tl.atomic_add(DW + b * sdw_b + tap * NCH + c, tl.sum(acc, axis=0), mask=cmask)
        if HAS_BIAS:  # noqa: SIM102 (a constexpr branch around a runtime one)
            if tap == 0:
                tl.atomic_add(DB + c, tl.sum(acc_b, axis=0), mask=cmask)


@triton.jit
def _wg_group(acc, g, x_base, t, y, x, tmask, HH, WW, sx_n, cmask, TAP0: tl.constexpr, NT: tl.constexpr,
              K: tl.constexpr, I64: tl.constexpr):  # fmt: skip
    """``acc + g * shifted x`` for the ``NT`` taps from ``TAP0``: ``acc`` and the shifted input rows are
    ``[NT, BLOCK_T, BLOCK_C]`` (zero outside the grid and past its end), ``g`` the tile's float32 gradient rows
    ``[1, BLOCK_T, BLOCK_C]``. A tap's neighbour of token ``t`` is token ``t + dy * WW + dx``: offsets in int32 unless
    ``I64`` (a sample's rows span 2^31 elements or more)."""
    tap = TAP0 + tl.arange(0, NT)
    dy, dx = tap // K - K // 2, tap % K - K // 2
    yy, xx = y[None, :] + dy[:, None], x[None, :] + dx[:, None]  # [NT, BLOCK_T]
    ok = tmask[None, :] & (yy >= 0) & (yy < HH) & (xx >= 0) & (xx < WW)
    src = t[None, :] + (dy * WW + dx)[:, None]
    off = (src.to(tl.int64) if I64 else src) * sx_n
    xv = tl.load(x_base + off[:, :, None], mask=ok[:, :, None] & cmask[None, None, :], other=0.0)
    return acc + g * xv.to(tl.float32)


@triton.jit
def _wg_group_sum(dw_base, acc, NCH, cmask, TAP0: tl.constexpr, NT: tl.constexpr):
    """Adds a group's sums over its tokens to its taps' rows of the tap-major kernel gradient."""
    tap = TAP0 + tl.arange(0, NT)
    tl.atomic_add(dw_base + tap[:, None] * NCH, tl.sum(acc, axis=1), mask=cmask[None, :])


@triton.jit
def _dx_rows(g_base, w_ptr, dx_base, t, HH, WW, NCH, sg_n, sd_n, cmask, K: tl.constexpr, BLOCK_T: tl.constexpr,
             BLOCK_C: tl.constexpr):  # fmt: skip
    """Writes the input gradient of tokens ``t``: ``sum_taps W[tap] * G[t - offset(tap)]`` (the forward's taps
    mirrored), rows of taps in a loop and the taps of a row unrolled, as the forward kernel."""
    tmask = t < HH * WW
    y, x = t // WW, t % WW
    g_row = g_base + t.to(tl.int64)[:, None] * sg_n
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for ky in range(K):
        yy = y - (ky - K // 2)
        row_ok = tmask & (yy >= 0) & (yy < HH)
        row_ptr = g_row - ((ky - K // 2) * WW) * sg_n
        for kx in tl.static_range(K):
            xx = x - (kx - K // 2)
            ok = row_ok & (xx >= 0) & (xx < WW)
            gv = tl.load(row_ptr - (kx - K // 2) * sg_n, mask=ok[:, None] & cmask[None, :], other=0.0)
            wv = tl.load(w_ptr + (ky * K + kx) * NCH, mask=cmask, other=0.0)
            acc += gv.to(tl.float32) * wv[None, :]
    dx_ptr = dx_base + t.to(tl.int64)[:, None] * sd_n
    tl.store(dx_ptr, acc.to(dx_ptr.dtype.element_ty), mask=tmask[:, None] & cmask[None, :])


@triton.jit
def _weight_grad_tile_kernel(
    G, X, W, DX, DW, DB, HH, WW, NCH, P, per, sg_b, sg_n, sg_c, sx_b, sx_n, sx_c, sw_b, sd_b, sd_n, sd_c, sdw_b,
    K: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, HAS_BIAS: tl.constexpr, DX_OUT: tl.constexpr,
    I64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Adds ``sum_t G[b, P + t, c] * X[b, P + neighbour(t, tap), c]`` of its token chunk to ``DW[b, tap, c]`` (and
    ``sum_t G`` to ``DB[c]``), every tap of a token tile at once: ``[taps, BLOCK_T, BLOCK_C]`` tiles of shifted inputs
    against the tile's gradient, read once. The ``K * K`` taps are three groups of power-of-two sizes, ``T1`` + ``T2``
    + 1 (9 = 8 + 1, 25 = 16 + 8 + 1, 49 = 32 + 16 + 1; a size 0 group is absent): one tile padded to 16 / 32 / 64 taps
    spent 78 / 28 / 31% more loads and multiply-adds on taps that do not exist. The chunk is walked once (the per-tap
    kernel walks it ``K * K`` times); the neighbours come from L1 / L2, and the bounds and offsets are per (tap,
    token), amortised over the channels. Sums are per (tap, token, channel) in registers, reduced over the tokens once
    per program.
    ``DX_OUT``: also writes the input gradient of the chunk's tokens (:func:`_dx_rows`, from the float32 tap-major
    kernel ``W``) into ``DX``, so ``G`` is read from memory once for both (otherwise the input gradient is the forward
    kernel run on ``G`` with flipped taps, a second pass); prefix rows of ``DX`` are not written."""
    pid_s, pid_c = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # offsets in int64: a tensor may span more than 2^31 elements
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < NCH
    g_base = G + b * sg_b + P * sg_n + c[None, :] * sg_c
    x_base = X + b * sx_b + P * sx_n + c[None, None, :] * sx_c
    w_ptr = W + b * sw_b + c  # (DX_OUT) a tap's weights are NCH contiguous floats
    dx_base = DX + b * sd_b + P * sd_n + c[None, :] * sd_c
    if T1 > 0:  # (a constexpr branch: at T1 = 0, acc1 does not exist)
        acc1 = tl.zeros([T1, BLOCK_T, BLOCK_C], dtype=tl.float32)
    if T2 > 0:
        acc2 = tl.zeros([T2, BLOCK_T, BLOCK_C], dtype=tl.float32)
    acc3 = tl.zeros([1, BLOCK_T, BLOCK_C], dtype=tl.float32)  # the last tap
    acc_b = tl.zeros([1, BLOCK_T, BLOCK_C], dtype=tl.float32)
    g_rows = G + b * sg_b + P * sg_n + c[None, None, :] * sg_c  # g_base as [1, 1, BLOCK_C], the products' layout
    t = pid_s * per * BLOCK_T + tl.arange(0, BLOCK_T)  # int32: a grid has fewer than 2^31 tokens
    # grid positions stepped per tile (a division per token per tile was ~25 instructions of the walk's ~260)
    y, x = t // WW, t % WW
    step_y, step_x = BLOCK_T // WW, BLOCK_T % WW
    for _ in range(per):
        tmask = t < HH * WW
        g_off = (t.to(tl.int64) if I64 else t) * sg_n
        g = tl.load(g_rows + g_off[None, :, None], mask=tmask[None, :, None] & cmask[None, None, :], other=0.0)
        g = g.to(tl.float32)
        if T1 > 0:
            acc1 = _wg_group(acc1, g, x_base, t, y, x, tmask, HH, WW, sx_n, cmask, 0, T1, K, I64)
        if T2 > 0:
            acc2 = _wg_group(acc2, g, x_base, t, y, x, tmask, HH, WW, sx_n, cmask, T1, T2, K, I64)
        acc3 = _wg_group(acc3, g, x_base, t, y, x, tmask, HH, WW, sx_n, cmask, K * K - 1, 1, K, I64)
        if HAS_BIAS:
            acc_b += g
        if DX_OUT:
            _dx_rows(g_base, w_ptr, dx_base, t, HH, WW, NCH, sg_n, sd_n, cmask, K, BLOCK_T, BLOCK_C)
        t += BLOCK_T
        x += step_x
        wrap = x >= WW
        x = tl.where(wrap, x - WW, x)
        y += step_y + wrap.to(tl.int32)
    dw_base = DW + b * sdw_b + c[None, :]
    if T1 > 0:
        _wg_group_sum(dw_base, acc1, NCH, cmask, 0, T1)
    if T2 > 0:
        _wg_group_sum(dw_base, acc2, NCH, cmask, T1, T2)
    _wg_group_sum(dw_base, acc3, NCH, cmask, K * K - 1, 1)
    if HAS_BIAS:
        tl.atomic_add(DB + c[None, :], tl.sum(acc_b, axis=1), mask=cmask[None, :])


@triton.jit
def _tap_rows(x_tok, y, x, tmask, HH, WW, sx_n, cm, TAP0: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    """The shifted input rows of the ``N`` taps from ``TAP0`` (a power of two), float32 ``[BLOCK_T, BLOCK_C]`` each,
    stacked by :func:`tl.join` on trailing size-2 dims (tap ``TAP0 + i0 + 2 i1 + 4 i2 ...``): every tap one load
    like the forward's (a scalar shift of the tile's pointers), the stack in each thread's registers."""
    if N == 1:
        dy: tl.constexpr = TAP0 // K - K // 2
        dx: tl.constexpr = TAP0 % K - K // 2
        yy = y + dy
        xx = x + dx
        ok = tmask & (yy >= 0) & (yy < HH) & (xx >= 0) & (xx < WW)
        return tl.load(x_tok + (dy * WW + dx) * sx_n, mask=ok[:, None] & cm, other=0.0).to(tl.float32)
    else:
        lo = _tap_rows(x_tok, y, x, tmask, HH, WW, sx_n, cm, TAP0, N // 2, K)
        hi = _tap_rows(x_tok, y, x, tmask, HH, WW, sx_n, cm, TAP0 + N // 2, N // 2, K)
        return tl.join(lo, hi)


@triton.jit
def _stacked(t, N: tl.constexpr):
    """``t`` ``[BLOCK_T, BLOCK_C]`` broadcastable against an ``N``-tap stack (``N = 1``: ``t`` itself)."""
    if N == 1:
        return t
    else:
        return tl.expand_dims(_stacked(t, N // 2), -1)


@triton.jit
def _stack_zeros(BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, N: tl.constexpr):
    if N == 1:
        return tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    else:
        z = _stack_zeros(BLOCK_T, BLOCK_C, N // 2)
        return tl.join(z, z)


@triton.jit
def _stack_offsets(c, NCH, TAP0: tl.constexpr, N: tl.constexpr):
    """The kernel gradient's offsets ``tap * NCH + c`` of an ``N``-tap stack, stacked as :func:`_tap_rows` stacks
    the taps (the same joins, so the two agree however a backend orders a join)."""
    if N == 1:
        return TAP0 * NCH + c
    else:
        return tl.join(_stack_offsets(c, NCH, TAP0, N // 2), _stack_offsets(c, NCH, TAP0 + N // 2, N // 2))


@triton.jit
def _weight_grad_rows_kernel(
    G, X, DW, DB, HH, WW, NCH, P, per, sg_b, sg_n, sg_c, sx_b, sx_n, sx_c, sdw_b,
    K: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, HAS_BIAS: tl.constexpr, I64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """:func:`_weight_grad_tile_kernel`'s sums (same tap groups, same walk) with each tap's shifted rows loaded as a
    ``[BLOCK_T, BLOCK_C]`` tile like the forward's, the group's taps stacked in each thread's registers
    (:func:`_tap_rows`): the tap axis spread over threads cost per-(tap, token) bounds and offsets and a shared-memory
    pass for the gradient tile every step (sm_90 SASS at k = 3, 16 tokens: 4.3 instructions per multiply-add against
    5.8)."""
    pid_s, pid_c = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # offsets in int64: a tensor may span more than 2^31 elements
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < NCH
    cm = cmask[None, :]
    t = pid_s * per * BLOCK_T + tl.arange(0, BLOCK_T)  # int32: a grid has fewer than 2^31 tokens
    rows = (t.to(tl.int64) if I64 else t) + P
    g_ptr = G + b * sg_b + rows[:, None] * sg_n + c[None, :] * sg_c
    x_tok = X + b * sx_b + rows[:, None] * sx_n + c[None, :] * sx_c
    y, x = t // WW, t % WW
    step_y, step_x = BLOCK_T // WW, BLOCK_T % WW
    if T1 > 0:  # (constexpr branches: a size-0 group does not exist)
        acc1 = _stack_zeros(BLOCK_T, BLOCK_C, T1)
    if T2 > 0:
        acc2 = _stack_zeros(BLOCK_T, BLOCK_C, T2)
    acc3 = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)  # the last tap
    acc_b = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for _ in range(per):
        tmask = t < HH * WW
        g = tl.load(g_ptr, mask=tmask[:, None] & cm, other=0.0).to(tl.float32)
        if T1 > 0:
            acc1 += _stacked(g, T1) * _tap_rows(x_tok, y, x, tmask, HH, WW, sx_n, cm, 0, T1, K)
        if T2 > 0:
            acc2 += _stacked(g, T2) * _tap_rows(x_tok, y, x, tmask, HH, WW, sx_n, cm, T1, T2, K)
        acc3 += g * _tap_rows(x_tok, y, x, tmask, HH, WW, sx_n, cm, K * K - 1, 1, K)
        if HAS_BIAS:
            acc_b += g
        t += BLOCK_T
        g_ptr += BLOCK_T * sg_n
        x_tok += BLOCK_T * sx_n
        x += step_x
        wrap = x >= WW
        x = tl.where(wrap, x - WW, x)
        y += step_y + wrap.to(tl.int32)
    dw_base = DW + b * sdw_b
    if T1 > 0:
        offs = _stack_offsets(c, NCH, 0, T1)
        tl.atomic_add(dw_base + offs, tl.sum(acc1, axis=0), mask=_stacked(cmask, T1))
    if T2 > 0:
        offs = _stack_offsets(c, NCH, T1, T2)
        tl.atomic_add(dw_base + offs, tl.sum(acc2, axis=0), mask=_stacked(cmask, T2))
    tl.atomic_add(dw_base + (K * K - 1) * NCH + c, tl.sum(acc3, axis=0), mask=cmask)
    if HAS_BIAS:
        tl.atomic_add(DB + c, tl.sum(acc_b, axis=0), mask=cmask)


@triton.jit
def _strip_load(ptr, x0, ok, cm, WW, s_n, OFF: tl.constexpr, N: tl.constexpr):
    """The rows at grid columns ``x0 + OFF .. x0 + OFF + N - 1`` of the strips starting at ``ptr`` (their first
    token's row; ``ok``: the strip's grid row exists), float32 ``[BLOCK_R, BLOCK_C]`` each, zero outside the grid,
    stacked by :func:`tl.join` on trailing size-2 dims (column ``OFF + i0 + 2 i1 + ...``), so each thread holds its
    strips' columns. Callers ask for overlapping columns (every tap of a kernel row): the loads of one column are the
    same operation on the same values, and the compiler keeps one (sm_90 PTX at k = 3, 4 columns: 6 loads per kernel
    row, not 12), so a kernel row costs ``N + k - 1`` loads per strip instead of ``N * k``."""
    if N == 1:
        pos = x0 + OFF
        m = ok & (pos >= 0) & (pos < WW)
        return tl.load(ptr + OFF * s_n, mask=m[:, None] & cm, other=0.0).to(tl.float32)
    else:
        lo = _strip_load(ptr, x0, ok, cm, WW, s_n, OFF, N // 2)
        hi = _strip_load(ptr, x0, ok, cm, WW, s_n, OFF + N // 2, N // 2)
        return tl.join(lo, hi)


@triton.jit
def _strip_store(ptr, v, x0, ok, cm, WW, s_n, OFF: tl.constexpr, N: tl.constexpr):
    """Stores the ``N``-column stack ``v`` (as :func:`_strip_load` stacks) at the strips' columns from ``OFF``."""
    if N == 1:
        m = ok & (x0 + OFF < WW)
        tl.store(ptr + OFF * s_n, v.to(ptr.dtype.element_ty), mask=m[:, None] & cm)
    else:
        lo, hi = tl.split(v)
        _strip_store(ptr, lo, x0, ok, cm, WW, s_n, OFF, N // 2)
        _strip_store(ptr, hi, x0, ok, cm, WW, s_n, OFF + N // 2, N // 2)


@triton.jit
def _strip_dot(acc, g, xs, N: tl.constexpr):
    """``acc + sum_i g[..., i] * xs[..., i]`` over an ``N``-column stack: a chain of multiply-adds in registers."""
    if N == 1:
        return acc + g * xs
    else:
        g_lo, g_hi = tl.split(g)
        x_lo, x_hi = tl.split(xs)
        return _strip_dot(_strip_dot(acc, g_lo, x_lo, N // 2), g_hi, x_hi, N // 2)


@triton.jit
def _strip_sum(t, N: tl.constexpr):
    """The sum of an ``N``-column stack over its columns."""
    if N == 1:
        return t
    else:
        lo, hi = tl.split(t)
        return _strip_sum(lo + hi, N // 2)


@triton.jit
def _conv_strip_kernel(
    X, W, BIAS, RES, OUT, HH, WW, NCH, P, NXS, sx_b, sx_n, sx_c, sw_b, sr_b, sr_n, sr_c, so_b, so_n, so_c,
    K: tl.constexpr, FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, S: tl.constexpr,
    I64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """:func:`_conv_kernel`'s output, by strips: each of a program's ``BLOCK_R`` rows is a strip of ``S`` neighbouring
    tokens of one grid row (``NXS`` strips per grid row), its ``S`` outputs a per-thread stack. A kernel row's ``S + k
    - 1`` input columns are loaded once and serve all its ``k`` taps (:func:`_strip_load`): the tile kernel loads ``k``
    shifted tiles per kernel row, every input token ``k * k`` times from L1, and was bound by those loads' instructions
    (0.19 ms for 77 MB in + out at k = 5, 5x the bandwidth's time). ``I64``: token offsets in int64 (a sample's rows
    span 2^31 elements or more; otherwise the row shifts and column offsets are int32 products)."""
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # offsets in int64: a tensor may span more than 2^31 elements
    s = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ok, cmask = s < HH * NXS, c < NCH
    cm = cmask[None, :]
    y = s // NXS
    x0 = (s % NXS) * S
    if I64:  # token strides in int64: every row shift and column offset an int64 product (a constexpr branch)
        i64 = tl.full([], 1, tl.int64)
        sx_n, sr_n, so_n = sx_n * i64, sr_n * i64, so_n * i64
    rows = (P + y.to(tl.int64) * WW + x0)[:, None]  # each strip's first token
    x_ptr = X + b * sx_b + rows * sx_n + c[None, :] * sx_c
    w_ptr = W + b * sw_b + c
    acc = _stack_zeros(BLOCK_R, BLOCK_C, S)
    for dy in range(K):  # kernel rows in a loop, a row's taps unrolled (their shared columns loaded once)
        yy = y + (dy - K // 2)
        row_ok = ok & (yy >= 0) & (yy < HH)
        row_ptr = x_ptr + ((dy - K // 2) * WW) * sx_n
        for dx in tl.static_range(K):
            tap = (K - 1 - dy) * K + (K - 1 - dx) if FLIP else dy * K + dx
            wv = tl.load(w_ptr + tap * NCH, mask=cmask, other=0.0)
            acc += _stacked(wv[None, :], S) * _strip_load(row_ptr, x0, row_ok, cm, WW, sx_n, dx - K // 2, S)
    if HAS_BIAS:
        acc += _stacked(tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)[None, :], S)
    if HAS_RES:
        acc += _strip_load(RES + b * sr_b + rows * sr_n + c[None, :] * sr_c, x0, ok, cm, WW, sr_n, 0, S)
    _strip_store(OUT + b * so_b + rows * so_n + c[None, :] * so_c, acc, x0, ok, cm, WW, so_n, 0, S)


@triton.jit
def _strip_taps(acc, g, row0, x0, y, ok, cm, HH, WW, sx_n, TAP0: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                S: tl.constexpr):  # fmt: skip
    """``acc`` (an ``N``-tap stack from ``TAP0``, stacked as :func:`_stack_offsets`) plus each tap's sum over the
    strips' ``S`` columns of ``g * shifted x`` (:func:`_strip_dot`); ``row0``: the strips' first tokens' input rows."""
    if N == 1:
        dy: tl.constexpr = TAP0 // K - K // 2
        dx: tl.constexpr = TAP0 % K - K // 2
        yy = y + dy
        row_ok = ok & (yy >= 0) & (yy < HH)
        xs = _strip_load(row0 + (dy * WW) * sx_n, x0, row_ok, cm, WW, sx_n, dx, S)
        return _strip_dot(acc, g, xs, S)
    else:
        lo, hi = tl.split(acc)
        lo = _strip_taps(lo, g, row0, x0, y, ok, cm, HH, WW, sx_n, TAP0, N // 2, K, S)
        hi = _strip_taps(hi, g, row0, x0, y, ok, cm, HH, WW, sx_n, TAP0 + N // 2, N // 2, K, S)
        return tl.join(lo, hi)


@triton.jit
def _weight_grad_strip_kernel(
    G, X, DW, DB, HH, WW, NCH, P, NXS, per, sg_b, sg_n, sg_c, sx_b, sx_n, sx_c, sdw_b,
    K: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, HAS_BIAS: tl.constexpr, S: tl.constexpr,
    I64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """:func:`_weight_grad_tile_kernel`'s sums (same tap groups ``T1 + T2 + 1``, atomic adds per program) by strips
    as :func:`_conv_strip_kernel`: per tile of ``BLOCK_R`` strips the gradient's ``S`` columns are read once, each
    kernel row's ``S + k - 1`` input columns once for its ``k`` taps, and every tap's products are a per-thread chain
    of multiply-adds; the program walks ``per`` tiles. The tile kernel loads a shifted input tile per tap and spends
    per-(tap, token) bounds and offsets: ~4-6 instructions per multiply-add."""
    pid_s, pid_c = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # offsets in int64: a tensor may span more than 2^31 elements
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < NCH
    cm = cmask[None, :]
    if T1 > 0:  # (constexpr branches: a size-0 group does not exist)
        acc1 = _stack_zeros(BLOCK_R, BLOCK_C, T1)
    if T2 > 0:
        acc2 = _stack_zeros(BLOCK_R, BLOCK_C, T2)
    acc3 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)  # the last tap
    acc_b = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    s = pid_s * per * BLOCK_R + tl.arange(0, BLOCK_R)
    if I64:  # token strides in int64, as in _conv_strip_kernel
        i64 = tl.full([], 1, tl.int64)
        sg_n, sx_n = sg_n * i64, sx_n * i64
    for _ in range(per):
        ok = s < HH * NXS
        y = s // NXS
        x0 = (s % NXS) * S
        rows = (P + y.to(tl.int64) * WW + x0)[:, None]
        g = _strip_load(G + b * sg_b + rows * sg_n + c[None, :] * sg_c, x0, ok, cm, WW, sg_n, 0, S)
        row0 = X + b * sx_b + rows * sx_n + c[None, :] * sx_c
        if T1 > 0:
            acc1 = _strip_taps(acc1, g, row0, x0, y, ok, cm, HH, WW, sx_n, 0, T1, K, S)
        if T2 > 0:
            acc2 = _strip_taps(acc2, g, row0, x0, y, ok, cm, HH, WW, sx_n, T1, T2, K, S)
        acc3 = _strip_taps(acc3, g, row0, x0, y, ok, cm, HH, WW, sx_n, K * K - 1, 1, K, S)
        if HAS_BIAS:
            acc_b += _strip_sum(g, S)
        s += BLOCK_R
    dw_base = DW + b * sdw_b
    if T1 > 0:
        tl.atomic_add(dw_base + _stack_offsets(c, NCH, 0, T1), tl.sum(acc1, axis=0), mask=_stacked(cmask, T1))
    if T2 > 0:
        tl.atomic_add(dw_base + _stack_offsets(c, NCH, T1, T2), tl.sum(acc2, axis=0), mask=_stacked(cmask, T2))
    tl.atomic_add(dw_base + (K * K - 1) * NCH + c, tl.sum(acc3, axis=0), mask=cmask)
    if HAS_BIAS:
        tl.atomic_add(DB + c, tl.sum(acc_b, axis=0), mask=cmask)


def weight_grad_tile(k: int, elements: int = 0) -> tuple[int, int, int]:
    """``(T1, T2, BLOCK_T)`` of :func:`_weight_grad_tile_kernel` at kernel size ``k``: the sizes of its first two tap
    groups (``k * k - 1 = T1 + T2``, powers of two or 0; the third group is the last tap), and the most tokens per
    tile (a power of two, at most 64) for which a tile holds at most about ``elements`` products (``k * k`` taps x
    tokens x ``BLOCK_C`` channels; 0: ``WEIGHT_GRAD_ELEMENTS``; 128 tokens at k = 1 spilled registers for sm_90 with
    the input gradient in the walk)."""
    rest = k * k - 1
    t1 = 1 << (rest.bit_length() - 1) if rest else 0
    t2 = rest - t1
    if t2 & (t2 - 1):
        raise ValueError(f"kernel size {k}: {k * k} taps are not two powers of two and one (allowed: 1, 3, 5, 7, 9)")
    tokens = min(64, max(1, (elements or WEIGHT_GRAD_ELEMENTS) // (k * k * BLOCK_C)))
    return t1, t2, 1 << (tokens.bit_length() - 1)


#: Tile of tokens x channels and warps per program (forward: 4 warps held 233-255 registers for sm_90 and spilled at
#: k = 7; tests/test_kernels_sm90_compile.py checks every shipped setting compiles without spills). ``TUNING`` holds
#: the forward / input-gradient kernel's settings (``stages``: Triton's software pipelining of the tap-row loop,
#: ``None`` its default); benchmarks/conv_op.py --sweep times others by updating it.
BLOCK_T, BLOCK_C, WARPS, WARPS_WEIGHT_GRAD = 32, 64, 4, 4
#: A sample's rows span fewer elements than this: the one-pass weight gradient's token offsets are int32 (tests lower
#: it to run the int64 form on small tensors).
I32_OFFSETS = 2**31
#: Products per tile of the one-pass weight gradient (taps x tokens x ``BLOCK_C`` channels).
WEIGHT_GRAD_ELEMENTS = 8192
#: The most products per tile ``TUNING["wg_elements"]`` may ask for: at 32768 (k = 7, 8 tokens, 8 warps) Triton 3.6
#: compiled the kernel for an H200 into one whose kernel gradient was 40% off (float32, GPU-tested at 9ebf9cc; every
#: setting up to 16384 matched float64 at k = 3, 5 and 7 with 4 and 8 warps).
MAX_WEIGHT_GRAD_ELEMENTS = 16384
#: The forward / input-gradient kernels: ``"strip"`` (:func:`_conv_strip_kernel`, strips of ``strip_s`` neighbouring
#: tokens per thread, each input column loaded once per kernel row; shipped) or ``"tile"`` (:func:`_conv_kernel`, a
#: tile of raster-order tokens, one shifted tile per tap).
CONV_KERNELS = ("tile", "strip")
#: Settings of the strip kernels by kernel size, chosen on an H200 as CUDA-graph replays at the models' shapes (bf16):
#: the forward's columns per strip, strips and channels per program, ``STRIP[k] = (S, BLOCK_R, BLOCK_C)``, and the
#: weight gradient's, ``WG_STRIP[k]``. Forward: 4 x 32 x 32 (s39/conv_op_strip_36d1d35.json: 1.01-1.31x the tile
#: kernel at k = 3, 1.20-2.01x at k = 5); at k = 5, 8 x 16 x 32 (s43/conv_op_strip_ad8ea03.json: 0.093 / 0.131 ms
#: against 0.100 / 0.142 at FLatten-PVT-S / FLatten-Swin-T stage 1; at k = 3 within 3% of 4 x 32 x 32). Weight
#: gradient (s43, 30 settings): k = 3 at 8 x 16 x 32 (0.439 ms summed over four NaLaFormer-T / RAVLT-T shapes against
#: 0.471 for the former 8 x 8 x 64), k = 5 at 8 x 16 x 16 (0.260 against 0.350 for the former 8 x 4 x 64: narrower
#: channel blocks take fewer registers, so more programs share an SM); k = 1 and 7 not timed (k = 7 keeps 4 x 4 x 64,
#: which compiles for sm_90 in 168 registers where 8 x 4 spills). ``TUNING["strip_s"]`` and the others override a
#: setting at every size. Kernels above ``STRIP_MAX_K`` take ``"tile"``.
STRIP = {1: (4, 32, 32), 3: (4, 32, 32), 5: (8, 16, 32), 7: (4, 32, 32)}
WG_STRIP = {1: (8, 8, 64), 3: (8, 16, 32), 5: (8, 16, 16), 7: (4, 4, 64)}
STRIP_MAX_K = 7
#: The weight gradient's kernels: ``"tile"`` (every tap of a token tile at once, one pass over the tokens),
#: ``"fused"`` (the same walk also writing the input gradient: no separate input-gradient pass), ``"rows"`` (the same
#: sums with each tap's rows loaded as a tile and the taps stacked per thread; opt-in: on the H200 faster than "tile"
#: only at 3,136 tokens, s37/conv_op_weight_grad_sweep_317b7cf.json), ``"taps"`` (one pass per tap) or ``"strip"``
#: (:func:`_weight_grad_strip_kernel`, shipped: strips of neighbouring tokens per thread, each input column loaded
#: once per kernel row; kernels above ``STRIP_MAX_K`` take ``"tile"``).
WEIGHT_GRAD_KERNELS = ("tile", "fused", "rows", "taps", "strip")
#: Products per tile of the ``"rows"`` kernel (16 tokens at k = 3, the prototype's fastest without spills), and the
#: largest kernel size it takes (at k = 7 each thread would hold 49 taps' rows: 208 bytes spilled for sm_90; larger
#: kernels take ``"tile"``).
ROWS_ELEMENTS = 16384
ROWS_MAX_K = 5


TUNING: dict[str, int | str | None] = {
    "block_t": BLOCK_T,
    "block_c": BLOCK_C,
    "warps": WARPS,
    "stages": None,
    "conv": "strip",
    # the strip kernels' columns per strip, strips (and channels) per program (None: STRIP, WG_STRIP by kernel size)
    "strip_s": None,
    "strip_r": None,
    "strip_c": None,
    "wg_strip_s": None,
    "wg_strip_r": None,
    "wg_strip_c": None,
    "weight_grad": "strip",
    # the weight gradient's launch (None: the defaults): programs per SM, warps, products per tile of the tile kernel
    "wg_per_sm": None,
    "wg_warps": None,
    "wg_elements": None,
}


def _conv_kernel_name() -> str:
    """``TUNING["conv"]``, or a ``ValueError`` naming it and the choices."""
    kernel = TUNING["conv"]
    if kernel not in CONV_KERNELS:
        raise ValueError(f"visionlin.kernels.triton.conv.TUNING['conv'] = {kernel!r}: allowed {CONV_KERNELS}")
    return kernel


def _strip_i64(p: int, hh: int, ww: int, s: int, k: int, *tensors: torch.Tensor) -> bool:
    """Whether the strip kernels need int64 token offsets: a sample's rows (a strip and a kernel's reach past the end
    included) span ``I32_OFFSETS`` elements or more in one of ``tensors``."""
    return (p + hh * ww + s + k) * max(t.stride(1) for t in tensors) >= I32_OFFSETS


def _pow2(key: str, default: int) -> int:
    """``TUNING[key]`` (a power of two) when set, else ``default``."""
    return tuned(TUNING, __name__, key, default, pow2=True)


def _launch_conv(x, w32, k, per_sample, bias, residual, out, hh, ww, p, flip):
    b, _, c = x.shape
    bt, bc = TUNING["block_t"], TUNING["block_c"]
    res = residual if residual is not None else out
    stages = {} if TUNING["stages"] is None else {"num_stages": TUNING["stages"]}
    if _conv_kernel_name() == "strip" and k <= STRIP_MAX_K:
        ss, sr, bc = STRIP.get(k, STRIP[STRIP_MAX_K])
        ss, sr = _pow2("strip_s", ss), _pow2("strip_r", sr)
        bc, nxs = _pow2("strip_c", bc), cdiv(ww, ss)
        i64 = _strip_i64(p, hh, ww, ss, k, x, res, out)
        launch(_conv_strip_kernel, (cdiv(hh * nxs, sr), cdiv(c, bc), b),
            x, w32, bias if bias is not None else w32, res, out, hh, ww, c, p, nxs, *x.stride(),
            w32.stride(0) if per_sample else 0, *res.stride(), *out.stride(),
            K=k, FLIP=flip, HAS_BIAS=bias is not None, HAS_RES=residual is not None, S=ss, I64=i64,
            BLOCK_R=sr, BLOCK_C=bc, num_warps=TUNING["warps"], **stages,
        )  # fmt: skip
        return
    grid = (cdiv(hh * ww, bt), cdiv(c, bc), b)
    launch(_conv_kernel, grid,
        x, w32, bias if bias is not None else w32, res, out, hh, ww, c, p, *x.stride(),
        w32.stride(0) if per_sample else 0, *res.stride(), *out.stride(),
        K=k, FLIP=flip, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        BLOCK_T=bt, BLOCK_C=bc, num_warps=TUNING["warps"], **stages,
    )  # fmt: skip


def _weight_grad_kernel() -> str:
    """``TUNING["weight_grad"]``, or a ``ValueError`` naming it and the choices."""
    kernel = TUNING["weight_grad"]
    if kernel not in WEIGHT_GRAD_KERNELS:
        raise ValueError(
            f"visionlin.kernels.triton.conv.TUNING['weight_grad'] = {kernel!r}: allowed {WEIGHT_GRAD_KERNELS}"
        )
    return kernel


def _launch_weight_grad(g, x, dw, db, k, has_bias, hh, ww, p, sdw_b, w32=None, dx=None) -> bool:
    """The kernel and bias gradients' atomic sums into the zeroed ``dw`` / ``db`` (``TUNING["weight_grad"]``); with
    ``"fused"`` also the input gradient's grid rows into ``dx``, from the flat kernel ``w32``. Returns whether it wrote
    ``dx``."""
    kernel = _weight_grad_kernel()
    b, _, c = x.shape
    c_blocks = cdiv(c, BLOCK_C)
    per_sm, warps = _pow2("wg_per_sm", 4), _pow2("wg_warps", WARPS_WEIGHT_GRAD)
    if kernel == "taps":
        splits, per = _splits(hh * ww, BLOCK_T, b * c_blocks, x.device, per_sm)
        launch(_weight_grad_taps_kernel, (splits, c_blocks, b),
            g, x, dw, db, hh, ww, c, p, per, *g.stride(), *x.stride(), sdw_b,
            K=k, HAS_BIAS=has_bias, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, num_warps=warps,
        )  # fmt: skip
        return False
    if kernel == "strip" and k <= STRIP_MAX_K:
        ss, sr, bc = WG_STRIP.get(k, WG_STRIP[STRIP_MAX_K])
        ss, sr = _pow2("wg_strip_s", ss), _pow2("wg_strip_r", sr)
        bc = _pow2("wg_strip_c", bc)
        t1, t2, _ = weight_grad_tile(k)
        nxs = cdiv(ww, ss)
        splits, per = _splits(hh * nxs, sr, b * cdiv(c, bc), x.device, per_sm)  # strip tiles: programs per SM
        launch(_weight_grad_strip_kernel, (splits, cdiv(c, bc), b),
            g, x, dw, db, hh, ww, c, p, nxs, per, *g.stride(), *x.stride(), sdw_b,
            K=k, T1=t1, T2=t2, HAS_BIAS=has_bias, S=ss, I64=_strip_i64(p, hh, ww, ss, k, g, x), BLOCK_R=sr,
            BLOCK_C=bc, num_warps=warps,
        )  # fmt: skip
        return False
    fused = kernel == "fused"
    rows = kernel == "rows" and k <= ROWS_MAX_K  # (larger kernels take "tile", at its own tile size)
    elements = _pow2("wg_elements", ROWS_ELEMENTS if rows else WEIGHT_GRAD_ELEMENTS)
    if elements > MAX_WEIGHT_GRAD_ELEMENTS:
        raise ValueError(
            f"visionlin.kernels.triton.conv.TUNING['wg_elements'] = {elements}: at most {MAX_WEIGHT_GRAD_ELEMENTS}"
        )
    t1, t2, bt = weight_grad_tile(k, elements)
    splits, per = _splits(hh * ww, bt, b * c_blocks, x.device, per_sm)  # token chunks: programs per SM
    i64 = (p + hh * ww + bt) * max(x.stride(1), g.stride(1)) >= I32_OFFSETS  # a tile past the end included
    if rows:
        launch(_weight_grad_rows_kernel, (splits, c_blocks, b),
            g, x, dw, db, hh, ww, c, p, per, *g.stride(), *x.stride(), sdw_b,
            K=k, T1=t1, T2=t2, HAS_BIAS=has_bias, I64=i64, BLOCK_T=bt, BLOCK_C=BLOCK_C, num_warps=warps,
        )  # fmt: skip
        return False
    if fused:
        w_arg, dx_arg, sw_b, dx_strides = w32, dx, w32.stride(0) if sdw_b else 0, dx.stride()
    else:  # not read by the kernel (DX_OUT off)
        w_arg, dx_arg, sw_b, dx_strides = dw, dw, 0, (0, 0, 0)
    launch(_weight_grad_tile_kernel, (splits, c_blocks, b),
        g, x, w_arg, dx_arg, dw, db, hh, ww, c, p, per, *g.stride(), *x.stride(), sw_b, *dx_strides, sdw_b,
        K=k, T1=t1, T2=t2, HAS_BIAS=has_bias, DX_OUT=fused, I64=i64, BLOCK_T=bt, BLOCK_C=BLOCK_C,
        num_warps=warps,
    )  # fmt: skip
    return fused


def _flat_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[C, k, k]`` -> float32 ``[1, k*k, C]``; ``[B, C, k, k]`` -> ``[B, k*k, C]``. Tap-major: a program reads one tap
    for a block of channels at a time, contiguous this way (channel-major, the ``[C, k*k]`` of the module's weight,
    it was a gather over ``BLOCK_C`` cache lines per tap, more L1 traffic than the tokens themselves)."""
    w = weight if weight.ndim == 4 else weight.unsqueeze(0)
    taps = w.reshape(w.shape[0], w.shape[1], w.shape[-2] * w.shape[-1]).transpose(1, 2)  # (no -1: C may be 0)
    # one copy kernel (``.float().contiguous()`` of the transposed view of a half weight made two)
    return torch.empty(taps.shape, device=w.device, dtype=torch.float32).copy_(taps)


def _unflat_weight_grad(dw: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The ``[Bw, k*k, C]`` float32 gradient back in ``weight``'s shape and dtype, contiguous (as the op's fake
    says: a strided view of the transposed buffer failed the fake-tensor check under ``torch.compile``)."""
    c, k = weight.shape[-3], weight.shape[-1]
    out = torch.empty(weight.shape, device=dw.device, dtype=weight.dtype)
    out.view(dw.shape[0], c, k * k).copy_(dw.transpose(1, 2))  # one copy kernel, the cast included
    return out


@torch.library.custom_op("visionlin::token_dwconv_fwd", mutates_args=())
def token_dwconv_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    hh: int,
    ww: int,
    p: int,
) -> torch.Tensor:
    """The op's output ``[B, P + H*W, C]`` in ``x``'s dtype."""
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if p:
        if residual is None:
            out[:, :p].zero_()
        else:
            out[:, :p].copy_(residual[:, :p])
    if x.shape[0] and x.shape[2]:
        k, per_sample = weight.shape[-1], weight.ndim == 4
        _launch_conv(x, _flat_weight(weight), k, per_sample, bias, residual, out, hh, ww, p, flip=False)
    return out


@token_dwconv_fwd.register_fake
def _(x, weight, bias, residual, hh, ww, p):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("visionlin::token_dwconv_bwd", mutates_args=())
def token_dwconv_bwd(
    g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, hh: int, ww: int, p: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)``; ``dbias`` is empty without a bias."""
    b, _, c = x.shape
    g = _channels_contiguous(g)
    w32 = _flat_weight(weight)
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)  # the conv writes every grid row
    if p:
        dx[:, :p].zero_()  # prefix rows are not convolved
    # the weight and bias gradients are sums of atomic adds: one zeroed buffer for both
    sums = torch.zeros(w32.numel() + (c if has_bias else 0), device=x.device, dtype=torch.float32)
    dw, db = sums[: w32.numel()].view(w32.shape), sums[w32.numel() :]
    if b and c:
        k = weight.shape[-1]
        sdw_b = dw.stride(0) if weight.ndim == 4 else 0
        if not _launch_weight_grad(g, x, dw, db, k, has_bias, hh, ww, p, sdw_b, w32, dx):  # "fused" wrote dx
            _launch_conv(g, w32, k, weight.ndim == 4, None, None, dx, hh, ww, p, flip=True)
    return dx, _unflat_weight_grad(dw, weight), db


@token_dwconv_bwd.register_fake
def _(g, x, weight, has_bias, hh, ww, p):
    return (
        torch.empty_like(x),
        torch.empty_like(weight),
        x.new_empty(x.shape[2] if has_bias else 0, dtype=torch.float32),
    )


def _setup(ctx, inputs, output):
    x, weight, bias, residual, hh, ww, p = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (hh, ww, p)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.has_residual = residual is not None


def _backward(ctx, g):
    x, weight = ctx.saved_tensors
    dx, dw, db = _token_dwconv_bwd_call(g, x, weight, ctx.bias_dtype is not None, *ctx.args)
    db = None if ctx.bias_dtype is None else db.to(ctx.bias_dtype)
    return dx, dw, db, (g if ctx.has_residual else None), None, None, None


token_dwconv_fwd.register_autograd(_backward, setup_context=_setup)
_token_dwconv_bwd_call = eager_call(token_dwconv_bwd)
_token_dwconv_fwd_call = eager_op(token_dwconv_fwd, _setup, _backward)


def token_depthwise_conv2d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    feat_size: tuple[int, int],
    num_prefix_tokens: int = 0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``"triton"`` backend of :func:`visionlin.kernels.conv.token_depthwise_conv2d`."""
    hh, ww = (int(s) for s in feat_size)
    x, residual = _channels_contiguous(x), None if residual is None else _channels_contiguous(residual)
    return _token_dwconv_fwd_call(x, weight, bias, residual, hh, ww, int(num_prefix_tokens))


def _channels_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit channel stride (the kernels' vector loads and stores need it; the JIT specialises it)."""
    return t if t.stride(-1) == 1 else t.contiguous()
