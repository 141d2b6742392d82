"""Agent attention's position biases in Triton, forward and backward; the math is
:func:`visionlin.kernels.agent_bias.agent_position_biases_reference`.

Forward: one program per (block of ``BLOCK_T`` bias columns, i.e. prefix or grid tokens, block of ``BLOCK_A`` agents,
head and bias) computes one bias for its tokens and agents: PyTorch's bilinear source index and weights per token
(float32, ``align_corners=False``), four gathers from the small ``an`` / ``na`` table, the two axis tables, or the
prefix table for prefix columns; one rounding to the output dtype. The agent bias is stored agents-major, the query
bias tokens-major, each in its own layout. Backward: one program per (agent, head, bias) reduces that agent's row (or
column) of the output gradient over the grid in tiles of whole grid rows: the row sums are the ``ah`` / ``ha``
gradients, the column sums the ``aw`` / ``wa`` ones, and the base table's gradient is ``Wy^T G Wx`` (the bilinear
weights as ``[rows, s]`` / ``[columns, s']`` matrices, two float32 products per tile). Every gradient element is
written once; no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import MAX_GRID_YZ
from ._eager import eager_call, eager_op
from ._launch import cdiv, launch, next_pow2

__all__ = ["agent_position_biases_triton", "backward_tiles", "grid_reasons"]

#: Launch settings: forward blocks of ``block_t`` columns x ``block_a`` agents (capped by the next power of two of the
#: agent count; 32 x 64 took 200 registers for sm_90, 64 x 64 spilled); backward tiles of whole grid rows, at most
#: ``tile`` elements (at least 16 rows); warps per program.
TUNING: dict[str, int] = {"block_t": 16, "block_a": 64, "tile": 2048, "warps": 4}

#: Widest grid the backward tiles hold in one row of a tile, and the largest base table side (padded to 16 for
#: ``tl.dot``; a 64-wide base at a 1,024-wide grid needed 392 KiB of shared memory, more than an H200 block has).
MAX_GRID_WIDTH = 1024
MAX_BASE_SIDE = 16


def grid_reasons(
    base: tuple[int, int], grid: tuple[int, int], heads: int = 1, agents: int = 1, prefix: int = 0
) -> list[str]:
    """Reasons the kernels cannot run base tables of side ``base`` resized to ``grid`` for ``heads`` x ``agents``
    biases with ``prefix`` extra columns (empty if they can)."""
    reasons = []
    elements = heads * agents * (prefix + grid[0] * grid[1])
    if elements >= 2**31:
        reasons.append(f"{elements} bias elements >= 2^31 (the forward's offsets are 32-bit)")
    if grid[1] > MAX_GRID_WIDTH:
        reasons.append(f"grid width {grid[1]} > {MAX_GRID_WIDTH} (the backward holds whole grid rows)")
    if max(base) > MAX_BASE_SIDE:
        reasons.append(f"base table {tuple(base)} wider than {MAX_BASE_SIDE} (allowed: sides 1 to {MAX_BASE_SIDE})")
    if 2 * heads > MAX_GRID_YZ:
        reasons.append(f"{heads} heads: the forward's grid has 2 x heads = {2 * heads} > {MAX_GRID_YZ} rows")
    return reasons


@triton.jit
def _source(pos, scale, size):
    """PyTorch's bilinear source (``align_corners=False``) of output positions ``pos``: the lower input index, the
    upper one (clamped to ``size - 1``) and the upper one's weight."""
    src = tl.maximum(scale * (pos.to(tl.float32) + 0.5) - 0.5, 0.0)
    lo = src.to(tl.int32)  # src >= 0: truncation is the floor
    return lo, tl.minimum(lo + 1, size - 1), src - lo.to(tl.float32)


@triton.jit
def _fwd_side(
    BASE, AY, AX, PRE, OUT, head, t, a, HH, WW, P, NA, SH, SW, scale_y, scale_x,
    sb_h, sb_a, sb_i, sb_j, sy_h, sy_a, sy_y, sx_h, sx_a, sx_x, sp_h, sp_a, sp_p, so_h, so_a, so_t,
    HAS_PRE: tl.constexpr,
):  # fmt: skip
    """One bias's ``[BLOCK_T, BLOCK_A]`` block: columns ``t`` (prefix first), agents ``a``."""
    amask = a < NA
    tmask = t < P + HH * WW
    g = tl.maximum(t - P, 0)
    y, x = g // WW, g % WW
    y0, y1, ly = _source(y, scale_y, SH)
    x0, x1, lx = _source(x, scale_x, SW)
    on_grid = (tmask & (t >= P))[:, None] & amask[None, :]
    base = BASE + head * sb_h + a[None, :] * sb_a
    v00 = tl.load(base + y0[:, None] * sb_i + x0[:, None] * sb_j, mask=on_grid, other=0.0).to(tl.float32)
    v01 = tl.load(base + y0[:, None] * sb_i + x1[:, None] * sb_j, mask=on_grid, other=0.0).to(tl.float32)
    v10 = tl.load(base + y1[:, None] * sb_i + x0[:, None] * sb_j, mask=on_grid, other=0.0).to(tl.float32)
    v11 = tl.load(base + y1[:, None] * sb_i + x1[:, None] * sb_j, mask=on_grid, other=0.0).to(tl.float32)
    wy, wx = ly[:, None], lx[:, None]
    value = (1.0 - wy) * ((1.0 - wx) * v00 + wx * v01) + wy * ((1.0 - wx) * v10 + wx * v11)
    ay = tl.load(AY + head * sy_h + a[None, :] * sy_a + y[:, None] * sy_y, mask=on_grid, other=0.0)
    ax = tl.load(AX + head * sx_h + a[None, :] * sx_a + x[:, None] * sx_x, mask=on_grid, other=0.0)
    value += ay.to(tl.float32) + ax.to(tl.float32)
    if HAS_PRE:
        pre_mask = (t < P)[:, None] & amask[None, :]
        pre = tl.load(PRE + head * sp_h + a[None, :] * sp_a + t[:, None] * sp_p, mask=pre_mask, other=0.0)
        value = tl.where(pre_mask, pre.to(tl.float32), value)
    else:
        value = tl.where((t < P)[:, None], 0.0, value)
    out = OUT + head * so_h + a[None, :] * so_a + t[:, None] * so_t
    tl.store(out, value.to(OUT.dtype.element_ty), mask=tmask[:, None] & amask[None, :])


@triton.jit
def _bias_fwd_kernel(
    AN, NA_T, AH, AW, HA, WA, AC, CA, OUT_A, OUT_Q, HH, WW, P, NA, SH, SW, scale_y, scale_x,
    sb_h, sb_a, sb_i, sb_j, sah_h, sah_a, sah_y, saw_h, saw_a, saw_x, sha_h, sha_a, sha_y, swa_h, swa_a, swa_x,
    sac_h, sac_a, sac_p, sca_h, sca_a, sca_p, soa_h, soa_a, soa_t, soq_h, soq_a, soq_t,
    HAS_PRE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr,
):  # fmt: skip
    """One bias's ``[BLOCK_T, BLOCK_A]`` block: ``program_id(2)`` is head * 2 + bias (0: the agent bias, 1: the query
    bias; ``an`` and ``na`` share strides)."""
    head = tl.program_id(2) // 2
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    a = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    if tl.program_id(2) % 2 == 0:
        _fwd_side(AN, AH, AW, AC, OUT_A, head, t, a, HH, WW, P, NA, SH, SW, scale_y, scale_x,
                  sb_h, sb_a, sb_i, sb_j, sah_h, sah_a, sah_y, saw_h, saw_a, saw_x, sac_h, sac_a, sac_p,
                  soa_h, soa_a, soa_t, HAS_PRE)  # fmt: skip
    else:
        _fwd_side(NA_T, HA, WA, CA, OUT_Q, head, t, a, HH, WW, P, NA, SH, SW, scale_y, scale_x,
                  sb_h, sb_a, sb_i, sb_j, sha_h, sha_a, sha_y, swa_h, swa_a, swa_x, sca_h, sca_a, sca_p,
                  soq_h, soq_a, soq_t, HAS_PRE)  # fmt: skip


@triton.jit
def _weights(pos, mask, scale, size, BLOCK_S: tl.constexpr):
    """``[len(pos), BLOCK_S]`` float32: row ``r`` holds the bilinear weights of output position ``pos[r]`` on the
    ``size`` input positions (zeros for masked rows and padding columns)."""
    lo, hi, w = _source(pos, scale, size)
    s = tl.arange(0, BLOCK_S)[None, :]
    m = tl.where(s == lo[:, None], 1.0 - w[:, None], 0.0) + tl.where(s == hi[:, None], w[:, None], 0.0)
    return tl.where(mask[:, None], m, 0.0)


@triton.jit
def _bwd_side(
    G, DB, DY, DX, DP, head, a, HH, WW, P, SH, SW, scale_y, scale_x,
    sg_h, sg_a, sg_t, sdb_h, sdb_a, sdb_i, sdb_j, sdy_h, sdy_a, sdy_y, sdx_h, sdx_a, sdx_x, sdp_h, sdp_a, sdp_p,
    HAS_PRE: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    """One agent's gradients of one bias: ``G`` is its row (agent bias) or column (query bias), ``sg_t`` apart."""
    g_row = G + head * sg_h + a * sg_a
    if HAS_PRE:
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            gp = tl.load(g_row + p.to(tl.int64) * sg_t, mask=p < P, other=0.0)
            tl.store(DP + head * sdp_h + a * sdp_a + p * sdp_p, gp.to(DP.dtype.element_ty), mask=p < P)
    xs = tl.arange(0, BLOCK_X)
    xmask = xs < WW
    wx = _weights(xs, xmask, scale_x, SW, BLOCK_S)  # [BLOCK_X, BLOCK_S]
    acc_x = tl.zeros([BLOCK_X], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_S, BLOCK_S], dtype=tl.float32)
    for y0 in range(0, HH, BLOCK_Y):
        ys = y0 + tl.arange(0, BLOCK_Y)
        ymask = ys < HH
        cols = (P + ys[:, None] * WW + xs[None, :]).to(tl.int64)
        g = tl.load(g_row + cols * sg_t, mask=ymask[:, None] & xmask[None, :], other=0.0).to(tl.float32)
        tl.store(DY + head * sdy_h + a * sdy_a + ys * sdy_y, tl.sum(g, axis=1).to(DY.dtype.element_ty), mask=ymask)
        acc_x += tl.sum(g, axis=0)
        wy = _weights(ys, ymask, scale_y, SH, BLOCK_S)  # [BLOCK_Y, BLOCK_S]
        gw = tl.dot(g, wx, input_precision="ieee")  # [BLOCK_Y, BLOCK_S]: each row's sums into the columns j
        acc_b = tl.dot(tl.trans(wy), gw, acc_b, input_precision="ieee")
    tl.store(DX + head * sdx_h + a * sdx_a + xs * sdx_x, acc_x.to(DX.dtype.element_ty), mask=xmask)
    s = tl.arange(0, BLOCK_S)
    db = DB + head * sdb_h + a * sdb_a + s[:, None] * sdb_i + s[None, :] * sdb_j
    tl.store(db, acc_b.to(DB.dtype.element_ty), mask=(s < SH)[:, None] & (s < SW)[None, :])


@triton.jit
def _bias_bwd_kernel(
    GA, GQ, DAN, DNA, DAH, DAW, DHA, DWA, DAC, DCA, HH, WW, P, SH, SW, scale_y, scale_x,
    sga_h, sga_a, sga_t, sgq_h, sgq_a, sgq_t, sdb_h, sdb_a, sdb_i, sdb_j,
    sah_h, sah_a, sah_y, saw_h, saw_a, saw_x, sha_h, sha_a, sha_y, swa_h, swa_a, swa_x,
    sac_h, sac_a, sac_p, sca_h, sca_a, sca_p,
    HAS_PRE: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Program ``(agent, head, side)``: side 0 the agent bias's tables, side 1 the query bias's."""
    a = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    if tl.program_id(2) == 0:
        _bwd_side(GA, DAN, DAH, DAW, DAC, head, a, HH, WW, P, SH, SW, scale_y, scale_x,
                  sga_h, sga_a, sga_t, sdb_h, sdb_a, sdb_i, sdb_j, sah_h, sah_a, sah_y, saw_h, saw_a, saw_x,
                  sac_h, sac_a, sac_p, HAS_PRE, BLOCK_Y, BLOCK_X, BLOCK_S, BLOCK_P)  # fmt: skip
    else:
        _bwd_side(GQ, DNA, DHA, DWA, DCA, head, a, HH, WW, P, SH, SW, scale_y, scale_x,
                  sgq_h, sgq_a, sgq_t, sdb_h, sdb_a, sdb_i, sdb_j, sha_h, sha_a, sha_y, swa_h, swa_a, swa_x,
                  sca_h, sca_a, sca_p, HAS_PRE, BLOCK_Y, BLOCK_X, BLOCK_S, BLOCK_P)  # fmt: skip


def backward_tiles(block_x: int) -> tuple[int, int]:
    """(grid rows per tile, warps) of the backward for grid rows padded to ``block_x``: at most ``TUNING["tile"]``
    elements per tile (at least 16 rows, ``tl.dot``'s smallest K), twice the warps beyond 4,096."""
    rows = max(16, min(64, TUNING["tile"] // block_x))
    return rows, TUNING["warps"] if block_x * rows <= 4096 else 2 * TUNING["warps"]


def _scales(sh: int, sw: int, hh: int, ww: int) -> tuple[float, float]:
    """PyTorch's bilinear scales (input / output size, ``align_corners=False`` without a scale factor)."""
    return sh / hh, sw / ww


_AXIS_STRIDES = {  # the (head, agent, position) strides of each 5-D axis table
    "ah": lambda t: (t.stride(1), t.stride(2), t.stride(3)),
    "aw": lambda t: (t.stride(1), t.stride(2), t.stride(4)),
    "ha": lambda t: (t.stride(1), t.stride(4), t.stride(2)),
    "wa": lambda t: (t.stride(1), t.stride(4), t.stride(3)),
}


@torch.library.custom_op("visionlin::agent_bias_fwd", mutates_args=())
def agent_bias_fwd(
    an: torch.Tensor,
    na: torch.Tensor,
    ah: torch.Tensor,
    aw: torch.Tensor,
    ha: torch.Tensor,
    wa: torch.Tensor,
    ac: torch.Tensor | None,
    ca: torch.Tensor | None,
    p: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``agent_bias`` ``[1, h, n, P + H*W]`` and ``query_bias`` ``[1, h, P + H*W, n]`` in ``dtype``."""
    h, n, sh, sw = an.shape
    hh, ww = ah.shape[3], aw.shape[4]
    cols = p + hh * ww
    out_a = torch.empty(1, h, n, cols, device=an.device, dtype=dtype)
    out_q = torch.empty(1, h, cols, n, device=an.device, dtype=dtype)
    if out_a.numel() == 0:
        return out_a, out_q
    if na.stride() != an.stride():  # the kernel reads both base tables with one set of strides
        an, na = an.contiguous(), na.contiguous()
    has_pre = ac is not None and p > 0
    pre_a = ac if has_pre else an  # an unused pointer where there are no prefix tables
    pre_q = ca if has_pre else an
    pa = (ac.stride(1), ac.stride(2), ac.stride(3)) if has_pre else (0, 0, 0)
    pq = (ca.stride(1), ca.stride(3), ca.stride(2)) if has_pre else (0, 0, 0)
    bt, ba = TUNING["block_t"], min(TUNING["block_a"], max(16, next_pow2(n)))
    launch(_bias_fwd_kernel, (cdiv(cols, bt), cdiv(n, ba), 2 * h),
        an, na, ah, aw, ha, wa, pre_a, pre_q, out_a, out_q, hh, ww, p, n, sh, sw, *_scales(sh, sw, hh, ww),
        *an.stride(), *_AXIS_STRIDES["ah"](ah), *_AXIS_STRIDES["aw"](aw), *_AXIS_STRIDES["ha"](ha),
        *_AXIS_STRIDES["wa"](wa), *pa, *pq, out_a.stride(1), out_a.stride(2), out_a.stride(3),
        out_q.stride(1), out_q.stride(3), out_q.stride(2),
        HAS_PRE=has_pre, BLOCK_T=bt, BLOCK_A=ba, num_warps=TUNING["warps"],
    )  # fmt: skip
    return out_a, out_q


@agent_bias_fwd.register_fake
def _(an, na, ah, aw, ha, wa, ac, ca, p, dtype):
    h, n = an.shape[:2]
    cols = p + ah.shape[3] * aw.shape[4]
    return an.new_empty(1, h, n, cols, dtype=dtype), an.new_empty(1, h, cols, n, dtype=dtype)


@torch.library.custom_op("visionlin::agent_bias_bwd", mutates_args=())
def agent_bias_bwd(
    g_agent: torch.Tensor, g_query: torch.Tensor, sh: int, sw: int, hh: int, ww: int, p: int, has_prefix: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:  # fmt: skip
    """The gradients of ``an, na, ah, aw, ha, wa, ac, ca`` in ``dtype`` (``ac`` / ``ca``: ``[1, h, n, 0]`` /
    ``[1, h, 0, n]`` without prefix tables)."""
    _, h, n, _ = g_agent.shape
    dev = g_agent.device
    dan = torch.empty(h, n, sh, sw, device=dev, dtype=dtype)
    dna = torch.empty(h, n, sh, sw, device=dev, dtype=dtype)
    dah = torch.empty(1, h, n, hh, 1, device=dev, dtype=dtype)
    daw = torch.empty(1, h, n, 1, ww, device=dev, dtype=dtype)
    dha = torch.empty(1, h, hh, 1, n, device=dev, dtype=dtype)
    dwa = torch.empty(1, h, 1, ww, n, device=dev, dtype=dtype)
    pp = p if has_prefix else 0
    dac = torch.empty(1, h, n, pp, device=dev, dtype=dtype)
    dca = torch.empty(1, h, pp, n, device=dev, dtype=dtype)
    grads = (dan, dna, dah, daw, dha, dwa, dac, dca)
    if h * n == 0:
        return grads
    bs = max(16, next_pow2(max(sh, sw)))
    bx = max(16, next_pow2(ww))
    by, warps = backward_tiles(bx)
    launch(_bias_bwd_kernel, (n, h, 2),
        g_agent, g_query, dan, dna, dah, daw, dha, dwa, dac if pp else dan, dca if pp else dan,
        hh, ww, p, sh, sw, *_scales(sh, sw, hh, ww),
        g_agent.stride(1), g_agent.stride(2), g_agent.stride(3), g_query.stride(1), g_query.stride(3),
        g_query.stride(2), *dan.stride(), *_AXIS_STRIDES["ah"](dah), *_AXIS_STRIDES["aw"](daw),
        *_AXIS_STRIDES["ha"](dha), *_AXIS_STRIDES["wa"](dwa),
        *((dac.stride(1), dac.stride(2), dac.stride(3)) if pp else (0, 0, 0)),
        *((dca.stride(1), dca.stride(3), dca.stride(2)) if pp else (0, 0, 0)),
        HAS_PRE=pp > 0, BLOCK_Y=by, BLOCK_X=bx, BLOCK_S=bs, BLOCK_P=max(16, next_pow2(min(pp, 256))),
        num_warps=warps,
    )  # fmt: skip
    return grads


@agent_bias_bwd.register_fake
def _(g_agent, g_query, sh, sw, hh, ww, p, has_prefix, dtype):
    _, h, n, _ = g_agent.shape
    pp = p if has_prefix else 0
    shapes = ((h, n, sh, sw), (h, n, sh, sw), (1, h, n, hh, 1), (1, h, n, 1, ww), (1, h, hh, 1, n), (1, h, 1, ww, n),
              (1, h, n, pp), (1, h, pp, n))  # fmt: skip
    return tuple(g_agent.new_empty(s, dtype=dtype) for s in shapes)


def _setup(ctx, inputs, output):
    an, _, ah, aw, _, _, ac, _, p, _ = inputs
    ctx.sizes = (an.shape[2], an.shape[3], ah.shape[3], aw.shape[4], p, ac is not None and p > 0)
    ctx.shape = (an.shape[0], an.shape[1], p + ah.shape[3] * aw.shape[4])
    ctx.grad_dtype = an.dtype
    ctx.device = an.device


def _backward(ctx, g_agent, g_query):
    """Tables of a bias whose gradient is ``None`` (unused: the eager path) get ``None``, as autograd gives them."""
    h, n, cols = ctx.shape
    used_a, used_q = g_agent is not None, g_query is not None
    if not used_a:
        g_agent = torch.zeros(1, h, n, cols, device=ctx.device, dtype=g_query.dtype)
    if not used_q:
        g_query = torch.zeros(1, h, cols, n, device=ctx.device, dtype=g_agent.dtype)
    dan, dna, dah, daw, dha, dwa, dac, dca = _agent_bias_bwd_call(g_agent, g_query, *ctx.sizes, ctx.grad_dtype)
    has_prefix = ctx.sizes[-1]
    side_a = (dan, dah, daw, dac if has_prefix else None) if used_a else (None,) * 4
    side_q = (dna, dha, dwa, dca if has_prefix else None) if used_q else (None,) * 4
    return side_a[0], side_q[0], side_a[1], side_a[2], side_q[1], side_q[2], side_a[3], side_q[3], None, None


agent_bias_fwd.register_autograd(_backward, setup_context=_setup)
_agent_bias_bwd_call = eager_call(agent_bias_bwd)
_agent_bias_fwd_call = eager_op(agent_bias_fwd, _setup, _backward)


def agent_position_biases_triton(
    an: torch.Tensor,
    na: torch.Tensor,
    ah: torch.Tensor,
    aw: torch.Tensor,
    ha: torch.Tensor,
    wa: torch.Tensor,
    ac: torch.Tensor | None,
    ca: torch.Tensor | None,
    num_prefix_tokens: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``"triton"`` backend of :func:`visionlin.kernels.agent_bias.agent_position_biases` (tables in one dtype;
    ``dtype`` resolved by the caller)."""
    return _agent_bias_fwd_call(an, na, ah, aw, ha, wa, ac, ca, int(num_prefix_tokens), dtype)
