"""Agent attention's inference forward as two fused Triton kernels; the math is
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
views (stride 0 on batch). Forward only: the backend declines calls that need a gradient or dropout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._eager import eager_call
from ._launch import cdiv, launch, tile_dim
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
def _aggregate_kernel(
    A, K, V, AB, VA, STATS, M, H, NA, D, DV, scale, per_split,
    sa_b, sa_n, sa_h, sa_d, sk_b, sk_n, sk_h, sk_d, sv_b, sv_n, sv_h, sv_d, sab_b, sab_h, sab_a, sab_m,
    HAS_BIAS: tl.constexpr, HALF: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """``V_A`` (float32 ``[B*H, BLOCK_A, BLOCK_DV]``) of one (batch, head) from keys ``[start, start + per_split)``
    of split ``program_id(0)``; with ``SPLIT`` its unnormalised partial sums go to ``VA[split, bh]`` and the running
    maxima / sums to ``STATS[split, bh, 0 / 1]`` for :func:`_combine_kernel`."""
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
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
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


@triton.jit
def _combine_kernel(PART, STATS, VA, BH, splits, BLOCK_A: tl.constexpr, BLOCK_DV: tl.constexpr):
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
        m_new = tl.maximum(m_i, m_s)  # finite: every split holds at least one key
        alpha, beta = tl.exp(m_i - m_new), tl.exp(m_s - m_new)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + tl.load(PART + part * (BLOCK_A * BLOCK_DV) + tile) * beta[:, None]
        m_i = m_new
    tl.store(VA + bh * (BLOCK_A * BLOCK_DV) + tile, acc / tl.where(l_i > 0, l_i, 1.0)[:, None])


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
    s = tl.where(amask[None, :], s, float("-inf"))
    p = tl.exp(s - tl.max(s, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    va = tl.load(VA + bh * (BLOCK_A * BLOCK_DV) + offs_a[:, None] * BLOCK_DV + offs_e[None, :])
    out = _dot(p.to(q.dtype), va.to(q.dtype), HALF)
    o_ptr = Out + b * so_b + h * so_h + offs_n[:, None] * so_n + offs_e[None, :] * so_d
    tl.store(o_ptr, out.to(Out.dtype.element_ty), nmask[:, None] & (offs_e < DV)[None, :])


ROWS = 64

#: ``"splits"``: key splits of the aggregation per (batch, head) (``None``: enough programs for ~4 per SM, each over at
#: least two key tiles; 1 at 224 px, batch 256). With few (batch, head) pairs and long key sets (1024 px and up, small
#: batches) one program per pair left most SMs idle, as SDPA's flash kernels do with 49 queries.
TUNING: dict[str, int | None] = {"splits": None}


def _splits(bh: int, m: int, device: torch.device) -> tuple[int, int]:
    """``(splits, keys per split)`` of the aggregation (a multiple of ``ROWS`` keys each, none empty)."""
    tiles = cdiv(m, ROWS)
    want = TUNING["splits"]
    if want is None:
        want = min(cdiv(4 * _num_sms(device), max(bh, 1)), cdiv(tiles, 2))
    per = cdiv(tiles, max(1, min(int(want), tiles))) * ROWS
    return cdiv(m, per), per


def _pad(x: int) -> int:
    return tile_dim(x)


def _warps(block_a: int, block_d: int, block_dv: int) -> int:
    return 8 if block_a * max(block_d, block_dv) >= 64 * 64 else 4


def _bias_view(bias: torch.Tensor | None, shape: tuple[int, ...]) -> tuple[torch.Tensor | None, tuple[int, ...]]:
    if bias is None:
        return None, (0, 0, 0, 0)
    view = torch.broadcast_to(bias, shape)
    return view, view.stride()


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
    """``out`` ``[B, N, H, Dv]`` in ``q``'s dtype (forward only)."""
    b, n, h, d = q.shape
    m, dv, na = k.shape[1], v.shape[-1], agents.shape[1]
    out = torch.empty(b, n, h, dv, device=q.device, dtype=q.dtype)
    if b * h == 0 or n == 0 or dv == 0:
        return out
    ba, bd, bdv = _pad(na), _pad(d), _pad(dv)
    half = q.dtype in (torch.float16, torch.bfloat16)
    va = torch.empty(b * h, ba, bdv, device=q.device, dtype=torch.float32)
    ab, sab = _bias_view(agent_bias, (b, h, na, m))
    qb, sqb = _bias_view(query_bias, (b, h, n, na))
    splits, per = _splits(b * h, m, q.device)
    part = va if splits == 1 else torch.empty(splits, b * h, ba, bdv, device=q.device, dtype=torch.float32)
    stats = va if splits == 1 else torch.empty(splits, b * h, 2, ba, device=q.device, dtype=torch.float32)
    launch(_aggregate_kernel, (splits, b * h),
        agents, k, v, ab if ab is not None else va, part, stats, m, h, na, d, dv, scale, per,
        *agents.stride(), *k.stride(), *v.stride(), *sab,
        HAS_BIAS=ab is not None, HALF=half, SPLIT=splits > 1, BLOCK_A=ba, BLOCK_M=ROWS, BLOCK_D=bd, BLOCK_DV=bdv,
        num_warps=_warps(ba, bd, bdv),
    )  # fmt: skip
    if splits > 1:
        launch(_combine_kernel, (b * h,), part, stats, va, b * h, splits, BLOCK_A=ba, BLOCK_DV=bdv, num_warps=4)
    launch(_broadcast_kernel, (cdiv(n, ROWS), b * h),
        q, agents, va, qb if qb is not None else va, out, n, h, na, d, dv, scale,
        *q.stride(), *agents.stride(), *sqb, *out.stride(),
        HAS_BIAS=qb is not None, HALF=half, BLOCK_N=ROWS, BLOCK_A=ba, BLOCK_D=bd, BLOCK_DV=bdv,
        num_warps=_warps(ba, bd, bdv),
    )  # fmt: skip
    return out


@agent_attention_fwd.register_fake
def _(q, k, v, agents, agent_bias, query_bias, scale):
    return q.new_empty(*q.shape[:3], v.shape[-1])


def agent_attention_triton(q, k, v, agents, *, agent_bias=None, query_bias=None, scale=None, dropout_p=0.0):
    """The ``"triton"`` backend of :func:`visionlin.kernels.agent_attention` (inference: no gradient, no dropout)."""
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _fwd_call(q, k, v, agents, agent_bias, query_bias, s)


_fwd_call = eager_call(agent_attention_fwd)  # plain eager tensors: the op's body without the dispatcher
