"""Fused block-sparse softmax attention with SLA's linear branch in Triton, forward and backward; the math of
:func:`visionlin.kernels.sparse_linear_attention_reference` and
:func:`visionlin.kernels.block_sparse_attention_reference`.

Pipeline of one call (all on the device, no host round trip):

1. **Block selection** (:func:`select_blocks`, on the device): block means of q and k (``_pool_kernel``, float32,
   shared with the reference's selection), the pooled scores (a float32 einsum), and ``_select_kernel``: per
   query-block row one in-register sort of unique int64 keys (score image above the inverted block index), i.e. the
   very ranking of the stable descending sort :func:`visionlin.kernels.sla_block_map` uses, giving a compact list of
   the ``n_c`` critical key blocks per query block (the LUT, ``[B, H, nqb, n_c]`` int32, ascending) and, for SLA's
   paper variant, the marginal mask ``[B, H, nqb, nkb]`` (ranks ``n_c .. nkb - n_l - 1``); past
   :data:`SELECT_MAX_BLOCKS` key blocks the ranking is ``torch.sort``'s.
2. **Linear-branch states** (torch ops, differentiable): ``h_j = phi(K_j)^T V_j`` and ``z_j = phi(K_j)^T 1`` per
   key block in float32; the paper variant sums them per query block through the marginal mask as one batched GEMM
   (``H_i = sum_{j marginal} h_j``, ``O(nqb nkb D Dv)`` multiply-adds on the tensor cores instead of a gather of
   ``O(#marginal)`` ``D x Dv`` states per query block); the code variant has one state over all keys. Calls that need
   no gradient take ``_states_kernel`` instead: the code variant's state split over keys (the splits summed in a
   fixed order), and for half-precision inputs the paper variant's per-key-block states, written as high / low
   bfloat16 halves that one bfloat16 GEMM of the repeated marginal mask sums with float32 accumulation.
3. **One forward kernel** per (query block, batch x head): FlashAttention-style online softmax over the LUT's key
   blocks only (float32 accumulation, exp2), then, fused, ``phi(Q_i)``, the linear readout
   ``phi(Q_i) H_i / (phi(Q_i) . Z_i + eps)``, the projection ``O_l W^T + b`` (folded into the state once, ``H W^T``,
   for the code variant's shared state) and the sum ``O_s + ...``; it also writes the log-sum-exp and (SLA only)
   ``O_s`` (rounded to the inputs' dtype before the sum) for the backward.
4. **Additional keys** (``additional_keys`` / ``additional_values``, e.g. joint text tokens, :func:`_join_additional`):
   every query's dense softmax over them, ``O_t`` and ``lse_t``, by the same forward kernel with a LUT listing all
   their blocks (``TUNING["additional_keys"] = "kernel"``, the default) or by float32 torch einsums in chunks of query
   rows (``"torch"``; :data:`ADDITIONAL_CHUNK` bounds the ``[B, H, rows, T]`` scores), merged exactly with the
   kernel's softmax part by the log-sum-exps (float32 torch): ``a = sigmoid(lse_s - lse_t)``, softmax part
   ``a O_s + (1 - a) O_t``, so SLA's output is ``out + (1 - a) (O_t - O_s)``. ``O_s`` and the log-sum-exp are
   differentiable outputs of the op for this.

Backward: FlashAttention-2-style kernels over the same LUT: ``dq`` per query block, ``dk`` / ``dv`` per key block over
the inverse LUT (the query blocks that chose it, built on the device from the LUT), with ``delta = rowsum(dO * O_s)``
(``dO`` the gradient of ``out`` plus that of ``O_s``; a gradient on the log-sum-exp shifts ``delta``, see
:func:`sla_bwd_sparse`). The linear branch's read-out gradient (``dq`` through ``phi``, ``dH_i``, ``dZ_i``, ``dW``,
``db``) is one fused kernel by default (``TUNING["fused_readout_bwd"]``: ``_readout_bwd_kernel``, one program per
query block and batch x head; GPU-tested on the H200 at 283ebbe); ``TUNING["fused_readout_bwd"] = False`` runs the
closed-form torch math instead (``O(N D Dv)``, ``_readout_backward``, its reference). ``dH_i`` / ``dZ_i`` reach k and v
through the autograd of step 2.

Head dims are tiled to the next power of two (at least 16) with masked loads, so every head dim up to 128 runs;
64 and 128 waste no lanes. Products run in the inputs' dtype on the tensor cores; float32 operands (float32 inputs,
and the linear read-out always) as three TF32 products (``tf32x3``, error near float32's), in 64 x 64 tiles for
float32 inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import fp32_reference
from ._eager import eager_call, eager_op
from ._launch import cdiv, launch, next_pow2, tile_dim
from .linear import _num_sms

__all__ = ["FMAPS", "block_sparse_attention_triton", "select_blocks", "sparse_linear_attention_triton"]

#: Feature maps the forward kernel applies itself, by code.
FMAPS = {"softmax": 0, "elu": 1, "relu": 2}
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _feature(x, dmask, FMAP: tl.constexpr):
    """``phi`` of float32 rows ``x`` ``[R, BLOCK_D]`` over their first ``D`` (``dmask``) columns; padding -> 0."""
    if FMAP == 0:
        xs = tl.where(dmask[None, :], x, float("-inf"))
        e = tl.exp(xs - tl.max(xs, axis=1)[:, None])
        f = e / tl.sum(e, axis=1)[:, None]
    elif FMAP == 1:
        f = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    else:
        f = tl.maximum(x, 0.0)
    return tl.where(dmask[None, :], f, 0.0)


@triton.jit
def _fdot(a, b, PREC: tl.constexpr):
    """``a @ b`` of float32 tiles with float32 accumulation. ``"bf16x3"``: three bfloat16 tensor-core products of the
    operands' high and low bfloat16 halves (about 16 mantissa bits, float32's exponent range; any operand layout, where
    TF32 tensor-core products want K-major operands); ``"bf16x2"``: two, for a ``b`` exact in bfloat16; else one
    ``tl.dot`` with that input precision."""
    if PREC == "bf16x3":
        a_hi = a.to(tl.bfloat16)
        a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
        b_hi = b.to(tl.bfloat16)
        b_lo = (b - b_hi.to(tl.float32)).to(tl.bfloat16)
        return tl.dot(a_lo, b_hi, tl.dot(a_hi, b_lo, tl.dot(a_hi, b_hi)))
    elif PREC == "bf16x2":
        a_hi = a.to(tl.bfloat16)
        a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
        b16 = b.to(tl.bfloat16)
        return tl.dot(a_lo, b16, tl.dot(a_hi, b16))
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _fwd_kernel(
    Q, K, V, LUT, HI, ZI, W, BIAS, Out, OS, LSE, N, M, H, D, DV, n_c, nqb,
    sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h, so_b, so_n, so_h,
    sh_b, sh_h, sh_i, sz_b, sz_h, sz_i, scale, eps,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, QPB: tl.constexpr,
    KSUB: tl.constexpr, LINEAR: tl.constexpr, HAS_BIAS: tl.constexpr, FMAP: tl.constexpr, PREC: tl.constexpr,
    LIN_PREC: tl.constexpr, HAS_W: tl.constexpr = True,
):  # fmt: skip
    """One tile of ``BLOCK_Q`` queries (``QPB`` tiles per selection block) of one (batch, head): softmax over its
    block's ``n_c`` LUT key blocks, each in ``KSUB`` tiles of ``BLOCK_K`` keys (+ the fused linear branch). Block
    bases are int64 scalars (a tensor may span more than 2^31 elements), offsets inside a tile int32."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    i = tile // QPB  # the selection block
    row0 = tile * BLOCK_Q
    offs_q = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    offs_k = tl.arange(0, BLOCK_K)
    rmask = offs_q < N - row0
    dmask, emask = offs_d < D, offs_e < DV
    q_base = Q + b * sq_b + h * sq_h + row0.to(tl.int64) * sq_n
    q = tl.load(q_base + offs_q[:, None] * sq_n + offs_d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    kt_off = offs_k[None, :] * sk_n + offs_d[:, None]
    v_off = offs_k[:, None] * sv_n + offs_e[None, :]
    lut = LUT + (bh.to(tl.int64) * nqb + i) * n_c
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_DV], dtype=tl.float32)
    for t in range(n_c * KSUB):
        col0 = tl.load(lut + t // KSUB) * (BLOCK_K * KSUB) + (t % KSUB) * BLOCK_K
        cmask = offs_k < M - col0
        kt = tl.load(k_base + col0.to(tl.int64) * sk_n + kt_off, mask=cmask[None, :] & dmask[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=PREC)
        s = tl.where(cmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + col0.to(tl.int64) * sv_n + v_off, mask=cmask[:, None] & emask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    o_s = acc / l_i[:, None]
    tl.store(LSE + bh.to(tl.int64) * N + row0 + offs_q, m_i + tl.log2(l_i), mask=rmask)
    omask = rmask[:, None] & emask[None, :]
    o_base = b * so_b + h * so_h + row0.to(tl.int64) * so_n
    o_off = offs_q[:, None] * so_n + offs_e[None, :]
    if LINEAR:
        # O_s rounded to its stored dtype first: frees the float32 tile for the read-out (whose sum is rounded to the
        # same dtype anyway) and makes ``out - O_s`` the linear part exactly as the backward sees it.
        o_s = o_s.to(OS.dtype.element_ty)
        tl.store(OS + o_base + o_off, o_s, mask=omask)
        fq = _feature(q.to(tl.float32), dmask, FMAP)
        state = tl.load(HI + b * sh_b + h * sh_h + i * sh_i + offs_d[:, None] * DV + offs_e[None, :],
                        mask=dmask[:, None] & emask[None, :], other=0.0)  # fmt: skip
        z = tl.load(ZI + b * sz_b + h * sz_h + i * sz_i + offs_d, mask=dmask, other=0.0)
        num = _fdot(fq, state, LIN_PREC)
        o_l = num / (tl.sum(fq * z[None, :], axis=1) + eps)[:, None]
        if HAS_W:  # else the state is already H_i W^T (folded by the op)
            # W^T as [BLOCK_DV (in), BLOCK_DV (out)]: W is [Dv (out), Dv (in)], row-major float32.
            wt = tl.load(W + offs_e[None, :] * DV + offs_e[:, None], mask=emask[None, :] & emask[:, None], other=0.0)
            o_l = _fdot(o_l, wt, LIN_PREC)
        if HAS_BIAS:
            o_l += tl.load(BIAS + offs_e, mask=emask, other=0.0)[None, :]
        o_s = o_s.to(tl.float32) + o_l
    tl.store(Out + o_base + o_off, o_s.to(Out.dtype.element_ty), mask=omask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, G, LUT, LSE, DELTA, DQ, N, M, H, D, DV, n_c,
    sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h, sg_b, sg_n, sg_h, scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
    QPB: tl.constexpr, KSUB: tl.constexpr,
):  # fmt: skip
    """``dq`` (float32, ``[B, N, H, D]`` contiguous) of one tile of ``BLOCK_Q`` queries (``QPB`` per selection block)
    over its block's LUT key blocks (``KSUB`` tiles of ``BLOCK_K`` keys each)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    nqb = tl.num_programs(0) // QPB
    i = tile // QPB
    row0 = tile * BLOCK_Q
    offs_q = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    offs_k = tl.arange(0, BLOCK_K)
    rmask = offs_q < N - row0
    dmask, emask = offs_d < D, offs_e < DV
    r0 = row0.to(tl.int64)
    q = tl.load(Q + b * sq_b + h * sq_h + r0 * sq_n + offs_q[:, None] * sq_n + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)  # fmt: skip
    g = tl.load(G + b * sg_b + h * sg_h + r0 * sg_n + offs_q[:, None] * sg_n + offs_e[None, :],
                mask=rmask[:, None] & emask[None, :], other=0.0)  # fmt: skip
    lse = tl.load(LSE + bh.to(tl.int64) * N + row0 + offs_q, mask=rmask, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * N + row0 + offs_q, mask=rmask, other=0.0)
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    k_off = offs_k[:, None] * sk_n + offs_d[None, :]
    vt_off = offs_k[None, :] * sv_n + offs_e[:, None]
    lut = LUT + (bh.to(tl.int64) * nqb + i) * n_c
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for t in range(n_c * KSUB):
        col0 = tl.load(lut + t // KSUB) * (BLOCK_K * KSUB) + (t % KSUB) * BLOCK_K
        cmask = offs_k < M - col0
        k = tl.load(k_base + col0.to(tl.int64) * sk_n + k_off, mask=cmask[:, None] & dmask[None, :], other=0.0)
        vt = tl.load(v_base + col0.to(tl.int64) * sv_n + vt_off, mask=cmask[None, :] & emask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        dp = tl.dot(g, vt, input_precision=PREC)
        p = tl.where(cmask[None, :], tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    dq_ptr = DQ + ((b * N + r0) * H + h) * D + offs_q[:, None] * (H * D) + offs_d[None, :]
    tl.store(dq_ptr, dq * scale, mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, G, LUT_T, CNT, LSE, DELTA, DK, DVv, N, M, H, D, DV, nqb, nkb,
    sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h, sg_b, sg_n, sg_h, scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
    KPB: tl.constexpr, QSUB: tl.constexpr,
):  # fmt: skip
    """``dk``, ``dv`` (inputs' dtype, ``[B, M, H, D|Dv]`` contiguous) of one key block over the query blocks that
    chose it (the inverse LUT: ``CNT[bh, j]`` entries of ``LUT_T[bh, j, :]``), in tiles of ``BLOCK_K`` keys (``KPB``
    per selection block) and ``BLOCK_Q`` queries (``QSUB`` per query block)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    j = tile // KPB
    col0 = tile * BLOCK_K
    c0 = col0.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    offs_q = tl.arange(0, BLOCK_Q)
    cmask = offs_k < M - col0
    dmask, emask = offs_d < D, offs_e < DV
    kmask = cmask[:, None] & dmask[None, :]
    vmask = cmask[:, None] & emask[None, :]
    k = tl.load(K + b * sk_b + h * sk_h + c0 * sk_n + offs_k[:, None] * sk_n + offs_d[None, :], mask=kmask, other=0.0)
    v = tl.load(V + b * sv_b + h * sv_h + c0 * sv_n + offs_k[:, None] * sv_n + offs_e[None, :], mask=vmask, other=0.0)
    q_base = Q + b * sq_b + h * sq_h
    g_base = G + b * sg_b + h * sg_h
    qt_off = offs_q[None, :] * sq_n + offs_d[:, None]
    g_off = offs_q[:, None] * sg_n + offs_e[None, :]
    lut = LUT_T + (bh.to(tl.int64) * nkb + j) * nqb
    cnt = tl.load(CNT + bh.to(tl.int64) * nkb + j)
    qk_scale = scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_K, BLOCK_DV], dtype=tl.float32)
    for t in range(cnt * QSUB):
        row0 = tl.load(lut + t // QSUB) * (BLOCK_Q * QSUB) + (t % QSUB) * BLOCK_Q
        rmask = offs_q < N - row0
        r0 = row0.to(tl.int64)
        qt = tl.load(q_base + r0 * sq_n + qt_off, mask=rmask[None, :] & dmask[:, None], other=0.0)
        g = tl.load(g_base + r0 * sg_n + g_off, mask=rmask[:, None] & emask[None, :], other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * N + row0 + offs_q, mask=rmask, other=float("inf"))
        delta = tl.load(DELTA + bh.to(tl.int64) * N + row0 + offs_q, mask=rmask, other=0.0)
        st = tl.dot(k, qt, input_precision=PREC)
        pt = tl.exp2(st * qk_scale - lse[None, :])  # [BLOCK_K, BLOCK_Q]; 0 for rows past N
        dv += tl.dot(pt.to(g.dtype), g, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(g), input_precision=PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PREC)
    dk_ptr = DK + ((b * M + c0) * H + h) * D + offs_k[:, None] * (H * D) + offs_d[None, :]
    tl.store(dk_ptr, (dk * scale).to(DK.dtype.element_ty), mask=kmask)
    dv_ptr = DVv + ((b * M + c0) * H + h) * DV + offs_k[:, None] * (H * DV) + offs_e[None, :]
    tl.store(dv_ptr, dv.to(DVv.dtype.element_ty), mask=vmask)


@triton.jit
def _readout_bwd_kernel(
    Q, G, HI, ZI, W, DQ, DHI, DZI, DW, N, H, D, DV, nqb,
    sq_b, sq_n, sq_h, sg_b, sg_n, sg_h, sh_b, sh_h, sh_i, sz_b, sz_h, sz_i, eps,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, QSUB: tl.constexpr, FMAP: tl.constexpr,
    LIN_PREC: tl.constexpr, DW_PER_TILE: tl.constexpr,
):  # fmt: skip
    """The linear read-out's backward of one query block (``QSUB`` tiles of ``BLOCK_Q`` rows) of one (batch, head):
    ``dq`` through ``phi`` (float32, ``[B, N, H, D]`` contiguous), this block's ``dH_i`` / ``dZ_i`` (float32,
    ``[B*H, nqb, D, Dv]`` / ``[B*H, nqb, D]``) and its share of ``dW`` (float32 atomic add into ``[Dv, Dv]``)."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    offs_q = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    dmask, emask = offs_d < D, offs_e < DV
    hmask = dmask[:, None] & emask[None, :]
    wmask = emask[:, None] & emask[None, :]
    h_ptr = HI + b * sh_b + h * sh_h + i * sh_i + offs_d[:, None] * DV + offs_e[None, :]
    z = tl.load(ZI + b * sz_b + h * sz_h + i * sz_i + offs_d, mask=dmask, other=0.0)
    dhi = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    dzi = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw = tl.zeros([BLOCK_DV, BLOCK_DV], dtype=tl.float32)
    for t in range(QSUB):
        row0 = (i * QSUB + t) * BLOCK_Q
        r0 = row0.to(tl.int64)
        rmask = offs_q < N - row0
        qmask = rmask[:, None] & dmask[None, :]
        q = tl.load(Q + b * sq_b + h * sq_h + r0 * sq_n + offs_q[:, None] * sq_n + offs_d[None, :], mask=qmask,
                    other=0.0).to(tl.float32)  # fmt: skip
        g = tl.load(G + b * sg_b + h * sg_h + r0 * sg_n + offs_q[:, None] * sg_n + offs_e[None, :],
                    mask=rmask[:, None] & emask[None, :], other=0.0).to(tl.float32)  # fmt: skip
        fq = tl.where(rmask[:, None], _feature(q, dmask, FMAP), 0.0)  # rows past N: phi 0, as the padded reference
        state = tl.load(h_ptr, mask=hmask, other=0.0)
        den = tl.sum(fq * z[None, :], axis=1) + eps
        o_l = tl.dot(fq, state, input_precision=LIN_PREC) / den[:, None]
        # W is [Dv (out), Dv (in)], row-major float32: dO_l = g W, dW += g^T O_l.
        w = tl.load(W + offs_e[:, None] * DV + offs_e[None, :], mask=wmask, other=0.0)
        if DW_PER_TILE:  # no [Dv, Dv] accumulator held across tiles (wide head dims)
            dw_t = tl.dot(tl.trans(g), o_l, input_precision=LIN_PREC)
            tl.atomic_add(DW + offs_e[:, None] * DV + offs_e[None, :], dw_t, mask=wmask)
        else:
            dw += tl.dot(tl.trans(g), o_l, input_precision=LIN_PREC)
        dol = tl.dot(g, w, input_precision=LIN_PREC)
        dnum = dol / den[:, None]
        dden = -tl.sum(dol * o_l, axis=1) / den
        dfq = tl.dot(dnum, tl.trans(state), input_precision=LIN_PREC) + dden[:, None] * z[None, :]
        dhi += tl.dot(tl.trans(fq), dnum, input_precision=LIN_PREC)
        dzi += tl.sum(fq * dden[:, None], axis=0)
        if FMAP == 0:
            dq = fq * (dfq - tl.sum(dfq * fq, axis=1)[:, None])
        elif FMAP == 1:
            dq = tl.where(q > 0, dfq, dfq * tl.exp(tl.minimum(q, 0.0)))
        else:
            dq = tl.where(q > 0, dfq, 0.0)
        dq_ptr = DQ + ((b * N + r0) * H + h) * D + offs_q[:, None] * (H * D) + offs_d[None, :]
        tl.store(dq_ptr, dq, mask=qmask)
    blk = bh.to(tl.int64) * nqb + i
    tl.store(DHI + blk * D * DV + offs_d[:, None] * DV + offs_e[None, :], dhi, mask=hmask)
    tl.store(DZI + blk * D + offs_d, dzi, mask=dmask)
    if not DW_PER_TILE:
        tl.atomic_add(DW + offs_e[:, None] * DV + offs_e[None, :], dw, mask=wmask)


@triton.jit
def _states_kernel(
    K, V, HS, ZS, M, H, D, DV, rows, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h, s_split, s_bh, z_split, z_bh, lo_off,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, FMAP: tl.constexpr, PREC: tl.constexpr,
    SPLIT_OUT: tl.constexpr = False,
):  # fmt: skip
    """One split's share of a linear state: ``sum phi(k) v^T`` and ``sum phi(k)`` over keys ``[split * rows,
    (split + 1) * rows)`` of one (batch, head), float32, into state ``split * s_split + bh * s_bh`` of ``HS`` (``D x
    Dv`` each) and ``split * z_split + bh * z_bh`` of ``ZS`` (``D`` each). The code variant's splits are summed by the
    caller, in a fixed order; the paper variant's splits are its key blocks. ``SPLIT_OUT``: ``HS`` is bfloat16 and
    takes the state's high half there and its low half ``lo_off`` elements further (``hi + lo`` carries about 16
    mantissa bits)."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    dmask, emask = offs_d < D, offs_e < DV
    start = split * rows
    end = tl.minimum(start + rows, M)
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    acc = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    z = tl.zeros([BLOCK_D], dtype=tl.float32)
    start64 = start.to(tl.int64)
    for t in range(0, tl.cdiv(end - start, BLOCK_N)):
        rmask = offs_n < end - start - t * BLOCK_N
        r = start64 + t * BLOCK_N
        kx = tl.load(k_base + r * sk_n + offs_n[:, None] * sk_n + offs_d[None, :], mask=rmask[:, None] & dmask[None, :],
                     other=0.0).to(tl.float32)  # fmt: skip
        fk = tl.where(rmask[:, None], _feature(kx, dmask, FMAP), 0.0)
        vx = tl.load(v_base + r * sv_n + offs_n[:, None] * sv_n + offs_e[None, :], mask=rmask[:, None] & emask[None, :],
                     other=0.0).to(tl.float32)  # fmt: skip
        acc += _fdot(tl.trans(fk), vx, PREC)
        z += tl.sum(fk, axis=0)
    out = split.to(tl.int64) * s_split + bh.to(tl.int64) * s_bh
    h_ptr = HS + out * D * DV + offs_d[:, None] * DV + offs_e[None, :]
    hmask = dmask[:, None] & emask[None, :]
    if SPLIT_OUT:
        hi = acc.to(tl.bfloat16)
        tl.store(h_ptr, hi, mask=hmask)
        tl.store(h_ptr + lo_off, (acc - hi.to(tl.float32)).to(tl.bfloat16), mask=hmask)
    else:
        tl.store(h_ptr, acc, mask=hmask)
    tl.store(ZS + (split.to(tl.int64) * z_split + bh.to(tl.int64) * z_bh) * D + offs_d, z, mask=dmask)


#: Keys per program of the code variant's state kernel at least (``_states_kernel``; fewer, longer splits beyond
#: about two programs per SM).
STATES_MIN_ROWS = 512


#: The state kernel's keys per tile and launch options by the inputs' dtype (measured on the H200, N = 32,760, 12 heads,
#: head dim 128, bf16: 0.27 ms with 128-key tiles in 8 warps and 3 stages against 0.36 ms for 64-key tiles in 2
#: stages, which spill nothing where these spill 136 bytes at head dim 128); other dtypes take the 64-key tiles (the
#: 128-key ones with three stages need more shared memory than an SM has for float16 / float32 inputs).
STATES_TILES = {torch.bfloat16: (128, {"num_warps": 8, "num_stages": 3})}
STATES_DEFAULT_TILES = (64, {"num_warps": 8, "num_stages": 2})
#: The state kernel's products by the values' dtype: bfloat16 values are exact in bfloat16 (two products of phi(k)'s
#: halves), float16 ones are split too; float32 inputs (and Triton's interpreter, whose bfloat16 products are wrong)
#: take ``tf32x3``.
_STATES_PREC = {torch.bfloat16: "bf16x2", torch.float16: "bf16x3"}


@torch.library.custom_op("visionlin::sla_states", mutates_args=())
def sla_states(k: torch.Tensor, v: torch.Tensor, fmap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The code variant's one state ``(H [B, H, 1, D, Dv], Z [B, H, 1, D])``, float32, of keys ``[B, M, H, D]``:
    :func:`linear_states` without ``marginal`` in one kernel (no float32 copy of k / v, no ``phi(k)`` tensor), for
    calls that need no gradient. The products are TF32 (``phi(k)``'s 10-bit mantissa, half-precision values exact) for
    half inputs, ``tf32x3`` for float32 inputs."""
    b, m, h, d = k.shape
    dv = v.shape[-1]
    sms = _num_sms(k.device)
    block_n, opts = STATES_TILES.get(k.dtype, STATES_DEFAULT_TILES)
    splits = max(1, min(cdiv(m, STATES_MIN_ROWS), cdiv(2 * sms, max(1, b * h))))
    rows = cdiv(cdiv(m, splits), block_n) * block_n  # a multiple of the tile
    splits = max(1, cdiv(m, rows))
    hs = torch.empty(splits, b * h, d, dv, device=k.device, dtype=torch.float32)
    zs = torch.empty(splits, b * h, d, device=k.device, dtype=torch.float32)
    _launch_states(k, v, hs, zs, fmap, rows, splits, (b * h, 1), (b * h, 1), block_n, opts, split_out=False)
    return hs.sum(dim=0).view(b, h, 1, d, dv), zs.sum(dim=0).view(b, h, 1, d)


def _launch_states(k, v, hs, zs, fmap, rows, splits, h_strides, z_strides, block_n, opts, split_out):
    """``_states_kernel`` over ``splits`` splits of ``rows`` keys; ``h_strides`` / ``z_strides``: the (split, batch x
    head) strides of the outputs in states."""
    b, m, h, d = k.shape
    dv = v.shape[-1]
    launch(_states_kernel, (splits, b * h), k, v, hs, zs, m, h, d, dv, rows, *k.stride()[:3], *v.stride()[:3],
        *h_strides, *z_strides, splits * d * dv, BLOCK_N=block_n, BLOCK_D=_block(d), BLOCK_DV=_block(dv), FMAP=fmap,
        PREC=_STATES_PREC.get(v.dtype, "tf32x3") if k.is_cuda else "tf32x3", SPLIT_OUT=split_out, **opts,
    )  # fmt: skip


@sla_states.register_fake
def _(k, v, fmap):
    b, _, h, d = k.shape
    return k.new_empty(b, h, 1, d, v.shape[-1], dtype=torch.float32), k.new_empty(b, h, 1, d, dtype=torch.float32)


_states = eager_call(sla_states)


def block_states_config(block: int, dtype: torch.dtype) -> tuple[int, dict]:
    """``(keys per tile, launch options)`` of the per-key-block states: the state kernel's default tiles (64 keys, at
    most the block), whatever the dtype: with the high / low stores, bfloat16's 128-key tiles spill 140 bytes per
    thread in three stages and 224 in one (sm_90 compile test)."""
    tile, opts = STATES_DEFAULT_TILES
    return min(tile, tile_dim(block)), dict(opts)


@torch.library.custom_op("visionlin::sla_block_states", mutates_args=())
def sla_block_states(k: torch.Tensor, v: torch.Tensor, fmap: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper variant's per-key-block states for calls that need no gradient, by ``_states_kernel`` with one
    split per key block of ``block`` keys: ``(h [B H, 2 nkb, D Dv] bfloat16, z [B, H, nkb, D] float32)``, ``h``'s
    rows ``j`` and ``nkb + j`` the high and low bfloat16 halves of ``phi(K_j)^T V_j`` (float32 sums of the kernel's
    products: bf16x2 for bfloat16 inputs, bf16x3 for float16, tf32x3 for float32), so that one bfloat16 GEMM of the
    marginal mask repeated twice, ``[M, M] @ h``, sums them per query block with float32 accumulation."""
    b, m, h, d = k.shape
    dv = v.shape[-1]
    nkb = cdiv(m, block)
    block_n, opts = block_states_config(block, k.dtype)
    hs = torch.empty(b * h, 2 * nkb, d * dv, device=k.device, dtype=torch.bfloat16)
    zs = torch.empty(b, h, nkb, d, device=k.device, dtype=torch.float32)
    _launch_states(k, v, hs, zs, fmap, block, nkb, (1, 2 * nkb), (1, nkb), block_n, opts, split_out=True)
    return hs, zs


@sla_block_states.register_fake
def _(k, v, fmap, block):
    b, m, h, d = k.shape
    nkb = -(-m // block)
    return (k.new_empty(b * h, 2 * nkb, d * v.shape[-1], dtype=torch.bfloat16),
            k.new_empty(b, h, nkb, d, dtype=torch.float32))  # fmt: skip


_block_states = eager_call(sla_block_states)


# Launch helpers -------------------------------------------------------------------------------------------------------
def _block(d: int) -> int:
    return tile_dim(d)


#: Rows / keys of the smaller tiles (float32 inputs; dk / dv; the SLA forward at head dims above 64).
TILE = 64


def _precisions(fp32: bool) -> dict:
    """``PREC``: products of float32 operands in float32 inputs' kernels, as three TF32 tensor-core products
    (``tf32x3``: error near float32's; IEEE products run on the FMA units and spill); half-precision operands ignore
    it. ``LIN_PREC``: the linear read-out's float32 products, ``tf32x3`` for float32 inputs, one TF32 product for half
    inputs (its error stays below their rounding, and ``tf32x3`` spills at head dim 128)."""
    return {"PREC": "tf32x3", "LIN_PREC": "tf32x3" if fp32 else "tf32"}


def _launch(block_q: int, block_k: int, d: int, dv: int, fp32: bool, tile_q: int, tile_k: int) -> dict:
    """Tile constexprs and launch options shared by the kernels."""
    wide = max(tile_q, tile_k, _block(d), _block(dv)) >= 128
    return {
        "BLOCK_Q": tile_q, "BLOCK_K": tile_k, "BLOCK_D": _block(d), "BLOCK_DV": _block(dv), "PREC": "tf32x3",
        "num_warps": 8 if (wide or (fp32 and max(d, dv) > 64)) else 4,
        # float32 tiles take twice the shared memory: one stage (two exceed the 227 KB at head dim 128)
        "num_stages": 1 if fp32 else (2 if wide else 3),
    }  # fmt: skip


def fwd_config(block_q: int, block_k: int, d: int, dv: int, fp32: bool, linear: bool) -> dict:
    """The forward kernel's tiles: 64 x 64 for float32 inputs; for half inputs at head dims above 64, 64 x 64 tiles in
    4 warps with 3 stages (measured on the H200 at N = 32,760, head dim 128, 95% sparsity: 1.0 ms against 1.26 ms for
    128 x 64 in 8 warps with 2 stages, and 1.6 ms against 2.8 ms with the linear read-out,
    ``benchmarks/results/h200/sla_tiles_*.json``); else the selection blocks."""
    wide = max(_block(d), _block(dv)) >= 128
    if fp32 or wide:
        tq, tk = min(TILE, block_q), min(TILE, block_k)
    else:
        tq, tk = block_q, block_k
    cfg = _launch(block_q, block_k, d, dv, fp32, tq, tk)
    if wide and not fp32:
        cfg.update(num_warps=4, num_stages=3)
    return {**cfg, "QPB": block_q // tq, "KSUB": block_k // tk, "LIN_PREC": _precisions(fp32)["LIN_PREC"]}


def dq_config(block_q: int, block_k: int, d: int, dv: int, fp32: bool) -> dict:
    """The dq kernel's tiles: the selection blocks, 64 x 64 for float32 inputs."""
    tq, tk = (min(TILE, block_q), min(TILE, block_k)) if fp32 else (block_q, block_k)
    return {**_launch(block_q, block_k, d, dv, fp32, tq, tk), "QPB": block_q // tq, "KSUB": block_k // tk}


def dkdv_config(block_q: int, block_k: int, d: int, dv: int, fp32: bool) -> dict:
    """The dk / dv kernel's tiles: 64 x 64 whatever the selection blocks (a 128-row tile's four float32 accumulators
    spill)."""
    tq, tk = min(TILE, block_q), min(TILE, block_k)
    return {**_launch(block_q, block_k, d, dv, fp32, tq, tk), "KPB": block_k // tk, "QSUB": block_q // tq}


def readout_bwd_config(block_q: int, d: int, dv: int, fp32: bool) -> dict:
    """The fused read-out backward's tiles: 32-row tiles in 8 warps (no spills at head dim 64); at head dims above 64,
    16-row tiles in 16 warps with ``dW`` added per tile (the resident ``[D, Dv]`` / ``[Dv, Dv]`` float32 tiles still
    spill there: ``tests/test_kernels_sm90_compile.py``'s allowance); ``LIN_PREC`` as the forward's read-out."""
    wide = max(_block(d), _block(dv)) >= 128
    tq = min(block_q, 16 if wide else 32)
    return {
        "BLOCK_Q": tq, "BLOCK_D": _block(d), "BLOCK_DV": _block(dv), "QSUB": block_q // tq, "DW_PER_TILE": wide,
        "LIN_PREC": _precisions(fp32)["LIN_PREC"], "num_warps": 16 if wide else 8, "num_stages": 1,
    }  # fmt: skip


@triton.jit
def _pool_kernel(X, OUT, L, H, D, block, sx_b, sx_n, sx_h, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """The float32 mean of tokens ``[i * block, min((i + 1) * block, L))`` of ``X`` ``[B, L, H, D]`` (unit stride
    over D) for ``BLOCK_C`` of its ``H * D`` columns, into ``OUT`` ``[B, H, nb, D]``; the tokens are summed in a fixed
    order (``BLOCK_T`` rows at a time)."""
    i = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < H * D
    col_off = (cols // D).to(tl.int64) * sx_h + cols % D
    t0 = i * block
    cnt = tl.minimum(block, L - t0)
    offs_t = tl.arange(0, BLOCK_T)
    base = X + b * sx_b + t0.to(tl.int64) * sx_n
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(0, tl.cdiv(cnt, BLOCK_T)):
        rows = t * BLOCK_T + offs_t
        x = tl.load(base + rows[:, None].to(tl.int64) * sx_n + col_off[None, :],
                    mask=(rows < cnt)[:, None] & cmask[None, :], other=0.0)  # fmt: skip
        acc += tl.sum(x.to(tl.float32), axis=0)
    nb = tl.num_programs(0)
    out = ((b * H + cols // D) * nb + i) * D + cols % D  # [B, H, nb, D]: the scores' bmm reads it as it is
    tl.store(OUT + out, acc / cnt, mask=cmask)


@torch.library.custom_op("visionlin::sla_pool", mutates_args=())
def sla_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Block means of ``x`` ``[B, L, H, D]`` (``L >= 1``, unit stride over D) in float32, contiguous ``[B, H,
    ceil(L / block), D]`` (``_pool_kernel``; the last block averaged over its real tokens)."""
    b, length, h, d = x.shape
    nb = cdiv(length, block)
    out = torch.empty(b, h, nb, d, device=x.device, dtype=torch.float32)
    width = min(512, next_pow2(h * d))
    launch(_pool_kernel, (nb, b, cdiv(h * d, width)), x, out, length, h, d, block, *x.stride()[:3],
           BLOCK_T=16, BLOCK_C=width, num_warps=4)  # fmt: skip
    return out


@sla_pool.register_fake
def _(x, block):
    b, length, h, d = x.shape
    return x.new_empty(b, h, -(-length // block), d, dtype=torch.float32)


block_mean = eager_call(sla_pool)


@triton.jit
def _select_kernel(
    S, LUT, MARG, n_rows, nkb, n_c, n_hi, ROWS: tl.constexpr, BLOCK_J: tl.constexpr, MARGINAL: tl.constexpr
):  # fmt: skip
    """Block selection of ``ROWS`` query-block rows of the float32 pooled scores ``S`` ``[n_rows, nkb]``: the
    ranking of a stable descending sort (ties to the lower block index, NaN first), as one sort of unique int64 keys
    (the score's order-preserving int32 image above the inverted column index). Writes the row's ``n_c`` best key
    blocks in ascending order to ``LUT`` ``[n_rows, n_c]`` and, with ``MARGINAL``, ``1.0`` at ranks
    ``n_c .. n_hi - 1`` (else ``0.0``) to ``MARG`` ``[n_rows, nkb]``."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_J)
    rmask = rows < n_rows
    cmask = cols < nkb
    r64 = rows.to(tl.int64)
    x = tl.load(S + r64[:, None] * nkb + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=float("-inf"))
    bits = x.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order as int32 order (-inf below every finite)
    ordered = tl.where(x != x, 0x7FFFFFFF, ordered)  # NaN above everything, as torch.sort ranks it
    key = (ordered.to(tl.int64) << 32) | (BLOCK_J - 1 - cols)[None, :].to(tl.int64)
    ranked = tl.sort(key, dim=1, descending=True)
    # The n_c-th best key, picked by a sum with one nonzero term (exact in int64; no sentinel: keys span the whole
    # int64 range, and a max against one once cut rows whose n_c-th score was below -2 short, leaving LUT slots unset).
    thr = tl.sum(tl.where(cols[None, :] == n_c - 1, ranked, 0), axis=1)
    crit = (key >= thr[:, None]) & cmask[None, :]
    pos = tl.cumsum(crit.to(tl.int32), axis=1) - 1  # ascending block order within the row
    tl.store(LUT + r64[:, None] * n_c + pos, cols[None, :] + tl.zeros([ROWS, BLOCK_J], dtype=tl.int32),
             mask=crit & rmask[:, None])  # fmt: skip
    if MARGINAL:
        low = tl.sum(tl.where(cols[None, :] == n_hi - 1, ranked, 0), axis=1)
        marg = (key >= low[:, None]) & (key < thr[:, None])
        tl.store(MARG + r64[:, None] * nkb + cols[None, :], marg.to(tl.float32), mask=rmask[:, None] & cmask[None, :])


#: Key blocks per row up to which :func:`select_blocks` ranks in ``_select_kernel`` (one in-register sort per row),
#: above it by ``torch.sort``.
SELECT_MAX_BLOCKS = 4096


@torch.library.custom_op("visionlin::sla_select", mutates_args=())
def sla_select(scores: torch.Tensor, n_c: int, n_hi: int, marginal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``_select_kernel`` over float32 pooled scores ``[B, H, nqb, nkb]``: ``(LUT [B, H, nqb, n_c] int32, marginal
    mask [B, H, nqb, nkb] float32, or an empty tensor without ``marginal``)``."""
    b, h, nqb, nkb = scores.shape
    scores = scores.contiguous()
    lut = torch.empty(b, h, nqb, n_c, device=scores.device, dtype=torch.int32)
    mask = torch.empty(scores.shape if marginal else (0,), device=scores.device, dtype=torch.float32)
    width = next_pow2(nkb)
    rows = max(1, min(16, 2048 // width))
    warps = 4 if width <= 1024 else 8
    launch(_select_kernel, (cdiv(b * h * nqb, rows),), scores, lut, mask if marginal else lut, b * h * nqb,
           nkb, n_c, n_hi, ROWS=rows, BLOCK_J=width, MARGINAL=marginal, num_warps=warps)  # fmt: skip
    return lut, mask


@sla_select.register_fake
def _(scores, n_c, n_hi, marginal):
    b, h, nqb, _ = scores.shape
    mask = scores.new_empty(scores.shape if marginal else (0,), dtype=torch.float32)
    return scores.new_empty(b, h, nqb, n_c, dtype=torch.int32), mask


_select = eager_call(sla_select)


def select_blocks(
    q: torch.Tensor, k: torch.Tensor, topk: float, k_low: float, block_q: int, block_k: int, marginal: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LUT of critical key blocks ``[B, H, nqb, n_c]`` int32 (ascending per row) and, with ``marginal``, the
    float32 marginal mask ``[B, H, nqb, nkb]``; device-only ops, the ranking of ``sla_block_map`` (the same pooled
    scores, ranked by ``_select_kernel`` on CUDA or by the stable sort)."""
    from ..sparse_linear import _block_scores, sla_block_counts

    scores = _block_scores(q, k, block_q, block_k)  # [B, H, nqb, nkb]
    b, h, nqb, nkb = scores.shape
    n_c, n_l = sla_block_counts(nkb, topk, k_low)
    if q.is_cuda and scores.dtype == torch.float32 and next_pow2(nkb) <= SELECT_MAX_BLOCKS and nqb:
        lut, mask = _select(scores, n_c, nkb - n_l, marginal)
        return lut, (mask if marginal else None)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # best first
    lut = order[..., :n_c].sort(dim=-1).values.to(torch.int32).contiguous()
    if not marginal:
        return lut, None
    rank_marginal = torch.zeros(nkb, dtype=torch.float32, device=q.device)
    rank_marginal[n_c : nkb - n_l] = 1.0
    mask = torch.empty(order.shape, dtype=torch.float32, device=q.device)
    mask.scatter_(-1, order, rank_marginal.expand(order.shape).contiguous())
    return lut, mask


#: Whether this torch's bmm has the ``out_dtype`` overload (half inputs, float32 result; CUDA).
_BMM_OUT_DTYPE = "dtype" in torch.ops.aten.bmm.overloads()


def _bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of bfloat16 batches with float32 accumulation and a float32 result (``torch.bmm(...,
    out_dtype=torch.float32)`` on CUDA; elsewhere, or without that overload, a float32 bmm of the same values). No
    try / except and no state: traceable by ``torch.compile(fullgraph=True)``."""
    if a.is_cuda and _BMM_OUT_DTYPE:
        return torch.bmm(a, b, out_dtype=torch.float32)
    with fp32_reference(a.device):
        return torch.bmm(a.float(), b.float())


def _phi(x: torch.Tensor, fmap: str) -> torch.Tensor:
    from ..sparse_linear import SLA_FEATURE_MAPS

    return SLA_FEATURE_MAPS[fmap](x)


def linear_states(
    k: torch.Tensor, v: torch.Tensor, marginal: torch.Tensor | None, block_k: int, fmap: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H_i [B, H, nqb|1, D, Dv], Z_i [B, H, nqb|1, D])`` in float32 (differentiable torch ops): per query block
    over its marginal key blocks (``marginal`` given), else one state over all keys. Calls that need no gradient
    take the state kernel: the code variant's one state (:func:`sla_states`) and, for half-precision inputs, the paper
    variant's per-key-block states (:func:`sla_block_states`) summed through the marginal mask by one bfloat16 GEMM
    with float32 accumulation over their high and low halves (the float32 route: per-block states in float32, then a
    float32 GEMM of ``nqb nkb D Dv`` multiply-adds, 2.8 ms at Wan2.1's shape on the H200)."""
    with fp32_reference(k.device):  # float32 states under autocast too (its matmuls would round them to half)
        return _linear_states(k, v, marginal, block_k, fmap)


def _linear_states(k, v, marginal, block_k, fmap):
    b, m, h, d = k.shape
    dv = v.shape[-1]
    no_grad = m and not (torch.is_grad_enabled() and (k.requires_grad or v.requires_grad))
    if marginal is None and no_grad:
        return _states(k, v, FMAPS[fmap])
    if marginal is not None and no_grad and k.dtype in (torch.float16, torch.bfloat16):
        hs, zj = _block_states(k, v, FMAPS[fmap], block_k)  # [B H, 2 nkb, D Dv] bfloat16 (hi; lo), [B, H, nkb, D]
        nqb, nkb = marginal.shape[2], marginal.shape[3]
        m2 = marginal.reshape(b * h, nqb, nkb).to(torch.bfloat16).repeat(1, 1, 2)  # [M, M]: 0 / 1, exact
        return _bmm_f32(m2, hs).view(b, h, nqb, d, dv), marginal @ zj
    fk, vf = _phi(k.float(), fmap), v.float()
    if marginal is None:
        state = torch.einsum("bmhd,bmhe->bhde", fk, vf)
        return state.unsqueeze(2).contiguous(), fk.sum(dim=1).unsqueeze(2).contiguous()
    nkb = -(-m // block_k)
    pad = nkb * block_k - m
    fkb = torch.nn.functional.pad(fk, (0, 0, 0, 0, 0, pad)).view(b, nkb, block_k, h, d)  # padded keys: phi rows 0
    vb = torch.nn.functional.pad(vf, (0, 0, 0, 0, 0, pad)).view(b, nkb, block_k, h, dv)
    hj = torch.einsum("bjthd,bjthe->bhjde", fkb, vb).reshape(b, h, nkb, d * dv)  # h_j = phi(K_j)^T V_j
    zj = fkb.sum(dim=2).transpose(1, 2)  # [B, H, nkb, D]
    nqb = marginal.shape[2]
    return (marginal @ hj).view(b, h, nqb, d, dv), marginal @ zj


@torch.library.custom_op("visionlin::sla_fwd", mutates_args=())
def sla_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    hi: torch.Tensor | None,
    zi: torch.Tensor | None,
    w: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    eps: float,
    block_q: int,
    block_k: int,
    fmap: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out [B, N, H, Dv], O_s (SLA; else an empty tensor), log2-sum-exp [B, H, N] float32)``."""
    b, n, h, d = q.shape
    m, dv = k.shape[1], v.shape[-1]
    linear = hi is not None
    out = q.new_empty(b, n, h, dv)
    o_s = torch.empty_like(out) if linear else q.new_empty(0)
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    nqb, n_c = lut.shape[2], lut.shape[3]
    has_w = linear and hi.shape[2] > 1
    if linear:
        if not has_w:
            # One state for every query block (the code variant): fold the projection into it once, H W^T (float32,
            # no TF32), instead of a [rows, Dv] x [Dv, Dv] product per tile.
            with fp32_reference(q.device):
                hi = torch.matmul(hi, w.t()).contiguous()
        hs, zs = hi.stride(), zi.stride()
        sh = (hs[0], hs[1], hs[2] if has_w else 0)
        sz = (zs[0], zs[1], zs[2] if zi.shape[2] > 1 else 0)
    else:
        hi = zi = w = lse  # unused pointers
        sh = sz = (0, 0, 0)
    cfg = fwd_config(block_q, block_k, d, dv, q.dtype == torch.float32, linear)
    if linear and not has_w and q.dtype != torch.float32 and q.is_cuda:
        # The folded read-out's one product as three bfloat16 products (about 16 mantissa bits, more than TF32's 10;
        # 1.25 ms against 1.66 ms for TF32 at N = 32,760, head dim 128). Not in Triton's interpreter (CPU tensors),
        # whose bfloat16 products are wrong.
        cfg["LIN_PREC"] = "bf16x3"
    launch(_fwd_kernel, (nqb * cfg["QPB"], b * h),
        q, k, v, lut, hi, zi, w, lse if bias is None else bias, out, o_s if linear else out, lse,
        n, m, h, d, dv, n_c, nqb, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *sh, *sz,
        scale, eps, LINEAR=linear, HAS_BIAS=bias is not None, FMAP=fmap, HAS_W=has_w, **cfg,
    )  # fmt: skip
    return out, o_s, lse


@sla_fwd.register_fake
def _(q, k, v, lut, hi, zi, w, bias, scale, eps, block_q, block_k, fmap):
    b, n, h, _ = q.shape
    out = q.new_empty(b, n, h, v.shape[-1])
    o_s = torch.empty_like(out) if hi is not None else q.new_empty(0)
    return out, o_s, q.new_empty(b, h, n, dtype=torch.float32)


@torch.library.custom_op("visionlin::sla_bwd_sparse", mutates_args=())
def sla_bwd_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o_s: torch.Tensor,
    lse: torch.Tensor,
    g: torch.Tensor,
    lut: torch.Tensor,
    scale: float,
    block_q: int,
    block_k: int,
    g_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq float32, dk, dv)`` of the softmax branch for the gradient ``g`` of ``O_s`` and (optional) the gradient
    ``g_lse`` ``[B, H, N]`` of the log2-sum-exp ``lse`` the forward returned."""
    b, n, h, d = q.shape
    m, dv = k.shape[1], v.shape[-1]
    nqb, n_c = lut.shape[2], lut.shape[3]
    nkb = -(-m // block_k)
    delta = (g.float() * o_s.float()).sum(dim=-1).transpose(1, 2).contiguous()  # [B, H, N]
    if g_lse is not None:
        # The kernels form dS_ij = P_ij (dP_ij - delta_i) for the natural scores s_ij = scale q_i . k_j. The op returns
        # lse2_i = log2 sum_j exp(s_ij) = log2(e) lse_i (lse_i the natural log-sum-exp), and d lse_i / d s_ij = P_ij,
        # so a gradient g_lse on lse2 adds g_lse_i log2(e) P_ij to dS_ij: the same formula with
        # delta_i - log2(e) g_lse_i. (A gradient on the natural lse_i = ln(2) lse2_i arrives here times ln 2, so it
        # shifts delta by exactly itself.)
        delta = (delta - _LOG2E * g_lse.float()).contiguous()
    # The inverse LUT: per key block, the query blocks whose LUT holds it (first CNT entries), on the device.
    chosen = torch.zeros(b, h, nkb, nqb, dtype=torch.uint8, device=q.device)
    chosen.scatter_(2, lut.transpose(2, 3).long(), 1)
    cnt = chosen.sum(dim=-1, dtype=torch.int32).contiguous()
    lut_t = torch.sort(chosen, dim=-1, descending=True, stable=True).indices.to(torch.int32).contiguous()
    dq = torch.empty(b, n, h, d, device=q.device, dtype=torch.float32)
    dk = torch.empty(b, m, h, d, device=q.device, dtype=k.dtype)
    dvv = torch.empty(b, m, h, dv, device=q.device, dtype=v.dtype)
    fp32 = q.dtype == torch.float32
    cfg = dq_config(block_q, block_k, d, dv, fp32)
    launch(_bwd_dq_kernel, (nqb * cfg["QPB"], b * h),
        q, k, v, g, lut, lse, delta, dq, n, m, h, d, dv, n_c,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *g.stride()[:3], scale, **cfg,
    )  # fmt: skip
    cfg = dkdv_config(block_q, block_k, d, dv, fp32)
    launch(_bwd_dkdv_kernel, (nkb * cfg["KPB"], b * h),
        q, k, v, g, lut_t, cnt, lse, delta, dk, dvv, n, m, h, d, dv, nqb, nkb,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *g.stride()[:3], scale, **cfg,
    )  # fmt: skip
    return dq, dk, dvv


@sla_bwd_sparse.register_fake
def _(q, k, v, o_s, lse, g, lut, scale, block_q, block_k, g_lse=None):
    return torch.empty_like(q, dtype=torch.float32), torch.empty_like(k), torch.empty_like(v)


def _readout_backward(q, hi, zi, w, bias, g, fmap, eps, block_q):
    """Closed-form gradients of ``y = (phi(q) H_i / (phi(q) . Z_i + eps)) W^T + b`` for the output gradient ``g``:
    ``(dq, dH_i, dZ_i, dW, db)`` (float32; ``dH_i`` / ``dZ_i`` summed to ``hi`` / ``zi``'s shapes)."""
    b, n, h, d = q.shape
    dv = g.shape[-1]
    nqb = -(-n // block_q)
    pad = nqb * block_q - n
    qf = q.float()
    fq = _phi(qf, fmap)
    fqb = torch.nn.functional.pad(fq, (0, 0, 0, 0, 0, pad)).view(b, nqb, block_q, h, d).permute(0, 3, 1, 2, 4)
    gb = torch.nn.functional.pad(g.float(), (0, 0, 0, 0, 0, pad)).view(b, nqb, block_q, h, dv).permute(0, 3, 1, 2, 4)
    num = fqb @ hi  # [B, H, nqb, BQ, Dv] (hi broadcasts over nqb for the code variant)
    den = (fqb @ zi.unsqueeze(-1)) + eps  # [B, H, nqb, BQ, 1]
    o_l = num / den
    wf = w.float()
    dw = torch.einsum("bhiqo,bhiqe->oe", gb, o_l)
    db = gb.sum(dim=(0, 1, 2, 3)) if bias is not None else None
    dol = gb @ wf
    dnum = dol / den
    dden = -(dol * o_l).sum(dim=-1, keepdim=True) / den
    dfq = dnum @ hi.transpose(-1, -2) + dden * zi.unsqueeze(-2)
    dhi = fqb.transpose(-1, -2) @ dnum  # [B, H, nqb, D, Dv]
    dzi = (fqb * dden).sum(dim=-2)  # [B, H, nqb, D]
    if hi.shape[2] == 1:
        dhi, dzi = dhi.sum(dim=2, keepdim=True), dzi.sum(dim=2, keepdim=True)
    dfq = dfq.permute(0, 2, 3, 1, 4).reshape(b, nqb * block_q, h, d)[:, :n]
    if fmap == "softmax":
        dq = fq * (dfq - (dfq * fq).sum(dim=-1, keepdim=True))
    elif fmap == "elu":
        dq = torch.where(qf > 0, dfq, dfq * qf.clamp(max=0.0).exp())
    else:
        dq = torch.where(qf > 0, dfq, torch.zeros_like(dfq))
    return dq, dhi, dzi, dw.to(w.dtype), None if db is None else db.to(bias.dtype)


@torch.library.custom_op("visionlin::sla_readout_bwd", mutates_args=())
def sla_readout_bwd(
    q: torch.Tensor,
    g: torch.Tensor,
    hi: torch.Tensor,
    zi: torch.Tensor,
    w: torch.Tensor,
    eps: float,
    block_q: int,
    fmap: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_readout_bwd_kernel`` (a custom op, so that a traced backward sees one opaque node): ``(dq [B, N, H, D],
    dH_i [B, H, nqb, D, Dv], dZ_i [B, H, nqb, D], dW [Dv, Dv])``, float32, per query block even when ``hi`` / ``zi``
    are one state broadcast over the query blocks (``[B, H, 1, ...]``, the code variant)."""
    b, n, h, d = q.shape
    dv = g.shape[-1]
    nqb = -(-n // block_q)
    hs, zs = hi.stride(), zi.stride()
    sh = (hs[0], hs[1], hs[2] if hi.shape[2] > 1 else 0)
    sz = (zs[0], zs[1], zs[2] if zi.shape[2] > 1 else 0)
    dq = torch.empty(b, n, h, d, device=q.device, dtype=torch.float32)
    dhi = torch.empty(b, h, nqb, d, dv, device=q.device, dtype=torch.float32)
    dzi = torch.empty(b, h, nqb, d, device=q.device, dtype=torch.float32)
    dw = torch.zeros(dv, dv, device=q.device, dtype=torch.float32)
    cfg = readout_bwd_config(block_q, d, dv, q.dtype == torch.float32)
    launch(_readout_bwd_kernel, (nqb, b * h),
        q, g, hi, zi, w, dq, dhi, dzi, dw, n, h, d, dv, nqb, *q.stride()[:3], *g.stride()[:3], *sh, *sz, float(eps),
        FMAP=fmap, **cfg,
    )  # fmt: skip
    return dq, dhi, dzi, dw


@sla_readout_bwd.register_fake
def _(q, g, hi, zi, w, eps, block_q, fmap):
    b, n, h, d = q.shape
    dv = g.shape[-1]
    nqb = -(-n // block_q)
    f32 = dict(device=q.device, dtype=torch.float32)
    return (q.new_empty(b, n, h, d, **f32), q.new_empty(b, h, nqb, d, dv, **f32), q.new_empty(b, h, nqb, d, **f32),
            q.new_empty(dv, dv, **f32))  # fmt: skip


_readout_bwd = eager_call(sla_readout_bwd)


def _readout_backward_fused(q, hi, zi, w, bias, g, fmap, eps, block_q):
    """:func:`_readout_backward` in one Triton kernel per (query block, batch x head) (``_readout_bwd_kernel`` through
    :func:`sla_readout_bwd`); the same outputs. ``dW`` sums the programs' shares by float32 atomics (order not fixed);
    ``db`` is ``g``'s sum."""
    dq, dhi, dzi, dw = _readout_bwd(q, g, hi, zi, w, float(eps), block_q, FMAPS[fmap])
    if hi.shape[2] == 1:
        dhi, dzi = dhi.sum(dim=2, keepdim=True), dzi.sum(dim=2, keepdim=True)
    db = None if bias is None else g.float().sum(dim=(0, 1, 2)).to(bias.dtype)
    return dq, dhi, dzi, dw.to(w.dtype), db


#: Switches. ``fused_readout_bwd``: the linear read-out's backward by :func:`_readout_backward_fused` (the default:
#: GPU-tested on the H200 at 283ebbe, 1.5-9% faster forward + backward at N = 32,760) or, when ``False``, by the torch
#: :func:`_readout_backward`. ``additional_keys``: how the dense part over the additional keys runs (step 4 of the
#: module docstring): ``"kernel"`` (the default) or ``"torch"``.
TUNING = {"fused_readout_bwd": True, "additional_keys": "kernel"}
ADDITIONAL_MODES = ("kernel", "torch")


_FMAP_NAMES = {code: name for name, code in FMAPS.items()}


def _setup(ctx, inputs, output):
    q, k, v, lut, hi, zi, w, bias, scale, eps, block_q, block_k, fmap = inputs
    out, o_s, lse = output
    if hi is None:
        ctx.mark_non_differentiable(o_s)  # the empty placeholder (block-sparse: ``out`` is ``O_s``)
    ctx.save_for_backward(q, k, v, lut, hi, zi, w, bias, out if hi is None else o_s, lse)
    ctx.args = (scale, eps, block_q, block_k, fmap)


def _backward(ctx, g, g_os=None, g_lse=None):
    """Gradients of ``(out, O_s, lse)``, each possibly ``None`` (unused; zeros on the dispatcher's path): the softmax
    branch receives ``g + g_os`` (``out = O_s + linear part``), the linear read-out ``g`` alone, and ``g_lse`` shifts
    the softmax backward's ``delta`` (:func:`sla_bwd_sparse`)."""
    q, k, v, lut, hi, zi, w, bias, o_s, lse = ctx.saved_tensors
    scale, eps, block_q, block_k, fmap = ctx.args
    if hi is None:
        g_os = None  # the empty placeholder's
    if g is None and g_os is None and g_lse is None:  # no output was used
        return (None,) * 13
    parts = [t for t in (g, g_os) if t is not None]
    g_soft = (parts[0] + parts[1] if len(parts) == 2 else parts[0]) if parts else torch.zeros_like(o_s)
    g_soft = g_soft.to(o_s.dtype).contiguous()
    dq, dk, dv = _bwd_sparse(q, k, v, o_s, lse, g_soft, lut, scale, block_q, block_k, g_lse)
    dhi = dzi = dw = db = None
    if hi is not None and g is not None:
        readout = _readout_backward_fused if TUNING["fused_readout_bwd"] else _readout_backward
        dq_l, dhi, dzi, dw, db = readout(q, hi, zi, w, bias, g.contiguous(), _FMAP_NAMES[fmap], eps, block_q)
        dq = dq + dq_l
    return dq.to(q.dtype), dk, dv, None, dhi, dzi, dw, db, None, None, None, None, None


sla_fwd.register_autograd(_backward, setup_context=_setup)
# Eager calls on plain tensors skip the dispatcher (``_eager.py``); traced calls see the custom ops.
_fwd = eager_op(sla_fwd, _setup, _backward)
_bwd_sparse = eager_call(sla_bwd_sparse)


#: Float32 elements of one chunk of the additional keys' scores ``[B, H, rows, T]`` (256 MiB): the dense part over the
#: additional keys runs over query rows in chunks of ``max(1, ADDITIONAL_CHUNK // (B H T))`` rows, so it never holds
#: more than about two such tensors in the forward (scores, probabilities) and four in the backward (+ ``dP``,
#: ``dS``), whatever ``N`` (FLUX.1 at 1024 px, ``B H T = 24 x 512``: one chunk of the 4,096 rows).
ADDITIONAL_CHUNK = 2**26


def _chunk_rows(b: int, h: int, t: int, n: int) -> int:
    return max(1, min(n, ADDITIONAL_CHUNK // max(1, b * h * t)))


class _AdditionalAttention(torch.autograd.Function):
    """Softmax attention of every query over the additional keys alone, float32, chunked over queries (the scores
    are recomputed in the backward, never stored): ``(O_t [B, N, H, Dv], lse_t [B, H, N])`` float32, ``lse_t`` the
    natural log-sum-exp of ``s_t = scale q . k_t``."""

    @staticmethod
    def forward(ctx, q, kt, vt, scale):
        b, n, h, _ = q.shape
        ktf, vtf = kt.float(), vt.float()
        o_t = torch.empty(b, n, h, vt.shape[-1], device=q.device, dtype=torch.float32)
        lse_t = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
        with fp32_reference(q.device):  # float32 einsums under autocast too
            rows = _chunk_rows(b, h, kt.shape[1], n)
            for r0 in range(0, n, rows):
                s = torch.einsum("bnhd,bthd->bhnt", q[:, r0 : r0 + rows].float(), ktf) * scale  # [B, H, rows, T]
                lse = s.logsumexp(dim=-1)
                p = (s - lse.unsqueeze(-1)).exp_()
                o_t[:, r0 : r0 + rows] = torch.einsum("bhnt,bthe->bnhe", p, vtf)
                lse_t[:, :, r0 : r0 + rows] = lse
        ctx.save_for_backward(q, kt, vt, o_t, lse_t)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return o_t, lse_t

    @staticmethod
    def backward(ctx, g_o, g_lse):
        q, kt, vt, o_t, lse_t = ctx.saved_tensors
        scale = ctx.scale
        if g_o is None and g_lse is None:
            return None, None, None, None
        b, n, h, _ = q.shape
        ktf, vtf = kt.float(), vt.float()
        dq = torch.empty(q.shape, device=q.device, dtype=torch.float32)
        dkt = torch.zeros(kt.shape, device=q.device, dtype=torch.float32)
        dvt = torch.zeros(vt.shape, device=q.device, dtype=torch.float32)
        with fp32_reference(q.device):  # float32 einsums under autocast too
            rows = _chunk_rows(b, h, kt.shape[1], n)
            for r0 in range(0, n, rows):
                qc = q[:, r0 : r0 + rows].float()
                s = torch.einsum("bnhd,bthd->bhnt", qc, ktf) * scale
                p = (s - lse_t[:, :, r0 : r0 + rows].unsqueeze(-1)).exp_()  # [B, H, rows, T]
                # dS = P (dP - delta + g_lse): the softmax backward plus d lse / d s = P.
                if g_o is None:
                    ds = p * g_lse[:, :, r0 : r0 + rows].float().unsqueeze(-1)
                else:
                    go = g_o[:, r0 : r0 + rows].float()
                    shift = (go * o_t[:, r0 : r0 + rows]).sum(dim=-1).transpose(1, 2)  # delta [B, H, rows]
                    if g_lse is not None:
                        shift = shift - g_lse[:, :, r0 : r0 + rows].float()
                    ds = p * (torch.einsum("bnhe,bthe->bhnt", go, vtf) - shift.unsqueeze(-1))
                    dvt += torch.einsum("bhnt,bnhe->bthe", p, go)
                dq[:, r0 : r0 + rows] = torch.einsum("bhnt,bthd->bnhd", ds, ktf) * scale
                dkt += torch.einsum("bhnt,bnhd->bthd", ds, qc) * scale
        return dq.to(q.dtype), dkt.to(kt.dtype), dvt.to(vt.dtype), None


#: Keys per block of the additional keys in the ``"kernel"`` mode (one LUT entry per block, the last one masked).
ADDITIONAL_BLOCK = 64


def _additional_part(q, kt, vt, scale, block_q):
    """Every query's softmax over the additional keys alone: ``(O_t [B, N, H, Dv], lse_t [B, H, N])`` float32, ``lse_t``
    natural. ``TUNING["additional_keys"]``: ``"kernel"`` runs the block-sparse kernels themselves with a LUT that
    lists every block of the additional keys (dense: tensor-core products with float32 accumulation, ``O_t`` rounded
    once to q's dtype, memory ``O(N Dv)``, the backward through the op's own autograd with its log-sum-exp gradient);
    ``"torch"`` runs :class:`_AdditionalAttention` (float32 einsums, chunked over query rows)."""
    mode = TUNING["additional_keys"]
    if mode not in ADDITIONAL_MODES:
        raise ValueError(f"TUNING['additional_keys']={mode!r}; choose one of {ADDITIONAL_MODES}")
    if mode == "torch":
        return _AdditionalAttention.apply(q, kt, vt, scale)
    kt, vt = _inner_contiguous(kt.to(q.dtype), vt.to(q.dtype))
    b, n, h, _ = q.shape
    nqb, nkb = -(-n // block_q), -(-kt.shape[1] // ADDITIONAL_BLOCK)
    lut = torch.arange(nkb, device=q.device, dtype=torch.int32).expand(b, h, nqb, nkb).contiguous()
    o_t, _, lse_t = _fwd(q, kt, vt, lut, None, None, None, None, scale, 1.0, block_q, ADDITIONAL_BLOCK, 0)
    return o_t.float(), lse_t * _LN2


def _join_additional(q, out, o_s, lse, kt, vt, scale, block_q):
    """The kernel's softmax over the critical image keys and the dense softmax over the additional keys merged
    exactly into one softmax over both by their log-sum-exps: with ``a = sigmoid(lse_s - lse_t)`` (natural logs) per
    row the softmax part is ``a O_s + (1 - a) O_t``. ``o_s`` ``None``: block-sparse (``out`` is ``O_s``), else SLA
    (``out = O_s + linear part``, which the additional keys leave alone). Float32 math, output in q's dtype."""
    o_t, lse_t = _additional_part(q, kt, vt, scale, block_q)
    a = torch.sigmoid(lse * _LN2 - lse_t).transpose(1, 2).unsqueeze(-1)  # [B, N, H, 1]
    if o_s is None:
        return (o_t + a * (out.float() - o_t)).to(q.dtype)
    return (out.float() + (1.0 - a) * (o_t - o_s.float())).to(q.dtype)


def _inner_contiguous(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The kernels read the head dim with unit stride (vectorised loads); other strides are free (views of a fused
    qkv projection run as they are)."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def sparse_linear_attention_triton(
    q, k, v, proj_weight, proj_bias=None, *, topk=0.05, k_low=0.10, block_q=64, block_k=64, feature_map="softmax",
    variant="paper", scale=None, eps=1e-5, additional_keys=None, additional_values=None,
):  # fmt: skip
    """The ``"triton"`` backend of :func:`visionlin.kernels.sparse_linear_attention` (module docstring)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = _inner_contiguous(q, k, v)
    lut, marginal = select_blocks(q, k, topk, k_low if variant == "paper" else 0.0, block_q, block_k,
                                  marginal=variant == "paper")  # fmt: skip
    hi, zi = linear_states(k, v, marginal, block_k, feature_map)
    w = proj_weight if proj_weight.dtype == torch.float32 else proj_weight.float()
    bias = None if proj_bias is None else (proj_bias if proj_bias.dtype == torch.float32 else proj_bias.float())
    out, o_s, lse = _fwd(
        q, k, v, lut, hi, zi, w.contiguous(), None if bias is None else bias.contiguous(), scale, float(eps),
        block_q, block_k, FMAPS[feature_map],
    )  # fmt: skip
    if additional_keys is None:
        return out
    return _join_additional(q, out, o_s, lse, additional_keys, additional_values, scale, block_q)


def block_sparse_attention_triton(
    q, k, v, *, topk=0.5, block_q=64, block_k=64, scale=None, additional_keys=None, additional_values=None
):
    """The ``"triton"`` backend of :func:`visionlin.kernels.block_sparse_attention`: the same softmax kernel with no
    linear branch."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = _inner_contiguous(q, k, v)
    lut, _ = select_blocks(q, k, topk, 0.0, block_q, block_k, marginal=False)
    out, _, lse = _fwd(q, k, v, lut, None, None, None, None, scale, 1.0, block_q, block_k, 0)
    if additional_keys is None:
        return out
    return _join_additional(q, out, None, lse, additional_keys, additional_values, scale, block_q)
