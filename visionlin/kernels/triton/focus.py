"""FLatten's focusing map over all heads of a token (``joint_heads=True``) as one Triton kernel per direction; the math
is :func:`visionlin.kernels.focused.focus`.

Per token (the ``C = H * D`` channels of one row), with ``t = (relu(x) + eps) / c`` and its largest entry ``m`` (a
constant: the map is positively homogeneous, ``f(t) = m f(t / m)``), ``t' = t / m`` in ``[0, 1]``::

    s = t'^p,   f = m ||t'|| s / ||s||                                   (0 for an all-zero token)

Backward, for the gradient ``g`` of ``f`` (``n = ||t'||``, ``S = ||s||``, ``gs = g . s``)::

    dt = t' gs / (n S) + (n / S) p t'^(p-1) (g - gs s / S^2)
    dx = [x > 0] dt / c;   dc = -sum over tokens of dt t / c

One program holds ``BLOCK_T`` whole tokens (every channel, padded to a power of two) in registers, reads ``x`` once and
writes ``f`` once (the PyTorch chain makes about twenty passes); the backward reads ``x`` and ``g`` once, writes ``dx``
and adds its tokens' share of ``dc`` (float32 atomics: sums may differ between runs in the last bits). All math in
float32.

Focused linear attention runs as one op pair (``visionlin::focused_linear_fwd`` / ``_bwd``): the forward focuses ``q``
and ``k`` and runs the linear kernels (:mod:`visionlin.kernels.triton.linear`, identity map, divide) on the features,
keeping nothing but its inputs; the backward recomputes the features and the float32 state (two focusing passes and
the state kernel), runs the linear backward and then the focusing backward. Composing the pieces as separate autograd
ops instead kept the raw ``q`` and ``k``, both feature tensors, the output and the state of every layer alive between
the passes: three ``[B, N, C]`` tensors and a state more per layer, which put FLatten-DeiT-S's training step 17% above
the dense twin's peak memory (``benchmarks/results/h200/saved_memory_df71109.log``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning_flag, tuning_int
from ._eager import eager_call, eager_op
from ._launch import cdiv, launch, next_pow2
from .linear import (
    FEATURE_MAP_IDS,
    NORMALIZATION_IDS,
    _num_sms,
    _pad_dims,
    linear_backward,
    linear_forward,
    linear_state,
)

__all__ = ["focused_linear_attention_triton"]


@triton.jit
def _tile_mask(t, ch, H, D, N):
    """The entries of tokens ``t`` and channels ``ch`` that exist (recomputed where needed: a carried boolean tile
    costs a register per entry)."""
    return (t < N)[:, None] & (ch < H * D)[None, :]


@triton.jit
def _load_rows(X, b, t, ch, D, s_b, s_n, s_h, s_d, FLAT: tl.constexpr, mask):
    """Channels ``ch`` of tokens ``t`` of sample ``b`` in the input's dtype, ``[BLOCK_T, BLOCK_C]`` (0 off ``mask``)."""
    return tl.load(X + _offsets(b, t, ch, D, s_b, s_n, s_h, s_d, FLAT), mask=mask, other=0.0)


@triton.jit
def _features_in(raw, mask, rc, eps, HAS_C: tl.constexpr):
    """``(x, t)``: ``raw`` as float32 and ``t = (relu(x) + eps) / c`` (0 where ``mask`` is off; ``rc``: ``1 / c`` per
    channel, loaded once per program)."""
    x = raw.to(tl.float32)
    tt = tl.maximum(x, 0.0) + eps
    if HAS_C:
        tt = tt * rc[None, :]
    return x, tl.where(mask, tt, 0.0)


@triton.jit
def _inverse_scale(CS, ch, H, D, HAS_C: tl.constexpr):
    """``1 / c`` per channel (1 in padded channels and without a scale): multiplications per element instead of
    float32 divisions."""
    if HAS_C:
        return 1.0 / tl.load(CS + ch, mask=ch < H * D, other=1.0)
    return tl.full(ch.shape, 1.0, tl.float32)


@triton.jit
def _offsets(b, t, ch, D, s_b, s_n, s_h, s_d, FLAT: tl.constexpr):
    """Element offsets of channels ``ch`` (``head * D + j``) of tokens ``t``; ``FLAT``: the heads are contiguous
    (``s_h == D * s_d``), so channel ``ch`` is at ``ch * s_d``: no division by ``D`` per element, and vector loads
    when ``s_d`` is 1."""
    if FLAT:
        return b * s_b + t[:, None] * s_n + ch[None, :] * s_d
    return b * s_b + t[:, None] * s_n + (ch // D)[None, :] * s_h + (ch % D)[None, :] * s_d


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _add3(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def _powered(tt, p):
    """``(t', s, m)`` per row (module docstring); rows that are all zero get ``m = 1``."""
    m = tl.max(tt, axis=1)
    m = tl.where(m > 0, m, 1.0)
    tp = tt * (1.0 / m)[:, None]
    s = tl.where(tp > 0, tl.exp2(p * tl.log2(tl.maximum(tp, 1e-30))), 0.0)
    return tp, s, m


@triton.jit
def _focus_kernel(
    X, CS, F, N, H, D, per, sx_b, sx_n, sx_h, sx_d, sf_b, sf_n, sf_h, sf_d, p, eps,
    HAS_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, FLAT_X: tl.constexpr,
    PREFETCH: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(1).to(tl.int64)  # offsets in int64: a tensor may span more than 2^31 elements
    ch = tl.arange(0, BLOCK_C)
    rc = _inverse_scale(CS, ch, H, D, HAS_C)
    if PREFETCH:
        t = (tl.program_id(0) * per * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        raw = _load_rows(X, b, t, ch, D, sx_b, sx_n, sx_h, sx_d, FLAT_X, _tile_mask(t, ch, H, D, N))
    for i in range(per):
        # the tile's tokens from i, not carried across iterations (a carried int64 row vector cost 50-80 registers)
        t = ((tl.program_id(0) * per + i) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask = _tile_mask(t, ch, H, D, N)
        if PREFETCH:  # the next tile's loads issued before this tile's math: twice the bytes in flight
            mask_next = _tile_mask(t + BLOCK_T, ch, H, D, N) & (i + 1 < per)
            raw_next = _load_rows(X, b, t + BLOCK_T, ch, D, sx_b, sx_n, sx_h, sx_d, FLAT_X, mask_next)
        else:
            raw = _load_rows(X, b, t, ch, D, sx_b, sx_n, sx_h, sx_d, FLAT_X, mask)
        _, tt = _features_in(raw, mask, rc, eps, HAS_C)
        tp, s, m = _powered(tt, p)
        n2, s2 = tl.reduce((tp * tp, s * s), 1, _add2)  # both row sums in one reduction (one exchange per row)
        big_s = tl.where(s2 > 0, tl.sqrt(s2), 1.0)
        f = s * (m * tl.sqrt(n2) / big_s)[:, None]
        tl.store(F + _offsets(b, t, ch, D, sf_b, sf_n, sf_h, sf_d, True), f.to(F.dtype.element_ty), mask)
        if PREFETCH:
            raw = raw_next


@triton.jit
def _focus_backward_kernel(
    X, CS, G, DX, DC, N, H, D, per, sx_b, sx_n, sx_h, sx_d, sg_b, sg_n, sg_h, sg_d, sdx_b, sdx_n, sdx_h, sdx_d, p, eps,
    HAS_C: tl.constexpr, NEED_DC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    FLAT_X: tl.constexpr, FLAT_G: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(1).to(tl.int64)
    ch = tl.arange(0, BLOCK_C)
    cmask = ch < H * D
    rc = _inverse_scale(CS, ch, H, D, HAS_C)
    # dc's terms summed per tile entry across the walk, reduced over the tokens once at the end (not one cross-warp
    # reduction per tile)
    dc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    if PREFETCH:
        t = (tl.program_id(0) * per * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask = _tile_mask(t, ch, H, D, N)
        raw = _load_rows(X, b, t, ch, D, sx_b, sx_n, sx_h, sx_d, FLAT_X, mask)
        graw = _load_rows(G, b, t, ch, D, sg_b, sg_n, sg_h, sg_d, FLAT_G, mask)
    for i in range(per):
        # both loads issued before any math; PREFETCH: the next tile's too, before this tile's math
        t = ((tl.program_id(0) * per + i) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask = _tile_mask(t, ch, H, D, N)
        if PREFETCH:
            mask_next = _tile_mask(t + BLOCK_T, ch, H, D, N) & (i + 1 < per)
            raw_next = _load_rows(X, b, t + BLOCK_T, ch, D, sx_b, sx_n, sx_h, sx_d, FLAT_X, mask_next)
            graw_next = _load_rows(G, b, t + BLOCK_T, ch, D, sg_b, sg_n, sg_h, sg_d, FLAT_G, mask_next)
        else:
            raw = _load_rows(X, b, t, ch, D, sx_b, sx_n, sx_h, sx_d, FLAT_X, mask)
            graw = _load_rows(G, b, t, ch, D, sg_b, sg_n, sg_h, sg_d, FLAT_G, mask)
        x, tt = _features_in(raw, mask, rc, eps, HAS_C)
        g = graw.to(tl.float32)
        tp, s, m = _powered(tt, p)
        n2, s2, gs = tl.reduce((tp * tp, s * s, g * s), 1, _add3)  # the three row sums in one reduction
        n = tl.sqrt(n2)
        big_s = tl.where(s2 > 0, tl.sqrt(s2), 1.0)
        # p t'^(p-1) as p s / t' (the approximate division: a reciprocal and a product, 2 ulp)
        dpow = tl.where(tp > 0, p * tl.fdiv(s, tl.maximum(tp, 1e-30), ieee_rounding=False), 0.0)
        n_safe = tl.where(n > 0, n, 1.0)
        dt = tp * (gs / (n_safe * big_s))[:, None] + (n / big_s)[:, None] * dpow * (
            g - (gs / (big_s * big_s))[:, None] * s
        )
        dt = tl.where(mask, dt, 0.0)
        dx = tl.where(x > 0, dt, 0.0)
        if HAS_C:
            dx = dx * rc[None, :]
            if NEED_DC:
                dc += -dt * tt
        doffs = _offsets(b, t, ch, D, sdx_b, sdx_n, sdx_h, sdx_d, True)
        tl.store(DX + doffs, dx.to(DX.dtype.element_ty), mask)
        if PREFETCH:
            raw, graw = raw_next, graw_next
    if NEED_DC:
        tl.atomic_add(DC + ch, tl.sum(dc, axis=0) * rc, mask=cmask)


#: Launch settings (``benchmarks/focus_op.py`` sweeps them; the shipped ones were the best FLatten-PVT-S step totals of
#: its s41 runs, within 6% of the best at every PVT-S, Swin-T and DeiT-S shape: forward 1.91 ms, one tile per
#: program (walks with or without prefetch 2.08-2.27); backward 1.84 ms with prefetch, 1.92 without, 3-9% less at the
#: large shapes). ``fwd_elements`` / ``bwd_elements``: entries of a tile (``BLOCK_T`` the largest power of two of
#: whole tokens in them, at least 1, at most the power of two at or above the tokens there are); ``fwd_tokens`` /
#: ``bwd_tokens``: a fixed power of two ``BLOCK_T`` instead (``None``: from the elements); ``warp_elements`` /
#: ``bwd_warp_elements``: tile entries per warp, a power of two (4 to 16 warps);
#: ``bwd_programs``: the backward's programs per SM over the batch (each walks its share of a sample's token blocks and
#: adds its share of ``dc`` once); ``fwd_programs``: the same for the forward (``None``: one tile per program, no
#: walk); ``prefetch``: a walk loads its next tile before the current tile's math (twice the bytes in flight per
#: program at the registers of one more raw tile). ``NARROW``: the tiles before stop 41 (8 / 4 tokens, 128 entries a
#: warp): 256-512 entries at FLatten's 64-128 channels, too few bytes in flight (forward 1.25x, backward 1.38x slower
#: over PVT-S's calls in the s41 run).
TUNING: dict[str, int | None] = {
    "fwd_elements": 2048,
    "bwd_elements": 1024,
    "fwd_tokens": None,
    "bwd_tokens": None,
    "warp_elements": 512,
    "bwd_warp_elements": 256,
    "bwd_programs": 8,
    "fwd_programs": None,
    "prefetch": True,
    "keep_features": False,
}
NARROW = {
    "fwd_tokens": 8,
    "bwd_tokens": 4,
    "warp_elements": 128,
    "bwd_warp_elements": 128,
    "bwd_programs": 8,
    "fwd_programs": None,
    "prefetch": False,
}


def _setting(key: str, allow_none: bool = False, pow2: bool = False) -> int | None:
    return tuning_int(TUNING, __name__, key, allow_none=allow_none, pow2=pow2)


def _prefetch() -> bool:
    return tuning_flag(TUNING, __name__, "prefetch")


def _grid(b: int, n: int, device: torch.device, block_t: int, programs: int) -> tuple[tuple[int, int], int]:
    """The grid ``(token blocks, b)`` of programs each walking ``per`` blocks, about ``programs`` per SM in all."""
    blocks = cdiv(n, block_t)
    want = min(blocks, max(1, cdiv(programs * _num_sms(device), max(b, 1))))
    per = cdiv(blocks, want)
    return (cdiv(blocks, per), b), per


def _meta(h: int, d: int, n: int, backward: bool) -> dict[str, int]:
    block_c = next_pow2(h * d)
    pre = "bwd_" if backward else "fwd_"
    tokens = _setting(f"{pre}tokens", allow_none=True, pow2=True)
    if tokens is None:
        elements = _setting(f"{pre}elements")
        tokens = min(next_pow2(max(1, elements // block_c + 1)) // 2 or 1, next_pow2(max(n, 1)))
    # 4 to 16 warps (tests/test_kernels_sm90_compile.py checks the shipped settings compile within their spill
    # allowances); a power of two, as Triton requires: the tile and the entries per warp are powers of two
    per_warp = _setting("bwd_warp_elements" if backward else "warp_elements", pow2=True)
    warps = min(16, max(4, tokens * block_c // per_warp))
    return {"BLOCK_T": tokens, "BLOCK_C": block_c, "num_warps": warps}


def _flat(t: torch.Tensor) -> bool:
    """The heads of ``t`` ``[B, N, H, D]`` are contiguous in memory (``stride(H) == D * stride(D)``)."""
    return t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3)


def _focus(x: torch.Tensor, c: torch.Tensor | None, p: float, eps: float) -> torch.Tensor:
    """The focused features of ``x`` ``[B, N, H, D]`` in ``x``'s dtype; ``c``: float32 ``[H * D]`` or ``None``."""
    b, n, h, d = x.shape
    f = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if b * n * h * d:
        # By default one block of tokens per program (no atomics to amortise here, unlike the backward); with
        # TUNING["fwd_programs"] a walk of blocks per program (what prefetching needs)
        meta = _meta(h, d, n, backward=False)
        programs = _setting("fwd_programs", allow_none=True)
        if programs is None:
            grid, per = (cdiv(n, meta["BLOCK_T"]), b), 1
        else:
            grid, per = _grid(b, n, x.device, meta["BLOCK_T"], programs)
        launch(_focus_kernel, grid,
            x, c if c is not None else x, f, n, h, d, per, *x.stride(), *f.stride(), p, eps,
            HAS_C=c is not None, FLAT_X=_flat(x), PREFETCH=_prefetch() and per > 1, **meta,
        )  # fmt: skip
    return f


def _focus_grad(
    x: torch.Tensor, c: torch.Tensor | None, g: torch.Tensor, p: float, eps: float, need_dc: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dc)`` of :func:`_focus` for the gradient ``g`` of its output; ``dc`` (float32 ``[H * D]``) is zeros
    unless ``need_dc``."""
    b, n, h, d = x.shape
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dc = torch.zeros(h * d, device=x.device, dtype=torch.float32)
    if b * n * h * d:
        meta = _meta(h, d, n, backward=True)
        grid, per = _grid(b, n, x.device, meta["BLOCK_T"], _setting("bwd_programs"))
        launch(_focus_backward_kernel, grid,
            x, c if c is not None else x, g, dx, dc, n, h, d, per, *x.stride(), *g.stride(), *dx.stride(), p, eps,
            HAS_C=c is not None, NEED_DC=need_dc and c is not None, FLAT_X=_flat(x), FLAT_G=_flat(g),
            PREFETCH=_prefetch() and per > 1, **meta,
        )  # fmt: skip
    return dx, dc


# Focused linear attention as one op that keeps only its inputs for the backward ---------------------------------------
_IDENTITY, _DIVIDE = FEATURE_MAP_IDS["identity"], NORMALIZATION_IDS["divide"]


@torch.library.custom_op("visionlin::focused_linear_fwd", mutates_args=())
def focused_linear_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor | None, p: float, eps: float
) -> torch.Tensor:
    """Focused linear attention ``[B, N, H, Dv]`` in ``q``'s dtype: both focusing kernels, then the linear kernels on
    the features (identity map, divide, scale 1) without saving their state."""
    fq, fk = _focus(q, c, p, eps), _focus(k, c, p, eps)
    return linear_forward(fq, fk, v, _IDENTITY, _DIVIDE, 1.0, eps, save_state=False)[0]


@focused_linear_fwd.register_fake
def _(q, k, v, c, p, eps):
    return q.new_empty(*q.shape[:3], v.shape[-1])


@torch.library.custom_op("visionlin::focused_linear_keep_fwd", mutates_args=())
def focused_linear_keep_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor | None, p: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`focused_linear_fwd` that also returns what its backward would recompute, ``(out, f(q), f(k), float32
    state)``, for the backward to keep (``TUNING["keep_features"]``)."""
    fq, fk = _focus(q, c, p, eps), _focus(k, c, p, eps)
    out, state = linear_forward(fq, fk, v, _IDENTITY, _DIVIDE, 1.0, eps, save_state=True)
    return out, fq, fk, state


@focused_linear_keep_fwd.register_fake
def _(q, k, v, c, p, eps):
    bd, bdv = _pad_dims(q.shape[-1], v.shape[-1])
    state = q.new_empty(q.shape[0] * q.shape[2], bd * bdv + bd + bdv, dtype=torch.float32)
    return q.new_empty(*q.shape[:3], v.shape[-1]), q.new_empty(q.shape), k.new_empty(k.shape), state


@torch.library.custom_op("visionlin::focused_linear_bwd", mutates_args=())
def focused_linear_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    c: torch.Tensor | None,
    g: torch.Tensor,
    p: float,
    eps: float,
    need_dc: bool,
    fq: torch.Tensor | None = None,
    fk: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dc)`` of :func:`focused_linear_fwd` for the gradient ``g`` of its output, recomputing the
    features and the state (two focusing passes and the state kernel, instead of keeping two ``[B, N, C]`` feature
    tensors and a float32 state per layer alive from the forward to the backward) unless they are passed
    (:func:`focused_linear_keep_fwd`'s)."""
    if fq is None or fk is None or state is None:
        fq, fk = _focus(q, c, p, eps), _focus(k, c, p, eps)
        state = linear_state(fk, v, _IDENTITY)
    dfq, dfk, dv = linear_backward(fq, fk, v, None, state, g, _IDENTITY, _DIVIDE, 1.0, eps)
    del fq, fk, state
    dq, dc = _focus_grad(q, c, dfq, p, eps, need_dc)
    del dfq
    dk, dck = _focus_grad(k, c, dfk, p, eps, need_dc)
    return dq, dk, dv, dc.add_(dck)


@focused_linear_bwd.register_fake
def _(q, k, v, c, g, p, eps, need_dc, fq=None, fk=None, state=None):
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        q.new_empty(q.shape[2] * q.shape[3], dtype=torch.float32),
    )


def _fl_setup(ctx, inputs, output):
    """Both forward ops': the inputs saved, and :func:`focused_linear_keep_fwd`'s kept ``(f(q), f(k), state)``."""
    q, k, v, c, p, eps = inputs
    kept = output[1:] if isinstance(output, tuple) else ()
    ctx.mark_non_differentiable(*kept)
    ctx.save_for_backward(q, k, v, c, *kept)
    ctx.args = (p, eps)
    ctx.c_grad = c is not None and c.requires_grad


def _fl_backward(ctx, g, *_kept_grads):
    q, k, v, c, *kept = ctx.saved_tensors
    dq, dk, dv, dc = _focused_linear_bwd_call(q, k, v, c, g, *ctx.args, ctx.c_grad, *kept)
    return dq, dk, dv, (dc if ctx.c_grad else None), None, None


focused_linear_fwd.register_autograd(_fl_backward, setup_context=_fl_setup)
focused_linear_keep_fwd.register_autograd(_fl_backward, setup_context=_fl_setup)
_focused_linear_bwd_call = eager_call(focused_linear_bwd)
_focused_linear_fwd_call = eager_op(focused_linear_fwd, _fl_setup, _fl_backward)
_focused_linear_keep_call = eager_op(focused_linear_keep_fwd, _fl_setup, _fl_backward)


def _scale_vector(x: torch.Tensor, channel_scale: torch.Tensor | float | None) -> torch.Tensor | None:
    """``channel_scale`` as the kernels take it: float32 ``[H * D]`` on ``x``'s device, or ``None``."""
    if channel_scale is None:
        return None
    h, d = x.shape[-2:]
    c = channel_scale
    # the FLatten layer's kept scale is already a contiguous float32 [H, D] on x's device: a view, no four ops
    if not (
        type(c) is torch.Tensor
        and c.dtype == torch.float32
        and c.shape == (h, d)
        and c.is_contiguous()
        and c.device == x.device
    ):
        c = torch.as_tensor(channel_scale, device=x.device, dtype=torch.float32).expand(h, d).contiguous()
    return c.view(h * d)


def focused_linear_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    focusing_factor: float,
    *,
    channel_scale: torch.Tensor | float | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """:func:`visionlin.kernels.focused.focused_linear_attention` with ``joint_heads=True`` on CUDA (one op: the
    features and the state are recomputed in the backward, or kept from the forward with ``TUNING["keep_features"]``),
    in ``q``'s dtype."""
    args = (q, k, v, _scale_vector(q, channel_scale), float(focusing_factor), float(eps))
    # kept only where a backward can follow (no_grad / inference would write the features and the state for nothing)
    if tuning_flag(TUNING, __name__, "keep_features") and _wants_grad(args[:4]):
        return _focused_linear_keep_call(*args)[0]
    return _focused_linear_fwd_call(*args)


def _wants_grad(tensors: tuple[torch.Tensor | None, ...]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
