"""Agent attention as fused Triton kernels, forward and backward; the math is
:func:`visionlin.kernels.agent.agent_attention_reference` (``s`` = scale)::

    V_A = softmax(s A K^T + agent_bias) V          aggregation: one program per (batch, head) and key range, online
                                                   softmax over key tiles (flash-style), V_A kept in float32; with
                                                   several ranges (few (batch, head) pairs, long key sets: 1024 px
                                                   and up at small batches) their partial sums are rescaled and
                                                   added by a third kernel (flash-decoding's split)
    out = softmax(s Q A^T + query_bias) V_A        broadcast: one program per (query block, batch, head); the agents
                                                   (n <= 128) fit one tile, so each row's softmax is exact in one pass

Both weight matrices stay in registers (the ``"sdpa"`` backend makes two cuDNN calls whose small shapes (49 agents)
ran at 145 us each at 224 px, batch 256, on an H200, with the bias tables as dense masks). Products run on the tensor
cores in the inputs' half dtype with float32 accumulation (float32 inputs: IEEE float32). Biases may be broadcast
views (stride 0 on batch).

The backward (:func:`agent_attention_bwd`; the forward keeps only its inputs) recomputes ``V_A`` and the
aggregation's log-sum-exp (one aggregation pass), then runs the broadcast's backward (``dQ``; ``dA`` and ``dV_A``),
then the aggregation's (``dK``, ``dV``; the rest of ``dA``). Each program walks a range of query (key) blocks of one
(batch, head) with ``dA`` / ``dV_A`` summed in registers, split over ranges as the forward's aggregation is (atomic
adds only then). The biases' gradients are each logits' gradient stored once per (batch, head) element into tables
in the inputs' dtype (float32 for float32 inputs), each summed in float32 to its bias's shape before the next is made:
the first version added every block's share atomically (~75 M float32 atomics at 224 px, batch 256: 1.6 ms, 2.3x
SDPA's forward + backward). The backend takes calls that need a gradient only when
``visionlin.kernels.agent.TRITON_BACKWARD`` is set and the tiles fit (``visionlin.kernels.agent.MAX_TILES``); it
declines dropout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._eager import eager_call, eager_op
from ._launch import cdiv, launch, tile_dim, tuned
from .linear import _num_sms

__all__ = ["MAX_AGENTS", "TUNING", "agent_attention_triton"]

#: Most agent tokens one tile holds.
MAX_AGENTS = 128


@triton.jit
def _dot(a, b, HALF: tl.constexpr):
    if HALF:
        return tl.dot(a, b)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _lse(m_i, l_i):
    """Natural log-sum-exp of rows with running maximum ``m_i`` and sum ``l_i``; ``+inf`` for a row whose every key is
    masked (``l_i`` 0: a ``-inf`` bias row), so the backward's ``exp(s - lse)`` gives 0 there, not NaN."""
    return tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("inf"))


@triton.jit
def _masked_softmax(s):
    """Softmax of each row of ``s``; 0 for a row whose every logit is ``-inf`` (as the reference's
    ``masked_softmax`` and SDPA give), not NaN."""
    mx = tl.max(s, axis=1)
    p = tl.exp(s - tl.where(mx == float("-inf"), 0.0, mx)[:, None])
    den = tl.sum(p, axis=1)
    return p / tl.where(den > 0, den, 1.0)[:, None]


@triton.jit
def _aggregate_kernel(
    A, K, V, AB, VA, STATS, LSE, M, H, NA, D, DV, scale, per_split,
    sa_b, sa_n, sa_h, sa_d, sk_b, sk_n, sk_h, sk_d, sv_b, sv_n, sv_h, sv_d, sab_b, sab_h, sab_a, sab_m,
    HAS_BIAS: tl.constexpr, HALF: tl.constexpr, SPLIT: tl.constexpr, SAVE: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """``V_A`` (float32 ``[B*H, BLOCK_A, BLOCK_DV]``) of one (batch, head) from keys ``[start, start + per_split)``
    of split ``program_id(0)``; with ``SPLIT`` its unnormalised partial sums go to ``VA[split, bh]`` and the running
    maxima / sums to ``STATS[split, bh, 0 / 1]`` for :func:`_combine_kernel`; else, with ``SAVE``, each agent's
    log-sum-exp to ``LSE[bh]`` (float32 ``[B*H, BLOCK_A]``, for the backward)."""
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H  # offsets in int64: a tensor may span more than 2^31 elements
    start = tl.program_id(0) * per_split
    end = tl.minimum(start + per_split, M)
    offs_a = tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    amask = offs_a < NA
    a = tl.load(
        A + b * sa_b + h * sa_h + offs_a[:, None] * sa_n + offs_d[None, :] * sa_d,
        mask=amask[:, None] & (offs_d < D)[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_A], dtype=tl.float32)
    acc = tl.zeros([BLOCK_A, BLOCK_DV], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mmask = offs_m < end
        k = tl.load(
            K + b * sk_b + h * sk_h + offs_m[:, None] * sk_n + offs_d[None, :] * sk_d,
            mask=mmask[:, None] & (offs_d < D)[None, :],
            other=0.0,
        )
        s = _dot(a, tl.trans(k), HALF) * scale  # [BLOCK_A, BLOCK_M]
        if HAS_BIAS:
            bias = tl.load(
                AB + b * sab_b + h * sab_h + offs_a[:, None] * sab_a + offs_m[None, :] * sab_m,
                mask=amask[:, None] & mmask[None, :],
                other=0.0,
            )
            s += bias.to(tl.float32)
        s = tl.where(mmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # every key so far masked: p and alpha 0, not NaN
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            V + b * sv_b + h * sv_h + offs_m[:, None] * sv_n + offs_e[None, :] * sv_d,
            mask=mmask[:, None] & (offs_e < DV)[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, HALF)
        m_i = m_new
    tile = offs_a[:, None] * BLOCK_DV + offs_e[None, :]
    if SPLIT:
        part = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + bh
        tl.store(VA + part * (BLOCK_A * BLOCK_DV) + tile, acc)
        tl.store(STATS + part * (2 * BLOCK_A) + offs_a, m_i)
        tl.store(STATS + part * (2 * BLOCK_A) + BLOCK_A + offs_a, l_i)
    else:
        tl.store(VA + bh * (BLOCK_A * BLOCK_DV) + tile, acc / tl.where(l_i > 0, l_i, 1.0)[:, None])
        if SAVE:
            tl.store(LSE + bh * BLOCK_A + offs_a, _lse(m_i, l_i))


@triton.jit
def _combine_kernel(
    PART, STATS, VA, LSE, BH, splits, SAVE: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_DV: tl.constexpr
):
    """``V_A`` of one (batch, head) from the ``splits`` partial results of :func:`_aggregate_kernel` (flash-decoding's
    rescale-and-add of the partial softmax sums)."""
    bh = tl.program_id(0).to(tl.int64)
    offs_a = tl.arange(0, BLOCK_A)
    tile = offs_a[:, None] * BLOCK_DV + tl.arange(0, BLOCK_DV)[None, :]
    m_i = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_A], dtype=tl.float32)
    acc = tl.zeros([BLOCK_A, BLOCK_DV], dtype=tl.float32)
    for sp in range(0, splits):
        part = sp * BH + bh
        m_s = tl.load(STATS + part * (2 * BLOCK_A) + offs_a)
        l_s = tl.load(STATS + part * (2 * BLOCK_A) + BLOCK_A + offs_a)
        m_new = tl.maximum(m_i, m_s)  # -inf while every key so far is masked for the agent (a -inf bias)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha, beta = tl.exp(m_i - m_safe), tl.exp(m_s - m_safe)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + tl.load(PART + part * (BLOCK_A * BLOCK_DV) + tile) * beta[:, None]
        m_i = m_new
    tl.store(VA + bh * (BLOCK_A * BLOCK_DV) + tile, acc / tl.where(l_i > 0, l_i, 1.0)[:, None])
    if SAVE:
        tl.store(LSE + bh * BLOCK_A + offs_a, _lse(m_i, l_i))


@triton.jit
def _broadcast_kernel(
    Q, A, VA, QB, Out, N, H, NA, D, DV, scale,
    sq_b, sq_n, sq_h, sq_d, sa_b, sa_n, sa_h, sa_d, sqb_b, sqb_h, sqb_n, sqb_a, so_b, so_n, so_h, so_d,
    HAS_BIAS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """``out`` of one block of queries of one (batch, head)."""
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_a = tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    nmask, amask = offs_n < N, offs_a < NA
    q = tl.load(
        Q + b * sq_b + h * sq_h + offs_n[:, None] * sq_n + offs_d[None, :] * sq_d,
        mask=nmask[:, None] & (offs_d < D)[None, :],
        other=0.0,
    )
    a = tl.load(
        A + b * sa_b + h * sa_h + offs_a[:, None] * sa_n + offs_d[None, :] * sa_d,
        mask=amask[:, None] & (offs_d < D)[None, :],
        other=0.0,
    )
    s = _dot(q, tl.trans(a), HALF) * scale  # [BLOCK_N, BLOCK_A]
    if HAS_BIAS:
        bias = tl.load(
            QB + b * sqb_b + h * sqb_h + offs_n[:, None] * sqb_n + offs_a[None, :] * sqb_a,
            mask=nmask[:, None] & amask[None, :],
            other=0.0,
        )
        s += bias.to(tl.float32)
    p = _masked_softmax(tl.where(amask[None, :], s, float("-inf")))
    va = tl.load(VA + bh * (BLOCK_A * BLOCK_DV) + offs_a[:, None] * BLOCK_DV + offs_e[None, :])
    out = _dot(p.to(q.dtype), va.to(q.dtype), HALF)
    o_ptr = Out + b * so_b + h * so_h + offs_n[:, None] * so_n + offs_e[None, :] * so_d
    tl.store(o_ptr, out.to(Out.dtype.element_ty), nmask[:, None] & (offs_e < DV)[None, :])


@triton.jit
def _broadcast_backward_kernel(
    Q, A, VA, QB, G, DQ, DA, DVA, DQB, N, H, NA, D, DV, scale, per_split,
    sq_b, sq_n, sq_h, sq_d, sa_b, sa_n, sa_h, sa_d, sqb_b, sqb_h, sqb_n, sqb_a, sg_b, sg_n, sg_h, sg_d,
    sdq_b, sdq_n, sdq_h, sdq_d,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, HALF: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """The broadcast's backward over queries ``[start, start + per_split)`` of one (batch, head): ``dQ`` stored per
    block; the (batch, head)'s ``dA`` and ``dV_A`` summed over the range in registers, then stored into float32
    ``[B*H, BLOCK_A, BLOCK_D / BLOCK_DV]`` (with ``SPLIT``, several ranges: added atomically); with ``BIAS_GRAD`` the
    query-bias logits' gradient stored per element into a float32 ``[B, H, N, NA]`` table (summed to the bias's shape
    afterwards). The softmax over the agents is recomputed exactly (one tile holds every agent); ``delta = rowsum(P *
    dP)`` equals ``rowsum(dout * out)``."""
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    start = tl.program_id(0) * per_split
    end = tl.minimum(start + per_split, N)
    offs_a = tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    amask, dmask, emask = offs_a < NA, offs_d < D, offs_e < DV
    a = tl.load(A + b * sa_b + h * sa_h + offs_a[:, None] * sa_n + offs_d[None, :] * sa_d,
                mask=amask[:, None] & dmask[None, :], other=0.0)  # fmt: skip
    va = tl.load(VA + bh * (BLOCK_A * BLOCK_DV) + offs_a[:, None] * BLOCK_DV + offs_e[None, :]).to(Q.dtype.element_ty)
    da = tl.zeros((BLOCK_A, BLOCK_D), dtype=tl.float32)
    dva = tl.zeros((BLOCK_A, BLOCK_DV), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        nmask = offs_n < end
        q = tl.load(Q + b * sq_b + h * sq_h + offs_n[:, None] * sq_n + offs_d[None, :] * sq_d,
                    mask=nmask[:, None] & dmask[None, :], other=0.0)  # fmt: skip
        s = _dot(q, tl.trans(a), HALF) * scale  # [BLOCK_N, BLOCK_A]
        if HAS_BIAS:
            bias = tl.load(QB + b * sqb_b + h * sqb_h + offs_n[:, None] * sqb_n + offs_a[None, :] * sqb_a,
                           mask=nmask[:, None] & amask[None, :], other=0.0)  # fmt: skip
            s += bias.to(tl.float32)
        p = _masked_softmax(tl.where(amask[None, :], s, float("-inf")))
        p = tl.where(nmask[:, None], p, 0.0)  # rows past the range contribute nothing to dA / dV_A
        g = tl.load(G + b * sg_b + h * sg_h + offs_n[:, None] * sg_n + offs_e[None, :] * sg_d,
                    mask=nmask[:, None] & emask[None, :], other=0.0)  # fmt: skip
        dp = _dot(g, tl.trans(va.to(g.dtype)), HALF)  # [BLOCK_N, BLOCK_A]
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])  # d(logits); 0 for padded agents and rows past the range
        dq = _dot(ds.to(q.dtype), a, HALF) * scale
        tl.store(DQ + b * sdq_b + h * sdq_h + offs_n[:, None] * sdq_n + offs_d[None, :] * sdq_d,
                 dq.to(DQ.dtype.element_ty), mask=nmask[:, None] & dmask[None, :])  # fmt: skip
        da += _dot(tl.trans(ds.to(q.dtype)), q, HALF)
        dva += _dot(tl.trans(p.to(g.dtype)), g, HALF)
        if BIAS_GRAD:
            tl.store(DQB + (bh.to(tl.int64) * N + offs_n[:, None]) * NA + offs_a[None, :], ds,
                     mask=nmask[:, None] & amask[None, :])  # fmt: skip
    tile_d = bh * (BLOCK_A * BLOCK_D) + offs_a[:, None] * BLOCK_D + offs_d[None, :]
    tile_e = bh * (BLOCK_A * BLOCK_DV) + offs_a[:, None] * BLOCK_DV + offs_e[None, :]
    if SPLIT:
        tl.atomic_add(DA + tile_d, da * scale)
        tl.atomic_add(DVA + tile_e, dva)
    else:
        tl.store(DA + tile_d, da * scale)
        tl.store(DVA + tile_e, dva)


@triton.jit
def _aggregate_backward_kernel(
    A, K, V, AB, VA, DVA, LSE, DA, DK, DVv, DAB, M, H, NA, D, DV, scale, per_split,
    sa_b, sa_n, sa_h, sa_d, sk_b, sk_n, sk_h, sk_d, sv_b, sv_n, sv_h, sv_d, sab_b, sab_h, sab_a, sab_m,
    sdk_b, sdk_n, sdk_h, sdk_d, sdv_b, sdv_n, sdv_h, sdv_d,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, HALF: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """The aggregation's backward over keys ``[start, start + per_split)`` of one (batch, head), after the
    broadcast's (``dV_A`` complete): ``dK`` and ``dV`` stored per block, the range's share of ``dA`` summed in
    registers, then added to the broadcast's (with ``SPLIT``: atomically); with ``BIAS_GRAD`` the agent-bias logits'
    gradient stored per element into a float32 ``[B, H, NA, M]`` table. ``P_A`` from the forward's log-sum-exp;
    ``delta = rowsum(dV_A * V_A)`` with ``dV_A`` rounded as the products use it (the row sums of the logits'
    gradient then cancel as they should)."""
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    start = tl.program_id(0) * per_split
    end = tl.minimum(start + per_split, M)
    offs_a = tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    amask, dmask, emask = offs_a < NA, offs_d < D, offs_e < DV
    a = tl.load(A + b * sa_b + h * sa_h + offs_a[:, None] * sa_n + offs_d[None, :] * sa_d,
                mask=amask[:, None] & dmask[None, :], other=0.0)  # fmt: skip
    tile_e = bh * (BLOCK_A * BLOCK_DV) + offs_a[:, None] * BLOCK_DV + offs_e[None, :]
    dva = tl.load(DVA + tile_e).to(V.dtype.element_ty)
    delta = tl.sum(dva.to(tl.float32) * tl.load(VA + tile_e), axis=1)  # [BLOCK_A]
    lse = tl.load(LSE + bh * BLOCK_A + offs_a)
    da = tl.zeros((BLOCK_A, BLOCK_D), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mmask = offs_m < end
        k = tl.load(K + b * sk_b + h * sk_h + offs_m[:, None] * sk_n + offs_d[None, :] * sk_d,
                    mask=mmask[:, None] & dmask[None, :], other=0.0)  # fmt: skip
        v = tl.load(V + b * sv_b + h * sv_h + offs_m[:, None] * sv_n + offs_e[None, :] * sv_d,
                    mask=mmask[:, None] & emask[None, :], other=0.0)  # fmt: skip
        s = _dot(a, tl.trans(k), HALF) * scale  # [BLOCK_A, BLOCK_M]
        if HAS_BIAS:
            bias = tl.load(AB + b * sab_b + h * sab_h + offs_a[:, None] * sab_a + offs_m[None, :] * sab_m,
                           mask=amask[:, None] & mmask[None, :], other=0.0)  # fmt: skip
            s += bias.to(tl.float32)
        p = tl.where(amask[:, None] & mmask[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(dva, tl.trans(v), HALF)  # [BLOCK_A, BLOCK_M]
        ds = p * (dp - delta[:, None])
        dv = _dot(tl.trans(p.to(v.dtype)), dva, HALF)  # [BLOCK_M, BLOCK_DV]
        tl.store(DVv + b * sdv_b + h * sdv_h + offs_m[:, None] * sdv_n + offs_e[None, :] * sdv_d,
                 dv.to(DVv.dtype.element_ty), mask=mmask[:, None] & emask[None, :])  # fmt: skip
        dk = _dot(tl.trans(ds.to(a.dtype)), a, HALF) * scale  # [BLOCK_M, BLOCK_D]
        tl.store(DK + b * sdk_b + h * sdk_h + offs_m[:, None] * sdk_n + offs_d[None, :] * sdk_d,
                 dk.to(DK.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])  # fmt: skip
        da += _dot(ds.to(k.dtype), k, HALF)
        if BIAS_GRAD:
            tl.store(DAB + (bh.to(tl.int64) * NA + offs_a[:, None]) * M + offs_m[None, :], ds,
                     mask=amask[:, None] & mmask[None, :])  # fmt: skip
    tile_d = bh * (BLOCK_A * BLOCK_D) + offs_a[:, None] * BLOCK_D + offs_d[None, :]
    if SPLIT:
        tl.atomic_add(DA + tile_d, da * scale)
    else:
        tl.store(DA + tile_d, tl.load(DA + tile_d) + da * scale)


ROWS = 64

#: ``"splits"``: key splits of the aggregation per (batch, head) (``None``: enough programs for ~4 per SM, each over at
#: least two key tiles; 1 at 224 px, batch 256). With few (batch, head) pairs and long key sets (1024 px and up, small
#: batches) one program per pair left most SMs idle, as SDPA's flash kernels do with 49 queries.
#: The backward kernels' rows per block (queries / keys), warps and pipeline stages (``None``: see :func:`_bwd_meta`):
#: 64 rows in 4 warps, the fastest of 12 settings (``agent_backends.py --bwd-sweep``, H200, both
#: kernels): at Agent-DeiT-S's head dim 64 with one stage 326 / 435 / 351 us at its 224 / 1024 / 2048 px shapes
#: against 526 / 618 / 551 for 32 rows in 8 warps (the one setting that spills nothing); at Agent-Swin-T's first
#: stage (head dim 32) two stages 640 us, one 716, 32 rows in 8 warps 1,436.
TUNING: dict[str, int | None] = {"splits": None, "bwd_rows": None, "bwd_warps": None, "bwd_stages": None}


def _splits(bh: int, m: int, device: torch.device) -> tuple[int, int]:
    """``(splits, keys per split)`` of the aggregation (a multiple of ``ROWS`` keys each, none empty)."""
    tiles = cdiv(m, ROWS)
    want = TUNING["splits"]
    if want is None:
        want = min(cdiv(4 * _num_sms(device), max(bh, 1)), cdiv(tiles, 2))
    per = cdiv(tiles, max(1, min(int(want), tiles))) * ROWS
    return cdiv(m, per), per


def _bwd_meta(block_d: int, block_dv: int) -> tuple[int, dict[str, int]]:
    """``(rows, launch options)`` of the backward kernels: 64 rows, 4 warps, 1 pipeline stage at head dims above 32
    and 2 at 32 and below, unless ``TUNING`` sets them (rows a power of two >= 16, warps a power of two, stages a
    non-negative int; 0 leaves Triton's default)."""
    rows = tuned(TUNING, __name__, "bwd_rows", 64, pow2=True)
    if rows < 16:
        raise ValueError(f"TUNING['bwd_rows'] must be a power of two >= 16 (a tl.dot operand), got {rows}")
    meta = {"num_warps": tuned(TUNING, __name__, "bwd_warps", 4, pow2=True)}
    stages = tuned(TUNING, __name__, "bwd_stages", 1 if max(block_d, block_dv) > 32 else 2)
    return rows, meta | ({"num_stages": stages} if stages else {})


def _pad(x: int) -> int:
    return tile_dim(x)


def _warps(block_a: int, block_d: int, block_dv: int) -> int:
    return 8 if block_a * max(block_d, block_dv) >= 64 * 64 else 4


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``t`` summed to the broadcastable ``shape``, accumulated and returned in float32 (no float32 copy of ``t``)."""
    lead = t.dim() - len(shape)
    dims = [*range(lead), *(lead + i for i, s in enumerate(shape) if s == 1 and t.shape[lead + i] != 1)]
    out = t.sum(dim=dims, keepdim=True, dtype=torch.float32) if dims else t.float()
    return out.reshape(shape)


def _bias_view(bias: torch.Tensor | None, shape: tuple[int, ...]) -> tuple[torch.Tensor | None, tuple[int, ...]]:
    if bias is None:
        return None, (0, 0, 0, 0)
    view = torch.broadcast_to(bias, shape)
    return view, view.stride()


def _aggregate(k, v, agents, agent_bias, scale, save):
    """``(V_A, lse)``: the aggregation's float32 ``V_A`` ``[B*H, BLOCK_A, BLOCK_DV]`` and, with ``save``, its
    log-sum-exp ``[B*H, BLOCK_A]`` (else a placeholder); ``k`` holds at least one key and ``B*H`` is not 0."""
    b, m, h, _ = k.shape
    dv, na = v.shape[-1], agents.shape[1]
    ba, bd, bdv = _pad(na), _pad(k.shape[-1]), _pad(dv)
    va = torch.empty(b * h, ba, bdv, device=k.device, dtype=torch.float32)
    lse = torch.empty(b * h, ba, device=k.device, dtype=torch.float32) if save else va
    ab, sab = _bias_view(agent_bias, (b, h, na, m))
    splits, per = _splits(b * h, m, k.device)
    part = va if splits == 1 else torch.empty(splits, b * h, ba, bdv, device=k.device, dtype=torch.float32)
    stats = va if splits == 1 else torch.empty(splits, b * h, 2, ba, device=k.device, dtype=torch.float32)
    launch(_aggregate_kernel, (splits, b * h),
        agents, k, v, ab if ab is not None else va, part, stats, lse, m, h, na, k.shape[-1], dv, scale, per,
        *agents.stride(), *k.stride(), *v.stride(), *sab,
        HAS_BIAS=ab is not None, HALF=k.dtype in (torch.float16, torch.bfloat16), SPLIT=splits > 1, SAVE=save,
        BLOCK_A=ba, BLOCK_M=ROWS, BLOCK_D=bd, BLOCK_DV=bdv, num_warps=_warps(ba, bd, bdv),
    )  # fmt: skip
    if splits > 1:
        launch(_combine_kernel, (b * h,), part, stats, va, lse, b * h, splits, SAVE=save, BLOCK_A=ba, BLOCK_DV=bdv,
               num_warps=4)  # fmt: skip
    return va, lse


@torch.library.custom_op("visionlin::agent_attention_fwd", mutates_args=())
def agent_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    agent_bias: torch.Tensor | None,
    query_bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """``out`` ``[B, N, H, Dv]`` in ``q``'s dtype: the aggregation, then the broadcast. Nothing but the inputs is
    kept for a backward (:func:`agent_attention_bwd` recomputes ``V_A`` and the log-sum-exp)."""
    b, n, h, d = q.shape
    dv = v.shape[-1]
    out = torch.empty(b, n, h, dv, device=q.device, dtype=q.dtype)
    if b * h == 0 or n == 0 or dv == 0:  # (no key: refused by agent_attention's checks)
        return out
    va, _ = _aggregate(k, v, agents, agent_bias, scale, False)
    ba, bd, bdv = va.shape[1], _pad(d), va.shape[2]
    qb, sqb = _bias_view(query_bias, (b, h, n, agents.shape[1]))
    launch(_broadcast_kernel, (cdiv(n, ROWS), b * h),
        q, agents, va, qb if qb is not None else va, out, n, h, agents.shape[1], d, dv, scale,
        *q.stride(), *agents.stride(), *sqb, *out.stride(),
        HAS_BIAS=qb is not None, HALF=q.dtype in (torch.float16, torch.bfloat16), BLOCK_N=ROWS, BLOCK_A=ba,
        BLOCK_D=bd, BLOCK_DV=bdv, num_warps=_warps(ba, bd, bdv),
    )  # fmt: skip
    return out


@agent_attention_fwd.register_fake
def _(q, k, v, agents, agent_bias, query_bias, scale):
    return q.new_empty(*q.shape[:3], v.shape[-1])


@torch.library.custom_op("visionlin::agent_attention_bwd", mutates_args=())
def agent_attention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    agent_bias: torch.Tensor | None,
    query_bias: torch.Tensor | None,
    g: torch.Tensor,
    scale: float,
    agent_bias_grad: bool,
    query_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dagents, dagent_bias, dquery_bias)``; the bias gradients are float32 in the biases' shapes
    (empty when not asked for). ``V_A`` and the aggregation's log-sum-exp are recomputed (one aggregation pass over
    the keys and values) rather than kept from the forward: a float32 ``[B*H, 64, 64]`` tile per layer of
    Agent-DeiT-S (151 MB over its 12 layers at batch 128) that put its training step above the dense twin's peak."""
    b, n, h, d = q.shape
    m, dv_, na = k.shape[1], v.shape[-1], agents.shape[1]
    ba, bd, bdv = _pad(na), _pad(d), _pad(dv_)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    run = bool(b * h and n and m and dv_)
    splits_q, per_q = _splits(b * h, n, q.device) if run else (1, 0)  # (no queries: no range to split)
    # dA / dV_A: every tile stored whole by the broadcast's backward unless its query range is split (then added)
    buf = torch.zeros if splits_q > 1 or not run else torch.empty
    da32 = buf(b * h, ba, bd, device=q.device, dtype=torch.float32)
    dva = buf(b * h, ba, bdv, device=q.device, dtype=torch.float32)
    # The logits' gradients of the biases: every (batch, head) element stored once, in the inputs' dtype (as SDPA's
    # mask gradient), then summed to the biases' shapes in float32; each table is summed, and freed, before the next
    # is made (at Agent-DeiT-S's shapes the two float32 tables were 28 MiB of the backward's peak at batch 64).
    half = q.dtype in (torch.float16, torch.bfloat16)
    table = q.dtype if half else torch.float32
    if run:
        dqb = q.new_empty((b, h, n, na) if query_bias_grad else (0,), dtype=table)
        ab, sab = _bias_view(agent_bias, (b, h, na, m))
        qb, sqb = _bias_view(query_bias, (b, h, n, na))
        g = g if g.stride(-1) == 1 else g.contiguous()
        rows, meta = _bwd_meta(bd, bdv)
        va, lse = _aggregate(k, v, agents, agent_bias, scale, True)
        launch(_broadcast_backward_kernel, (splits_q, b * h),
            q, agents, va, qb if qb is not None else va, g, dq, da32, dva, dqb, n, h, na, d, dv_, scale, per_q,
            *q.stride(), *agents.stride(), *sqb, *g.stride(), *dq.stride(),
            HAS_BIAS=qb is not None, BIAS_GRAD=query_bias_grad, HALF=half, SPLIT=splits_q > 1, BLOCK_N=rows,
            BLOCK_A=ba, BLOCK_D=bd, BLOCK_DV=bdv, **meta,
        )  # fmt: skip
        dqb = _sum_to(dqb, query_bias.shape) if query_bias_grad else dqb
        dab = q.new_empty((b, h, na, m) if agent_bias_grad else (0,), dtype=table)
        splits_k, per_k = _splits(b * h, m, q.device)
        launch(_aggregate_backward_kernel, (splits_k, b * h),
            agents, k, v, ab if ab is not None else va, va, dva, lse, da32, dk, dv, dab, m, h, na, d, dv_, scale,
            per_k, *agents.stride(), *k.stride(), *v.stride(), *sab, *dk.stride(), *dv.stride(),
            HAS_BIAS=ab is not None, BIAS_GRAD=agent_bias_grad, HALF=half, SPLIT=splits_k > 1, BLOCK_A=ba,
            BLOCK_M=rows, BLOCK_D=bd, BLOCK_DV=bdv, **meta,
        )  # fmt: skip
        dab = _sum_to(dab, agent_bias.shape) if agent_bias_grad else dab.float()
        dqb = dqb if query_bias_grad else dqb.float()
    else:  # an empty output (no batch, head, query or value channel): every gradient is zero
        dq.zero_(), dk.zero_(), dv.zero_()
        dqb = q.new_zeros(query_bias.shape if query_bias_grad else (0,), dtype=torch.float32)
        dab = q.new_zeros(agent_bias.shape if agent_bias_grad else (0,), dtype=torch.float32)
    dagents = torch.empty(agents.shape, device=q.device, dtype=agents.dtype)
    dagents.copy_(da32[:, :na, :d].reshape(b, h, na, d).transpose(1, 2))
    return dq, dk, dv, dagents, dab, dqb


@agent_attention_bwd.register_fake
def _(q, k, v, agents, agent_bias, query_bias, g, scale, agent_bias_grad, query_bias_grad):
    f32 = torch.float32
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(agents),
            q.new_empty(agent_bias.shape if agent_bias_grad else (0,), dtype=f32),
            q.new_empty(query_bias.shape if query_bias_grad else (0,), dtype=f32))  # fmt: skip


def _setup(ctx, inputs, output):
    q, k, v, agents, agent_bias, query_bias, scale = inputs
    ctx.save_for_backward(q, k, v, agents, agent_bias, query_bias)
    ctx.scale = scale
    ctx.bias_grads = (
        agent_bias is not None and agent_bias.requires_grad,
        query_bias is not None and query_bias.requires_grad,
    )


def _backward(ctx, g):
    q, k, v, agents, agent_bias, query_bias = ctx.saved_tensors
    dq, dk, dv, da, dab, dqb = _bwd_call(q, k, v, agents, agent_bias, query_bias, g, ctx.scale, *ctx.bias_grads)
    ab_grad, qb_grad = ctx.bias_grads
    return (dq, dk, dv, da, dab.to(agent_bias.dtype) if ab_grad else None,
            dqb.to(query_bias.dtype) if qb_grad else None, None)  # fmt: skip


agent_attention_fwd.register_autograd(_backward, setup_context=_setup)
_bwd_call = eager_call(agent_attention_bwd)
_fwd_call = eager_op(agent_attention_fwd, _setup, _backward)


def agent_attention_triton(q, k, v, agents, *, agent_bias=None, query_bias=None, scale=None, dropout_p=0.0):
    """The ``"triton"`` backend of :func:`visionlin.kernels.agent_attention` (no dropout)."""
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _fwd_call(q, k, v, agents, agent_bias, query_bias, s)
