"""2-D neighborhood attention (NAT / DiNAT) in Triton, forward and backward, with NAT's relative positional bias.

Math: :func:`visionlin.kernels.neighborhood.neighborhood_attention_reference`. Along each axis the query at group
position ``p`` (dilation group ``g = x % d``, ``p = x // d``, group length ``n``) attends to the group positions
``s(p) .. s(p) + k - 1`` with ``s(p) = clamp(p - k // 2, 0, n - k)`` (NATTEN's inward-shifted border windows); the
logit of a neighbour is ``scale * q . k + rpb[h, px' - px + K - 1, py' - py + K - 1]`` (``K`` the table's kernel size,
offsets in dilated units). The host passes the effective ``(k, d)`` per axis
(:func:`visionlin.kernels.neighborhood.effective_window`).

Tiling: a program owns a 2-D tile of ``TX x TY`` queries of one dilation group and one (batch, head). ``s`` is
monotone, so the tile's keys are the rectangle of group positions ``[s(first), s(last) + k)`` per axis (at most
``TX + k - 1`` by ``TY + k - 1``, computed from the tile's coordinates, no index tables). The program streams that
rectangle in blocks of ``KROWS`` rows by ``KCOLS`` columns (``KCOLS`` a power of two covering the rectangle's width)
with an online softmax in float32 (exp2, the scale folded in); the per-element test ``s(p) <= p' < s(p) + k`` keeps
each query to its own window. Rows of the rectangle outside the map are never read.

Backward (flash-attention 2 style, ``delta = rowsum(dout * out)`` by a small kernel, the log-sum-exp saved by the
forward): one key-tile kernel walks the queries whose windows can hold its keys (the inverse neighbourhood: a
contiguous range of group positions per axis, ``TX + k - 1`` wide inside the map, up to ``TX + 3 (k // 2)`` near a
border), recomputes the probabilities, keeps ``dk`` and ``dv`` in registers and adds each query block's ``dS K`` to a
float32 ``dq`` buffer with atomics (five tile products per query block; a query-tile ``dq`` kernel beside a key-tile
``dk`` / ``dv`` kernel recomputed ``S`` and ``dP`` and took 0.72-1.16 ms against 0.48-0.80 at NAT-T's stage-1 shape).
The bias gradient ``drpb`` (only when the table requires a gradient) is the sum of ``dS`` per (head, offset): the kernel
stores each probability gradient in a float32 ``[B, H, X, Y, k_x * k_y]`` buffer (one slice per batch element, no
atomics, while :data:`DS_BUFFER_BYTES` allows; fewer slices shared by atomics beyond), and a second kernel sums the
slices of each (query, slot) and adds the sums to the table by atomics, the table index computed from the query's
window. Float32 atomics make ``dq`` and ``drpb`` differ in the last bits from run to run: not bitwise deterministic.

Precision: products run on the tensor cores in the inputs' half dtype with float32 accumulation; float32 inputs in
IEEE float32. Head dims up to 128 (padded to a power of two >= 16). Inputs may be strided views (e.g. a head split of a
fused qkv projection). 1-D calls run as 2-D with one row.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import tuning_flag
from ._eager import eager_call, eager_op
from ._launch import cdiv, launch, next_pow2, tile_dim, tuned
from .linear import _num_sms

__all__ = ["MAX_KERNEL", "TUNING", "na2d_triton", "launch_meta", "tile_config"]

#: Largest effective kernel size per axis the tiles are laid out for (NAT / DiNAT use 3 to 13).
MAX_KERNEL = 13
_NEG = tl.constexpr(
    -1.0e30
)  # running maximum's start: finite, so rows whose keys are all masked give exp2(-inf) = 0, not NaN


@triton.jit
def _dot(a, b, HALF: tl.constexpr, acc=None):
    if HALF:
        return tl.dot(a, b, acc)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _logits(q, k, rpb_base, bias_off, scale, tab_last, BIAS_DOT: tl.constexpr, HALF: tl.constexpr):
    """Base-2 logits ``scale q . k log2(e)`` of a score tile; with ``BIAS_DOT`` plus the bias ``rpb log2(e)``, which
    enters the product's float32 accumulator as ``rpb / scale`` (read unmasked at ``rpb_base + bias_off``, the offsets
    clamped into the head's table ``[0, tab_last]``: pairs outside the window are masked by the caller). The tile then
    never leaves the product's layout: added after the product (masked by the window, as without ``BIAS_DOT``), the
    gathered bias tile drew the online softmax into the gather's layout too, so every row maximum and exponential was
    computed twice (two loop-carried copies). sm_90 SASS compiled as the runtime specialises NAT-T's stage 1 (unit
    strides, bf16, head dim 32): the forward's loop 547 -> 449 instructions per key block, 117 -> 80 registers, and
    the forward kernel 0.208 -> 0.140 ms on an H200; the backward's loop 540 -> 502 instructions, but the backward
    kernel 0.408 -> 0.426 ms, so the backward takes it only with ``TUNING["bwd_bias_dot"]``."""
    qk_scale = scale * 1.4426950408889634
    if BIAS_DOT:
        bias = tl.load(rpb_base + tl.minimum(tl.maximum(bias_off, 0), tab_last)).to(tl.float32) * (1.0 / scale)
        return _dot(q, tl.trans(k), HALF, bias) * qk_scale
    return _dot(q, tl.trans(k), HALF) * qk_scale


@triton.jit
def _start(p, n, k):
    """Window start ``clamp(p - k // 2, 0, n - k)`` of group position ``p`` on an axis of ``n`` group positions."""
    return tl.minimum(tl.maximum(p - k // 2, 0), n - k)


@triton.jit
def _tile(pid, LX, LY, DIL_X, DIL_Y, TBX, TBY, TX: tl.constexpr, TY: tl.constexpr, BLOCK: tl.constexpr):
    """Group, group lengths and the tile's group positions (flattened ``[BLOCK]``) of program ``pid``."""
    tiles = TBX * TBY
    grp = pid // tiles
    t = pid % tiles
    gx = grp // DIL_Y
    gy = grp % DIL_Y
    nx = (LX - gx + DIL_X - 1) // DIL_X
    ny = (LY - gy + DIL_Y - 1) // DIL_Y
    px0 = (t // TBY) * TX
    py0 = (t % TBY) * TY
    i = tl.arange(0, BLOCK)
    px = px0 + i // TY
    py = py0 + i % TY
    valid = (px < nx) & (py < ny) & (i < TX * TY)
    return gx, gy, nx, ny, px0, py0, px, py, valid


@triton.jit
def _key_rect(
    px0, py0, px, py, sy, qvalid, nx, ny, gy, KX, KY, DIL_Y, OFFX, OFFY, sr_x, sr_y,
    TX: tl.constexpr, KROWS: tl.constexpr, KCOLS: tl.constexpr, I64: tl.constexpr,
):  # fmt: skip
    """The key rectangle of a query tile (the forward's walk) in group positions: rows
    ``[row_lo, row_hi)``, columns ``col_lo + [0, KCOLS)`` (``ky_pos``, their map columns ``ky``); ``in_y`` the column
    half of each query's window with padded queries masked once here; the bias offset split into a query part
    (``q_bias``) and a key-column part (``ky_bias``); ``tab_last`` the head's last table entry (tables are ``2 OFF + 1``
    per axis)."""
    row_lo = _start(px0, nx, KX)
    row_hi = _start(tl.minimum(px0 + TX - 1, nx - 1), nx, KX) + KX
    col_lo = _start(py0, ny, KY)
    j = tl.arange(0, KROWS * KCOLS)
    ky_pos = col_lo + j % KCOLS
    ky = ky_pos * DIL_Y + gy
    if I64:
        ky = ky.to(tl.int64)
    in_y = (ky_pos[None, :] >= sy[:, None]) & (ky_pos[None, :] < sy[:, None] + KY) & qvalid[:, None]
    q_bias = (OFFX - px) * sr_x + (OFFY - py) * sr_y
    ky_bias = ky_pos * sr_y
    tab_last = 2 * OFFX * sr_x + 2 * OFFY * sr_y
    return row_lo, row_hi, j, ky_pos, ky, in_y, q_bias, ky_bias, tab_last


@triton.jit
def _key_rows(r0, j, row_hi, ky_pos, ny, gx, DIL_X, KCOLS: tl.constexpr, I64: tl.constexpr):
    """The key block from rectangle row ``r0``: group rows ``kx_pos``, their validity and map rows ``kx``."""
    kx_pos = r0 + j // KCOLS
    kvalid = (kx_pos < row_hi) & (ky_pos < ny)
    kx = kx_pos * DIL_X + gx
    if I64:
        kx = kx.to(tl.int64)
    return kx_pos, kvalid, kx


@triton.jit
def _window_scores(
    q, k, kx_pos, sx, in_y, q_bias, ky_bias, sr_x, rpb_base, scale, tab_last, KX,
    HAS_RPB: tl.constexpr, BIAS_DOT: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    """Base-2 logits of a query tile against a key block, NAT's bias included (:func:`_logits`), and which pairs
    lie in the query's window (``inwin``; the caller masks the rest)."""
    bias_off = q_bias[:, None] + (kx_pos * sr_x + ky_bias)[None, :]
    s = _logits(q, k, rpb_base, bias_off, scale, tab_last, BIAS_DOT, HALF)
    inwin = in_y & (kx_pos[None, :] >= sx[:, None]) & (kx_pos[None, :] < sx[:, None] + KX)
    if HAS_RPB and not BIAS_DOT:
        s += tl.load(rpb_base + bias_off, mask=inwin, other=0.0).to(tl.float32) * 1.4426950408889634
    return s, inwin


@triton.jit
def _fwd_kernel(
    Q, K, V, RPB, Out, LSE,
    LX, LY, H, D, DV, KX, KY, DIL_X, DIL_Y, TBX, TBY, OFFX, OFFY, scale,
    sq_b, sq_x, sq_y, sq_h, sq_d, sk_b, sk_x, sk_y, sk_h, sk_d, sv_b, sv_x, sv_y, sv_h, sv_d,
    so_b, so_x, so_y, so_h, so_d, sr_h, sr_x, sr_y,
    HAS_RPB: tl.constexpr, BIAS_DOT: tl.constexpr, HALF: tl.constexpr, TX: tl.constexpr, TY: tl.constexpr,
    BLOCK_Q: tl.constexpr, KROWS: tl.constexpr, KCOLS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    I64: tl.constexpr = True,
):  # fmt: skip
    """``out`` and the base-2 log-sum-exp of one tile of queries; key offsets within a (batch, head) in int32
    unless ``I64``."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    gx, gy, nx, ny, px0, py0, px, py, qvalid = _tile(tl.program_id(0), LX, LY, DIL_X, DIL_Y, TBX, TBY, TX, TY, BLOCK_Q)
    qx = (px * DIL_X + gx).to(tl.int64)
    qy = (py * DIL_Y + gy).to(tl.int64)
    sx = _start(px, nx, KX)
    sy = _start(py, ny, KY)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b * sq_b + h * sq_h + qx[:, None] * sq_x + qy[:, None] * sq_y + offs_d[None, :] * sq_d,
        mask=qvalid[:, None] & (offs_d < D)[None, :],
        other=0.0,
    )
    row_lo, row_hi, j, ky_pos, ky, in_y, q_bias, ky_bias, tab_last = _key_rect(
        px0, py0, px, py, sy, qvalid, nx, ny, gy, KX, KY, DIL_Y, OFFX, OFFY, sr_x, sr_y, TX, KROWS, KCOLS, I64
    )
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    rpb_base = RPB + h * sr_h
    m_i = tl.full([BLOCK_Q], _NEG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_DV], dtype=tl.float32)
    for r0 in range(row_lo, row_hi, KROWS):
        kx_pos, kvalid, kx = _key_rows(r0, j, row_hi, ky_pos, ny, gx, DIL_X, KCOLS, I64)
        k = tl.load(
            k_base + kx[:, None] * sk_x + ky[:, None] * sk_y + offs_d[None, :] * sk_d,
            mask=kvalid[:, None] & (offs_d < D)[None, :],
            other=0.0,
        )
        s, inwin = _window_scores(q, k, kx_pos, sx, in_y, q_bias, ky_bias, sr_x, rpb_base, scale, tab_last, KX,
                                  HAS_RPB, BIAS_DOT, HALF)  # fmt: skip
        s = tl.where(inwin, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + kx[:, None] * sv_x + ky[:, None] * sv_y + offs_e[None, :] * sv_d,
            mask=kvalid[:, None] & (offs_e < DV)[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, HALF)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        Out + b * so_b + h * so_h + qx[:, None] * so_x + qy[:, None] * so_y + offs_e[None, :] * so_d,
        out.to(Out.dtype.element_ty),
        mask=qvalid[:, None] & (offs_e < DV)[None, :],
    )
    tl.store(LSE + bh.to(tl.int64) * LX * LY + qx * LY + qy, m_i + tl.log2(l_safe), mask=qvalid)


@triton.jit
def _delta_kernel(
    G, Out, DELTA, NROWS, LX, LY, H, DV,
    sg_b, sg_x, sg_y, sg_h, sg_d, so_b, so_x, so_y, so_h, so_d,
    BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """``delta = rowsum(dO * O)`` in float32 for ``BLOCK_R`` positions of head ``program_id(1)``, stored in the
    log-sum-exp's ``[B, H, X, Y]`` layout: one read of ``dO`` and ``O`` (torch took a cast, a product, a sum and a
    permuted copy, about 10% of the whole forward + backward at NAT-T's stage-1 shape)."""
    h = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < NROWS
    b = rows // (LX * LY)
    x = (rows // LY) % LX
    y = rows % LY
    e = tl.arange(0, BLOCK_DV)
    m = rmask[:, None] & (e < DV)[None, :]
    g = tl.load(G + (b * sg_b + x * sg_x + y * sg_y + h * sg_h)[:, None] + e[None, :] * sg_d, mask=m, other=0.0)
    o = tl.load(Out + (b * so_b + x * so_x + y * so_y + h * so_h)[:, None] + e[None, :] * so_d, mask=m, other=0.0)
    d = tl.sum(g.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(DELTA + ((b * H + h) * LX + x) * LY + y, d, mask=rmask)


def _delta(g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``rowsum(g * out)`` float32 ``[B, H, X, Y]`` for ``g``, ``out`` ``[B, X, Y, H, Dv]`` (any strides)."""
    b, x, y, h, dvd = out.shape
    delta = torch.empty(b, h, x, y, device=out.device, dtype=torch.float32)
    block_dv = _blocks(dvd)
    block_r = max(8, 2048 // block_dv)  # 8 elements of dO and O per thread: 92 registers at sm_90, no spills
    grid = (cdiv(b * x * y, block_r), h)
    launch(_delta_kernel, grid, g, out, delta, b * x * y, x, y, h, dvd, *g.stride(), *out.stride(),
                        BLOCK_R=block_r, BLOCK_DV=block_dv, num_warps=8)  # fmt: skip
    return delta


@triton.jit
def _inverse_range(a, b, n, k):
    """Group positions ``[lo, hi]`` of the queries whose windows can hold a key in ``[a, b]`` (axis of ``n``)."""
    lo = tl.where(a < k, 0, a - k // 2)
    hi = tl.where(b >= n - k, n - 1, b + k // 2)
    return lo, hi


@triton.jit
def _bwd_kernel(
    Q, K, V, RPB, G, LSE, DELTA, DQACC, DK, DVv, DSBUF, Out,
    LX, LY, H, D, DV, KX, KY, DIL_X, DIL_Y, TBX, TBY, OFFX, OFFY, scale, NSLICE,
    sq_b, sq_x, sq_y, sq_h, sq_d, sk_b, sk_x, sk_y, sk_h, sk_d, sv_b, sv_x, sv_y, sv_h, sv_d,
    sg_b, sg_x, sg_y, sg_h, sg_d, sr_h, sr_x, sr_y, so_b, so_x, so_y, so_h, so_d,
    sdq_b, sdq_x, sdq_y, sdq_h, sdk_b, sdk_x, sdk_y, sdk_h, sdv_b, sdv_x, sdv_y, sdv_h,
    HAS_RPB: tl.constexpr, BIAS_DOT: tl.constexpr, NEED_DRPB: tl.constexpr, DS_STORE: tl.constexpr,
    HALF: tl.constexpr, TX: tl.constexpr, TY: tl.constexpr, BLOCK_K: tl.constexpr, QROWS: tl.constexpr,
    QCOLS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DQ_DIRECT: tl.constexpr = False,
    DELTA_FUSED: tl.constexpr = False, I64: tl.constexpr = True,
):  # fmt: skip
    """The whole backward of one tile of keys: walks the queries of its inverse neighbourhood, accumulates ``dk`` and
    ``dv`` in registers (stored through their own strides, the last one 1: slices of one packed gradient too), adds
    each query block's ``dS K`` to the float32 ``dq`` buffer (``sdq_*``) with
    atomics (a query's window spans a few key tiles, four at kernel 7, up to eight from 11: little contention; with
    ``DQ_DIRECT``, a tile that holds its whole dilation group, stores it in the inputs' dtype instead), and,
    with ``NEED_DRPB``, writes ``dS`` per (query, window slot) into the bias-gradient buffer
    ``[NSLICE, H, X, Y, KX * KY]`` at slice ``b % NSLICE``: a plain store when there is a slice per batch element
    (``DS_STORE``: each (query, slot) pair belongs to exactly one key tile and one query block), atomics otherwise.
    With ``DELTA_FUSED`` each query block's ``rowsum(dO * O)`` is computed here from ``Out`` (read once per key tile
    whose inverse neighbourhood holds the query, about four at kernel 7) instead of read from ``DELTA``."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    gx, gy, nx, ny, px0, py0, kpx, kpy, kvalid = _tile(
        tl.program_id(0), LX, LY, DIL_X, DIL_Y, TBX, TBY, TX, TY, BLOCK_K
    )
    kx = (kpx * DIL_X + gx).to(tl.int64)
    ky = (kpy * DIL_Y + gy).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    k = tl.load(
        K + b * sk_b + h * sk_h + kx[:, None] * sk_x + ky[:, None] * sk_y + offs_d[None, :] * sk_d,
        mask=kvalid[:, None] & (offs_d < D)[None, :],
        other=0.0,
    )
    v = tl.load(
        V + b * sv_b + h * sv_h + kx[:, None] * sv_x + ky[:, None] * sv_y + offs_e[None, :] * sv_d,
        mask=kvalid[:, None] & (offs_e < DV)[None, :],
        other=0.0,
    )
    x_lo, x_hi = _inverse_range(px0, tl.minimum(px0 + TX - 1, nx - 1), nx, KX)
    y_lo, y_hi = _inverse_range(py0, tl.minimum(py0 + TY - 1, ny - 1), ny, KY)
    i = tl.arange(0, QROWS * QCOLS)
    tab_last = 2 * OFFX * sr_x + 2 * OFFY * sr_y
    q_base = Q + b * sq_b + h * sq_h
    g_base = G + b * sg_b + h * sg_h
    o_base = Out + b * so_b + h * so_h
    lse_base = LSE + bh.to(tl.int64) * LX * LY
    delta_base = DELTA + bh.to(tl.int64) * LX * LY
    dq_base = DQACC + b * sdq_b + h * sdq_h
    rpb_base = RPB + h * sr_h
    ds_base = DSBUF + ((b % NSLICE) * H + h) * LX * LY * (KX * KY)
    k_bias = kpx * sr_x + kpy * sr_y
    dk = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_K, BLOCK_DV], dtype=tl.float32)
    for r0 in range(x_lo, x_hi + 1, QROWS):
        for c0 in range(y_lo, y_hi + 1, QCOLS):
            px = r0 + i // QCOLS
            py = c0 + i % QCOLS
            qvalid = (px <= x_hi) & (py <= y_hi)
            qx = px * DIL_X + gx
            qy = py * DIL_Y + gy
            if I64:
                qx, qy = qx.to(tl.int64), qy.to(tl.int64)
            sx = _start(px, nx, KX)
            sy = _start(py, ny, KY)
            q = tl.load(
                q_base + qx[:, None] * sq_x + qy[:, None] * sq_y + offs_d[None, :] * sq_d,
                mask=qvalid[:, None] & (offs_d < D)[None, :],
                other=0.0,
            )
            do = tl.load(
                g_base + qx[:, None] * sg_x + qy[:, None] * sg_y + offs_e[None, :] * sg_d,
                mask=qvalid[:, None] & (offs_e < DV)[None, :],
                other=0.0,
            )
            row = qx * LY + qy
            lse = tl.load(lse_base + row, mask=qvalid, other=0.0)
            if DELTA_FUSED:
                o = tl.load(
                    o_base + qx[:, None] * so_x + qy[:, None] * so_y + offs_e[None, :] * so_d,
                    mask=qvalid[:, None] & (offs_e < DV)[None, :],
                    other=0.0,
                )
                delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
            else:
                delta = tl.load(delta_base + row, mask=qvalid, other=0.0)
            bias_off = ((OFFX - px) * sr_x + (OFFY - py) * sr_y)[:, None] + k_bias[None, :]
            s = _logits(q, k, rpb_base, bias_off, scale, tab_last, BIAS_DOT, HALF)  # [queries, keys]
            inwin = (
                (kpx[None, :] >= sx[:, None]) & (kpx[None, :] < sx[:, None] + KX)
                & (kpy[None, :] >= sy[:, None]) & (kpy[None, :] < sy[:, None] + KY)
                & qvalid[:, None] & kvalid[None, :]
            )  # fmt: skip
            if HAS_RPB and not BIAS_DOT:
                s += tl.load(rpb_base + bias_off, mask=inwin, other=0.0).to(tl.float32) * 1.4426950408889634
            p = tl.where(inwin, tl.exp2(s - lse[:, None]), 0.0)
            dv += _dot(tl.trans(p.to(do.dtype)), do, HALF)
            dp = _dot(do, tl.trans(v), HALF)
            ds = p * (dp - delta[:, None])
            dsh = ds.to(q.dtype)
            dk += _dot(tl.trans(dsh), q, HALF)
            dq = _dot(dsh, k, HALF) * scale
            dq_ptr = dq_base + (qx * sdq_x + qy * sdq_y)[:, None] + offs_d[None, :]
            if DQ_DIRECT:  # the tile holds the query's whole group: its dq is complete here
                tl.store(dq_ptr, dq.to(DQACC.dtype.element_ty), mask=qvalid[:, None] & (offs_d < D)[None, :])
            else:
                tl.atomic_add(dq_ptr, dq, mask=qvalid[:, None] & (offs_d < D)[None, :], sem="relaxed")
            if NEED_DRPB:
                slot = (kpx[None, :] - sx[:, None]) * KY + (kpy[None, :] - sy[:, None])
                ds_ptr = ds_base + row[:, None] * (KX * KY) + slot
                if DS_STORE:
                    tl.store(ds_ptr, ds, mask=inwin)
                else:
                    tl.atomic_add(ds_ptr, ds, mask=inwin, sem="relaxed")
    dk_ptr = DK + b * sdk_b + h * sdk_h + kx[:, None] * sdk_x + ky[:, None] * sdk_y + offs_d[None, :]
    tl.store(dk_ptr, (dk * scale).to(DK.dtype.element_ty), mask=kvalid[:, None] & (offs_d < D)[None, :])
    dv_ptr = DVv + b * sdv_b + h * sdv_h + kx[:, None] * sdv_x + ky[:, None] * sdv_y + offs_e[None, :]
    tl.store(dv_ptr, dv.to(DVv.dtype.element_ty), mask=kvalid[:, None] & (offs_e < DV)[None, :])


@triton.jit
def _table_start(i, n, k, d, ks):
    """Bias-table index of window slot 0 of position ``i`` along an axis of length ``n`` (window ``k``, dilation ``d``,
    the table's kernel size ``ks``): ``start - pos + ks - 1``, slot ``a`` adding ``a`` (``neighborhood_indices``)."""
    pos, g = i // d, i % d
    return _start(pos, (n - g + d - 1) // d, k) - pos + ks - 1


@triton.jit
def _bias_grad_kernel(
    DSBUF, DRPB, LX, LY, KX, KY, DIL_X, DIL_Y, KSX, KSY, per, n_slices, sd_s, sd_h,
    BLOCK_Q: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """``DRPB[h, table index of (query, slot)] += sum over slices s of DSBUF[s, h, query, slot]`` for a block of queries
    and ``per`` slices from ``program_id(2) * per``: the backward's per-(query, window slot) bias gradient summed in
    registers over its slices, then added to the ``[H, 2 KSX - 1, 2 KSY - 1]`` float32 table by atomics, the table
    index computed from the query's window start (no index tensor)."""
    pid, h, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    slot = tl.arange(0, BLOCK_W)
    kk = KX * KY
    mask = (q < LX * LY)[:, None] & (slot < kk)[None, :]
    first = chunk * per
    ptr = DSBUF + h.to(tl.int64) * sd_h + first.to(tl.int64) * sd_s + (q.to(tl.int64) * kk)[:, None] + slot[None, :]
    acc = tl.zeros([BLOCK_Q, BLOCK_W], dtype=tl.float32)
    for _ in range(tl.minimum(per, n_slices - first)):
        acc += tl.load(ptr, mask=mask, other=0.0)
        ptr += sd_s
    sx, sy = _table_start(q // LY, LX, KX, DIL_X, KSX), _table_start(q % LY, LY, KY, DIL_Y, KSY)
    a, b = slot // KY, slot % KY
    tab_y = 2 * KSY - 1
    base = DRPB + h * (2 * KSX - 1) * tab_y
    # Queries whose window is not shifted at a border share one table row per slot: summed here first, added once
    # (one atomic per (query, slot) put every add of a head on its 169 table entries: 0.31 ms at NAT-T's stage 1).
    cx, cy = KSX - 1 - KX // 2, KSY - 1 - KY // 2
    inner = (sx == cx) & (sy == cy)
    inner_sum = tl.sum(tl.where(inner[:, None], acc, 0.0), axis=0)
    tl.atomic_add(base + (cx + a) * tab_y + cy + b, inner_sum, mask=slot < kk, sem="relaxed")
    idx = (sx[:, None] + a[None, :]) * tab_y + sy[:, None] + b[None, :]
    tl.atomic_add(base + idx, acc, mask=mask & ~inner[:, None], sem="relaxed")


# Host side ------------------------------------------------------------------------------------------------------------
#: Tile settings, ``None`` for the defaults (the benchmark script sweeps them): ``tile_y`` query-tile width,
#: ``block_k`` keys per block, ``warps`` per program, ``stages`` software pipelining, ``maxnreg`` a register cap per
#: thread (0: none), all of the forward; ``bwd_block`` queries per block of the backward, ``bwd_warps``, ``bwd_stages``,
#: ``bwd_maxnreg`` (0: none) its launch settings; ``bwd_bias_dot`` puts the bias in the backward's score products
#: as the forward does (:func:`_logits`; off by default: on, the backward took 4% longer at NAT-T's stage 1 on an
#: H200, ``benchmarks/neighborhood_op.py --bias-dot-ab``); ``tile_q`` queries per tile of 2-D maps (16, 32 or 64;
#: the backward's keys per tile too) and ``narrow_cols`` key blocks narrower than 16 columns (:func:`tile_config`),
#: which ``neighborhood_op.py --tile-sweep`` times at NAT's and DiNAT's small maps and dilation groups. By default
#: (``None``) both come from :data:`MEASURED_TILES` inside its measured range, the forward's and the backward's apart,
#: else 64 queries and key blocks of at least 16 columns; a set ``tile_q`` or ``tile_y`` replaces the table in both
#: passes (the other at its general default: 64 queries, rows of 8) and its warps. Tiles, blocks and warps are powers
#: of two, the others non-negative ints, each within :data:`_BOUNDS` (``narrow_cols`` None or a bool, ``bwd_bias_dot``
#: a bool): anything else raises ``ValueError`` naming the key and the value (:func:`_check_tuning`). ``stages`` 0
#: means its default, as ``None`` does; ``maxnreg`` 0 no cap. ``bwd_tile_q`` (16-256, opt-in) sets the backward's key
#: tile alone, in whole group rows where they fit (:func:`_tile_plan`); larger than the table's it was slower at every
#: NAT-T / DiNAT-T shape (1.4-3.9x the time, ``neighborhood_op.py --bwd-block-sweep --bwd-tiles-only``, s47).
#: ``bwd_dq_direct`` (on): with half-precision inputs, a key tile that holds a whole dilation group (the shipped 8 x 8
#: tiles at 7 x 7 groups) stores ``dq`` directly in the inputs' dtype: no float32 buffer, zero fill, atomics or cast
#: (the same sweep: NAT-T's stage 4 1.09x, DiNAT-T's 14 x 14 map at dilation 2 1.17x, its 56 x 56 at dilation 8
#: 1.13x; elsewhere no change).
#: ``bwd_delta_fused``: the backward computes each query block's ``rowsum(dO * O)`` itself instead of a separate pass
#: (:func:`_delta`; 0.48 ms over NAT-T's 30 calls a compiled step at s44). ``None`` (default): with a bias table where
#: dq is stored directly (one key tile a group: each query's ``O`` read once, as the pass reads it; NAT-T's stage 4
#: 1.08x, DiNAT-T's 14 x 14 map at dilation 2 1.07x); elsewhere each query's ``O`` is read by every key tile whose
#: inverse neighbourhood holds it, and fusing was 1.01-1.03x slower (``s47/neighborhood_op_bwd_block_4a5fa5b.json``).
#: ``bwd_int32_offsets``: the backward's loop addresses its queries with int32 offsets where they fit
#: (:func:`_bwd_i64`): 8-21% fewer sm_90 instructions a query block at NAT-T's four shapes, but more registers (228
#: against 168 at 56 x 56) or spills (180 against 88 bytes at 7 x 7). ``None`` (default, since s51): int32 except where
#: dq is stored directly (``bwd_dq_direct``: half-precision inputs, one key tile a dilation group, e.g. the 7 x 7
#: groups, where the spills made it 1.05x slower), on an H100 0.990 against 1.006 ms at NAT-T's 56 x 56 shape,
#: 0.543 / 0.553 at 28 x 28, 0.287 / 0.297 at 14 x 14, 0.088 / 0.084 at 7 x 7 (``neighborhood_op.py
#: --bwd-block-sweep``, ``benchmarks/results/h100/s51/neighborhood_op_bwd_block_229372b.json``); ``True`` / ``False``
#: everywhere / nowhere.
#: ``fwd_int32_offsets`` (on since s51): the same for the forward's key offsets (:func:`_fwd_i64`): 4-7% fewer
#: instructions a key block, registers 148 against 168 at 7 x 7 and 254 against 244 at 14 x 14 / 28 x 28, no spills;
#: faster at each of NAT-T's shapes in that sweep (1.04x, 1.03x, 1.03x, 1.12x from 56 x 56 to 7 x 7).
#: (Tried and removed: ``dq`` by a pass of its own over the forward's query tiles, recomputing ``P`` and ``dP``, with
#: no float32 ``dq`` buffer, atomics or cast: the backward 0.70-0.97x the shipped one at NAT-T's four shapes, NAT-T's
#: CUDA-graph step 0.985x; H100, ``benchmarks/results/h100/s52/``.)
TUNING: dict[str, int | bool | None] = {
    "tile_y": None, "block_k": None, "warps": None, "stages": None, "maxnreg": None,
    "bwd_block": None, "bwd_warps": None, "bwd_stages": None, "bwd_maxnreg": None, "bwd_bias_dot": False,
    "tile_q": None, "narrow_cols": None, "bwd_tile_q": None, "bwd_dq_direct": True, "bwd_delta_fused": None,
    "bwd_int32_offsets": None, "fwd_int32_offsets": True,
}  # fmt: skip

#: The 2-D tiles where they were measured (``neighborhood_op.py --tile-sweep``: NAT-T's and DiNAT-T's seven attention
#: shapes at 224 px, bf16, batch 128, kernel 7, head dim 32, NAT's bias table; CUDA-graph replays on an H200,
#: ``benchmarks/results/h200/s44/neighborhood_op_tiles_665049b.json``), used for half-precision inputs with a bias
#: table, a 7 x 7 window and head dim 32 (float32 tiles, other windows and head dims keep the general rule: at float32
#: the narrow key blocks spill for sm_90), by the longest dilation group's row length ``ny``: the largest ``ny`` of
#: each row, ``(queries, width, warps, maxnreg)`` of the forward's query tile, then of the backward's key tile
#: (``None``: the general rule's warps / register cap; ``maxnreg`` 0: no cap). Group rows of at most 8: 8 x 8 tiles
#: over a 7 x 7 group (NAT-T's stage 4, every DiNAT-T dilation group), the backward at 2 warps uncapped (0.096 against
#: 0.101 ms at NAT-T's stage 4, 0.702 against 0.714 at DiNAT-T's stage 1; ``--bwd-block-sweep``,
#: ``s46/neighborhood_op_bwd_block_153f216.json``). 14: the forward in 16 x 2 tiles of 2 warps (0.065 against 0.087 ms
#: for 8 x 8), the backward in 4 x 16 (the whole row; 0.278 against 0.326). 28: 16 x 2 forward (0.138 against 0.172),
#: 4 x 4 backward of 2 warps (0.534 against 0.604). Longer: 8 x 8 forward, 8 x 2 backward of 2 warps, uncapped since
#: s46 (0.888 against 0.924 capped at 56; 1.007 for 8 x 8). Key blocks as narrow as the key rectangle wherever the
#: table applies (``narrow_cols``: 1.5-1.6x the forward, 1.2-1.3x the backward at 7 x 7 groups, no loss at the other
#: shapes). Query blocks of the backward beyond 16 were slower at every shape (32: 1.0-1.2x the time, 64-256: up to
#: 30x, spilled).
MEASURED_TILES = (
    (8, (64, 8, None, None), (64, 8, 2, 0)),
    (16, (32, 2, 2, None), (64, 16, None, None)),
    (32, (32, 2, 2, None), (16, 4, 2, None)),
    (None, (64, 8, None, None), (16, 2, 2, 0)),
)

#: Bias-gradient buffer (bytes) of the fused backward: one ``[H, X, Y, kx * ky]`` float32 slice per batch element while
#: they fit in this many bytes (plain stores), fewer slices shared by atomics beyond; one slice is always made, larger
#: than this if it must be.
DS_BUFFER_BYTES = 256 << 20

#: Allowed ranges of the integer settings (also powers of two where :func:`_check_tuning` says so).
_BOUNDS = {
    "tile_q": (16, 64), "tile_y": (1, 64), "block_k": (1, 256), "warps": (1, 32), "stages": (0, 8),
    "maxnreg": (0, 255), "bwd_block": (16, 256), "bwd_warps": (1, 32), "bwd_stages": (0, 8), "bwd_maxnreg": (0, 255),
    "bwd_tile_q": (16, 256),
}  # fmt: skip
_POW2 = ("tile_q", "tile_y", "block_k", "warps", "bwd_block", "bwd_warps", "bwd_tile_q")
_checked: tuple | None = None


def _check_tuning() -> None:
    """Every ``TUNING`` value at once, before any kernel runs (once per distinct table: a tuple comparison after
    that): a ``ValueError`` naming the key, the value and what is allowed. A non-power-of-two tile or block, or a value
    past these bounds, would fail deep inside Triton or launch nothing useful."""
    global _checked
    state = (*TUNING, *TUNING.values(), *map(type, TUNING.values()))  # (True == 1, 2 == 2.0: types too)
    if state == _checked:
        return
    for key, (lo, hi) in _BOUNDS.items():
        value = tuned(TUNING, __name__, key, lo, pow2=key in _POW2)
        if not lo <= value <= hi:
            allowed = "16, 32 or 64" if key == "tile_q" else f"{lo} to {hi}"
            raise ValueError(f"TUNING[{key!r}] = {value}: allowed {allowed}")
    queries = TUNING["tile_q"] or 64
    if (TUNING["tile_y"] or 0) > queries:
        raise ValueError(f"TUNING['tile_y'] = {TUNING['tile_y']}: at most {queries} (the query tile holds {queries})")
    tuning_flag(TUNING, __name__, "narrow_cols", allow_none=True)
    tuning_flag(TUNING, __name__, "bwd_bias_dot")
    tuning_flag(TUNING, __name__, "bwd_dq_direct")
    tuning_flag(TUNING, __name__, "bwd_delta_fused", allow_none=True)
    tuning_flag(TUNING, __name__, "bwd_int32_offsets", allow_none=True)
    tuning_flag(TUNING, __name__, "fwd_int32_offsets")
    _checked = state


def _checking(fn):
    """``fn`` checking ``TUNING`` first (:func:`_check_tuning`) when called on its own; the ops check once per call
    and then call ``fn.unchecked`` (each check compares a snapshot of the table: a few microseconds, four helpers per
    forward + backward, 30 calls per NAT-T step)."""

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        _check_tuning()
        return fn(*args, **kwargs)

    checked.unchecked = fn
    return checked


def _measured_tile(
    ny: int, kx: int, ky: int, has_rpb: bool, d: int, half: bool, backward: bool
) -> tuple[int, int, int | None, int | None] | None:
    """``(queries, width, warps, maxnreg)`` from :data:`MEASURED_TILES` for a 2-D call inside its measured range
    (half-precision inputs, a bias table, a 7 x 7 window, padded head dim 32) unless ``TUNING["tile_q"]`` or
    ``["tile_y"]`` is set, else ``None``."""
    if TUNING["tile_q"] or TUNING["tile_y"] or not (half and has_rpb and kx == ky == 7 and d == 32):
        return None
    row = next((r for r in MEASURED_TILES if r[0] is None or ny <= r[0]), None)
    return None if row is None else row[2] if backward else row[1]


def _tile_plan(
    nx: int, ny: int, kx: int, ky: int, has_rpb: bool, d: int, backward: bool, half: bool
) -> tuple[int, int, int, int, int | None, int | None]:
    """:func:`tile_config`'s tile and key block, and the tile's warps and register cap from :data:`MEASURED_TILES`
    (``None``: the general rule's, :func:`_warps`, :func:`launch_meta`, :func:`_bwd_meta`; a set ``TUNING["tile_q"]``
    or ``["tile_y"]`` drops the table, its warps and cap with it): one look-up of the table per pass. The backward's
    own ``TUNING["bwd_tile_q"]`` drops the table too: that many keys in rows as long as the group row's power of two,
    key blocks as narrow as the key rectangle unless ``narrow_cols`` is ``False``."""
    own = TUNING["bwd_tile_q"] if backward and nx > 1 else None
    rule = _measured_tile(ny, kx, ky, has_rpb, d, half, backward) if nx > 1 and not own else None
    if nx == 1:
        tx, ty = 1, 16 if has_rpb else 32
    else:
        queries, row = rule[:2] if rule else (64, 16 if ky >= 11 else 8)
        queries = own or TUNING["tile_q"] or queries
        ty = min(queries if own else TUNING["tile_y"] or row, queries, max(2, next_pow2(ny)))
        tx = queries // ty
    width = min(ty + ky - 1, ny)
    narrow = (rule is not None or bool(own)) if TUNING["narrow_cols"] is None else TUNING["narrow_cols"]
    kcols = next_pow2(width) if nx > 1 and narrow else tile_dim(width)
    krows = max(1, max(16, TUNING["block_k"] or 32) // kcols)
    return tx, ty, krows, kcols, *(rule[2:] if rule else (None, None))


@_checking
def tile_config(
    nx: int, ny: int, kx: int, ky: int, has_rpb: bool, d: int = 32, backward: bool = False, half: bool = True
) -> tuple[int, int, int, int]:
    """Query tile ``TX x TY`` of the forward (the backward's key tile when ``backward``) and key block ``KROWS x
    KCOLS`` for group lengths ``nx, ny`` (the longest dilation group per axis), effective kernel sizes ``kx, ky``,
    padded head dim ``d`` and half-precision (``half``) or float32 inputs.

    One-row maps (1-D calls): ``1 x 32`` (``1 x 16`` with a bias table, whose gathered offsets cost registers). 2-D:
    :data:`MEASURED_TILES` inside its measured range, else ``TUNING["tile_q"]`` queries (64) in rows of
    ``TUNING["tile_y"]`` (8; 16 for kernels from 11, where ``8 + k - 1`` would round up to 32 columns anyway), ``TY``
    at most the group row's power of two; ``KCOLS`` is the power of two covering the key rectangle's width
    ``TY + ky - 1`` (or the row), at least 16 unless narrow (``TUNING["narrow_cols"]``, by default inside the table's
    range: a 7 x 7 group's key rows in blocks of 8 columns, not 16 of which half masked); a key block holds about 32
    keys (at NAT-T's stage-1 shape with a bias table, 4 warps: 0.21-0.23 ms against 0.21-0.33 with 16 keys,
    ``neighborhood_op.json``'s sweep), at least 16 (the score product's smallest width).
    """
    return _tile_plan(nx, ny, kx, ky, has_rpb, d, backward, half)[:4]


@_checking
def launch_meta(
    block_q: int, block_k: int, d: int = 32, has_rpb: bool = True, warps: int | None = None, cap: int | None = None
) -> dict[str, int]:
    """``num_warps``, ``num_stages`` and register cap of the forward for a ``block_q x block_k`` score tile at (padded)
    head dim ``d``: ``warps`` (the tile's, :func:`_tile_plan`) if given, else 4 up to head dim 64, 8 beyond; 2 stages
    (1 for tiles of at most 512 scores, 1-D with a bias table); the tile's register cap ``cap`` if given (0: none),
    else with a bias table at head dim 64 :data:`MAXNREG` registers a thread; ``TUNING`` wins over both. Measured at
    NAT-T's stage-1 shape (``neighborhood_op*.json``'s sweeps): 4 warps 0.21-0.23 ms against 0.35-0.52 with 8 (which
    took about 150 registers a thread, one program per SM); at head dim 64 with the bias table, 4 warps capped 0.20 ms
    against 0.29 uncapped and 0.80 with 8 warps; at head dim 32 without a bias table the cap cost time (0.17 against
    0.11 ms)."""
    stages = 1 if block_q * block_k <= 512 else 2  # (a set 0 also means this default)
    meta = {"num_warps": TUNING["warps"] or warps or _warps(d), "num_stages": TUNING["stages"] or stages}
    return meta | _cap("maxnreg", cap, MAXNREG if has_rpb and 32 < d <= 64 else 0)  # the default measured at 64 only


def _blocks(d: int) -> int:
    return tile_dim(d)


def _warps(d: int) -> int:
    """4 warps per program up to head dim 64 (a 64-query tile), 8 beyond (the accumulators of 128 dims)."""
    return 4 if d <= 64 else 8


#: Register cap of the forward at head dim 64 with a bias table and of the half-precision backward up to head dim 32
#: (:func:`launch_meta`, :func:`_bwd_meta`): 128 a thread is four 4-warp programs per SM against two uncapped, though
#: ptxas spills a little.
MAXNREG = 128


@_checking
def _bwd_block(kcols: int, has_rpb: bool, d: int) -> tuple[int, int]:
    """Query block ``QROWS x QCOLS`` of the backward: ``bwd_block`` queries (default 16 at head dims up to 32 with a
    bias table, 32 otherwise), in rows of at most ``kcols`` columns (the kernel steps through the columns of the
    inverse neighbourhood, so a row may be split: kernel 13 with a bias table, 32 columns, spilled)."""
    block = TUNING["bwd_block"] or (16 if has_rpb and d <= 32 else 32)
    qcols = min(kcols, block)
    return max(1, block // qcols), qcols


@_checking
def _bwd_meta(d: int, half: bool = True, warps: int | None = None, cap: int | None = None) -> dict[str, int]:
    """Launch settings of the backward: ``warps`` (the key tile's, :func:`_tile_plan`) if given, else 4 up to head dim
    64, 8 beyond; no software pipelining; the key tile's register cap ``cap`` if given (0: none), else
    :data:`MAXNREG` registers up to head dim 32 for half-precision inputs (float32 tiles spilled 170-810 bytes under
    the cap at sm_90, at most 20 without); ``TUNING`` wins over both. Measured at NAT-T's stage-1 shape
    (``neighborhood_op*.json``'s sweeps): with a bias table 0.57 ms capped against 0.75 uncapped (16-query blocks),
    without one 0.48 against 0.53 (32-query blocks); at head dim 64 (bias table) 32-query blocks uncapped 0.80 against
    0.92-1.28 for the others."""
    meta = {"num_warps": TUNING["bwd_warps"] or warps or _warps(d), "num_stages": TUNING["bwd_stages"] or 1}
    return meta | _cap("bwd_maxnreg", cap, MAXNREG if d <= 32 and half else 0)


def _cap(key: str, tile: int | None, default: int) -> dict[str, int]:
    """``{"maxnreg": cap}`` (empty for no cap, 0) of a pass: ``TUNING[key]`` if set, else the tile's ``tile`` (from
    :data:`MEASURED_TILES`) if given, else ``default``."""
    cap = TUNING[key] if TUNING[key] is not None else default if tile is None else tile
    return {"maxnreg": cap} if cap else {}


def _launch_args(q, kx, ky, dx, dy, tx, ty):
    b, x, y, h, _ = q.shape
    nx_max, ny_max = -(-x // dx), -(-y // dy)
    tbx, tby = -(-nx_max // tx), -(-ny_max // ty)
    grid = (dx * dy * tbx * tby, b * h)
    return grid, tbx, tby


#: ``|scale|`` range in which the bias enters the products' accumulator as ``rpb / scale`` (:func:`_logits`): ``1 /
#: scale`` a normal float32 with room for the table's values; beyond it (``scale = 0`` included) the bias is added
#: after the product.
BIAS_DOT_SCALES = (2.0**-100, 2.0**100)


def _bias_dot(rpb: torch.Tensor | None, scale: float, half: bool) -> bool:
    """Whether :func:`_logits` puts the bias in the products' accumulator: half-precision inputs (tensor-core
    products; float32's IEEE backward spilled 488 bytes that way at sm_90), ``|scale|`` in :data:`BIAS_DOT_SCALES`."""
    return rpb is not None and half and BIAS_DOT_SCALES[0] <= abs(scale) <= BIAS_DOT_SCALES[1]


def _rpb_args(rpb: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int], int, int]:
    if rpb is None:
        return q, (0, 0, 0), 0, 0
    return rpb, rpb.stride(), (rpb.shape[1] - 1) // 2, (rpb.shape[2] - 1) // 2


@torch.library.custom_op("visionlin::na2d_fwd", mutates_args=())
def na2d_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor | None,
    kx: int,
    ky: int,
    dx: int,
    dy: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, X, Y, H, Dv], lse [B, H, X, Y] float32, base 2)`` for effective windows ``(kx, dx), (ky, dy)``."""
    _check_tuning()
    return _fwd(q, k, v, rpb, kx, ky, dx, dy, scale)


@torch.library.custom_op("visionlin::na2d_fwd_qkv", mutates_args=())
def na2d_fwd_qkv(
    qkv: torch.Tensor, rpb: torch.Tensor | None, kx: int, ky: int, dx: int, dy: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`na2d_fwd` of ``q, k, v = qkv.unbind(3)`` for ``qkv`` ``[B, X, Y, 3, H, D]`` (a packed projection's
    output); its backward (:func:`na2d_bwd_qkv`) writes one packed gradient."""
    _check_tuning()
    return _fwd(*qkv.unbind(3), rpb, kx, ky, dx, dy, scale)


def _fwd(q, k, v, rpb, kx, ky, dx, dy, scale) -> tuple[torch.Tensor, torch.Tensor]:
    b, x, y, h, d = q.shape
    dv = v.shape[-1]
    out = torch.empty(b, x, y, h, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, x, y, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.zero_()
    bd, bdv = _blocks(d), _blocks(dv)
    nx, ny, has_rpb = -(-x // dx), -(-y // dy), rpb is not None
    half = q.dtype in (torch.float16, torch.bfloat16)
    tx, ty, krows, kcols, warps, cap = _tile_plan(nx, ny, kx, ky, has_rpb, bd, False, half)
    grid, tbx, tby = _launch_args(q, kx, ky, dx, dy, tx, ty)
    table, sr, offx, offy = _rpb_args(rpb, q)
    meta = launch_meta.unchecked(tx * ty, krows * kcols, bd, has_rpb, warps, cap)
    i64 = not TUNING["fwd_int32_offsets"] or _fwd_i64(k, v)
    launch(_fwd_kernel, grid,
        q, k, v, table, out, lse, x, y, h, d, dv, kx, ky, dx, dy, tbx, tby, offx, offy, scale,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *sr,
        HAS_RPB=has_rpb, BIAS_DOT=_bias_dot(rpb, scale, half), HALF=half, TX=tx, TY=ty, BLOCK_Q=tx * ty,
        KROWS=krows, KCOLS=kcols, BLOCK_D=bd, BLOCK_DV=bdv, I64=i64, **meta,
    )  # fmt: skip
    return out, lse


@na2d_fwd.register_fake
def _(q, k, v, rpb, kx, ky, dx, dy, scale):
    b, x, y, h, _ = q.shape
    return q.new_empty(b, x, y, h, v.shape[-1]), q.new_empty(b, h, x, y, dtype=torch.float32)


@na2d_fwd_qkv.register_fake
def _(qkv, rpb, kx, ky, dx, dy, scale):
    b, x, y, _, h, d = qkv.shape
    return qkv.new_empty(b, x, y, h, d), qkv.new_empty(b, h, x, y, dtype=torch.float32)


@torch.library.custom_op("visionlin::na2d_bwd", mutates_args=())
def na2d_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    g: torch.Tensor,
    kx: int,
    ky: int,
    dx: int,
    dy: int,
    scale: float,
    need_drpb: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, drpb)``; ``drpb`` (float32, the table's shape) is zeros unless ``need_drpb``."""
    _check_tuning()  # before any work
    b, x, y, h, d = q.shape
    dq = torch.empty(b, x, y, h, d, device=q.device, dtype=q.dtype)
    dk = torch.empty(b, x, y, h, d, device=q.device, dtype=k.dtype)
    dv = torch.empty(b, x, y, h, v.shape[-1], device=q.device, dtype=v.dtype)
    drpb = _bwd_into(q, k, v, rpb, out, lse, g, kx, ky, dx, dy, scale, need_drpb, dq, dk, dv)
    return dq, dk, dv, drpb


@torch.library.custom_op("visionlin::na2d_bwd_qkv", mutates_args=())
def na2d_bwd_qkv(
    qkv: torch.Tensor,
    rpb: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    g: torch.Tensor,
    kx: int,
    ky: int,
    dx: int,
    dy: int,
    scale: float,
    need_drpb: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dqkv, drpb)`` of :func:`na2d_fwd_qkv`: the three gradients written into one ``[B, X, Y, 3, H, D]`` tensor
    (what the packed projection's backward reads: no concatenation)."""
    _check_tuning()
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    q, k, v = qkv.unbind(3)
    dq, dk, dv = dqkv.unbind(3)
    return dqkv, _bwd_into(q, k, v, rpb, out, lse, g, kx, ky, dx, dy, scale, need_drpb, dq, dk, dv)


def _bwd_into(q, k, v, rpb, out, lse, g, kx, ky, dx, dy, scale, need_drpb, dq, dk, dv) -> torch.Tensor:
    """The backward's kernels, writing ``dq``, ``dk``, ``dv`` (views with unit last strides, in the inputs' dtypes);
    returns ``drpb`` (float32, the table's shape; zeros unless ``need_drpb``)."""
    b, x, y, h, d = q.shape
    dvd = v.shape[-1]
    drpb = torch.zeros(rpb.shape if rpb is not None else (0,), device=q.device, dtype=torch.float32)
    if q.numel() == 0 or dvd == 0:
        for t in (dq, dk, dv):
            t.zero_()
        return drpb
    g = g.to(q.dtype)
    bd, bdv = _blocks(d), _blocks(dvd)
    nx, ny, has_rpb = -(-x // dx), -(-y // dy), rpb is not None
    half = q.dtype in (torch.float16, torch.bfloat16)
    tx, ty, _, kcols, warps, cap = _tile_plan(nx, ny, kx, ky, has_rpb, bd, True, half)
    grid, tbx, tby = _launch_args(q, kx, ky, dx, dy, tx, ty)
    # one key tile a group: each dq whole in one program (half precision, where it was measured: float32 inputs'
    # 8 x 8 tiles spilled 56 bytes for sm_90 with it, none with the atomics)
    direct = TUNING["bwd_dq_direct"] and tbx * tby == 1 and half
    # (measured with a bias table; without one the general rule's capped 4-warp 8 x 8 tile spilled 468 bytes with it)
    fused = direct and has_rpb if TUNING["bwd_delta_fused"] is None else TUNING["bwd_delta_fused"]
    # rowsum(dout * out) in float32, laid out as the log-sum-exp [B, H, X, Y] (fused: computed in the kernel instead)
    delta = lse if fused else _delta(g, out)
    table, sr, offx, offy = _rpb_args(rpb, q)
    need = bool(need_drpb and has_rpb)
    qrows, qcols = _bwd_block.unchecked(kcols, has_rpb, bd)
    # The bias gradient's dS per (query, window slot): a float32 slice per batch element while DS_BUFFER_BYTES allows
    slices = max(1, min(b, DS_BUFFER_BYTES // (h * x * y * kx * ky * 4))) if need else 1
    store = need and slices == b  # every (b, h, query, slot) entry stored exactly once: no zero fill needed
    dsbuf = (torch.empty if store else torch.zeros)(
        (slices, h, x, y, kx * ky) if need else (1,), device=q.device, dtype=torch.float32
    )
    bias_dot = TUNING["bwd_bias_dot"] and _bias_dot(rpb, scale, half)
    meta = _bwd_meta.unchecked(bd, half, warps, cap)
    dqacc = dq if direct else torch.zeros(b, x, y, h, d, device=q.device, dtype=torch.float32)
    # int32 query offsets where they fit, but not where dq is stored directly (there they spilled: slower)
    int32 = not direct if TUNING["bwd_int32_offsets"] is None else TUNING["bwd_int32_offsets"]
    i64 = not int32 or _bwd_i64(q, g, out, kx * ky, dqacc)
    launch(_bwd_kernel, grid,
        q, k, v, table, g, lse, delta, dqacc, dk, dv, dsbuf, out,
        x, y, h, d, dvd, kx, ky, dx, dy, tbx, tby, offx, offy, scale, slices,
        *q.stride(), *k.stride(), *v.stride(), *g.stride(), *sr, *out.stride(),
        *dqacc.stride()[:4], *dk.stride()[:4], *dv.stride()[:4],
        HAS_RPB=has_rpb, BIAS_DOT=bias_dot, NEED_DRPB=need, DS_STORE=store, HALF=half, DQ_DIRECT=direct,
        DELTA_FUSED=fused, I64=i64,
        TX=tx, TY=ty, BLOCK_K=tx * ty, QROWS=qrows, QCOLS=qcols, BLOCK_D=bd, BLOCK_DV=bdv, **meta,
    )  # fmt: skip
    if not direct:
        dq.copy_(dqacc)
    if need:
        _bias_grad(dsbuf, drpb, x, y, kx, ky, dx, dy)
    return drpb


def _reach(*tensors: torch.Tensor) -> int:
    """The largest element offset within one (batch, head) of ``[B, X, Y, H, D]`` tensors: rows, columns and channels
    by their strides (the (batch, head) base is int64 in the kernels)."""
    return max(sum((t.shape[a] - 1) * t.stride(a) for a in (1, 2, 4)) for t in tensors)


def _fwd_i64(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the forward's key offsets within one (batch, head) need int64: an element offset of ``k`` or ``v`` at
    or beyond 2^31."""
    return _reach(k, v) >= 2**31


def _bwd_i64(q: torch.Tensor, g: torch.Tensor, out: torch.Tensor, window: int, dq: torch.Tensor | None = None) -> bool:
    """Whether the backward's query-side offsets within one (batch, head) need int64: an element offset of ``q``,
    ``dO``, ``O`` or ``dq`` (their strides), of a query's ``dq`` row or of its bias-gradient slots at or beyond 2^31.
    Below, the loop's addresses may take int32 offsets (``TUNING["bwd_int32_offsets"]``; ``I64`` off: 633 instead of 706
    sm_90 instructions a query block at NAT-T's 14 x 14 shape, the 64-bit adds gone)."""
    b, x, y, h, d = q.shape
    reach = _reach(*(t for t in (q, g, out, dq) if t is not None))
    return max(reach, x * y * h * max(d, out.shape[-1]), x * y * window) >= 2**31


#: (query, slot) sums per program of the bias gradient's reduction (:func:`_bias_grad_kernel`: 64 queries of a 7 x 7
#: window; 8192 spilled 2.6 KB for sm_90 at 13 x 13).
BIAS_GRAD_ELEMENTS = 4096
#: Programs per SM the reduction aims at (the slices split into chunks, each chunk's sums added by atomics, until the
#: grid has that many), by the map's queries ``X * Y``: ``(most queries or None, programs per SM)``, the first row
#: that holds the map. Maps of at most 28 x 28 at 1 (NAT-T's 14 x 14 stage, 18 calls a step: 0.035 against 0.044 ms at
#: 2; DiNAT-T's 14 x 14 at dilation 2: 0.035 against 0.046), larger at 2 (NAT-T's 56 x 56: 0.097 against 0.121 at 1);
#: ``neighborhood_op.py --bias-grad-sweep``, ``benchmarks/results/h200/s46/neighborhood_op_bias_grad_153f216.json``.
BIAS_GRAD_PER_SM = ((28 * 28, 1), (None, 2))


def _bias_grad_block(kk: int) -> tuple[int, int]:
    """``(BLOCK_Q, BLOCK_W)`` of :func:`_bias_grad_kernel` for windows of ``kk`` slots."""
    width = next_pow2(kk)
    return max(8, BIAS_GRAD_ELEMENTS // width), width


def _bias_grad(dsbuf: torch.Tensor, drpb: torch.Tensor, x: int, y: int, kx: int, ky: int, dx: int, dy: int) -> None:
    """Adds the sums over slices of ``dsbuf`` ``[slices, H, X, Y, kx * ky]`` to the table gradient ``drpb`` ``[H, 2 KSX
    - 1, 2 KSY - 1]`` (float32) at each (query, slot)'s table index. One kernel: summing over the slices with
    ``torch.sum`` and adding through an index tensor with ``scatter_add_`` took about 35 small kernels per backward
    where the index could not be kept (every call under torch.compile's CUDA graphs: NAT-T's 38 ms compiled training
    step had 360 int64 index additions, 0.36 ms); 0.071 against 0.142 ms at NAT-T's stage 1 on an H200."""
    slices, h = dsbuf.shape[0], drpb.shape[0]
    ksx, ksy = (drpb.shape[1] + 1) // 2, (drpb.shape[2] + 1) // 2
    block_q, width = _bias_grad_block(kx * ky)
    q_blocks = cdiv(x * y, block_q)
    per_sm = next(n for most, n in BIAS_GRAD_PER_SM if most is None or x * y <= most)
    chunks = max(1, min(slices, per_sm * _num_sms(dsbuf.device) // (q_blocks * h)))
    per = cdiv(slices, chunks)
    launch(_bias_grad_kernel, (q_blocks, h, cdiv(slices, per)),
        dsbuf, drpb, x, y, kx, ky, dx, dy, ksx, ksy, per, slices, dsbuf.stride(0), dsbuf.stride(1),
        BLOCK_Q=block_q, BLOCK_W=width, num_warps=4,
    )  # fmt: skip


@na2d_bwd.register_fake
def _(q, k, v, rpb, out, lse, g, kx, ky, dx, dy, scale, need_drpb):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        q.new_empty(rpb.shape if rpb is not None else (0,), dtype=torch.float32),
    )


@na2d_bwd_qkv.register_fake
def _(qkv, rpb, out, lse, g, kx, ky, dx, dy, scale, need_drpb):
    drpb = qkv.new_empty(rpb.shape if rpb is not None else (0,), dtype=torch.float32)
    return torch.empty_like(qkv, memory_format=torch.contiguous_format), drpb


def _setup(ctx, inputs, output):
    q, k, v, rpb, kx, ky, dx, dy, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, rpb, out, lse)
    ctx.window = (kx, ky, dx, dy, scale)
    ctx.need_drpb = rpb is not None and ctx.needs_input_grad[3]


def _backward(ctx, g, _g_lse=None):
    q, k, v, rpb, out, lse = ctx.saved_tensors
    dq, dk, dv, drpb = _na2d_bwd_call(q, k, v, rpb, out, lse, g, *ctx.window, ctx.need_drpb)
    drpb = drpb.to(rpb.dtype) if ctx.need_drpb else None
    return dq, dk, dv, drpb, None, None, None, None, None


na2d_fwd.register_autograd(_backward, setup_context=_setup)
_na2d_bwd_call = eager_call(na2d_bwd)
_na2d_fwd_call = eager_op(na2d_fwd, _setup, _backward)


def _setup_qkv(ctx, inputs, output):
    qkv, rpb, kx, ky, dx, dy, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, rpb, out, lse)
    ctx.window = (kx, ky, dx, dy, scale)
    ctx.need_drpb = rpb is not None and ctx.needs_input_grad[1]


def _backward_qkv(ctx, g, _g_lse=None):
    qkv, rpb, out, lse = ctx.saved_tensors
    dqkv, drpb = _na2d_bwd_qkv_call(qkv, rpb, out, lse, g, *ctx.window, ctx.need_drpb)
    drpb = drpb.to(rpb.dtype) if ctx.need_drpb else None
    return dqkv, drpb, None, None, None, None, None


na2d_fwd_qkv.register_autograd(_backward_qkv, setup_context=_setup_qkv)
_na2d_bwd_qkv_call = eager_call(na2d_bwd_qkv)
_na2d_fwd_qkv_call = eager_op(na2d_fwd_qkv, _setup_qkv, _backward_qkv)


def na2d_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: tuple[tuple[int, int], tuple[int, int]],
    *,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """2-D neighborhood attention over ``[B, X, Y, H, D]`` with effective windows ``((kx, dx), (ky, dy))`` (from
    :func:`visionlin.kernels.neighborhood.effective_window`); ``rpb`` ``[H, 2K_x - 1, 2K_y - 1]`` or ``None``.

    Returns:
        ``[B, X, Y, H, Dv]`` in ``q``'s dtype.
    """
    (kx, dx), (ky, dy) = window
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _na2d_fwd_call(q, k, v, rpb, kx, ky, dx, dy, s)[0]


def na2d_triton_qkv(
    qkv: torch.Tensor,
    window: tuple[tuple[int, int], tuple[int, int]],
    *,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`na2d_triton` of ``qkv.unbind(3)`` for ``qkv`` ``[B, X, Y, 3, H, D]``: the backward writes one packed
    gradient (no concatenation of three for the projection that made ``qkv``)."""
    (kx, dx), (ky, dy) = window
    s = qkv.shape[-1] ** -0.5 if scale is None else float(scale)
    return _na2d_fwd_qkv_call(qkv, rpb, kx, ky, dx, dy, s)[0]
