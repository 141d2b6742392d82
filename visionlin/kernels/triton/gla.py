"""Gated linear attention (GLA) as a chunked Triton kernel, forward and backward, one direction per call; ViG's
bidirectional form is the mean of a forward and a reversed call (the reversal is in the kernels' indexing, no copies).
:func:`bidirectional_gla_triton_qkv` takes ViG's projections' outputs packed (``qkv``, ``gates``) and chains the two
directions' kernels: the reversed walk adds the forward walk's float32 outputs before its one rounding, and in the
backward the second direction's ``dv`` store and epilogue add the first's float32 ``dv``, ``dq`` and ``dk`` shares,
writing one packed gradient for ``qkv`` and one for ``gates`` (the halving of the mean is in ``scale``).

Math: :func:`visionlin.kernels.scan.gated_linear_attention_reference`, per (batch, head), ``G_t = sum_{r <= t} g_r``::

    S_t = diag(exp g_t) S_{t-1} + k_t v_t^T,   o_t = scale q_t^T S_t
        = scale sum_{s <= t} (q_t * exp(G_t - G_s)) . k_s  v_s

A program owns one (batch, head) and a block of value channels, holds the ``[K, V]`` state in float32 and walks the
sequence in chunks of ``T = 16`` positions. Inside a chunk (``G`` the chunk's inclusive cumulative sum of ``g``)::

    A_ts  = scale sum_k q_tk k_sk exp(G_tk - G_sk)      (s <= t; the [T, T, K] exponent is masked before exp)
    o     = A v + scale (q * exp(G)) S_in
    S_out = exp(G_last) * S_in + (k * exp(G_last - G))^T v

Every exponent is a sum of log-gates ``<= 0`` (no ``exp(G_t) * exp(-G_s)`` factorisation, which overflows for strong
decays), so nothing overflows whatever the gates. With ``TUNING["intra_factor"]``, a chunk whose decay range
``G_0 - G_last`` (per channel) is below :data:`FACTOR_LIMIT` forms its block from ``[T, K]`` tiles instead:
``A = scale ((q exp(G - G_last)) (k exp(G_last - G))^T)`` on ``s <= t`` (the first factor at most
``exp(FACTOR_LIMIT)``, the second at most 1), and in the backward's intra kernel
``dq = exp(G - G_last) * (dA k~)``, ``dk = exp(G_last - G) * (dA^T q~)`` (``dA`` masked to ``s <= t``).

Backward (``dA_ts = scale do_t . v_s``): a forward pass over the chunks recomputes the state and writes ``dq``::

    dq_t = scale exp(G_t) * (S_in do_t) + sum_{s <= t} dA_ts exp(G_t - G_s) * k_s

and a reverse pass carries the state's adjoint ``H`` (``[K, V]``, float32) and writes ``dk``, ``dv``::

    dk_s = exp(G_last - G_s) * (H v_s) + sum_{t >= s} dA_ts exp(G_t - G_s) * q_t
    dv_s = (k_s * exp(G_last - G_s))^T H + sum_{t >= s} A_ts do_t
    H   <- exp(G_last) * H + scale (q * exp(G))^T do

Then ``dg = reverse_cumsum(q * dq - k * dk)`` (the gradient of ``G_t`` is ``q_t dq_t - k_t dk_t`` channel-wise) in
float32, from the kernels' float32 ``dq`` / ``dk`` (PyTorch, or one Triton pass with ``TUNING["bwd_fused_dg"]``); the
first gate of the walk gets an exact 0 (it only decays the zero initial state; the sum of every ``dG_t`` is 0 up to
float32 cancellation). The backward kernels take every value channel in one program (``dq`` sums over them). With
few (batch, head) programs (batch 1 at high resolution) the walks are cut into segments that start from incoming
states and adjoints computed first (``TUNING``).

Tile products (``A v``, the read-out, the state updates and the factored chunk blocks) run on the tensor cores for
bfloat16 inputs (TF32; three TF32 products in the backward of long sequences) and in IEEE float32 on the FMA units for
float16 and float32 inputs (``TUNING["half_dot_precision"]``); the ``[T, T, K]`` decay tiles always in float32.
``K`` and ``V`` up to 64 (ViG: 32 and 64; a 64 x 128 state spills registers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..scan import gla_packed_views
from . import tuning_flag, tuning_int
from ._eager import eager_call, eager_op
from ._launch import cdiv, launch, tile_dim
from .linear import _num_sms

__all__ = [
    "MAX_KEY_DIM",
    "MAX_VALUE_DIM",
    "TUNING",
    "bidirectional_gla_triton",
    "bidirectional_gla_triton_qkv",
    "gla_triton",
]

#: Largest key head dim (the ``[T, T, K]`` decay tile stays in registers) and value head dim.
MAX_KEY_DIM = 64
MAX_VALUE_DIM = 64
CHUNK = 16
#: ``TUNING["intra_factor"]``: a chunk's decay range (``G_0 - G_last``, log units, per channel) below which its
#: ``[T, T]`` block is formed from factored ``[T, K]`` tiles (the exponents stay within float32's range).
FACTOR_LIMIT = tl.constexpr(60.0)
#: Rows per tile of the fused epilogue (``TUNING["bwd_fused_dg"]``).
DG_ROWS = 32
#: Programs along a CUDA grid's second or third axis, at most.
MAX_GRID_AXIS = 65535
#: Value channels per program of the ``dk`` / ``dv`` kernel (its ``dk`` shares are summed by PyTorch): at 64 the kernel
#: spilled registers for sm_90 in float16 at ViG's head dims.
KV_BLOCK_V = 32

#: The forward's segmented walk (``"segments"``, on: 1.3x / 3.7x / 5.4x on ViG-S at 1024 / 2048 / 4096 px, batch 1,
#: and 15x on the op at 65,536 tokens, H200 at 7c4b443, ``benchmarks/gla_segments.py``): when the (batch,
#: head, value block) programs are fewer than the SMs (batch 1 at high resolution: ViG-S at 4096 px walked a
#: million-token stage in six programs), the sequence is cut into segments of at least ``"segment_chunks"`` chunks,
#: about four programs per SM in all, in three passes: each segment's own state (in parallel), the incoming states
#: (a short walk over the segments), each segment's outputs from its incoming state (in parallel). Same math, the
#: decays summed per segment (``"segment_below"`` / ``"segment_target"``: segment when the programs are fewer than
#: that many per SM, aiming at the target per SM).
#:
#: The backward's segmented walks (``"bwd_segments"``; the forward's rule, below one program per SM): the same cut
#: for the ``dq`` walk (forward) and the ``dk`` / ``dv`` walk (reverse), each segment starting from its incoming
#: state / state adjoint, which two short passes compute first (each segment's own state and adjoint in parallel,
#: then a walk over the segments). Measured on an H200 against the single walks (bf16, ViG-S's head dims, the
#: bidirectional op forward + backward, ``gla_backward_*_8f52911.json``): 3.27x at batch 1 x 65,536 tokens, 2.04x at
#: 4 x 16,384, 1.09x at 16 x 3,136. Where the (batch, head) programs fill the SMs, segmenting anyway was slower
#: (ViG-S's training shape, 128 x 196 tokens: 0.90x at 16 programs per SM, 0.75x with every chunk its own segment;
#: its training step 0.95x / 0.85x): there the walks are bound by each chunk's ``[T, T, K]`` decay tiles, not by
#: latency, and the extra passes only add work. ``"max_state_mib"`` bounds the float32 state buffers (incoming
#: states and adjoints) of one call.
#:
#: ``"bwd_intra"``: the chunks' own terms of ``dq``, ``dk``, ``dv`` (the decay tile, ``A``, ``dA``) in one kernel
#: parallel over the chunks, one decay tile per chunk, and walks that carry only ``[K, V]`` products. Off, each walk
#: forms its own decay tiles (the ``dk`` / ``dv`` walk one per value block of ``KV_BLOCK_V``): three decay tiles and
#: five ``[T, T, K]`` reductions per chunk where the forward has one and one (a ViG-S training step spent 40 of its
#: 95 ms in the two walks, ``profile_hier_train_8b3c786``). It holds a float32 ``[B, L, H, V]`` of the chunks' own
#: ``dv`` terms for the call. On: measured on an H200 (bf16, ``gla_backward_0f2cfac.json``), the op forward + backward
#: 1.13x / 1.03x / 1.18x the walks alone at ViG-S / ViG-T 224 px batch 128 and ViG-S 448 px batch 32, 1.24-1.36x
#: together with ``"bwd_fused_dg"``; a ViG-S training step 1.07x alone, 1.12x with both.
#:
#: ``"bwd_fused_dg"``: the backward's epilogue (``dk``'s value-block shares summed, ``q dq - k dk``, its reverse
#: cumulative sum along the walk into the gates' gradient, the casts: about a dozen PyTorch kernels per call, 24 calls
#: per ViG-S training step) in one Triton pass, where the (batch, head) programs fill the SMs (each walks
#: its sequence; with fewer, PyTorch's parallel scan is used). On: 1.09-1.14x the PyTorch epilogue at those shapes
#: (op forward + backward), 1.05x a ViG-S training step, and a lower peak (202 vs 257 MiB at ViG-S's shape).
#:
#: ``"half_dot_precision"``: the products of the kernels' ``[T, K]`` / ``[K, V]`` tiles (state, read-out, ``A v``)
#: for float16 / bfloat16 inputs: ``"ieee"`` (float32 on the FMA units, as float32 inputs always are), ``"tf32"`` or
#: ``"tf32x3"`` (tensor cores: one TF32 product, 2^-11 relative per product; or three, near float32), or ``"auto"``
#: (shipped): ``"ieee"`` for float16; for bfloat16 (its inputs round at 2^-8, eight times coarser) ``"tf32"``, but
#: ``"tf32x3"`` in the backward over more than :data:`AUTO_TF32_TOKENS` tokens. Measured on an H200
#: (``gpu_tests_s36_{093ba63,3bc0eb2}.log``): with ``"tf32"`` the gates' gradient, a reverse cumulative sum of
#: ``q dq - k dk`` that cancels, was 2.2e-2 off the float64 reference for bfloat16 at 65,536 tokens (its bound
#: 1.57e-2; within it at 20,000) and 4.4e-3 for float16 at strong decays over 2,000 tokens (its bound 2.05e-3). At
#: ViG-S's shape (B 128, 196 tokens, 6 heads, bf16; ``gla_backward_093ba63.json``) op forward + backward took 2.66 ms
#: in IEEE, 1.79 with ``"tf32"``, 2.26 with ``"tf32x3"``; a ViG-S training step under CUDA graphs 0.57x ``swin_tiny``
#: in IEEE (f40498f), 0.99x with ``"tf32"`` and the factored blocks, 0.81x with ``"tf32x3"`` in the backward (though
#: the op alone took the same time with either: 1.66 / 1.75 ms, ``gla_backward_f6bee75.json``).
#:
#: ``"intra_factor"``: a chunk's own block ``A_ts = sum_k q_tk k_sk exp(G_tk - G_sk)`` (and, in the backward's intra
#: kernel, ``dq`` / ``dk`` from ``dA``) as products of ``[T, K]`` tiles, ``(q exp(G - G_last)) (k exp(G_last - G))^T``,
#: instead of the ``[T, T, K]`` decay tile with one exponential per element, in chunks whose decay range is below
#: :data:`FACTOR_LIMIT` (every factor within float32's range, products exact to float32's relative precision); other
#: chunks take the decay tile. On (shipped): op forward + backward at ViG-S's shape 2.66 -> 2.11 ms alone,
#: 1.34 ms with TF32 products (1.98x; ``gla_backward_093ba63.json``).
TUNING: dict[str, bool | int | str] = {
    "segments": True,
    "segment_chunks": 64,
    "segment_below": 1,
    "segment_target": 4,
    "bwd_segments": True,
    "bwd_segment_chunks": 16,
    "bwd_segment_below": 1,
    "bwd_segment_target": 4,
    "max_state_mib": 256,
    "bwd_intra": True,
    "bwd_fused_dg": True,
    "half_dot_precision": "auto",
    "intra_factor": True,
    "launch": {},
}
#: ``TUNING["launch"]``: per-kernel launch overrides for measurement, ``{name: {"num_warps": w, "num_stages": s}}``
#: with ``name`` one of these (empty: :func:`warps`' rule and Triton's default stages).
LAUNCH_NAMES = ("fwd", "intra", "bwd_q", "bwd_kv", "dg", "seg")


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """``a @ b`` of float32 tiles, float32 accumulation: ``PREC`` ``"ieee"`` (FMA units), ``"tf32"`` or ``"tf32x3"``
    (tensor cores; one TF32 product, or three with an error near float32's)."""
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _chunk(Q, K, V, GG, base_qk, base_v, c, L, s_l, s_lg, s_lv, s_k, s_v, K_DIM, V_DIM, v0,
           REVERSE: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
           G_OWN: tl.constexpr):  # fmt: skip
    """Load chunk ``c`` (positions in walk order; reversed in memory when ``REVERSE``): ``q, k, g`` ``[T, BK]``,
    ``v`` ``[T, BV]`` in float32, the memory position ``pos`` ``[T]`` and its mask. ``q`` and ``k`` share strides;
    the gates too unless ``G_OWN``: then ``GG`` points at the gates' (batch, head) rows, which have their own position
    stride ``s_lg`` (ViG's gates come from another projection than ``q`` and ``k``: copying all three to one layout
    cost three copies per call)."""
    idx = tl.arange(0, T)
    t = c * T + idx
    tmask = t < L
    pos = tl.where(REVERSE, L - 1 - t, t).to(tl.int64)
    offs_k = tl.arange(0, BK)
    offs_v = v0 + tl.arange(0, BV)
    mk = tmask[:, None] & (offs_k < K_DIM)[None, :]
    mv = tmask[:, None] & (offs_v < V_DIM)[None, :]
    qk_off = base_qk + pos[:, None] * s_l + offs_k[None, :] * s_k
    q = tl.load(Q + qk_off, mask=mk, other=0.0).to(tl.float32)
    k = tl.load(K + qk_off, mask=mk, other=0.0).to(tl.float32)
    g_off = pos[:, None] * s_lg + offs_k[None, :] * s_k if G_OWN else qk_off
    g = tl.load(GG + g_off, mask=mk, other=0.0).to(tl.float32)
    v = tl.load(V + base_v + pos[:, None] * s_lv + offs_v[None, :] * s_v, mask=mv, other=0.0).to(tl.float32)
    return q, k, g, v, pos, tmask


@triton.jit
def _head_bases(bh, H, GG, sq_b, sq_h, sgg_b, sgg_h, sv_b, sv_h, G_OWN: tl.constexpr):
    """``(b, h, base_qk, GG, base_v)`` of (batch x head) row ``bh``: its batch and head (int64), the offsets of its
    ``q`` / ``k`` and ``v`` rows, and ``GG`` moved to its gates' rows when they have their own strides (``G_OWN``;
    else the gates' offsets are ``q``'s)."""
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if G_OWN:
        GG += b * sgg_b + h * sgg_h
    return b, h, b * sq_b + h * sq_h, GG, b * sv_b + h * sv_h


@triton.jit
def _causal(T: tl.constexpr):
    """``s <= t`` over a chunk: ``[T(t), T(s)]``."""
    idx = tl.arange(0, T)
    return idx[:, None] >= idx[None, :]


@triton.jit
def _decay(G, T: tl.constexpr):
    """``exp(G_t - G_s)`` for ``s <= t``, else 0: ``[T(t), T(s), BK]``."""
    diff = tl.where(_causal(T)[:, :, None], G[:, None, :] - G[None, :, :], float("-inf"))
    return tl.exp(diff)


@triton.jit
def _factored(G, g_last, LIMIT: tl.constexpr):
    """Whether the chunk's decays let ``exp(G_t - G_s)`` be factored as ``exp(G_t - G_last) * exp(G_last - G_s)``:
    the first factor is at most ``exp(G_0 - G_last)`` per channel (the second at most 1), so below ``exp(LIMIT)``
    neither overflows nor underflows in float32 and each product keeps float32's relative precision."""
    return tl.max(tl.max(G - g_last[None, :], axis=1), axis=0) < LIMIT


@triton.jit
def _segment(seg, seg_chunks, L, T: tl.constexpr):
    """The chunks ``[c0, c1)`` of segment ``seg`` (``seg_chunks`` each, the last one cut at the sequence's end)."""
    c0 = seg * seg_chunks
    return c0, tl.minimum(c0 + seg_chunks, tl.cdiv(L, T))


@triton.jit
def _state_tile(STATES, slot, BK: tl.constexpr, BV: tl.constexpr):
    """Pointers to the ``[BK, BV]`` float32 state (or adjoint) tile ``slot`` of a contiguous ``[..., BK, BV]``."""
    return STATES + slot * BK * BV + tl.arange(0, BK)[:, None] * BV + tl.arange(0, BV)[None, :]


@triton.jit
def _gla_fwd_kernel(
    Q, K, V, GG, Out, INIT, PREV,
    L, H, K_DIM, V_DIM, scale, seg_chunks,
    sq_b, sq_l, sq_h, sq_k, sgg_b, sgg_l, sgg_h, sv_b, sv_l, sv_h, sv_d, so_b, so_l, so_h, so_d,
    REVERSE: tl.constexpr, G_OWN: tl.constexpr, PREC: tl.constexpr, FACTOR: tl.constexpr, SEGMENTED: tl.constexpr,
    ACC: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """The outputs of one (batch, head) and value block: the whole walk from a zero state, or (``SEGMENTED``) the
    chunks of segment ``program_id(2)`` from its incoming state ``INIT[bh, vb, seg]`` (``[BK, BV]`` float32).
    ``ACC``: the other direction's float32 outputs ``PREV`` (contiguous ``[B, L, H, V]``) are added before the one
    rounding to ``Out``'s dtype (the bidirectional op's second walk)."""
    bh = tl.program_id(0)
    b, h, base_qk, GG, base_v = _head_bases(bh, H, GG, sq_b, sq_h, sgg_b, sgg_h, sv_b, sv_h, G_OWN)
    v0 = tl.program_id(1) * BV
    offs_v = v0 + tl.arange(0, BV)
    n_chunks = tl.cdiv(L, T)
    if SEGMENTED:
        seg = tl.program_id(2)
        c0, c1 = _segment(seg, seg_chunks, L, T)
        slot = (bh.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + seg
        state = tl.load(_state_tile(INIT, slot, BK, BV))
    else:
        c0 = 0
        c1 = n_chunks
        state = tl.zeros([BK, BV], dtype=tl.float32)
    for c in range(c0, c1):
        q, k, g, v, pos, tmask = _chunk(Q, K, V, GG, base_qk, base_v, c, L, sq_l, sgg_l, sv_l, sq_k, sv_d,
                                        K_DIM, V_DIM, v0, REVERSE, T, BK, BV, G_OWN)  # fmt: skip
        G = tl.cumsum(g, axis=0)
        g_last = tl.sum(g, axis=0)  # [BK]
        kw = k * tl.exp(g_last[None, :] - G)  # each key decayed to the chunk's end (the state update's, and A's)
        if FACTOR and _factored(G, g_last, FACTOR_LIMIT):  # A as one product of [T, K] tiles (module docstring)
            a = tl.where(_causal(T), _dot(q * tl.exp(G - g_last[None, :]), tl.trans(kw), PREC), 0.0) * scale
        else:
            a = tl.sum(q[:, None, :] * k[None, :, :] * _decay(G, T), axis=2) * scale  # [T, T]
        omask = tmask[:, None] & (offs_v < V_DIM)[None, :]
        o = _dot(a, v, PREC) + _dot(q * tl.exp(G) * scale, state, PREC)
        if ACC:
            o += tl.load(PREV + ((b * L + pos[:, None]) * H + h) * V_DIM + offs_v[None, :], mask=omask, other=0.0)
        tl.store(Out + b * so_b + h * so_h + pos[:, None] * so_l + offs_v[None, :] * so_d, o.to(Out.dtype.element_ty),
                 mask=omask)  # fmt: skip
        state = tl.exp(g_last)[:, None] * state + _dot(tl.trans(kw), v, PREC)


@triton.jit
def _gla_seg_state_kernel(
    K, V, GG, STATE, GSUM,
    L, H, K_DIM, V_DIM, seg_chunks,
    sq_b, sq_l, sq_h, sq_k, sgg_b, sgg_l, sgg_h, sv_b, sv_l, sv_h, sv_d,
    REVERSE: tl.constexpr, G_OWN: tl.constexpr, PREC: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """Pass 1 of the segmented forward: segment ``program_id(2)``'s own contribution to the state (its walk from a
    zero state) into ``STATE[bh, vb, seg]`` and its total log-decay ``sum g`` into ``GSUM[bh, seg]`` (``[BK]``)."""
    bh = tl.program_id(0)
    b, h, base_qk, GG, base_v = _head_bases(bh, H, GG, sq_b, sq_h, sgg_b, sgg_h, sv_b, sv_h, G_OWN)
    v0 = tl.program_id(1) * BV
    seg = tl.program_id(2)
    c0, c1 = _segment(seg, seg_chunks, L, T)
    state = tl.zeros([BK, BV], dtype=tl.float32)
    gsum = tl.zeros([BK], dtype=tl.float32)
    for c in range(c0, c1):
        # q is not needed: K is passed in its place (the loads of the shared helper)
        _, k, g, v, _, _ = _chunk(K, K, V, GG, base_qk, base_v, c, L, sq_l, sgg_l, sv_l, sq_k, sv_d,
                                  K_DIM, V_DIM, v0, REVERSE, T, BK, BV, G_OWN)  # fmt: skip
        G = tl.cumsum(g, axis=0)
        g_last = tl.sum(g, axis=0)
        state = tl.exp(g_last)[:, None] * state + _dot(tl.trans(k * tl.exp(g_last[None, :] - G)), v, PREC)
        gsum += g_last
    offs_k = tl.arange(0, BK)
    slot = (bh.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + seg
    tl.store(_state_tile(STATE, slot, BK, BV), state)
    if tl.program_id(1) == 0:
        tl.store(GSUM + (bh.to(tl.int64) * tl.num_programs(2) + seg) * BK + offs_k, gsum)


@triton.jit
def _gla_seg_carry_kernel(STATE, GSUM, n_seg, BK: tl.constexpr, BV: tl.constexpr):
    """Pass 2: walks the segments of one (batch, head) and value block in order and replaces each segment's own
    state by its incoming one, ``S_in[j + 1] = exp(GSUM[j]) * S_in[j] + STATE[j]``, ``S_in[0] = 0`` (in place)."""
    bh = tl.program_id(0).to(tl.int64)
    base = (bh * tl.num_programs(1) + tl.program_id(1)) * n_seg
    offs_k = tl.arange(0, BK)
    tile = offs_k[:, None] * BV + tl.arange(0, BV)[None, :]
    carried = tl.zeros([BK, BV], dtype=tl.float32)
    for j in range(0, n_seg):
        own = tl.load(STATE + (base + j) * BK * BV + tile)
        tl.store(STATE + (base + j) * BK * BV + tile, carried)
        carried = tl.exp(tl.load(GSUM + (bh * n_seg + j) * BK + offs_k))[:, None] * carried + own


@triton.jit
def _gla_bwd_q_kernel(
    Q, K, V, GG, G, DQ, INIT,
    L, H, K_DIM, V_DIM, scale, seg_chunks,
    sq_b, sq_l, sq_h, sq_k, sgg_b, sgg_l, sgg_h, sv_b, sv_l, sv_h, sv_d, sg_b, sg_l, sg_h, sg_d,
    REVERSE: tl.constexpr, G_OWN: tl.constexpr, PREC: tl.constexpr, SEGMENTED: tl.constexpr, INTRA: tl.constexpr,
    T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """``dq`` (float32, ``[B, L, H, K]`` contiguous) of one (batch, head): a forward walk that recomputes the state,
    from a zero state, or (``SEGMENTED``) over the chunks of segment ``program_id(1)`` from its incoming state
    ``INIT[bh, 0, seg]`` (every value channel in one block). ``INTRA``: ``DQ`` already holds the chunks' own terms
    (:func:`_gla_bwd_intra_kernel`); the walk adds the state's."""
    bh = tl.program_id(0)
    b, h, base_qk, GG, base_v = _head_bases(bh, H, GG, sq_b, sq_h, sgg_b, sgg_h, sv_b, sv_h, G_OWN)
    offs_k = tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    n_chunks = tl.cdiv(L, T)
    if SEGMENTED:
        seg = tl.program_id(1)
        c0, c1 = _segment(seg, seg_chunks, L, T)
        state = tl.load(_state_tile(INIT, bh.to(tl.int64) * tl.num_programs(1) + seg, BK, BV))
    else:
        c0 = 0
        c1 = n_chunks
        state = tl.zeros([BK, BV], dtype=tl.float32)
    for c in range(c0, c1):
        q, k, g, v, pos, tmask = _chunk(Q, K, V, GG, base_qk, base_v, c, L, sq_l, sgg_l, sv_l, sq_k, sv_d,
                                        K_DIM, V_DIM, 0, REVERSE, T, BK, BV, G_OWN)  # fmt: skip
        do = tl.load(G + b * sg_b + h * sg_h + pos[:, None] * sg_l + offs_v[None, :] * sg_d,
                     mask=tmask[:, None] & (offs_v < V_DIM)[None, :], other=0.0).to(tl.float32)  # fmt: skip
        G_ = tl.cumsum(g, axis=0)
        g_last = tl.sum(g, axis=0)
        dq_ptr = DQ + ((b * L + pos[:, None]) * H + h) * K_DIM + offs_k[None, :]
        kmask = tmask[:, None] & (offs_k < K_DIM)[None, :]
        if INTRA:
            dq = tl.load(dq_ptr, mask=kmask, other=0.0)
        else:
            da = _dot(do, tl.trans(v), PREC) * scale  # [T(t), T(s)]
            dq = tl.sum(da[:, :, None] * _decay(G_, T) * k[None, :, :], axis=1)  # [T, BK]
        dq += _dot(do, tl.trans(state), PREC) * tl.exp(G_) * scale
        tl.store(dq_ptr, dq, mask=kmask)
        state = tl.exp(g_last)[:, None] * state + _dot(tl.trans(k * tl.exp(g_last[None, :] - G_)), v, PREC)


@triton.jit
def _gla_seg_adj_kernel(
    Q, GG, G, ADJ, GSUM,
    L, H, K_DIM, V_DIM, scale, seg_chunks,
    sq_b, sq_l, sq_h, sq_k, sgg_b, sgg_l, sgg_h, sg_b, sg_l, sg_h, sg_d,
    REVERSE: tl.constexpr, G_OWN: tl.constexpr, PREC: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """The segmented backward's first pass for ``dk`` / ``dv``: segment ``program_id(2)``'s own contribution to the
    state's adjoint (its reverse walk from a zero adjoint, ``H <- exp(g_last) H + scale (q exp(G))^T do``) and its
    total log-decay, stored in reversed segment order (slot ``n_seg - 1 - seg``) so that
    :func:`_gla_seg_carry_kernel`'s walk over the slots turns them into the adjoint entering each segment from its
    right."""
    bh = tl.program_id(0)
    b, h, base_qk, GG, base_g = _head_bases(bh, H, GG, sq_b, sq_h, sgg_b, sgg_h, sg_b, sg_h, G_OWN)
    v0 = tl.program_id(1) * BV
    seg = tl.program_id(2)
    n_seg = tl.num_programs(2)
    c0, c1 = _segment(seg, seg_chunks, L, T)
    adj = tl.zeros([BK, BV], dtype=tl.float32)
    gsum = tl.zeros([BK], dtype=tl.float32)
    for cc in range(0, c1 - c0):
        c = c1 - 1 - cc
        # k is not needed: Q is passed in its place, and the output gradient in place of v (the shared loads)
        q, _, g, do, _, _ = _chunk(Q, Q, G, GG, base_qk, base_g, c, L, sq_l, sgg_l, sg_l, sq_k, sg_d,
                                   K_DIM, V_DIM, v0, REVERSE, T, BK, BV, G_OWN)  # fmt: skip
        G_ = tl.cumsum(g, axis=0)
        g_last = tl.sum(g, axis=0)
        adj = tl.exp(g_last)[:, None] * adj + _dot(tl.trans(q * tl.exp(G_) * scale), do, PREC)
        gsum += g_last
    offs_k = tl.arange(0, BK)
    rev = n_seg - 1 - seg
    slot = (bh.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * n_seg + rev
    tl.store(_state_tile(ADJ, slot, BK, BV), adj)
    if tl.program_id(1) == 0:
        tl.store(GSUM + (bh.to(tl.int64) * n_seg + rev) * BK + offs_k, gsum)


@triton.jit
def _gla_bwd_kv_kernel(
    Q, K, V, GG, G, DK, DVv, INIT, DVI, DVP,
    L, H, K_DIM, V_DIM, scale, seg_chunks,
    sq_b, sq_l, sq_h, sq_k, sgg_b, sgg_l, sgg_h, sv_b, sv_l, sv_h, sv_d, sg_b, sg_l, sg_h, sg_d, sdv_b, sdv_l, sdv_h,
    REVERSE: tl.constexpr, G_OWN: tl.constexpr, PREC: tl.constexpr, SEGMENTED: tl.constexpr, INTRA: tl.constexpr,
    DV_ACC: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """``dk`` (float32, this value block's share: ``DK[pid_v]`` of ``[n_blocks, B, L, H, K]``) and ``dv`` (the inputs'
    dtype) of one (batch, head) and block of value channels: a reverse walk carrying the state's adjoint, from a zero
    adjoint, or (``SEGMENTED``) over the chunks of segment ``program_id(2)`` from the adjoint entering it from its
    right (slot ``n_seg - 1 - seg`` of ``INIT``, :func:`_gla_seg_adj_kernel`). ``INTRA``: ``DK`` and ``DVI`` (float32,
    ``[B, L, H, V]`` contiguous) already hold the chunks' own terms (:func:`_gla_bwd_intra_kernel`; ``dk``'s whole in
    value block 0's share); the walk adds the state adjoint's. ``dv`` goes to ``DVv`` (contiguous ``[B, L, H, V]``)
    in ``DVv``'s dtype (the inputs', or float32 for the packed bidirectional op's first walk); ``DV_ACC`` (its second
    walk): plus the other direction's float32 ``dv`` ``DVP`` (contiguous), before the one rounding, stored through
    ``DVv``'s strides ``sdv_*`` (channel stride 1)."""
    bh = tl.program_id(0)
    b, h, base_qk, GG, base_v = _head_bases(bh, H, GG, sq_b, sq_h, sgg_b, sgg_h, sv_b, sv_h, G_OWN)
    v0 = tl.program_id(1) * BV
    DK += tl.program_id(1).to(tl.int64) * tl.num_programs(0) * L * K_DIM
    offs_k = tl.arange(0, BK)
    offs_v = v0 + tl.arange(0, BV)
    n_chunks = tl.cdiv(L, T)
    if SEGMENTED:
        seg = tl.program_id(2)
        c0, c1 = _segment(seg, seg_chunks, L, T)
        rev = tl.num_programs(2) - 1 - seg
        slot = (bh.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + rev
        adj = tl.load(_state_tile(INIT, slot, BK, BV))
    else:
        c0 = 0
        c1 = n_chunks
        adj = tl.zeros([BK, BV], dtype=tl.float32)
    for cc in range(0, c1 - c0):
        c = c1 - 1 - cc
        q, k, g, v, pos, tmask = _chunk(Q, K, V, GG, base_qk, base_v, c, L, sq_l, sgg_l, sv_l, sq_k, sv_d,
                                        K_DIM, V_DIM, v0, REVERSE, T, BK, BV, G_OWN)  # fmt: skip
        do = tl.load(G + b * sg_b + h * sg_h + pos[:, None] * sg_l + offs_v[None, :] * sg_d,
                     mask=tmask[:, None] & (offs_v < V_DIM)[None, :], other=0.0).to(tl.float32)  # fmt: skip
        G_ = tl.cumsum(g, axis=0)
        g_last = tl.sum(g, axis=0)
        if INTRA:  # the chunk's own dk (whole, in value block 0's share) and dv, then the state adjoint's terms
            ptr = (b * L + pos[:, None]) * H + h
            w = tl.exp(g_last[None, :] - G_)  # [T, BK]: decay from each position to the chunk's end
            kmask = tmask[:, None] & (offs_k < K_DIM)[None, :] & (tl.program_id(1) == 0)
            dk = tl.load(DK + ptr * K_DIM + offs_k[None, :], mask=kmask, other=0.0)
            dk += _dot(v, tl.trans(adj), PREC) * w
            vmask = tmask[:, None] & (offs_v < V_DIM)[None, :]
            dv = tl.load(DVI + ptr * V_DIM + offs_v[None, :], mask=vmask, other=0.0) + _dot(k * w, adj, PREC)
        else:
            # (the order of these statements is the one ptxas kept within 255 registers at K = 64 for sm_90)
            e = _decay(G_, T)  # [T(t), T(s), BK]
            da = _dot(do, tl.trans(v), PREC) * scale  # [T(t), T(s)]
            a = tl.sum(q[:, None, :] * k[None, :, :] * e, axis=2) * scale  # [T(t), T(s)]
            w = tl.exp(g_last[None, :] - G_)  # [T, BK]: decay from each position to the chunk's end
            dk = tl.sum(da[:, :, None] * e * q[:, None, :], axis=0)  # [T(s), BK]
            dk += _dot(v, tl.trans(adj), PREC) * w
            dv = _dot(tl.trans(a), do, PREC) + _dot(k * w, adj, PREC)
            ptr = (b * L + pos[:, None]) * H + h
        tl.store(DK + ptr * K_DIM + offs_k[None, :], dk, mask=tmask[:, None] & (offs_k < K_DIM)[None, :])
        vmask = tmask[:, None] & (offs_v < V_DIM)[None, :]
        if DV_ACC:  # (strided stores only here: three more offsets spilled the walks-only K = 64 kernel for sm_90)
            dv += tl.load(DVP + ptr * V_DIM + offs_v[None, :], mask=vmask, other=0.0)
            dv_ptr = DVv + b * sdv_b + h * sdv_h + pos[:, None] * sdv_l + offs_v[None, :]
        else:
            dv_ptr = DVv + ptr * V_DIM + offs_v[None, :]
        tl.store(dv_ptr, dv.to(DVv.dtype.element_ty), mask=vmask)
        adj = tl.exp(g_last)[:, None] * adj + _dot(tl.trans(q * tl.exp(G_) * scale), do, PREC)


@triton.jit
def _gla_bwd_intra_kernel(
    Q, K, V, GG, G, DQ, DK, DVI,
    L, H, K_DIM, V_DIM, scale,
    sq_b, sq_l, sq_h, sq_k, sgg_b, sgg_l, sgg_h, sv_b, sv_l, sv_h, sv_d, sg_b, sg_l, sg_h, sg_d,
    REVERSE: tl.constexpr, G_OWN: tl.constexpr, PREC: tl.constexpr, FACTOR: tl.constexpr, T: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """The terms of one chunk of one (batch, head) that involve only the chunk itself, in parallel over the chunks
    (float32, contiguous ``[B, L, H, *]``): ``DQ`` ``sum_{s <= t} dA_ts exp(G_t - G_s) * k_s``, ``DK``
    ``sum_{t >= s} dA_ts exp(G_t - G_s) * q_t``, ``DVI`` ``sum_{t >= s} A_ts do_t``, from one ``[T, T, K]`` decay
    tile (the walks then carry only ``[K, V]`` products, no decay tile). One grid axis, ``(batch, head)``-major:
    the second and third axes stop at 65,535 programs (a million-token stage has 65,536 chunks)."""
    pid = tl.program_id(0).to(tl.int64)
    n_chunks = tl.cdiv(L, T)
    bh = pid // n_chunks
    c = (pid % n_chunks).to(tl.int32)
    b, h, base_qk, GG, base_v = _head_bases(bh, H, GG, sq_b, sq_h, sgg_b, sgg_h, sv_b, sv_h, G_OWN)
    offs_k = tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    q, k, g, v, pos, tmask = _chunk(Q, K, V, GG, base_qk, base_v, c, L, sq_l, sgg_l, sv_l, sq_k, sv_d,
                                    K_DIM, V_DIM, 0, REVERSE, T, BK, BV, G_OWN)  # fmt: skip
    vmask = tmask[:, None] & (offs_v < V_DIM)[None, :]
    do = tl.load(G + b * sg_b + h * sg_h + pos[:, None] * sg_l + offs_v[None, :] * sg_d, mask=vmask,
                 other=0.0).to(tl.float32)  # fmt: skip
    G = tl.cumsum(g, axis=0)
    g_last = tl.sum(g, axis=0)
    da = _dot(do, tl.trans(v), PREC) * scale  # [T(t), T(s)]
    if FACTOR and _factored(G, g_last, FACTOR_LIMIT):  # three products of [T, K] tiles (module docstring)
        qf, kf = tl.exp(G - g_last[None, :]), tl.exp(g_last[None, :] - G)
        qt, kt = q * qf, k * kf
        causal = _causal(T)
        a = tl.where(causal, _dot(qt, tl.trans(kt), PREC), 0.0) * scale
        dam = tl.where(causal, da, 0.0)
        dq = _dot(dam, kt, PREC) * qf
        dk = _dot(tl.trans(dam), qt, PREC) * kf
    else:
        e = _decay(G, T)  # [T(t), T(s), BK]
        a = tl.sum(q[:, None, :] * k[None, :, :] * e, axis=2) * scale  # [T(t), T(s)]
        de = da[:, :, None] * e
        dq = tl.sum(de * k[None, :, :], axis=1)  # [T(t), BK]
        dk = tl.sum(de * q[:, None, :], axis=0)  # [T(s), BK]
    dv = _dot(tl.trans(a), do, PREC)  # [T(s), BV]
    ptr = (b * L + pos[:, None]) * H + h
    kmask = tmask[:, None] & (offs_k < K_DIM)[None, :]
    tl.store(DQ + ptr * K_DIM + offs_k[None, :], dq, mask=kmask)
    tl.store(DK + ptr * K_DIM + offs_k[None, :], dk, mask=kmask)
    tl.store(DVI + ptr * V_DIM + offs_v[None, :], dv, mask=vmask)


@triton.jit
def _gla_dg_kernel(
    Q, K, DQ, DKP, DG, DQO, DKO, PDQ, PDKP,
    L, H, K_DIM, n_parts, part_stride,
    sq_b, sq_l, sq_h, sq_k, sdg_b, sdg_l, sdg_h, so_b, so_l, so_h,
    REVERSE: tl.constexpr, PAIR: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """The backward's epilogue for one (batch, head), one pass instead of a dozen PyTorch ones: ``dk`` = the sum of
    the walks' value-block shares ``DKP``, ``dG = q * dq - k * dk`` and the gates' gradient ``dg_w = sum_{w' >= w}
    dG_w'`` in walk order (tiles from the walk's end, a float32 carry between them), 0 for the walk's first gate;
    writes ``dg`` (strides ``sdg_*``), ``dq`` and ``dk`` (strides ``so_*``; channel strides 1) in their buffers' dtypes
    (``DQ`` / ``DKP`` float32, contiguous). The bidirectional op's two walks (``PAIR``): the first (1) writes ``dg``
    only; the second (2) adds the first's float32 ``dq`` ``PDQ`` and ``dk`` shares ``PDKP`` (laid out as ``DQ`` /
    ``DKP``) to its own before writing ``dq`` and ``dk`` (0: a single direction)."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_k = tl.arange(0, BK)  # every key channel (BK = tile_dim(K) >= K)
    kmask = offs_k < K_DIM
    carry = tl.zeros([BK], dtype=tl.float32)
    n_tiles = tl.cdiv(L, BL)
    for i in range(0, n_tiles):
        t = (n_tiles - 1 - i) * BL + tl.arange(0, BL)  # walk positions
        pos = tl.where(REVERSE, L - 1 - t, t).to(tl.int64)
        mask = (t < L)[:, None] & kmask[None, :]
        src = b * sq_b + h * sq_h + pos[:, None] * sq_l + offs_k[None, :] * sq_k
        q = tl.load(Q + src, mask=mask, other=0.0).to(tl.float32)
        k = tl.load(K + src, mask=mask, other=0.0).to(tl.float32)
        dst = ((b * L + pos[:, None]) * H + h) * K_DIM + offs_k[None, :]
        dq = tl.load(DQ + dst, mask=mask, other=0.0)
        dk = tl.zeros([BL, BK], dtype=tl.float32)
        # (p * part_stride stays below 2^31 where part_stride is int32: at most two shares, V <= MAX_VALUE_DIM = 64 in
        # KV_BLOCK_V = 32 blocks; an int64 offset here spilled registers at K = 64 for sm_90)
        for p in range(0, n_parts):
            dk += tl.load(DKP + p * part_stride + dst, mask=mask, other=0.0)
        dgg = q * dq - k * dk
        dg = tl.cumsum(dgg, axis=0, reverse=True) + carry[None, :]
        carry += tl.sum(dgg, axis=0)
        dg = tl.where((t == 0)[:, None], 0.0, dg)
        tl.store(DG + b * sdg_b + h * sdg_h + pos[:, None] * sdg_l + offs_k[None, :], dg.to(DG.dtype.element_ty),
                 mask=mask)  # fmt: skip
        if PAIR != 1:
            if PAIR == 2:  # the first walk's dq and dk shares (same layout, same part count)
                dq += tl.load(PDQ + dst, mask=mask, other=0.0)
                for p in range(0, n_parts):
                    dk += tl.load(PDKP + p * part_stride + dst, mask=mask, other=0.0)
            out = b * so_b + h * so_h + pos[:, None] * so_l + offs_k[None, :]
            tl.store(DQO + out, dq.to(DQO.dtype.element_ty), mask=mask)
            tl.store(DKO + out, dk.to(DKO.dtype.element_ty), mask=mask)


# Host side ------------------------------------------------------------------------------------------------------------
def _blocks(kd: int, vd: int) -> tuple[int, int]:
    return tile_dim(kd), tile_dim(vd)


def _kv_blocks(vd: int) -> tuple[int, int]:
    """``(value channels per block, blocks)`` of the ``dk`` / ``dv`` walk (:data:`KV_BLOCK_V` at most per block)."""
    bv_kv = min(tile_dim(vd), KV_BLOCK_V)
    return bv_kv, cdiv(vd, bv_kv)


def _meta(name: str, default_warps: int) -> dict[str, int]:
    """``num_warps`` (and ``num_stages``) of kernel ``name``: ``default_warps`` unless ``TUNING["launch"]`` overrides
    it (a ``ValueError`` naming a malformed override: an unknown kernel or key, a warp count not a power of two)."""
    overrides = TUNING["launch"]
    if not isinstance(overrides, dict) or not set(overrides) <= set(LAUNCH_NAMES):
        raise ValueError(
            f"visionlin.kernels.triton.gla.TUNING['launch'] = {overrides!r}: must be a dict keyed by {LAUNCH_NAMES}"
        )
    meta = {"num_warps": default_warps}
    given = overrides.get(name, {})
    for key, value in given.items() if isinstance(given, dict) else [("", given)]:
        ok = key in ("num_warps", "num_stages") and type(value) is int and value >= 1
        if not ok or (key == "num_warps" and value & (value - 1)):
            raise ValueError(
                f"visionlin.kernels.triton.gla.TUNING['launch'][{name!r}] = {given!r}: allowed keys 'num_warps' (a "
                "power of two) and 'num_stages' (an integer >= 1)"
            )
        meta[key] = value
    return meta


DOT_PRECISIONS = ("auto", "ieee", "tf32", "tf32x3")
#: ``"auto"``'s longest bfloat16 sequence whose backward takes one TF32 product per tile product: within bfloat16's
#: bound at 20,000 tokens, 1.4x past it at 65,536 (H200, ``gpu_tests_s36_{093ba63,3bc0eb2}.log``).
AUTO_TF32_TOKENS = 16384


def dot_precision(dtype: torch.dtype, length: int = 0, backward: bool = False) -> str:
    """The kernels' ``PREC`` for inputs of ``dtype`` over sequences of ``length`` tokens: ``"ieee"`` for float32,
    ``TUNING["half_dot_precision"]`` for half precision; ``"auto"``: ``"ieee"`` for float16, for bfloat16 ``"tf32"``
    except the backward over more than :data:`AUTO_TF32_TOKENS` tokens, which takes ``"tf32x3"`` (its ``dq`` and ``dk``
    feed the gates' gradient, a cumulative sum along the sequence that cancels). A ``ValueError`` names any other
    setting."""
    prec = TUNING["half_dot_precision"]
    if prec not in DOT_PRECISIONS:
        raise ValueError(
            f"visionlin.kernels.triton.gla.TUNING['half_dot_precision'] = {prec!r}: allowed {DOT_PRECISIONS}"
        )
    if prec == "auto":
        if dtype != torch.bfloat16:
            return "ieee"
        return "tf32x3" if backward and length > AUTO_TF32_TOKENS else "tf32"
    return "ieee" if dtype == torch.float32 else prec


def warps(bk: int) -> int:
    """Warps per program: 4 up to a 32-wide key tile, 8 from a 64-wide one (the ``[T, T, K]`` decay tile). Measured on
    an H200 at ViG's head dims (K = 32, V = 64, bf16; ``gla_backward_launch_8a0d0ef.json``, one kernel changed at a
    time), every kernel was faster at 4 than at 8: the forward 1.13-1.20x, the op's forward + backward with the intra
    kernel at 4 1.16x / 1.14x, the ``dq`` walk 1.05x, the ``dk`` / ``dv`` walk 1.09x / 1.03x (ViG-S 224 px batch 128 /
    448 px batch 32); 16 slower everywhere."""
    return 8 if bk > 32 else 4


@torch.library.custom_op("visionlin::gla_fwd", mutates_args=())
def gla_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float, reverse: bool, float32_out: bool
) -> torch.Tensor:
    """``o`` ``[B, L, H, V]`` in ``v``'s dtype (float32 with ``float32_out``)."""
    return _forward(q, k, v, g, scale, reverse, torch.float32 if float32_out else v.dtype)


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    reverse: bool,
    dtype: torch.dtype,
    prev: torch.Tensor | None = None,
) -> torch.Tensor:
    """One direction's outputs ``[B, L, H, V]`` in ``dtype``; with ``prev`` (float32, contiguous, the other
    direction's outputs) their sum, rounded once."""
    b, length, h, kd = q.shape
    vd = v.shape[-1]
    out = torch.empty(b, length, h, vd, device=q.device, dtype=dtype)
    if out.numel() == 0:
        return out.zero_()
    bk, bv = _blocks(kd, vd)
    bv_fwd = min(bv, 64)
    q, k, g, g_own = _gla_layout(q, k, g)
    n_vb = cdiv(vd, bv_fwd)
    n_chunks = cdiv(length, CHUNK)
    n_seg, seg_chunks = _segments(b * h * n_vb, n_chunks, q.device)
    prec = dot_precision(v.dtype)
    factor = _flag("intra_factor")
    meta = dict(REVERSE=reverse, G_OWN=g_own, PREC=prec, FACTOR=factor, T=CHUNK, BK=bk, BV=bv_fwd,
                **_meta("fwd", warps(bk)))  # fmt: skip
    init = out  # a placeholder pointer when not segmented
    if n_seg > 1:
        init = _incoming_states(q, k, v, g, g_own, prec, reverse, n_seg, seg_chunks, bk, bv_fwd)
    launch(_gla_fwd_kernel, (b * h, n_vb, n_seg),
        q, k, v, g, out, init, out if prev is None else prev, length, h, kd, vd, scale,
        seg_chunks if n_seg > 1 else 0, *q.stride(), *g.stride()[:3], *v.stride(), *out.stride(),
        SEGMENTED=n_seg > 1, ACC=prev is not None, **meta,
    )  # fmt: skip
    return out


def _gla_layout(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, own: bool = True) -> tuple:
    """``(q, k, g, g_own)`` as the kernels read them: ``q`` and ``k`` with the same strides and ``g`` with their
    channel stride, its own batch / position / head strides (``g_own``, the kernels' ``G_OWN``) where they differ and
    ``own`` allows it (the walks-only backward: its decay tiles left no registers for a second set of offsets, ptxas
    spilled); otherwise all three contiguous."""
    if k.stride() != q.stride() or g.stride(-1) != q.stride(-1) or (not own and g.stride() != q.stride()):
        q, k, g = q.contiguous(), k.contiguous(), g.contiguous()
    return q, k, g, g.stride() != q.stride()


def _segments(programs: int, n_chunks: int, device: torch.device, backward: bool = False) -> tuple[int, int]:
    """``(segments, chunks per segment)`` of the forward walk (the backward's with ``backward``): ``(1, n_chunks)``
    unless ``TUNING["segments"]`` (``"bwd_segments"``) is on and ``programs`` (batch x heads x value blocks) are fewer
    than ``"segment_below"`` per SM; then about ``"segment_target"`` programs per SM in all, segments of at least
    ``"segment_chunks"`` chunks (the ``"bwd_"`` keys for the backward)."""
    pre = "bwd_" if backward else ""
    sms = _num_sms(device)
    below, target, chunks = (_setting(f"{pre}segment_{key}") for key in ("below", "target", "chunks"))
    if not _flag(f"{pre}segments") or programs >= below * sms or n_chunks < 2:
        return 1, n_chunks
    # segments sit on a grid axis past the first: at most 65,535 of them
    per = max(chunks, cdiv(n_chunks, cdiv(target * sms, programs)), cdiv(n_chunks, MAX_GRID_AXIS))
    return (cdiv(n_chunks, per), per) if per < n_chunks else (1, n_chunks)


def _flag(key: str) -> bool:
    return tuning_flag(TUNING, __name__, key)


def _setting(key: str, least: int = 1) -> int:
    return tuning_int(TUNING, __name__, key, least)


@gla_fwd.register_fake
def _(q, k, v, g, scale, reverse, float32_out):
    return v.new_empty(*q.shape[:3], v.shape[-1], dtype=torch.float32 if float32_out else v.dtype)


@torch.library.custom_op("visionlin::gla_bwd", mutates_args=())
def gla_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, do: torch.Tensor, scale: float, reverse: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dg)`` in the inputs' dtypes."""
    return _backward_one(q, k, v, g, do, scale, reverse)


def _backward_one(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, do: torch.Tensor, scale: float, reverse: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One direction's ``(dq, dk, dv, dg)`` in the inputs' dtypes."""
    b, length, h, kd = q.shape
    vd = v.shape[-1]
    if q.numel() == 0 or vd == 0:
        return tuple(torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, g))
    intra, fused = _flag("bwd_intra"), _flag("bwd_fused_dg")
    q, k, g, g_own = _gla_layout(q, k, g, own=intra)
    dv = torch.empty(b, length, h, vd, device=q.device, dtype=v.dtype)
    dq, dk_parts = _walks(q, k, v, g, g_own, do, scale, reverse, intra, dv)
    if fused and _fused_epilogue(b * h, dk_parts.shape[0], q.device):
        outs = [torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (g, q, k)]
        _epilogue(q, k, dq, dk_parts, reverse, *outs)
        dg, dq, dk = outs
        return dq, dk, dv, dg
    dk = dk_parts[0] if dk_parts.shape[0] == 1 else dk_parts.sum(0)
    # dG_t = q_t dq_t - k_t dk_t; g_r enters every G_t with t >= r in walk order (t <= r in memory order if reversed).
    dgg = q.float() * dq - k.float() * dk
    dg = dgg.cumsum(1) if reverse else dgg.flip(1).cumsum(1).flip(1)
    # The first gate of the walk only decays the zero initial state: its gradient (the sum of every dG_t, zero since
    # the output depends on differences of G only) is exactly 0, not the float32 cancellation residue of the sum (at
    # L = 1 that residue was the whole gradient, against an exact zero).
    dg[:, -1 if reverse else 0] = 0.0
    return dq.to(q.dtype), dk.to(k.dtype), dv, dg.to(g.dtype)


def _walks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    g_own: bool,
    do: torch.Tensor,
    scale: float,
    reverse: bool,
    intra: bool,
    dv: torch.Tensor,
    dv_prev: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction's backward kernels but the epilogue (``q``, ``k``, ``g`` as :func:`_gla_layout` gives them):
    the intra kernel (``intra``), the ``dq`` walk and the ``dk`` / ``dv`` walk, which writes ``dv`` into ``dv``
    (any strides with channel stride 1; plus ``dv_prev``, float32 contiguous, when given). Returns ``dq`` (float32
    ``[B, L, H, K]``) and ``dk``'s value-block shares (float32 ``[n_blocks, B, L, H, K]``)."""
    b, length, h, kd = q.shape
    vd = v.shape[-1]
    bk, bv = _blocks(kd, vd)
    prec = dot_precision(v.dtype, length, backward=True)
    dq = torch.empty(b, length, h, kd, device=q.device, dtype=torch.float32)
    bv_kv, n_vb = _kv_blocks(vd)
    dk_parts = torch.empty(n_vb, b, length, h, kd, device=q.device, dtype=torch.float32)
    n_chunks = cdiv(length, CHUNK)
    n_seg, seg_chunks = _backward_segments(b * h, n_chunks, bk, bv, n_vb, bv_kv, q.device)
    s_in = h_in = dv_intra = dq  # placeholder pointers when not segmented / not split
    if n_seg > 1:
        s_in, h_in = _incoming(q, k, v, g, g_own, prec, do, scale, reverse, n_seg, seg_chunks, bk, bv, n_vb, bv_kv)
    strides = (*q.stride(), *g.stride()[:3], *v.stride(), *do.stride())
    if intra:
        dv_intra = torch.empty(b, length, h, vd, device=q.device, dtype=torch.float32)
        launch(_gla_bwd_intra_kernel, (b * h * n_chunks,), q, k, v, g, do, dq, dk_parts, dv_intra,
               length, h, kd, vd, scale, *strides, REVERSE=reverse, G_OWN=g_own, PREC=prec,
               FACTOR=_flag("intra_factor"), T=CHUNK, BK=bk, BV=bv,
               **_meta("intra", warps(bk)))  # fmt: skip
    args = (length, h, kd, vd, scale, seg_chunks if n_seg > 1 else 0, *strides)  # (0: unused, one specialisation)
    common = dict(REVERSE=reverse, G_OWN=g_own, PREC=prec, SEGMENTED=n_seg > 1, INTRA=intra, T=CHUNK, BK=bk)
    launch(_gla_bwd_q_kernel, (b * h, n_seg), q, k, v, g, do, dq, s_in, *args, **common, BV=bv,
           **_meta("bwd_q", warps(bk)))  # fmt: skip
    launch(_gla_bwd_kv_kernel, (b * h, n_vb, n_seg), q, k, v, g, do, dk_parts, dv, h_in, dv_intra,
           dv if dv_prev is None else dv_prev, *args, *dv.stride()[:3], **common, DV_ACC=dv_prev is not None,
           BV=bv_kv, **_meta("bwd_kv", warps(bk)))  # fmt: skip
    return dq, dk_parts


def _fused_epilogue(programs: int, n_parts: int, device: torch.device) -> bool:
    """Whether the backward's epilogue may run as one Triton pass (:func:`_gla_dg_kernel`; with
    ``TUNING["bwd_fused_dg"]`` on): the (batch, head) ``programs`` fill the SMs (each walks its whole sequence) and
    ``dk`` comes in at most two shares."""
    return programs >= _num_sms(device) and n_parts <= 2


def _epilogue(
    q: torch.Tensor,
    k: torch.Tensor,
    dq: torch.Tensor,
    dk_parts: torch.Tensor,
    reverse: bool,
    dg: torch.Tensor,
    dq_out: torch.Tensor,
    dk_out: torch.Tensor,
    pair: int = 0,
    prev: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """:func:`_gla_dg_kernel` over the walks' ``dq`` / ``dk`` shares: ``dg`` into ``dg``, ``dq`` and ``dk`` into
    ``dq_out`` / ``dk_out`` (each any strides with channel stride 1; ``dq_out`` and ``dk_out`` share theirs). ``pair``
    1 writes ``dg`` only; 2 adds ``prev`` (the first walk's ``dq`` and ``dk`` shares) to ``dq`` and ``dk``."""
    b, length, h, kd = q.shape
    pdq, pdk = prev if prev is not None else (dq, dk_parts)
    launch(_gla_dg_kernel, (b * h,), q, k, dq, dk_parts, dg, dq_out, dk_out, pdq, pdk, length, h, kd,
           dk_parts.shape[0], dk_parts[0].numel(), *q.stride(), *dg.stride()[:3], *dq_out.stride()[:3],
           REVERSE=reverse, PAIR=pair, BL=DG_ROWS, BK=tile_dim(kd), **_meta("dg", 4))  # fmt: skip


def _backward_segments(
    programs: int, n_chunks: int, bk: int, bv: int, n_vb: int, bv_kv: int, device: torch.device
) -> tuple[int, int]:
    """The backward's ``(segments, chunks per segment)``: :func:`_segments`' rule, with fewer segments where the float32
    incoming states (``[programs, n_seg, BK, BV]``) and adjoints (``[programs, n_vb, n_seg, BK, BV_kv]``) would pass
    ``TUNING["max_state_mib"]``."""
    n_seg, per = _segments(programs, n_chunks, device, backward=True)
    if n_seg > 1:
        per_segment = programs * bk * (bv + n_vb * bv_kv) * 4
        fit = max(1, _setting("max_state_mib", least=0) * 2**20 // per_segment)
        if fit < n_seg:
            per = cdiv(n_chunks, fit)
            n_seg = cdiv(n_chunks, per)
    return n_seg, per


def _incoming_states(q, k, v, g, g_own, prec, reverse, n_seg, seg_chunks, bk, bv):
    """The state entering each segment, float32 ``[B*H, n_vb, n_seg, BK, BV]`` (value blocks of ``BV``): each
    segment's own state in parallel, then a walk over the segments (``k`` strided as ``q``)."""
    b, length, h, kd = q.shape
    vd = v.shape[-1]
    n_vb = cdiv(vd, bv)
    states = torch.empty(b * h, n_vb, n_seg, bk, bv, device=q.device, dtype=torch.float32)
    gsum = torch.empty(b * h, n_seg, bk, device=q.device, dtype=torch.float32)
    launch(_gla_seg_state_kernel, (b * h, n_vb, n_seg),
        k, v, g, states, gsum, length, h, kd, vd, seg_chunks, *q.stride(), *g.stride()[:3], *v.stride(),
        REVERSE=reverse, G_OWN=g_own, PREC=prec, T=CHUNK, BK=bk, BV=bv, **_meta("seg", warps(bk)),
    )  # fmt: skip
    launch(_gla_seg_carry_kernel, (b * h, n_vb), states, gsum, n_seg, BK=bk, BV=bv, num_warps=4)
    return states


def _incoming(q, k, v, g, g_own, prec, do, scale, reverse, n_seg, seg_chunks, bk, bv, n_vb, bv_kv):
    """The segmented backward's incoming states (``[B*H, 1, n_seg, BK, BV]``, every value channel in one block: the
    ``dq`` walk sums over them) and incoming state adjoints (``[B*H, n_vb, n_seg, BK, BV_kv]``, slots in reversed
    segment order), float32: each segment's own part in parallel, then a walk over the segments."""
    b, length, h, kd = q.shape
    vd = v.shape[-1]
    s_in = _incoming_states(q, k, v, g, g_own, prec, reverse, n_seg, seg_chunks, bk, bv)  # bv >= vd: one value block
    h_in = torch.empty(b * h, n_vb, n_seg, bk, bv_kv, device=q.device, dtype=torch.float32)
    gsum = torch.empty(b * h, n_seg, bk, device=q.device, dtype=torch.float32)  # reversed segment order
    launch(_gla_seg_adj_kernel, (b * h, n_vb, n_seg),
        q, g, do, h_in, gsum, length, h, kd, vd, scale, seg_chunks, *q.stride(), *g.stride()[:3], *do.stride(),
        REVERSE=reverse, G_OWN=g_own, PREC=prec, T=CHUNK, BK=bk, BV=bv_kv, **_meta("seg", warps(bk)),
    )  # fmt: skip
    launch(_gla_seg_carry_kernel, (b * h, n_vb), h_in, gsum, n_seg, BK=bk, BV=bv_kv, num_warps=4)
    return s_in, h_in


@gla_bwd.register_fake
def _(q, k, v, g, do, scale, reverse):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, g))


def _setup(ctx, inputs, output):
    q, k, v, g, scale, reverse, _ = inputs
    ctx.save_for_backward(q, k, v, g)
    ctx.scale, ctx.reverse = scale, reverse


def _backward(ctx, do):
    q, k, v, g = ctx.saved_tensors
    dq, dk, dv, dg = _gla_bwd_call(q, k, v, g, do, ctx.scale, ctx.reverse)
    return dq, dk, dv, dg, None, None, None


gla_fwd.register_autograd(_backward, setup_context=_setup)
_gla_bwd_call = eager_call(gla_bwd)
_gla_fwd_call = eager_op(gla_fwd, _setup, _backward)


# ViG's bidirectional op on the projections' packed outputs ------------------------------------------------------------
@torch.library.custom_op("visionlin::bigla_qkv_fwd", mutates_args=())
def bigla_qkv_fwd(qkv: torch.Tensor, gates: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """ViG's ``(o_fwd + o_bwd) / 2`` ``[B, L, H, V]`` in ``qkv``'s dtype: the forward walk's float32 outputs, then
    the reversed walk adds them before its one rounding. The halving is in ``scale`` (each output is linear in it)."""
    q, k, v, gf, gb = gla_packed_views(qkv, gates, heads)
    first = _forward(q, k, v, gf, scale * 0.5, False, torch.float32)
    if dot_precision(qkv.dtype) == "tf32x3":  # (three TF32 products: the accumulating walk spilled 24 bytes, sm_90)
        return (first + _forward(q, k, v, gb, scale * 0.5, True, torch.float32)).to(qkv.dtype)
    return _forward(q, k, v, gb, scale * 0.5, True, qkv.dtype, prev=first)


@bigla_qkv_fwd.register_fake
def _(qkv, gates, heads, scale):
    return qkv.new_empty(*qkv.shape[:2], heads, (qkv.shape[-1] - gates.shape[-1]) // heads)


@torch.library.custom_op("visionlin::bigla_qkv_bwd", mutates_args=())
def bigla_qkv_bwd(
    qkv: torch.Tensor, gates: torch.Tensor, do: torch.Tensor, heads: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d_qkv, d_gates)``, packed as ``qkv`` and ``gates`` (contiguous, their dtypes). With the shipped backward
    (intra kernel, fused epilogue, whose rule holds) the two walks write them directly: the first direction keeps its
    ``dq``, ``dk`` shares and ``dv`` in float32, the second adds them in its epilogue and ``dv`` store; ``dg`` of each
    direction goes to its half of ``d_gates``. Otherwise the two directions' gradients are summed and concatenated."""
    d_qkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    d_gates = torch.empty(gates.shape, device=gates.device, dtype=gates.dtype)
    if qkv.numel() == 0 or gates.shape[-1] == 0:
        return d_qkv.zero_(), d_gates.zero_()
    qkv, gates = (t if t.stride(-1) == 1 else t.contiguous() for t in (qkv, gates))  # one channel stride for the views
    q, k, v, gf, gb = gla_packed_views(qkv, gates, heads)
    s = scale * 0.5
    b, _, h, kd = q.shape
    _, n_vb = _kv_blocks(v.shape[-1])
    if not (_flag("bwd_intra") and _flag("bwd_fused_dg") and _fused_epilogue(b * h, n_vb, q.device)):
        fwd, bwd = _backward_one(q, k, v, gf, do, s, False), _backward_one(q, k, v, gb, do, s, True)
        torch.cat([(x.float() + y.float()).flatten(2) for x, y in zip(fwd[:3], bwd[:3], strict=True)], -1, out=d_qkv)
        torch.cat([fwd[3].flatten(2), bwd[3].flatten(2)], -1, out=d_gates)
        return d_qkv, d_gates
    dq, dk, dv, dgf, dgb = gla_packed_views(d_qkv, d_gates, heads)
    q, k, gf, own_f = _gla_layout(q, k, gf)  # (views of one buffer with channel stride 1: no copies)
    q, k, gb, own_b = _gla_layout(q, k, gb)
    dv_first = torch.empty(v.shape, device=v.device, dtype=torch.float32)
    first = _walks(q, k, v, gf, own_f, do, s, False, True, dv_first)
    _epilogue(q, k, *first, False, dgf, dq, dk, pair=1)
    second = _walks(q, k, v, gb, own_b, do, s, True, True, dv, dv_prev=dv_first)
    del dv_first
    _epilogue(q, k, *second, True, dgb, dq, dk, pair=2, prev=first)
    return d_qkv, d_gates


@bigla_qkv_bwd.register_fake
def _(qkv, gates, do, heads, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format), torch.empty_like(
        gates, memory_format=torch.contiguous_format
    )


def _setup_qkv(ctx, inputs, output):
    qkv, gates, heads, scale = inputs
    ctx.save_for_backward(qkv, gates)
    ctx.heads, ctx.scale = heads, scale


def _backward_qkv(ctx, do):
    qkv, gates = ctx.saved_tensors
    d_qkv, d_gates = _bigla_qkv_bwd_call(qkv, gates, do, ctx.heads, ctx.scale)
    return d_qkv, d_gates, None, None


bigla_qkv_fwd.register_autograd(_backward_qkv, setup_context=_setup_qkv)
_bigla_qkv_bwd_call = eager_call(bigla_qkv_bwd)
_bigla_qkv_fwd_call = eager_op(bigla_qkv_fwd, _setup_qkv, _backward_qkv)


def gla_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    reverse: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """One direction of gated linear attention (the ``"triton"`` backend of
    :func:`visionlin.kernels.gated_linear_attention`; ``chunk_size`` is the reference's performance knob, the kernels
    use 16); ``q, k, g`` ``[B, L, H, K]``, ``v`` ``[B, L, H, V]``.

    Returns:
        ``o`` ``[B, L, H, V]`` in ``v``'s dtype.
    """
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _gla_fwd_call(q, k, v, g, s, bool(reverse), False)


def bidirectional_gla_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_fwd: torch.Tensor,
    g_bwd: torch.Tensor,
    *,
    scale: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """ViG's bidirectional GLA, ``(o_fwd + o_bwd) / 2`` (the ``"triton"`` backend of
    :func:`visionlin.kernels.bidirectional_gated_linear_attention`): two float32 directions, one rounding."""
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)
    fwd = _gla_fwd_call(q, k, v, g_fwd, s, False, True)
    bwd = _gla_fwd_call(q, k, v, g_bwd, s, True, True)
    return ((fwd + bwd) * 0.5).to(v.dtype)


def bidirectional_gla_triton_qkv(
    qkv: torch.Tensor, gates: torch.Tensor, num_heads: int, *, scale: float | None = None
) -> torch.Tensor:
    """:func:`bidirectional_gla_triton` of ``q, k, v`` packed in one projection's output ``qkv`` ``[B, L, 2 K + V]``
    and ``g_fwd, g_bwd`` in ``gates`` ``[B, L, 2 K]`` (``num_heads`` heads each): the same result; the backward writes
    one gradient for each (no sums and concatenations of the two directions' five gradients)."""
    s = (gates.shape[-1] // (2 * num_heads)) ** -0.5 if scale is None else float(scale)
    return _bigla_qkv_fwd_call(qkv, gates, int(num_heads), s)
