"""Fused non-causal (bidirectional) linear attention in Triton, forward and backward.

Forward, two kernels: the state kernel reads every key and value once and adds, per (batch, head), the float32 sums
``S = sum_j phi(k_j) v_j^T`` ``[D, Dv]``, ``z = sum_j phi(k_j)`` and ``u = sum_j v_j`` (split over key chunks to fill
the GPU; chunks meet by float32 atomic adds, so sums may differ between runs in the last bits); the read-out kernel
reads every query once and writes ``out_i = (phi(q_i) A + c) / (phi(q_i) . w + eps)`` (``"divide"``) or
``phi(q_i) A + c``, with ``(A, c, w)`` formed from the state inside the kernel:

=============  ===========================  ================  ===========
normalize      A                             c                 w
=============  ===========================  ================  ===========
``divide``     ``s S / M``                  0                 ``s z / M``
``subtract``   ``s (S / M - zbar ubar^T)``  ``ubar = u / M``  (unused)
``none``       ``s S``                      0                 (unused)
=============  ===========================  ================  ===========

Backward, two kernels: the read-out backward writes ``dq`` and adds the gradients of ``(A, w, c)`` (``divide`` reads
the forward's output at head dims up to 64, and otherwise, or for callers that keep nothing from the forward
(FLatten's op, :mod:`visionlin.kernels.triton.focus`), takes ``dnum . out = phi(q) . dnum A^T / den`` from a product
it forms anyway); the state backward turns them into those of ``(S, z, u)`` and writes ``dk`` and ``dv``. Together
one custom op pair (``visionlin::linear_attention_fwd`` / ``_bwd``) with fake and autograd registrations.

Feature maps are applied inside the kernels in float32 (``identity``, ``relu``, ``elu`` = ELU + 1, ``sigmoid``,
``cosine``); products run on the tensor cores with float32 accumulation (see ``_mm``: operands scaled by powers of
two, so float16 never overflows, and float32 matrices kept as two half-precision parts, about 16 significant bits).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..linear import _default_scale
from ._eager import eager_call, eager_op
from ._launch import cdiv, launch, tile_dim, tuned

__all__ = ["FEATURE_MAP_IDS", "NORMALIZATION_IDS", "TUNING", "linear_attention_triton"]

FEATURE_MAP_IDS = {"identity": 0, "relu": 1, "elu": 2, "sigmoid": 3, "cosine": 4}
_COSINE_EPS = 1e-12  # torch.nn.functional.normalize's clamp


@triton.jit
def _phi(x, mask, FMAP: tl.constexpr):
    """Feature map of float32 rows ``x`` ``[R, BLOCK_D]``; padded columns (``mask`` False) come out 0."""
    if FMAP == 1:
        y = tl.maximum(x, 0.0)
    elif FMAP == 2:
        y = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FMAP == 3:
        y = 1.0 / (1.0 + tl.exp(-x))
    else:
        y = x
    y = tl.where(mask, y, 0.0)
    if FMAP == 4:
        norm = tl.sqrt(tl.sum(y * y, axis=1))
        y = y / tl.maximum(norm, 1e-12)[:, None]
    return y


@triton.jit
def _phi_backward(x, dy, mask, FMAP: tl.constexpr):
    """Gradient with respect to ``x`` of ``sum(dy * phi(x))`` for float32 rows ``x`` ``[R, BLOCK_D]``."""
    if FMAP == 1:
        dx = tl.where(x > 0, dy, 0.0)
    elif FMAP == 2:
        dx = tl.where(x > 0, dy, dy * tl.exp(tl.minimum(x, 0.0)))
    elif FMAP == 3:
        s = 1.0 / (1.0 + tl.exp(-x))
        dx = dy * s * (1.0 - s)
    elif FMAP == 4:
        xm = tl.where(mask, x, 0.0)
        norm = tl.sqrt(tl.sum(xm * xm, axis=1))
        n = tl.maximum(norm, 1e-12)
        y = xm / n[:, None]
        proj = tl.where(norm > 1e-12, tl.sum(y * dy, axis=1), 0.0)
        dx = (dy - y * proj[:, None]) / n[:, None]
    else:
        dx = dy
    return tl.where(mask, dx, 0.0)


@triton.jit
def _pow2_scale(x):
    """A power of two at or above ``max|x|`` (1 for an all-zero tile), so ``x / scale`` lies in [-1, 1]."""
    m = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    return tl.exp2(tl.ceil(tl.log2(tl.maximum(m, 1e-30))))


@triton.jit
def _mm(a, b, DTYPE: tl.constexpr, HALF: tl.constexpr, SPLIT: tl.constexpr, SCALE: tl.constexpr):
    """``a @ b`` of float32 tiles with float32 accumulation.

    Float32 inputs multiply in IEEE precision. Half inputs (``DTYPE``) run on the tensor cores; with ``SCALE``
    (float16) each operand is first scaled by a power of two to at most 1 (no overflow, nothing lost to the scaling;
    bfloat16 has float32's range and skips it), and with ``SPLIT`` the right operand is kept as ``b_hi + b_lo``
    (about 16 significant bits instead of 8 or 11).
    """
    if HALF:
        if SCALE:
            sa = _pow2_scale(a)
            sb = _pow2_scale(b)
            a = a / sa
            b = b / sb
        ah = a.to(DTYPE)
        bh = b.to(DTYPE)
        out = tl.dot(ah, bh)
        if SPLIT:
            out += tl.dot(ah, (b - bh.to(tl.float32)).to(DTYPE))
        if SCALE:
            out = out * (sa * sb)
        return out
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _matrices(s_mat, z, u, scale, inv_m, NORM: tl.constexpr):
    """``(A, c, w)`` of one (batch, head) from its float32 sums ``S, z, u`` (module docstring's table)."""
    if NORM == 0:
        a = s_mat * (scale * inv_m)
        c = u * 0.0
        w = z * (scale * inv_m)
    elif NORM == 1:
        ubar = u * inv_m
        a = (s_mat * inv_m - (z * inv_m)[:, None] * ubar[None, :]) * scale
        c = ubar
        w = z * 0.0
    else:
        a = s_mat * scale
        c = u * 0.0
        w = z * 0.0
    return a, c, w


@triton.jit
def _readout_matrices(
    S_ptr, offs_d, offs_e, scale, inv_m, NORM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr
):
    """:func:`_matrices` of a state stored at ``S_ptr`` (``S`` row-major, then ``z``, then ``u``)."""
    s_mat = tl.load(S_ptr + offs_d[:, None] * BLOCK_DV + offs_e[None, :])
    z = tl.load(S_ptr + BLOCK_D * BLOCK_DV + offs_d)
    u = tl.load(S_ptr + BLOCK_D * BLOCK_DV + BLOCK_D + offs_e)
    return _matrices(s_mat, z, u, scale, inv_m, NORM)


@triton.jit
def _state_sums(
    k_base, v_base, first_block, n_blocks, M, D, DV, sk_n, sk_d, sv_n, sv_d,
    FMAP: tl.constexpr, HALF: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """``(sum phi(k) v^T, sum phi(k), sum v)`` in float32 over key blocks ``first_block .. first_block + n_blocks``."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_e = offs_e < DV
    acc = tl.zeros((BLOCK_D, BLOCK_DV), dtype=tl.float32)
    z = tl.zeros((BLOCK_D,), dtype=tl.float32)
    u = tl.zeros((BLOCK_DV,), dtype=tl.float32)
    for i in range(0, n_blocks):
        offs_m = ((first_block + i) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < M
        kmask = mask_m[:, None] & mask_d[None, :]
        vmask = mask_m[:, None] & mask_e[None, :]
        k = tl.load(k_base + offs_m[:, None] * sk_n + offs_d[None, :] * sk_d, mask=kmask, other=0.0)
        v = tl.load(v_base + offs_m[:, None] * sv_n + offs_e[None, :] * sv_d, mask=vmask, other=0.0).to(tl.float32)
        fk = tl.where(mask_m[:, None], _phi(k.to(tl.float32), kmask, FMAP), 0.0)
        acc += _mm(tl.trans(fk), v, k.dtype, HALF, False, SCALE)
        z += tl.sum(fk, axis=0)
        u += tl.sum(v, axis=0)
    return acc, z, u


@triton.jit
def _readout_rows(
    q_base, o_base, pid_n, a, c, w, N, D, DV, eps, sq_n, sq_d, so_n, so_d,
    FMAP: tl.constexpr, HALF: tl.constexpr, SCALE: tl.constexpr, NORM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Writes ``out = (phi(q) A + c) / (phi(q) . w + eps)`` (divide) or ``phi(q) A + c`` for query block ``pid_n``."""
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    mask_n = offs_n < N
    qmask = mask_n[:, None] & (offs_d < D)[None, :]
    q = tl.load(q_base + offs_n[:, None] * sq_n + offs_d[None, :] * sq_d, mask=qmask, other=0.0)
    f = _phi(q.to(tl.float32), qmask, FMAP)
    out = _mm(f, a, q.dtype, HALF, True, SCALE) + c[None, :]
    if NORM == 0:
        out = out / (tl.sum(f * w[None, :], axis=1) + eps)[:, None]
    omask = mask_n[:, None] & (offs_e < DV)[None, :]
    tl.store(o_base + offs_n[:, None] * so_n + offs_e[None, :] * so_d, out.to(o_base.dtype.element_ty), omask)


@triton.jit
def _state_kernel(
    K, V, S,
    M, H, D, DV, blocks_per_split,
    sk_b, sk_n, sk_h, sk_d, sv_b, sv_n, sv_h, sv_d,
    FMAP: tl.constexpr, HALF: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Add one split of the keys' ``phi(k) v^T``, ``phi(k)`` and ``v`` sums into a (batch, head)'s float32 state."""
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # offsets in int64: a tensor may span more than 2^31 elements
    h = pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    acc, z, u = _state_sums(
        K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h, split * blocks_per_split, blocks_per_split,
        M, D, DV, sk_n, sk_d, sv_n, sv_d, FMAP, HALF, SCALE, BLOCK_M, BLOCK_D, BLOCK_DV,
    )  # fmt: skip
    base = S + pid_bh * (BLOCK_D * BLOCK_DV + BLOCK_D + BLOCK_DV)
    tl.atomic_add(base + offs_d[:, None] * BLOCK_DV + offs_e[None, :], acc, sem="relaxed")
    tl.atomic_add(base + BLOCK_D * BLOCK_DV + offs_d, z, sem="relaxed")
    tl.atomic_add(base + BLOCK_D * BLOCK_DV + BLOCK_D + offs_e, u, sem="relaxed")


@triton.jit
def _readout_kernel(
    Q, S, Out,
    N, H, D, DV, scale, inv_m, eps, blocks_per_split,
    sq_b, sq_n, sq_h, sq_d, so_b, so_n, so_h, so_d,
    FMAP: tl.constexpr, HALF: tl.constexpr, SCALE: tl.constexpr, NORM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """``out = (phi(q) A + c) / (phi(q) . w + eps)`` (divide) or ``phi(q) A + c`` for one split of the queries
    (``blocks_per_split`` blocks: the state is read and turned into ``A, c, w`` once per split, not once per block)."""
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # offsets in int64: a tensor may span more than 2^31 elements
    h = pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    base = S + pid_bh * (BLOCK_D * BLOCK_DV + BLOCK_D + BLOCK_DV)
    a, c, w = _readout_matrices(base, offs_d, offs_e, scale, inv_m, NORM, BLOCK_D, BLOCK_DV)
    for i in range(0, blocks_per_split):
        _readout_rows(
            Q + b * sq_b + h * sq_h, Out + b * so_b + h * so_h, split * blocks_per_split + i, a, c, w, N, D, DV, eps,
            sq_n, sq_d, so_n, so_d, FMAP, HALF, SCALE, NORM, BLOCK_N, BLOCK_D, BLOCK_DV,
        )  # fmt: skip


@triton.jit
def _fused_kernel(
    Q, K, V, S, Out,
    N, M, H, D, DV, scale, inv_m, eps,
    sq_b, sq_n, sq_h, sq_d, sk_b, sk_n, sk_h, sk_d, sv_b, sv_n, sv_h, sv_d, so_b, so_n, so_h, so_d,
    FMAP: tl.constexpr, HALF: tl.constexpr, SCALE: tl.constexpr, NORM: tl.constexpr, SAVE_STATE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """One (batch, head) whole: the state of every key kept in registers, then every query block read out (no
    atomics, no state round trip through memory, one launch); the state is stored for the backward only if asked."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)  # offsets in int64: a tensor may span more than 2^31 elements
    h = pid_bh % H
    acc, z, u = _state_sums(
        K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h, 0, tl.cdiv(M, BLOCK_N),
        M, D, DV, sk_n, sk_d, sv_n, sv_d, FMAP, HALF, SCALE, BLOCK_N, BLOCK_D, BLOCK_DV,
    )  # fmt: skip
    if SAVE_STATE:
        offs_d = tl.arange(0, BLOCK_D)
        offs_e = tl.arange(0, BLOCK_DV)
        base = S + pid_bh * (BLOCK_D * BLOCK_DV + BLOCK_D + BLOCK_DV)
        tl.store(base + offs_d[:, None] * BLOCK_DV + offs_e[None, :], acc)
        tl.store(base + BLOCK_D * BLOCK_DV + offs_d, z)
        tl.store(base + BLOCK_D * BLOCK_DV + BLOCK_D + offs_e, u)
    a, c, w = _matrices(acc, z, u, scale, inv_m, NORM)
    for pid_n in range(0, tl.cdiv(N, BLOCK_N)):
        _readout_rows(
            Q + b * sq_b + h * sq_h, Out + b * so_b + h * so_h, pid_n, a, c, w, N, D, DV, eps, sq_n, sq_d, so_n, so_d,
            FMAP, HALF, SCALE, NORM, BLOCK_N, BLOCK_D, BLOCK_DV,
        )  # fmt: skip


@triton.jit
def _readout_backward_kernel(
    Q, G, Out, S, DQ, GS,
    N, H, D, DV, scale, inv_m, eps, blocks_per_split,
    sq_b, sq_n, sq_h, sq_d, sg_b, sg_n, sg_h, sg_d, so_b, so_n, so_h, so_d, sdq_b, sdq_n, sdq_h, sdq_d,
    FMAP: tl.constexpr, HALF: tl.constexpr, SCALE: tl.constexpr, NORM: tl.constexpr, HAS_OUT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """``dq`` for one split of the queries; adds that split's gradients of ``A``, ``w``, ``c`` into ``GS``.
    ``divide``'s gradient of the denominator, ``-dnum . out``, reads the forward's output (``HAS_OUT``) or, without
    it, comes from ``phi(q) . dnum A^T``, the product the gradient of ``phi(q)`` takes anyway: no ``out`` kept alive
    from the forward to the backward, at 10-17% more GPU time at head dims 32-64 on the H200 (more register spills)
    and 13% less at 128 (``benchmarks/results/h200/s30``): see :func:`_setup`."""
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # offsets in int64: a tensor may span more than 2^31 elements
    h = pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_e = offs_e < DV
    stride = BLOCK_D * BLOCK_DV + BLOCK_D + BLOCK_DV
    a, c, w = _readout_matrices(S + pid_bh * stride, offs_d, offs_e, scale, inv_m, NORM, BLOCK_D, BLOCK_DV)
    a_t = tl.trans(a)
    da = tl.zeros((BLOCK_D, BLOCK_DV), dtype=tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dc = tl.zeros((BLOCK_DV,), dtype=tl.float32)
    for i in range(0, blocks_per_split):
        offs_n = ((split * blocks_per_split + i) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = offs_n < N
        qmask = mask_n[:, None] & mask_d[None, :]
        emask = mask_n[:, None] & mask_e[None, :]
        q = tl.load(Q + b * sq_b + h * sq_h + offs_n[:, None] * sq_n + offs_d[None, :] * sq_d, mask=qmask, other=0.0)
        g = tl.load(G + b * sg_b + h * sg_h + offs_n[:, None] * sg_n + offs_e[None, :] * sg_d, mask=emask, other=0.0)
        g = g.to(tl.float32)
        qf = q.to(tl.float32)
        f = tl.where(mask_n[:, None], _phi(qf, qmask, FMAP), 0.0)
        if NORM == 0:
            den = tl.where(mask_n, tl.sum(f * w[None, :], axis=1) + eps, 1.0)
            dnum = g / den[:, None]
            # The two branches order the same statements differently on purpose: compiled for sm_90, hoisting the
            # dc / da updates above df (one copy for both) spilled more in float32 and float16 at head dim 128 with
            # HAS_OUT (fp32 D 32: 1,372 vs 904 bytes) for less in bfloat16; not timed, so left as measured.
            if HAS_OUT:
                o_ptr = Out + b * so_b + h * so_h + offs_n[:, None] * so_n + offs_e[None, :] * so_d
                o = tl.load(o_ptr, mask=emask, other=0.0).to(tl.float32)
                dden = -tl.sum(dnum * o, axis=1)
                df = _mm(dnum, a_t, q.dtype, HALF, True, SCALE) + dden[:, None] * w[None, :]
                dw += tl.sum(dden[:, None] * f, axis=0)
                dc += tl.sum(dnum, axis=0)
                da += _mm(tl.trans(f), dnum, q.dtype, HALF, False, SCALE)
            else:
                dc += tl.sum(dnum, axis=0)
                da += _mm(tl.trans(f), dnum, q.dtype, HALF, False, SCALE)
                # -dnum . out = -(phi(q) . dnum A^T) / den
                dnum_at = _mm(dnum, a_t, q.dtype, HALF, True, SCALE)
                dden = -tl.sum(f * dnum_at, axis=1) / den
                df = dnum_at + dden[:, None] * w[None, :]
                dw += tl.sum(dden[:, None] * f, axis=0)
        else:
            dnum = g
            df = _mm(dnum, a_t, q.dtype, HALF, True, SCALE)
            dc += tl.sum(dnum, axis=0)
            da += _mm(tl.trans(f), dnum, q.dtype, HALF, False, SCALE)
        dq = _phi_backward(qf, df, qmask, FMAP)
        dq_ptr = DQ + b * sdq_b + h * sdq_h + offs_n[:, None] * sdq_n + offs_d[None, :] * sdq_d
        tl.store(dq_ptr, dq.to(DQ.dtype.element_ty), qmask)
    base = GS + pid_bh * stride
    tl.atomic_add(base + offs_d[:, None] * BLOCK_DV + offs_e[None, :], da, sem="relaxed")
    tl.atomic_add(base + BLOCK_D * BLOCK_DV + offs_d, dw, sem="relaxed")
    tl.atomic_add(base + BLOCK_D * BLOCK_DV + BLOCK_D + offs_e, dc, sem="relaxed")


@triton.jit
def _state_backward_kernel(
    K, V, S, GS, DK, DVv,
    M, H, D, DV, scale, inv_m,
    sk_b, sk_n, sk_h, sk_d, sv_b, sv_n, sv_h, sv_d, sdk_b, sdk_n, sdk_h, sdk_d, sdv_b, sdv_n, sdv_h, sdv_d,
    FMAP: tl.constexpr, HALF: tl.constexpr, SCALE: tl.constexpr, NORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """``dk = phi'(k) * (v dS^T + dz)`` and ``dv = phi(k) dS + du`` for one block of keys, where ``(dS, dz, du)``
    follow from the read-out's ``(dA, dw, dc)`` through the normalisation's formulas."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # offsets in int64: a tensor may span more than 2^31 elements
    h = pid_bh % H
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < M
    kmask = mask_m[:, None] & (offs_d < D)[None, :]
    vmask = mask_m[:, None] & (offs_e < DV)[None, :]
    stride = BLOCK_D * BLOCK_DV + BLOCK_D + BLOCK_DV
    gbase = GS + pid_bh * stride
    da = tl.load(gbase + offs_d[:, None] * BLOCK_DV + offs_e[None, :])
    dw = tl.load(gbase + BLOCK_D * BLOCK_DV + offs_d)
    dc = tl.load(gbase + BLOCK_D * BLOCK_DV + BLOCK_D + offs_e)
    if NORM == 0:
        ds = da * (scale * inv_m)
        dz = dw * (scale * inv_m)
        du = dc * 0.0
    elif NORM == 1:
        sbase = S + pid_bh * stride
        z = tl.load(sbase + BLOCK_D * BLOCK_DV + offs_d)
        u = tl.load(sbase + BLOCK_D * BLOCK_DV + BLOCK_D + offs_e)
        ds = da * (scale * inv_m)
        dz = -tl.sum(da * u[None, :], axis=1) * (scale * inv_m * inv_m)
        du = dc * inv_m - tl.sum(da * z[:, None], axis=0) * (scale * inv_m * inv_m)
    else:
        ds = da * scale
        dz = dw * 0.0
        du = dc * 0.0
    k = tl.load(K + b * sk_b + h * sk_h + offs_m[:, None] * sk_n + offs_d[None, :] * sk_d, mask=kmask, other=0.0)
    v = tl.load(V + b * sv_b + h * sv_h + offs_m[:, None] * sv_n + offs_e[None, :] * sv_d, mask=vmask, other=0.0)
    kf = k.to(tl.float32)
    fk = _phi(kf, kmask, FMAP)
    dfk = _mm(v.to(tl.float32), tl.trans(ds), k.dtype, HALF, True, SCALE) + dz[None, :]
    dv = _mm(fk, ds, k.dtype, HALF, True, SCALE) + du[None, :]
    dk = _phi_backward(kf, dfk, kmask, FMAP)
    dk_ptr = DK + b * sdk_b + h * sdk_h + offs_m[:, None] * sdk_n + offs_d[None, :] * sdk_d
    tl.store(dk_ptr, dk.to(DK.dtype.element_ty), kmask)
    dv_ptr = DVv + b * sdv_b + h * sdv_h + offs_m[:, None] * sdv_n + offs_e[None, :] * sdv_d
    tl.store(dv_ptr, dv.to(DVv.dtype.element_ty), vmask)


# Launch helpers -------------------------------------------------------------------------------------------------------
#: Launch settings, ``None`` for the measured defaults of :func:`_forward_settings` / :func:`_backward_settings`;
#: benchmarks sweep them (``visionlin bench op --sweep``, ``benchmarks/linear_settings_ab.py --grid``).
#: Forward: ``rows`` per step, ``warps``, ``stages`` (0: Triton's default), ``state_per_sm`` / ``readout_per_sm`` the
#: programs per SM the two-kernel forward's key / query splits aim at (``readout_per_sm`` 0: one block of rows per
#: program), ``fused`` whether the single-kernel forward runs (``None``: :func:`_use_fused`'s rule). Backward:
#: ``rows_backward``, ``warps_backward``, ``stages_backward``, ``backward_per_sm`` (the query splits' programs per SM)
#: and ``maxnreg_backward`` (a register cap per thread; ``None``: none). Rows and warps are powers of two; a per-SM
#: knob at 0 gives one split per (batch, head).
TUNING: dict[str, int | None] = {
    "rows": None, "warps": None, "stages": None, "state_per_sm": None, "readout_per_sm": None, "fused": None,
    "rows_backward": None, "warps_backward": None, "stages_backward": None, "backward_per_sm": None,
    "maxnreg_backward": None,
}  # fmt: skip
NORMALIZATION_IDS = {"divide": 0, "subtract": 1, "none": 2}


def _pad_dims(d: int, dv: int) -> tuple[int, int]:
    return tile_dim(d), tile_dim(dv)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the Triton interpreter (CPU) only needs some split
    return _cuda_sms(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_sms(index: int) -> int:
    """SMs of CUDA device ``index``, looked up once (every launch asks: the property query cost host time per call)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(rows: int, block: int, bh: int, device: torch.device, per_sm: int = 4) -> tuple[int, int]:
    """(splits, blocks per split) so that ``bh * splits`` programs fill the GPU about ``per_sm`` times over."""
    n_blocks = cdiv(rows, block)
    want = min(n_blocks, max(1, cdiv(per_sm * _num_sms(device), bh)))
    per = cdiv(n_blocks, want)
    return cdiv(n_blocks, per), per


def _use_fused(bh: int, block_d: int, block_dv: int, device: torch.device) -> bool:
    """Whether the single-kernel forward (:func:`_fused_kernel`, one program per (batch, head)) runs: when the
    (batch, head) pairs alone fill the GPU twice over and the state fits in registers (``TUNING["fused"]`` forces)."""
    if TUNING["fused"] is not None:
        return bool(TUNING["fused"])
    return bh >= 2 * _num_sms(device) and block_d * block_dv <= 64 * 64


_POW2_KNOBS = ("rows", "warps", "rows_backward", "warps_backward")


def _tuned(defaults: dict[str, int]) -> dict[str, int]:
    """``defaults`` with the ``TUNING`` entries that are set (not ``None``) in their place, checked."""
    return {key: tuned(TUNING, __name__, key, default, pow2=key in _POW2_KNOBS) for key, default in defaults.items()}


def _forward_settings(block_d: int, block_dv: int, fused: bool) -> dict[str, int]:
    """``rows``, ``warps``, ``stages``, ``state_per_sm``, ``readout_per_sm`` of the forward (``TUNING`` overrides).

    Chosen by a graph-timed search on an H200 (``benchmarks/results/h200/linear_settings_grid_69e6057.json``): few
    warps per program, since each step's products are small (``[rows, D] x [D, Dv]``) and the kernels are bound by
    memory latency, so more resident programs beat wider ones. At D = 32 (B 64, N 3,136, H 3) 2 warps / 64 rows /
    one pipeline stage took 0.060-0.067 ms against 0.160 with the former 8 warps; at D = 64 (65k tokens) 4 warps /
    128 rows with four read-out programs per SM 0.151 against 0.334; the fused forward (B 256, N 197, H 6, D 64) 2 warps
    / 32 rows 0.090 against 0.155. Head dims above 64 were not searched and keep 8 warps / 64 rows."""
    size = block_d * block_dv
    if fused:
        rows, warps, stages, readout = (32, 2, 0, 0) if size <= 64 * 64 else (64, 8, 0, 0)
    elif size <= 32 * 32:
        rows, warps, stages, readout = 64, 2, 1, 0
    elif size <= 64 * 64:
        rows, warps, stages, readout = 128, 4, 0, 4
    else:
        rows, warps, stages, readout = 64, 8, 0, 0
    return _tuned(dict(rows=rows, warps=warps, stages=stages, state_per_sm=4, readout_per_sm=readout))


def _backward_settings(block_d: int, block_dv: int) -> dict[str, int]:
    """``rows_backward``, ``warps_backward``, ``stages_backward``, ``backward_per_sm`` of the backward (``TUNING``
    overrides). From the same search: 4 warps, one pipeline stage and eight query splits per SM, 128 rows at D = 32
    (0.142 ms against 0.203 at 8 warps, B 64, N 3,136, H 3) and 64 at D = 64 (0.207 against 0.332, B 256, N 197,
    H 6); above 64 (not searched) the former 8 warps / 16 rows / four splits per SM, the largest rows that compiled
    without register spills for sm_90 (tests/test_kernels_sm90_compile.py checks the shipped settings)."""
    size = block_d * block_dv
    if size <= 32 * 32:
        rows, warps, stages = 128, 4, 1
    elif size <= 64 * 64:
        rows, warps, stages = 64, 4, 1
    else:
        rows, warps, stages = 16, 8, 0
    per_sm = 8 if size <= 64 * 64 else 4  # the former setting above 64
    return _tuned(dict(rows_backward=rows, warps_backward=warps, stages_backward=stages, backward_per_sm=per_sm))


def _meta(q: torch.Tensor, v: torch.Tensor, settings: dict[str, int] | None = None) -> dict[str, int | bool]:
    """Constexprs of the kernels, with the launch options (warps, stages, register cap) of ``settings`` (from
    :func:`_forward_settings` or :func:`_backward_settings`)."""
    bd, bdv = _pad_dims(q.shape[-1], v.shape[-1])
    half = q.dtype in (torch.float16, torch.bfloat16)
    scale = q.dtype == torch.float16
    meta: dict[str, int | bool] = dict(HALF=half, SCALE=scale, BLOCK_D=bd, BLOCK_DV=bdv)
    if settings is not None:
        backward = "warps_backward" in settings
        meta["num_warps"] = settings["warps_backward" if backward else "warps"]
        stages = settings["stages_backward" if backward else "stages"]
        if stages:
            meta["num_stages"] = stages
        if backward and TUNING["maxnreg_backward"]:
            meta["maxnreg"] = TUNING["maxnreg_backward"]
    return meta


# Launches (plain functions: other ops' implementations call them too) and custom ops ----------------------------------
def linear_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fmap: int,
    norm: int,
    scale: float,
    eps: float,
    save_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, N, H, Dv] in q's dtype, the float32 state [B*H, BD*BDV + BD + BDV] holding S, z, u)``; with
    ``save_state=False`` (no gradient will be asked for) the state may come back empty (``[0]``)."""
    b, n, h, d = q.shape
    m, dv = k.shape[1], v.shape[-1]
    bd, bdv = _pad_dims(d, dv)
    fused = _use_fused(b * h, bd, bdv, q.device)
    settings = _forward_settings(bd, bdv, fused)
    meta = _meta(q, v, settings)
    out = torch.empty(b, n, h, dv, device=q.device, dtype=q.dtype)
    rows = settings["rows"]
    if fused and b * h and m:
        size = (b * h, bd * bdv + bd + bdv) if save_state else (0,)
        state = torch.empty(size, device=q.device, dtype=torch.float32)
        launch(_fused_kernel, (b * h,),
            q, k, v, state, out, n, m, h, d, dv, scale, 1.0 / m, eps,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            FMAP=fmap, NORM=norm, SAVE_STATE=save_state, BLOCK_N=rows, **meta,
        )  # fmt: skip
        return out, state
    state = _state(k, v, fmap, settings, meta)
    if b * h == 0 or m == 0:
        return out, state
    if n:
        if settings["readout_per_sm"]:
            splits, per = _splits(n, rows, b * h, q.device, per_sm=settings["readout_per_sm"])
        else:
            splits, per = cdiv(n, rows), 1
        launch(_readout_kernel, (splits, b * h),
            q, state, out, n, h, d, dv, scale, 1.0 / m, eps, per, *q.stride(), *out.stride(),
            FMAP=fmap, NORM=norm, BLOCK_N=rows, **meta,
        )  # fmt: skip
    return out, state


def _state(k: torch.Tensor, v: torch.Tensor, fmap: int, settings: dict[str, int], meta: dict) -> torch.Tensor:
    """The float32 state ``[B*H, BD*BDV + BD + BDV]`` (``S``, ``z``, ``u``) of keys ``k`` and values ``v`` by the
    state kernel (key splits meeting by atomic adds)."""
    b, m, h, d = k.shape
    bd, bdv = meta["BLOCK_D"], meta["BLOCK_DV"]
    state = torch.zeros(b * h, bd * bdv + bd + bdv, device=k.device, dtype=torch.float32)
    if b * h and m:
        rows = settings["rows"]
        splits, per = _splits(m, rows, b * h, k.device, per_sm=settings["state_per_sm"])
        launch(_state_kernel, (b * h, splits),
            k, v, state, m, h, d, v.shape[-1], per, *k.stride(), *v.stride(), FMAP=fmap, BLOCK_M=rows, **meta
        )  # fmt: skip
    return state


def linear_state(k: torch.Tensor, v: torch.Tensor, fmap: int) -> torch.Tensor:
    """The state :func:`linear_forward` saves for the backward, alone (for callers that recompute it there instead
    of keeping it: :mod:`visionlin.kernels.triton.focus`)."""
    settings = _forward_settings(*_pad_dims(k.shape[-1], v.shape[-1]), False)
    return _state(k, v, fmap, settings, _meta(k, v, settings))


@torch.library.custom_op("visionlin::linear_attention_fwd", mutates_args=())
def linear_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fmap: int,
    norm: int,
    scale: float,
    eps: float,
    save_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`linear_forward` as a custom op."""
    return linear_forward(q, k, v, fmap, norm, scale, eps, save_state)


@linear_attention_fwd.register_fake
def _(q, k, v, fmap, norm, scale, eps, save_state=True):
    b, n, h, d = q.shape
    bd, bdv = _pad_dims(d, v.shape[-1])
    fused_unsaved = not save_state and _use_fused(b * h, bd, bdv, q.device) and b * h and k.shape[1]
    size = (0,) if fused_unsaved else (b * h, bd * bdv + bd + bdv)
    return q.new_empty(b, n, h, v.shape[-1]), q.new_empty(size, dtype=torch.float32)


def linear_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    state: torch.Tensor,
    g: torch.Tensor,
    fmap: int,
    norm: int,
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`linear_attention_fwd`'s output for its gradient ``g``; ``out``: that output, or
    ``None`` (``divide`` then forms what it needs of it from a product the kernel takes anyway; slower, see
    :func:`_readout_backward_kernel`)."""
    b, n, h, d = q.shape
    m, dv = k.shape[1], v.shape[-1]
    settings = _backward_settings(*_pad_dims(d, dv))
    meta = _meta(q, v, settings)
    dq = torch.empty(b, n, h, d, device=q.device, dtype=q.dtype)
    dk = torch.empty(b, m, h, d, device=k.device, dtype=k.dtype)
    dvv = torch.empty(b, m, h, dv, device=v.device, dtype=v.dtype)
    if b * h == 0 or m == 0:
        return dq.zero_(), dk.zero_(), dvv.zero_()
    grads = torch.zeros_like(state)
    rows = settings["rows_backward"]
    if n:
        splits, per = _splits(n, rows, b * h, q.device, per_sm=settings["backward_per_sm"])
        launch(_readout_backward_kernel, (b * h, splits),
            q, g, out if out is not None else g, state, dq, grads, n, h, d, dv, scale, 1.0 / m, eps, per,
            *q.stride(), *g.stride(), *(out if out is not None else g).stride(), *dq.stride(),
            FMAP=fmap, NORM=norm, HAS_OUT=out is not None, BLOCK_N=rows, **meta,
        )  # fmt: skip
    launch(_state_backward_kernel, (cdiv(m, rows), b * h),
        k, v, state, grads, dk, dvv, m, h, d, dv, scale, 1.0 / m,
        *k.stride(), *v.stride(), *dk.stride(), *dvv.stride(),
        FMAP=fmap, NORM=norm, BLOCK_M=rows, **meta,
    )  # fmt: skip
    return dq, dk, dvv


@torch.library.custom_op("visionlin::linear_attention_bwd", mutates_args=())
def linear_attention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    state: torch.Tensor,
    g: torch.Tensor,
    fmap: int,
    norm: int,
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`linear_backward` as a custom op (``out`` may be ``None``: see :func:`_setup`)."""
    return linear_backward(q, k, v, out, state, g, fmap, norm, scale, eps)


@linear_attention_bwd.register_fake
def _(q, k, v, out, state, g, fmap, norm, scale, eps):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, fmap, norm, scale, eps, _save_state = inputs
    out, state = output
    ctx.mark_non_differentiable(state)
    # The output is kept for the read-out backward at head dims up to 64, where reading it beat forming what the
    # backward needs of it (graph-timed on the H200: 0.366 vs 0.411 ms at 65k tokens, head dim 64); above, forming
    # it was the faster (2.26 vs 1.97 ms at head dim 128, 16k tokens) and the output is not kept (ab_op_*_s30a).
    bd, bdv = _pad_dims(q.shape[-1], v.shape[-1])
    ctx.save_for_backward(q, k, v, out if bd * bdv <= 64 * 64 else None, state)
    ctx.args = (fmap, norm, scale, eps)


def _backward(ctx, g, _g_state):
    q, k, v, out, state = ctx.saved_tensors
    dq, dk, dv = _linear_attention_bwd_call(q, k, v, out, state, g, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


linear_attention_fwd.register_autograd(_backward, setup_context=_setup)
_linear_attention_bwd_call = eager_call(linear_attention_bwd)
_linear_attention_fwd_call = eager_op(linear_attention_fwd, _setup, _backward)


def linear_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "elu",
    normalize: str = "divide",
    scale: float | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The ``"triton"`` backend of :func:`visionlin.kernels.linear_attention` (named feature maps only)."""
    s = _default_scale(normalize, q.shape[-1]) if scale is None else float(scale)
    save = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    out, _ = _linear_attention_fwd_call(
        q, k, v, FEATURE_MAP_IDS[feature_map], NORMALIZATION_IDS[normalize], s, float(eps), save
    )
    return out
