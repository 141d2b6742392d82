"""Neighborhood attention's Triton kernels (``visionlin.kernels.triton.neighborhood``) against
:func:`visionlin.kernels.neighborhood_attention_reference` in float64, forward and backward (q, k, v and NAT's bias
table ``rpb``), through the op's ``"triton"`` backend function (1-D calls run the 2-D kernels with one row).

Errors are relative Frobenius norms against the float64 reference on the same (exactly upcast) inputs.
Tolerance: float32 2e-5 (the kernels accumulate in float32: measured ~1e-6). Half precision follows the
flash-attention rule of DESIGN.md: at most twice the error of the plain PyTorch computation in the same dtype
(:func:`_plain`: the reference's gather formula with every intermediate in the half dtype, autograd for the
gradients), measured in the test; the bias gradient (a float32 sum over the batch and the queries) is held to the same
bound. The ``gpu`` tests run on the GPU machine; the interpreter test runs the kernels on the CPU in a subprocess.
"""

from __future__ import annotations

import itertools
import math
import re
import textwrap

import pytest
import torch
from interpreter_utils import run_in_interpreter

from visionlin.kernels import (
    get_op,
    neighborhood_attention,
    neighborhood_attention_qkv,
    neighborhood_attention_reference,
)
from visionlin.kernels import neighborhood as na


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double().cpu() - ref.cpu()).norm() / ref.cpu().norm().clamp_min(1e-30)).item()


def _plain(q, k, v, kernel, dilation, rpb, scale):
    """The reference's formula evaluated by PyTorch ops in the inputs' dtype (every intermediate rounded to it)."""
    nd = q.ndim - 3
    spatial = tuple(q.shape[1 : 1 + nd])
    b, h = q.shape[0], q.shape[-2]
    flat, bias_index = na._flat_windows(spatial, kernel, dilation, q.device)
    qf = q.flatten(1, nd) * scale
    kf, vf = k.flatten(1, nd)[:, flat], v.flatten(1, nd)[:, flat]
    s = torch.einsum("bnhd,bnkhd->bnhk", qf, kf)
    if rpb is not None:
        bias = rpb.to(q.dtype)[(slice(None), *bias_index)]
        s = s + bias.reshape(h, flat.shape[0], flat.shape[1]).transpose(0, 1)
    out = torch.einsum("bnhk,bnkhe->bnhe", s.softmax(-1), vf)
    return out.reshape(b, *spatial, h, v.shape[-1])


def check_na(
    spatial,
    kernel,
    dilation,
    dtype,
    device,
    *,
    rpb=True,
    rpb_grad=True,
    batch=2,
    heads=2,
    dim=16,
    dv=None,
    std=1.0,
    non_contiguous=False,
    packed=False,
    seed=0,
    scale=None,
):
    """Run the Triton backend on ``device`` and compare forward and gradients with the float64 reference; with
    ``packed`` through one ``[B, *spatial, 3, H, D]`` tensor and its packed backward (``neighborhood_attention_qkv``'s
    Triton path)."""
    non_contiguous = non_contiguous or packed
    nd = len(spatial)
    kernel = (kernel,) * nd if isinstance(kernel, int) else tuple(kernel)
    dilation = (dilation,) * nd if isinstance(dilation, int) else tuple(dilation)
    dv = dim if dv is None else dv
    g = torch.Generator().manual_seed(seed)
    if non_contiguous:  # q, k, v as head splits of one fused [B, *spatial, 3, H, D] projection
        qkv = std * torch.randn(batch, *spatial, 3, heads, dim, generator=g, dtype=torch.float64)
        q, k, v = qkv.to(dtype).double().unbind(-3)
        assert dv == dim
    else:
        q, k = (std * torch.randn(batch, *spatial, heads, dim, generator=g, dtype=torch.float64) for _ in range(2))
        v = torch.randn(batch, *spatial, heads, dv, generator=g, dtype=torch.float64)
        q, k, v = (t.to(dtype).double() for t in (q, k, v))
    table = torch.randn(heads, *(2 * ks - 1 for ks in kernel), generator=g, dtype=torch.float64) if rpb else None
    if table is not None:
        table = table.to(dtype).double()
    grad = torch.randn(batch, *spatial, heads, dv, generator=g, dtype=torch.float64)
    given, scale = scale, dim**-0.5 if scale is None else scale

    # The float64 reference runs on the device too (fast on the GPU).
    ref_in = [t.to(device).clone().requires_grad_() for t in (q, k, v)]
    ref_rpb = None if table is None else table.to(device).clone().requires_grad_(rpb_grad)
    ref = neighborhood_attention_reference(*ref_in, kernel, dilation, rpb=ref_rpb, scale=given)
    ref.backward(grad.to(device))

    if non_contiguous:
        fused = torch.stack([q, k, v], dim=-3).to(device, dtype).requires_grad_()
        ours_in = list(fused.unbind(-3))
    else:
        ours_in = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
    ours_rpb = None if table is None else table.to(device, torch.float32).requires_grad_(rpb_grad)
    if packed:
        out = na._triton_qkv(fused, kernel, dilation, rpb=ours_rpb, scale=given)
    else:
        out = na._triton(*ours_in, kernel, dilation, rpb=ours_rpb, scale=given)
    assert out.dtype == dtype and out.shape == ref.shape
    out.backward(grad.to(device, dtype))
    grads = list(fused.grad.unbind(-3)) if non_contiguous else [t.grad for t in ours_in]
    errors = {"out": _rel(out, ref.detach())}
    errors |= {f"d{n}": _rel(gr, r.grad) for n, gr, r in zip("qkv", grads, ref_in, strict=True)}
    if table is not None and rpb_grad:
        errors["drpb"] = _rel(ours_rpb.grad, ref_rpb.grad)
    elif table is not None:
        assert ours_rpb.grad is None
    if dtype == torch.float32:
        bounds = dict.fromkeys(errors, 2e-5)
    else:
        plain_in = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
        plain_rpb = None if table is None else table.to(device, dtype).requires_grad_(rpb_grad)
        plain = _plain(*plain_in, kernel, dilation, plain_rpb, scale)
        plain.backward(grad.to(device, dtype))
        plain_err = {"out": _rel(plain, ref.detach())}
        plain_err |= {f"d{n}": _rel(p.grad, r.grad) for n, p, r in zip("qkv", plain_in, ref_in, strict=True)}
        if "drpb" in errors:
            plain_err["drpb"] = _rel(plain_rpb.grad, ref_rpb.grad)
        bounds = {key: 2 * e for key, e in plain_err.items()}
    bad = {key: f"{e:.2e} > {bounds[key]:.2e}" for key, e in errors.items() if not e <= bounds[key]}
    assert not bad, (spatial, kernel, dilation, dtype, bad)
    return errors


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from tests.test_kernels_triton_neighborhood import check_na
    f32 = torch.float32
    # Floating torch.empty buffers start as NaN: a kernel that leaves part of one unwritten (the backward's
    # bias-gradient buffer is not zero-filled when every entry is stored once) shows NaN in the compared results.
    _empty = torch.empty
    torch.empty = lambda *a, **kw: (lambda t: t.fill_(float("nan")) if t.is_floating_point() else t)(_empty(*a, **kw))
    # The interpreter's time grows with the programs (batch x heads x tiles): the first case runs batch 2 x 2 heads
    # (batch and head strides, the bias gradient summed over both), the others one of the two.
    check_na((9, 11), 5, (1, 2), f32, "cpu")                       # borders, dilation groups on one axis
    check_na((4, 6), 7, 1, f32, "cpu", batch=1, heads=1)           # map smaller than the kernel: whole map
    check_na((6, 10), 3, 3, f32, "cpu", rpb=False, dim=8, dv=24, batch=1)  # dilation 3 both axes, Dv != D, no bias
    check_na((10, 7), (3, 5), (3, 1), f32, "cpu", rpb_grad=False, batch=3, heads=1)  # dilation capped, frozen table
    check_na((13,), 5, 2, f32, "cpu", dim=32)                      # 1-D as one row
    check_na((5, 9), 3, 1, f32, "cpu", non_contiguous=True, batch=1)  # head splits of a fused qkv
    check_na((7, 9), 3, (2, 1), torch.float16, "cpu", batch=1)
    # the bias in the products' accumulator as rpb / scale (a negative scale), and added after the product where
    # 1 / scale leaves float32's range (scale 0: the logits are the bias alone)
    from visionlin.kernels.triton import neighborhood as nt
    t = torch.zeros(1)
    assert nt._bias_dot(t, -0.3, True) and not nt._bias_dot(t, 0.0, True) and not nt._bias_dot(t, 2.0**-101, True)
    assert not nt._bias_dot(None, 1.0, True) and not nt._bias_dot(t, 1.0, False)  # float32: added after the product
    check_na((7, 8), 5, 1, torch.float16, "cpu", batch=1, heads=1, scale=-0.3)
    nt.TUNING["bwd_bias_dot"] = True  # the backward's opt-in form of the same
    check_na((7, 8), 5, 1, torch.float16, "cpu", batch=1, heads=1, scale=-0.3)
    nt.TUNING["bwd_bias_dot"] = False
    check_na((7, 8), 5, 1, torch.float16, "cpu", batch=1, heads=1, scale=0.0)
    nt.DS_BUFFER_BYTES = 1  # one bias-gradient slice for the whole batch: the fused backward's atomic path
    check_na((6, 7), 3, 1, f32, "cpu", batch=3, heads=1)
    nt.DS_BUFFER_BYTES = 2 * 6 * 7 * 9 * 4  # two slices for three batch elements (b % 2)
    check_na((6, 7), 3, 1, f32, "cpu", batch=3, heads=1)
    nt.DS_BUFFER_BYTES = 256 << 20
    # MEASURED_TILES (half precision, bias table, 7 x 7 window, head dim 32) by group row: a 7 x 7 group in 8 x 8
    # tiles with key rows of 8 columns; rows of 9-16: 16 x 2 forward, 4 x 16 backward; 17-32: 16 x 2 forward, 4 x 4
    # backward; longer: 8 x 8 forward, 8 x 2 backward
    for spatial in ((7, 7), (7, 14), (7, 20), (7, 34)):
        check_na(spatial, 7, 1, torch.float16, "cpu", batch=1, heads=1, dim=32)
    # narrow key blocks on request outside the table's range; then 16-query tiles of 8 x 2, with and without them
    nt.TUNING["narrow_cols"] = True
    check_na((7, 7), 7, 1, f32, "cpu", batch=1, heads=1)
    check_na((9, 11), 5, (1, 2), torch.float16, "cpu", batch=1)
    nt.TUNING.update(tile_q=16, tile_y=2)
    check_na((9, 11), 5, (1, 2), f32, "cpu", batch=1, heads=1)
    nt.TUNING["narrow_cols"] = False
    check_na((10, 7), (3, 5), (3, 1), f32, "cpu", rpb=False, heads=1)
    nt.TUNING.update(tile_q=None, tile_y=None, narrow_cols=None)
    # the backward's own key tile (bwd_tile_q) and dq stored directly where one tile holds a whole dilation group:
    # whole maps (9 x 11 in a 16 x 16 tile; the 7 x 7 groups of the shipped 8 x 8 tiles), dilation groups of unequal
    # lengths, and a tile that does not hold the group (atomics)
    assert nt.TUNING["bwd_dq_direct"] is True  # shipped on; the float32 atomics it replaces checked too
    check_na((7, 7), 7, 1, torch.float16, "cpu", batch=1, heads=1, dim=32)
    nt.TUNING["bwd_dq_direct"] = False
    check_na((7, 7), 7, 1, torch.float16, "cpu", batch=1, heads=1, dim=32)
    nt.TUNING["bwd_dq_direct"] = True
    nt.TUNING["bwd_tile_q"] = 256
    check_na((9, 11), 5, 1, torch.float16, "cpu", batch=2, heads=1)
    check_na((13, 11), 5, (2, 3), torch.float16, "cpu", batch=1, heads=2)
    check_na((9, 11), 5, 1, f32, "cpu", batch=1, heads=1)  # float32: atomics (direct only in half precision)
    nt.TUNING["bwd_tile_q"] = 32
    check_na((9, 11), 5, 1, f32, "cpu", batch=1, heads=1)
    nt.TUNING["bwd_tile_q"] = None
    # rowsum(dO * O) inside the backward instead of its own pass: one tile a group (direct dq), several (atomics),
    # dilation groups of unequal lengths
    nt.TUNING["bwd_delta_fused"] = True
    check_na((7, 7), 7, 1, torch.float16, "cpu", batch=1, heads=1, dim=32)
    check_na((9, 11), 5, (1, 2), f32, "cpu", batch=2, heads=2)
    nt.TUNING["bwd_delta_fused"] = None
    # int32 query / key offsets everywhere (the shipped rule keeps int64 for the backward at one key tile a group,
    # and for maps, strides or bias-gradient slices past 2^31 elements), then int64 everywhere (s50's kernels)
    nt.TUNING["bwd_int32_offsets"] = True
    check_na((9, 11), 5, (1, 2), torch.float16, "cpu", batch=2, heads=2)
    check_na((7, 7), 7, 1, torch.float16, "cpu", batch=1, heads=1, dim=32)
    nt.TUNING["bwd_int32_offsets"] = nt.TUNING["fwd_int32_offsets"] = False
    check_na((9, 11), 5, (1, 2), torch.float16, "cpu", batch=1, heads=2)
    nt.TUNING["bwd_int32_offsets"], nt.TUNING["fwd_int32_offsets"] = None, True
    i64 = nt._bwd_i64, nt._fwd_i64
    nt._bwd_i64 = nt._fwd_i64 = lambda *args: True
    check_na((9, 11), 5, (1, 2), f32, "cpu", batch=1, heads=2)
    nt._bwd_i64, nt._fwd_i64 = i64
    # q, k, v packed in one tensor with one packed gradient: 2-D (dq by atomics and stored directly), dilation
    # groups, 1-D, without a bias table
    check_na((9, 11), 5, (1, 2), f32, "cpu", batch=2, heads=2, packed=True)
    check_na((7, 7), 7, 1, torch.float16, "cpu", batch=1, heads=2, dim=32, packed=True)
    check_na((13,), 5, 2, torch.float16, "cpu", batch=2, heads=1, packed=True)
    check_na((6, 9), 3, 1, f32, "cpu", rpb=False, batch=1, heads=1, packed=True)
    print("interpreter ok")
    """
)


def test_interpreter_neighborhood_matches_reference():
    """The kernels' math on the CPU (Triton's interpreter): float32 and float16, forward and backward."""
    pytest.importorskip("triton")
    run_in_interpreter(_INTERPRETER_SCRIPT)


@pytest.mark.parametrize(
    ("queries", "tile_y", "narrow"),
    [(None, None, None), (None, None, True), (None, None, False), (64, 8, True), (16, 2, True), (32, None, None)],
)
def test_tile_config_covers_the_key_rectangle(queries, tile_y, narrow, monkeypatch):
    """The key block's columns cover the tile's key rectangle (``TY + k - 1`` wide, or the whole row), at least 16
    columns unless narrow (``narrow_cols``, by default inside ``MEASURED_TILES``' range); a key block and a query tile
    hold at least 16 (the products' smallest size), the forward's and the backward's, at every head dim and
    precision."""
    pytest.importorskip("triton")
    from visionlin.kernels.triton import neighborhood as nt

    monkeypatch.setitem(nt.TUNING, "tile_q", queries)
    monkeypatch.setitem(nt.TUNING, "tile_y", tile_y)
    monkeypatch.setitem(nt.TUNING, "narrow_cols", narrow)
    for k, ny, nx, rpb, d, bwd, half in itertools.product(
        (1, 3, 5, 7, 9, 11, 13), (1, 2, 5, 7, 13, 17, 28, 56), (1, 3, 7, 56), (False, True), (16, 32, 64),
        (False, True), (False, True),
    ):  # fmt: skip
        kx, ky = min(k, nx), min(k, ny)
        tx, ty, krows, kcols = nt.tile_config(nx, ny, kx, ky, rpb, d, bwd, half)
        if nx == 1:
            assert (tx, ty) == (1, 16 if rpb else 32)
        else:
            assert tx * ty == queries if queries else tx * ty in (16, 32, 64), (tx, ty)
            assert math.log2(ty) % 1 == 0 and ty <= max(2, 2 ** math.ceil(math.log2(ny))), (tx, ty)
        width = min(ty + ky - 1, ny)
        measured = nt._measured_tile(ny, kx, ky, rpb, d, half, bwd) is not None
        may_narrow = nx > 1 and (narrow or (narrow is None and measured))
        assert kcols >= width and (kcols >= 16 or (may_narrow and kcols < 2 * width))
        assert krows * kcols >= 16 and math.log2(krows * kcols) % 1 == 0
    monkeypatch.setitem(nt.TUNING, "block_k", 16)
    wide = narrow is False or (narrow is None and queries)  # a set tile drops the table's narrow blocks
    assert nt.tile_config(7, 7, 7, 7, True)[2:] == ((1, 16) if wide else (2, 8))  # a 7 x 7 map's rows in 8 columns


def test_measured_tiles_by_group_row(monkeypatch):
    """The default 2-D tiles follow ``MEASURED_TILES`` by the dilation group's row length inside the range they were
    measured in (half precision, bias table, 7 x 7 window, head dim 32), forward and backward apart, with their warps
    and narrow key blocks; the general rule (64 queries in rows of 8, warps by head dim, blocks of at least 16 columns)
    outside it; a tile set in ``TUNING`` drops the table (its warps and narrow blocks with it)."""
    pytest.importorskip("triton")
    from visionlin.kernels.triton import neighborhood as nt

    def tile(n, k=7, rpb=True, d=32, half=True, bwd=False):
        tx, ty, krows, kcols, warps, cap = nt._tile_plan(n, n, min(k, n), min(k, n), rpb, d, bwd, half)
        assert nt.tile_config(n, n, min(k, n), min(k, n), rpb, d, bwd, half) == (tx, ty, krows, kcols)
        assert cap in (None, 0) and (warps is not None or cap is None)  # the table's cap comes with its warps
        return tx, ty, kcols, warps, cap

    # NAT-T's four stages (56, 28, 14, 7) and DiNAT-T's 7 x 7 dilation groups, narrow key blocks
    assert [tile(n) for n in (56, 28, 14, 7)] == [(8, 8, 16, None, None), (16, 2, 8, 2, None), (16, 2, 8, 2, None),
                                                  (8, 8, 8, None, None)]  # fmt: skip
    assert [tile(n, bwd=True) for n in (56, 28, 14, 7)] == [(8, 2, 8, 2, 0), (4, 4, 16, 2, None),
                                                            (4, 16, 16, None, None), (8, 8, 8, 2, 0)]  # fmt: skip
    assert tile(9) == (16, 2, 8, 2, None) and tile(17, bwd=True) == (4, 4, 16, 2, None)
    assert tile(33, bwd=True) == (8, 2, 8, 2, 0)
    for outside in (dict(rpb=False), dict(k=5), dict(k=9), dict(d=16), dict(d=64), dict(half=False)):
        for bwd in (False, True):  # not measured: the general rule, 16-column key blocks at 7 x 7
            assert tile(14, bwd=bwd, **outside)[:2] == (8, 8) and tile(14, bwd=bwd, **outside)[3:] == (None, None)
        assert tile(56, bwd=True, **outside)[:2] == (8, 8)
        if outside != dict(k=9):  # kernel 9 at a 7 x 7 map is a 7 x 7 window: the table's
            assert tile(7, **outside)[2] == 16
    assert nt.tile_config(1, 3136, 1, 7, True) == nt.tile_config(1, 3136, 1, 7, True, 32, True, False)  # 1-D
    assert nt._tile_plan(1, 3136, 1, 7, True, 32, True, True)[4] is None
    assert nt.launch_meta(32, 32, 32, True, 2)["num_warps"] == 2 and nt._bwd_meta(32, True, 2)["num_warps"] == 2
    assert nt.launch_meta(32, 32, 32, True)["num_warps"] == 4 and nt._bwd_meta(32, True)["num_warps"] == 4
    # the register cap: the tile's if given (0: none), else the rule's (MAXNREG at head dim 32 half / 64 with a table)
    assert nt._bwd_meta(32, True, 2, 0).get("maxnreg") is None and nt._bwd_meta(32, True)["maxnreg"] == nt.MAXNREG
    assert nt._bwd_meta(32, True, 2, 96)["maxnreg"] == 96 and nt._bwd_meta(32, False).get("maxnreg") is None
    assert nt.launch_meta(32, 32, 64, True, 4, 0).get("maxnreg") is None
    assert nt.launch_meta(32, 32, 64, True)["maxnreg"] == nt.MAXNREG
    monkeypatch.setitem(nt.TUNING, "bwd_maxnreg", 200)
    assert nt._bwd_meta(32, True, 2, 0)["maxnreg"] == 200  # TUNING wins over the tile's cap
    monkeypatch.setitem(nt.TUNING, "bwd_maxnreg", None)
    monkeypatch.setitem(nt.TUNING, "tile_q", 32)
    assert tile(56)[:3] == (4, 8, 16) and tile(14)[3:] == (None, None)  # the set tile, rows of 8, no table warps / cap
    monkeypatch.setitem(nt.TUNING, "tile_q", None)
    monkeypatch.setitem(nt.TUNING, "tile_y", 32)
    assert tile(56) == (2, 32, 64, None, None) and tile(56, bwd=True)[:2] == (2, 32)  # 64 queries: the general rule
    monkeypatch.setitem(nt.TUNING, "tile_y", None)
    monkeypatch.setitem(nt.TUNING, "narrow_cols", False)
    assert tile(7)[2] == 16 and tile(28)[:2] == (16, 2)  # wide blocks, the table's tile kept
    monkeypatch.setitem(nt.TUNING, "narrow_cols", True)
    assert tile(7, half=False)[2] == 8  # narrow outside the table's range, on request
    monkeypatch.setitem(nt.TUNING, "bwd_warps", 8)
    assert nt._bwd_meta(32, True, 2)["num_warps"] == 8  # a set warp count wins over the tile's


def test_ops_launch_each_pass_with_its_own_tile_and_warps(monkeypatch):
    """``na2d_fwd`` and ``na2d_bwd`` launch their kernels with the tile, warps and register cap of their own pass
    (``_tile_plan``) at NAT-T's stage shapes, bf16 with a bias table; float32 takes
    the general rule (the kernels stubbed: only the launch arguments are checked)."""
    pytest.importorskip("triton")
    from visionlin.kernels.triton import neighborhood as nt

    seen = []
    monkeypatch.setattr(nt, "launch", lambda kernel, grid, *args, **meta: seen.append((kernel, meta)))
    monkeypatch.setattr(nt, "_delta", lambda g, out: torch.zeros(1))
    want = {  # map side: (forward TX, TY, warps, register cap), (backward TX, TY, warps, register cap)
        56: ((8, 8, 4, None), (8, 2, 2, None)), 28: ((16, 2, 2, None), (4, 4, 2, 128)),
        14: ((16, 2, 2, None), (4, 16, 4, 128)), 7: ((8, 8, 4, None), (8, 8, 2, None)),
    }  # fmt: skip
    for dtype in (torch.bfloat16, torch.float32):
        for n, (fwd, bwd) in want.items():
            q = torch.zeros(1, n, n, 2, 32, dtype=dtype)
            rpb = torch.zeros(2, 13, 13)
            seen.clear()
            nt.na2d_fwd(q, q, q, rpb, 7, 7, 1, 1, 0.25)
            nt.na2d_bwd(q, q, q, rpb, q, torch.zeros(1, 2, n, n), q, 7, 7, 1, 1, 0.25, False)
            got = [(m["TX"], m["TY"], m["num_warps"], m.get("maxnreg")) for k, m in seen
                   if k in (nt._fwd_kernel, nt._bwd_kernel)]  # fmt: skip
            if dtype == torch.float32:
                fwd = bwd = (8, 8, 4, None)
            assert got == [fwd, bwd], (dtype, n, got)


def test_bwd_tile_and_direct_dq_launch(monkeypatch):
    """``TUNING["bwd_tile_q"]`` sets the backward's key tile alone (whole group rows where they fit, the forward's
    tile unchanged); with ``bwd_dq_direct`` (on by default) a key tile that holds its whole dilation group stores dq in
    the inputs' dtype (``DQ_DIRECT``, no float32 buffer), and only then (the kernels stubbed: the launch arguments
    checked)."""
    pytest.importorskip("triton")
    from visionlin.kernels.triton import neighborhood as nt

    seen = []
    monkeypatch.setattr(nt, "launch", lambda kernel, grid, *args, **meta: seen.append((kernel, args, meta)))
    monkeypatch.setattr(nt, "_delta", lambda g, out: torch.zeros(1))

    def launched(kernel):
        """The meta of each launch of ``kernel`` since the last ``bwd`` call."""
        return [m for k, a, m in seen if k is kernel]

    def bwd(n, dil=1, dtype=torch.bfloat16, rpb=True):
        seen.clear()
        q = torch.zeros(1, n, n, 2, 32, dtype=dtype)
        table = torch.zeros(2, 13, 13) if rpb else None
        dq = nt.na2d_bwd(q, q, q, table, q, torch.zeros(1, 2, n, n), q, 7, 7, dil, dil, 0.25, False)[0]
        ((args, meta),) = [(a, m) for k, a, m in seen if k is nt._bwd_kernel]
        return (meta["TX"], meta["TY"], meta["DQ_DIRECT"]), args[7].dtype, dq.dtype

    assert bwd(14) == ((4, 16, False), torch.float32, torch.bfloat16)  # the shipped tile, dq by float32 atomics
    assert bwd(7) == ((8, 8, True), torch.bfloat16, torch.bfloat16)  # one tile holds the map: stored directly
    monkeypatch.setitem(nt.TUNING, "bwd_dq_direct", False)
    assert bwd(7) == ((8, 8, False), torch.float32, torch.bfloat16)  # switched off: atomics
    monkeypatch.setitem(nt.TUNING, "bwd_dq_direct", True)
    assert bwd(28, dil=4) == ((8, 8, True), torch.bfloat16, torch.bfloat16)  # DiNAT's 7 x 7 groups
    assert bwd(7, dtype=torch.float32)[0] == (8, 8, False)  # float32 inputs: atomics (direct spilled there)
    assert bwd(14)[0] == (4, 16, False)  # four tiles a map: atomics still
    monkeypatch.setitem(nt.TUNING, "bwd_tile_q", 256)
    assert bwd(14)[0] == (16, 16, True) and bwd(28)[0] == (8, 32, False)  # 28 x 28: four 8 x 32 tiles
    assert nt.tile_config(14, 14, 7, 7, True, 32, False, True)[:2] == (16, 2)  # the forward's tile unchanged
    monkeypatch.setitem(nt.TUNING, "bwd_tile_q", None)
    deltas = []
    monkeypatch.setattr(nt, "_delta", lambda g, out: deltas.append(1) or torch.zeros(1))

    def fused(*args, **kw):
        bwd(*args, **kw)
        return launched(nt._bwd_kernel)[0]["DELTA_FUSED"]

    # rowsum(dO * O) in the backward (no pass of its own) by default only where one tile holds the group (these calls
    # pass a bias table: without one, the pass)
    assert not fused(14) and len(deltas) == 1
    assert not fused(7, rpb=False) and len(deltas) == 2
    deltas.clear()
    assert fused(7) and fused(28, dil=4) and not deltas
    assert not fused(7, dtype=torch.float32) and len(deltas) == 1  # (atomics there: not direct)
    monkeypatch.setitem(nt.TUNING, "bwd_delta_fused", True)  # or everywhere / nowhere on request
    assert fused(14) and fused(7, dtype=torch.float32) and fused(7, rpb=False) and len(deltas) == 1
    monkeypatch.setitem(nt.TUNING, "bwd_delta_fused", False)
    assert not fused(7) and len(deltas) == 2
    monkeypatch.setitem(nt.TUNING, "bwd_delta_fused", 1)
    with pytest.raises(ValueError, match=r"TUNING\['bwd_delta_fused'\] = 1: must be None \(the default\), True"):
        bwd(7)
    monkeypatch.setitem(nt.TUNING, "bwd_delta_fused", None)

    def i64(*args, **kw):
        bwd(*args, **kw)
        return launched(nt._bwd_kernel)[0]["I64"]

    # int32 query offsets by default (s51), but not where one key tile holds the group (dq direct: spilled, slower)
    assert not i64(14) and not i64(56) and not i64(7, dtype=torch.float32)
    assert i64(7) and i64(28, dil=4)
    monkeypatch.setitem(nt.TUNING, "bwd_int32_offsets", True)  # everywhere on request
    assert not i64(14) and not i64(7)
    monkeypatch.setitem(nt.TUNING, "bwd_int32_offsets", False)  # or nowhere
    assert i64(14) and i64(7)
    monkeypatch.setitem(nt.TUNING, "bwd_int32_offsets", None)
    monkeypatch.setattr(nt, "_bwd_i64", lambda *args: True)  # past int32: int64 still
    assert i64(14)
    monkeypatch.setitem(nt.TUNING, "bwd_int32_offsets", "no")
    with pytest.raises(ValueError, match=r"TUNING\['bwd_int32_offsets'\] = 'no': must be None \(the default\), True"):
        bwd(14)
    monkeypatch.setitem(nt.TUNING, "bwd_int32_offsets", None)
    monkeypatch.setitem(nt.TUNING, "bwd_dq_direct", "yes")
    with pytest.raises(ValueError, match=r"TUNING\['bwd_dq_direct'\] = 'yes': must be True or False"):
        bwd(7)
    monkeypatch.setitem(nt.TUNING, "bwd_dq_direct", False)
    monkeypatch.setitem(nt.TUNING, "bwd_tile_q", 512)
    with pytest.raises(ValueError, match=r"TUNING\['bwd_tile_q'\] = 512: allowed 16 to 256"):
        bwd(7)


def test_fwd_int32_offsets_launch(monkeypatch):
    """``TUNING["fwd_int32_offsets"]``: the forward's key offsets in int32 (``I64`` off; the default since s51) unless
    ``k`` / ``v`` reach 2^31 elements within a (batch, head); off, int64 (the kernels stubbed: the launch arguments
    checked)."""
    pytest.importorskip("triton")
    from visionlin.kernels.triton import neighborhood as nt

    seen = []
    monkeypatch.setattr(nt, "launch", lambda kernel, grid, *args, **meta: seen.append(meta["I64"]))
    q = torch.zeros(1, 14, 14, 2, 32, dtype=torch.bfloat16)
    nt._fwd(q, q, q, None, 7, 7, 1, 1, 0.25)
    monkeypatch.setitem(nt.TUNING, "fwd_int32_offsets", False)
    nt._fwd(q, q, q, None, 7, 7, 1, 1, 0.25)
    wide = torch.empty_strided((1, 4, 4, 1, 32), (2**33, 2**30, 2**20, 32, 1), device="meta")
    assert nt._fwd_i64(wide, wide) and not nt._fwd_i64(q, q)
    assert seen[-2:] == [False, True]


def test_bwd_i64_only_past_int32_offsets():
    """The backward's query-side offsets within one (batch, head) stay int32 unless a stride, a ``dq`` row offset or
    a bias-gradient slot offset reaches 2^31 (meta tensors: no memory)."""
    pytest.importorskip("triton")
    from visionlin.kernels.triton import neighborhood as nt

    def t(shape, stride=None):
        return torch.empty_strided(shape, stride or torch.empty(shape, device="meta").stride(), device="meta")

    q = t((128, 56, 56, 2, 32))
    assert not nt._bwd_i64(q, q, q, 49)
    big = t((1, 2048, 2048, 16, 32))  # 2^31 elements a sample: dq rows past int32
    assert nt._bwd_i64(big, big, big, 49)
    wide = t((1, 8192, 8192, 1, 8))  # 2^29 elements, but 49 bias-gradient slots a query past int32
    assert nt._bwd_i64(wide, wide, wide, 49) and not nt._bwd_i64(wide, wide, wide, 1)
    strided = t((2, 4, 4, 1, 32), (2**33, 2**30, 2**20, 32, 1))  # a view whose rows lie 2^30 elements apart
    assert nt._bwd_i64(q[:2, :4, :4, :1], strided, q[:2, :4, :4, :1], 49)
    assert not nt._bwd_i64(q[:2, :4, :4, :1], q[:2, :4, :4, :1], q[:2, :4, :4, :1], 49)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("tile_y", 3, "TUNING['tile_y'] = 3: must be a power of two"),
        ("tile_y", 128, "TUNING['tile_y'] = 128: allowed 1 to 64"),
        ("block_k", 0, "TUNING['block_k'] = 0: must be an integer >= 1 or None"),
        ("block_k", 512, "TUNING['block_k'] = 512: allowed 1 to 256"),
        ("warps", 6, "TUNING['warps'] = 6: must be a power of two"),
        ("warps", 64, "TUNING['warps'] = 64: allowed 1 to 32"),
        ("stages", -1, "TUNING['stages'] = -1: must be an integer >= 0 or None"),
        ("stages", 9, "TUNING['stages'] = 9: allowed 0 to 8"),
        ("maxnreg", 1.5, "TUNING['maxnreg'] = 1.5: must be an integer >= 0 or None"),
        ("maxnreg", 256, "TUNING['maxnreg'] = 256: allowed 0 to 255"),
        ("bwd_block", 24, "TUNING['bwd_block'] = 24: must be a power of two"),
        ("bwd_block", 8, "TUNING['bwd_block'] = 8: allowed 16 to 256"),
        ("bwd_warps", True, "TUNING['bwd_warps'] = True: must be an integer >= 1 or None"),
        ("bwd_stages", "2", "TUNING['bwd_stages'] = '2': must be an integer >= 0 or None"),
        ("bwd_maxnreg", -128, "TUNING['bwd_maxnreg'] = -128: must be an integer >= 0 or None"),
        ("bwd_bias_dot", "no", "TUNING['bwd_bias_dot'] = 'no': must be True or False"),
        ("tile_q", 128, "TUNING['tile_q'] = 128: allowed 16, 32 or 64"),
        ("tile_q", 8, "TUNING['tile_q'] = 8: allowed 16, 32 or 64"),
        ("tile_q", "abc", "TUNING['tile_q'] = 'abc': must be an integer >= 1 or None"),
        ("narrow_cols", 1, "TUNING['narrow_cols'] = 1: must be None (the default), True or False"),
    ],
)
def test_bad_launch_settings_raise_naming_them(key, value, message, monkeypatch):
    """A launch setting the kernels cannot take raises a ``ValueError`` naming it and the value, from every helper
    that reads the settings, 1-D (one-row) maps included, and from the ops before any kernel runs (a non-power-of-two
    tile or block would fail deep inside Triton; the string ``"no"`` would read as on)."""
    pytest.importorskip("triton")
    from visionlin.kernels.triton import neighborhood as nt

    monkeypatch.setitem(nt.TUNING, key, value)
    q = torch.zeros(1, 8, 8, 1, 16)
    calls = [
        lambda: nt.tile_config(8, 8, 7, 7, True),
        lambda: nt.tile_config(1, 13, 1, 5, True),  # a one-row map reads no 2-D tile setting, and checks them all
        lambda: nt.launch_meta(64, 32, 16),
        lambda: nt._bwd_meta(16, True),
        lambda: nt._bwd_block(16, True, 16),
        lambda: nt.na2d_fwd(q, q, q, None, 7, 7, 1, 1, 0.25),  # on the CPU without the interpreter: a kernel
        lambda: nt.na2d_bwd(q, q, q, None, q, torch.zeros(1, 1, 8, 8), q, 7, 7, 1, 1, 0.25, False),  # would raise
    ]
    for call in calls:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()


def test_a_checked_table_does_not_hide_a_bad_value_of_an_equal_number(monkeypatch):
    """The check runs once per distinct table: ``1`` after ``True`` (equal in Python) or ``8.0`` after ``8`` is a new
    table, and raises."""
    pytest.importorskip("triton")
    from visionlin.kernels.triton import neighborhood as nt

    for key, good, bad in (("narrow_cols", True, 1), ("tile_y", 8, 8.0)):
        monkeypatch.setitem(nt.TUNING, key, good)
        nt.tile_config(8, 8, 7, 7, True)
        monkeypatch.setitem(nt.TUNING, key, bad)
        with pytest.raises(ValueError, match=re.escape(f"TUNING[{key!r}]")):
            nt.tile_config(8, 8, 7, 7, True)
        monkeypatch.setitem(nt.TUNING, key, good)


def test_tile_y_at_most_the_query_tile(monkeypatch):
    pytest.importorskip("triton")
    from visionlin.kernels.triton import neighborhood as nt

    monkeypatch.setitem(nt.TUNING, "tile_q", 16)
    monkeypatch.setitem(nt.TUNING, "tile_y", 32)
    with pytest.raises(ValueError, match=re.escape("TUNING['tile_y'] = 32: at most 16")):
        nt.tile_config(8, 8, 7, 7, True)
    monkeypatch.setitem(nt.TUNING, "tile_y", 16)
    assert nt.tile_config(8, 8, 7, 7, True)[:2] == (2, 8)  # 16 wide, cut to the map's 8 columns: 2 x 8


# Dispatch ----------------------------------------------------------------------------------------------------------
def _qkv(spatial, dtype=torch.float32, dim=8, heads=2, device="cpu"):
    return [torch.randn(2, *spatial, heads, dim, dtype=dtype, device=device) for _ in range(3)]


_BIAS_GRAD_SCRIPT = textwrap.dedent(
    """
    import torch
    from visionlin.kernels import neighborhood as na
    from visionlin.kernels.triton import neighborhood as nt

    def reference(ds, shape, x, y, kx, ky, dx, dy):  # the sum over slices, scattered through an index tensor
        ksx, ksy = (shape[1] + 1) // 2, (shape[2] + 1) // 2
        _, bix = na.neighborhood_indices(x, ksx, dx)
        _, biy = na.neighborhood_indices(y, ksy, dy)
        flat = (bix[:, None, :, None] * shape[2] + biy[None, :, None, :]).reshape(1, -1).expand(shape[0], -1)
        out = torch.zeros(shape, dtype=torch.float64)
        out.view(shape[0], -1).scatter_add_(1, flat, ds.double().sum(0).reshape(shape[0], -1))
        return out

    torch.manual_seed(0)
    # (map, kernel, dilation, heads): clipped borders, dilation groups on one or both axes, a map smaller than the
    # kernel (window = the whole map, table 13 x 13), non-square kernels
    for (x, y), ks, dil, h in (((7, 5), 3, 1, 2), ((12, 9), 5, (2, 1), 3), ((4, 6), 7, 1, 1), ((9, 13), (3, 5), 2, 2)):
        ks = ks if isinstance(ks, tuple) else (ks, ks)
        dil = dil if isinstance(dil, tuple) else (dil, dil)
        (kx, dx), (ky, dy) = na.effective_window(x, ks[0], dil[0]), na.effective_window(y, ks[1], dil[1])
        shape = (h, 2 * ks[0] - 1, 2 * ks[1] - 1)
        for slices, per_sm in ((1, 4), (5, 4), (5, 1000), (3, 0)):  # one chunk, several, one slice each; per_sm 0: 1
            nt.BIAS_GRAD_PER_SM = ((None, per_sm),)
            ds = torch.randn(slices, h, x, y, kx * ky)
            drpb = torch.zeros(shape)
            nt._bias_grad(ds, drpb, x, y, kx, ky, dx, dy)
            want = reference(ds, shape, x, y, kx, ky, dx, dy)
            assert torch.allclose(drpb.double(), want, rtol=1e-5, atol=1e-5), ((x, y), ks, dil, slices, per_sm)
        ds = torch.randn(2, h, x, y, kx * ky)  # strided slices: a view into a larger buffer
        big = torch.randn(2, h + 1, x, y, kx * ky)
        big[:, :h] = ds
        drpb = torch.zeros(shape)
        nt._bias_grad(big[:, :h], drpb, x, y, kx, ky, dx, dy)
        assert torch.allclose(drpb.double(), reference(ds, shape, x, y, kx, ky, dx, dy), rtol=1e-5, atol=1e-5)
    print("interpreter ok")
    """
)


def test_bias_gradient_reduction_programs_per_sm_by_map(monkeypatch):
    """``BIAS_GRAD_PER_SM``: the first row holding the map's queries sets the programs per SM the slices are split
    for (1 up to 28 x 28, 2 beyond); the grid's third axis is the chunk count (the kernel stubbed)."""
    pytest.importorskip("triton")
    from visionlin.kernels.triton import neighborhood as nt

    grids = []
    monkeypatch.setattr(nt, "launch", lambda kernel, grid, *args, **meta: grids.append(grid))
    monkeypatch.setattr(nt, "_num_sms", lambda device: 132)
    assert nt.BIAS_GRAD_PER_SM == ((784, 1), (None, 2))
    for n, heads in ((14, 8), (28, 4), (56, 2)):
        ds = torch.zeros(128, heads, n, n, 49)
        nt._bias_grad(ds, torch.zeros(heads, 13, 13), n, n, 7, 7, 1, 1)
    # 64 queries a program (4096 sums of 64 slots): 4 / 13 / 49 query blocks x heads = 32 / 52 / 98 programs before
    # the split; chunks 132 // 32 = 4, 132 // 52 = 2 (1 a SM), 264 // 98 = 2 (2 a SM; 1 a SM would give 1 chunk)
    assert grids == [(4, 8, 4), (13, 4, 2), (49, 2, 2)]


def test_interpreter_bias_gradient_reduction():
    """The backward's bias-gradient reduction kernel (slices summed in registers, added to the table by atomics at
    indices computed from each query's window) against the sum over slices scattered through ``neighborhood_indices``
    (float64): clipped and dilated windows, maps smaller than the kernel, slices split into chunks or not."""
    pytest.importorskip("triton")
    run_in_interpreter(_BIAS_GRAD_SCRIPT)


def test_triton_supports_reasons():
    op = get_op("neighborhood_attention")
    assert list(op.backends) == ["natten", "triton", "flex", "chunked", "reference"]
    q, k, v = _qkv((6, 6))
    reasons = "; ".join(op.supports(q, k, v, (3, 3), (1, 1), dropout_p=0.1, backend="triton"))
    assert "not on a CUDA device" in reasons and "dropout" in reasons
    q3, k3, v3 = _qkv((3, 4, 5), dtype=torch.float64, dim=160)
    reasons = "; ".join(op.supports(q3, k3, v3, (3, 3, 3), (1, 1, 1), backend="triton"))
    for words in ("1-D and 2-D", "torch.float64", "head dims D=160"):
        assert words in reasons, (words, reasons)
    q, k, v = _qkv((20, 20))
    extra = torch.zeros(2, 1, 2, 8)
    reasons = "; ".join(
        op.supports(q, k, v, (15, 15), (1, 1), additional_keys=extra, additional_values=extra, backend="triton")
    )
    assert "effective kernel sizes (15, 15) exceed" in reasons and "additional_keys" in reasons
    # A kernel larger than a small map shrinks to the map (effective window): 15 on a 9 x 9 map is 9 x 9.
    q, k, v = _qkv((9, 9))
    assert not any("kernel" in r for r in op.supports(q, k, v, (15, 15), (1, 1), backend="triton"))
    with pytest.raises(NotImplementedError, match=r"backend 'triton' cannot run this call: .*CUDA"):
        neighborhood_attention(q, k, v, 3, backend="triton")


# GPU ---------------------------------------------------------------------------------------------------------------
gpu = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]

# (spatial, kernel, dilation, batch): odd maps, maps smaller than kernel x dilation, capped dilations, every odd kernel
GPU_CASES = [
    ((13, 17), 7, 1, 3),
    ((13, 17), 3, (2, 3), 1),
    ((5, 6), 7, 1, 3),  # smaller than the kernel: the whole map
    ((14, 14), 7, 4, 1),  # dilation capped at 14 // 7 = 2
    ((9, 30), 5, (1, 5), 3),
    ((21, 19), 9, 2, 1),
    ((23, 29), 11, 1, 3),
    ((27, 31), 13, (1, 2), 1),
    ((56, 56), 7, 1, 1),  # NAT stage 1
    ((28, 28), 7, 4, 3),  # DiNAT stage 2
    ((7, 7), 7, 1, 3),  # NAT stage 4: one window
    ((1, 40), 5, 1, 3),  # one row
]
GPU_IDS = ["x".join(map(str, s)) + f"_k{k}_d{'-'.join(map(str, d if isinstance(d, tuple) else (d,)))}_b{b}"
           for s, k, d, b in GPU_CASES]  # fmt: skip


def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


# Every case in bfloat16; float32 and float16 on the cases of distinct tilings (each dtype, bias flag, head dim and
# tiling is one more Triton compilation: the whole cross product would spend minutes compiling).
DTYPE_CASES = [(c, torch.bfloat16) for c in range(len(GPU_CASES))] + [
    (c, dt) for dt in (torch.float32, torch.float16) for c in (0, 2, 3, 7)
]


@gpu
@pytest.mark.parametrize(("case", "dtype"), DTYPE_CASES, ids=[f"{GPU_IDS[c]}-{str(dt)[6:]}" for c, dt in DTYPE_CASES])
def test_gpu_na2d(case, dtype):
    """With the bias at head dim 32 and without at 64 on even cases, the other way round on odd ones."""
    _cuda_or_skip()
    spatial, kernel, dilation, batch = GPU_CASES[case]
    dims = (32, 64) if case % 2 == 0 else (64, 32)
    check_na(spatial, kernel, dilation, dtype, "cuda", rpb=True, batch=batch, heads=3, dim=dims[0])
    check_na(spatial, kernel, dilation, dtype, "cuda", rpb=False, batch=batch, heads=3, dim=dims[1])


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_na_awkward_layouts(dtype):
    """Head splits of a fused qkv, Dv != D, a frozen bias table, large logits, scales 0 and negative, 1-D."""
    _cuda_or_skip()
    check_na((13, 17), 7, 1, dtype, "cuda", non_contiguous=True, dim=32, heads=2)
    check_na((11, 12), 5, 2, dtype, "cuda", dim=64, dv=32, rpb_grad=False)
    check_na((15, 15), 3, 1, dtype, "cuda", dim=32, std=4.0)
    check_na((15, 15), 5, 1, dtype, "cuda", dim=32, scale=0.0)  # the bias added after the product (1 / scale)
    check_na((15, 15), 5, 1, dtype, "cuda", dim=32, scale=-2.0)
    check_na((197,), 7, 3, dtype, "cuda", dim=32, batch=3)
    check_na((49,), 13, 1, dtype, "cuda", dim=64, batch=1, rpb=False)


@gpu
@pytest.mark.parametrize("slices", [1, 2, 3])
def test_gpu_na_bias_gradient_slices(slices, monkeypatch):
    """The backward's bias-gradient buffer with fewer slices than batch elements (atomics into slice ``b % n``) and
    with one slice per element (plain stores), and head dim 128 (8 warps, no register cap)."""
    _cuda_or_skip()
    from visionlin.kernels.triton import neighborhood as nt

    spatial, heads = (12, 13), 2
    monkeypatch.setattr(nt, "DS_BUFFER_BYTES", slices * heads * 12 * 13 * 25 * 4)
    check_na(spatial, 5, 1, torch.bfloat16, "cuda", batch=3, heads=heads, dim=32)
    check_na(spatial, 5, 1, torch.bfloat16, "cuda", batch=3, heads=heads, dim=128)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_na_backward_bias_in_product(dtype, monkeypatch):
    """The backward's opt-in form (``TUNING["bwd_bias_dot"]``): the bias in its score products' accumulator as the
    forward does; NAT's stage-1 tiling, a dilated one, a negative scale and scale 0 (added after the product)."""
    _cuda_or_skip()
    from visionlin.kernels.triton import neighborhood as nt

    monkeypatch.setitem(nt.TUNING, "bwd_bias_dot", True)
    check_na((56, 56), 7, 1, dtype, "cuda", batch=1, heads=2, dim=32)
    check_na((28, 28), 7, 4, dtype, "cuda", batch=2, heads=2, dim=64)
    check_na((15, 15), 5, 1, dtype, "cuda", dim=32, scale=-2.0)
    check_na((15, 15), 5, 1, dtype, "cuda", dim=32, scale=0.0)


@gpu
def test_gpu_automatic_backend_is_triton_without_libnatten():
    _cuda_or_skip()
    q, k, v = _qkv((13, 17), dtype=torch.bfloat16, dim=32, device="cuda")
    op = get_op("neighborhood_attention")
    rpb = torch.zeros(2, 13, 13, device="cuda")
    chosen = op.select(q, k, v, (7, 7), (1, 1), rpb=rpb, backend=None)
    assert chosen.name == "triton"  # natten refuses rpb whatever its build
    state = na._natten_state()
    if state is None or not state[1]:
        assert op.select(q, k, v, (7, 7), (1, 1), backend=None).name == "triton"


@gpu
def test_gpu_na_torch_compile_fullgraph():
    _cuda_or_skip()
    q, k, v = (t.requires_grad_() for t in _qkv((14, 15), dtype=torch.bfloat16, dim=32, device="cuda"))
    rpb = torch.randn(2, 13, 13, device="cuda", requires_grad=True)

    def f(q, k, v, rpb):
        return neighborhood_attention(q, k, v, 7, 2, rpb=rpb, backend="triton")

    eager = f(q, k, v, rpb)
    eager.float().square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v, rpb)]
    for t in (q, k, v, rpb):
        t.grad = None
    compiled = torch.compile(f, fullgraph=True)(q, k, v, rpb)
    compiled.float().square().sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for a, b in zip((q.grad, k.grad, v.grad, rpb.grad), grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # drpb sums with atomics: order may differ


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_na_qkv_packed(dtype):
    """One packed ``qkv`` and its packed gradient (``neighborhood_attention_qkv``'s Triton path) against the float64
    reference at NAT-T's maps (dq by atomics and stored directly), a dilation group and 1-D; then the public function
    compiled with ``fullgraph=True`` against eager."""
    _cuda_or_skip()
    for spatial, kernel, dilation, batch in TILE_CASES[:6] + [((40,), 7, 2, 2)]:
        check_na(spatial, kernel, dilation, dtype, "cuda", batch=batch, heads=3, dim=32, packed=True)
    qkv = torch.randn(2, 14, 15, 3, 2, 32, device="cuda", dtype=dtype, requires_grad=True)
    rpb = torch.randn(2, 13, 13, device="cuda", requires_grad=True)

    def f(qkv, rpb):
        return neighborhood_attention_qkv(qkv, 7, 2, rpb=rpb, backend="triton")

    eager = f(qkv, rpb)
    eager.float().square().sum().backward()
    grads = [qkv.grad.clone(), rpb.grad.clone()]
    qkv.grad = rpb.grad = None
    compiled = torch.compile(f, fullgraph=True)(qkv, rpb)
    compiled.float().square().sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close([qkv.grad, rpb.grad], grads, rtol=1e-5, atol=1e-5)  # atomics: order may differ


# tiles of TUNING["tile_q"] / ["tile_y"] / ["narrow_cols"] that neighborhood_op.py --tile-sweep times, and the opt-in
# backward key tiles / direct dq store its --bwd-block-sweep times (BWD_TILE_CONFIGS; the shipped defaults: every other
# gpu test)
TILE_SETTINGS = {
    "shipped": {},
    "wide": dict(narrow_cols=False),
    "narrow": dict(narrow_cols=True),
    "q16_y2_narrow": dict(tile_q=16, tile_y=2, narrow_cols=True),
    "q32_y4_narrow": dict(tile_q=32, tile_y=4, narrow_cols=True),
    "q16_y4": dict(tile_q=16, tile_y=4, narrow_cols=False),
    "dq_atomic": dict(bwd_dq_direct=False),
    "bwd_q128_w4_direct": dict(bwd_tile_q=128, bwd_warps=4, bwd_maxnreg=0, bwd_dq_direct=True),
    "bwd_q256_w8_direct": dict(bwd_tile_q=256, bwd_warps=8, bwd_maxnreg=0, bwd_dq_direct=True),
    "delta_fused": dict(bwd_delta_fused=True),
    "int32_offsets": dict(bwd_int32_offsets=True, fwd_int32_offsets=True),  # the backward's direct tiles too
    # int64 everywhere (s50's shipped offsets; what runs past 2^31 elements, where the shipped int32 would not fit)
    "int64_offsets": dict(bwd_int32_offsets=False, fwd_int32_offsets=False),
}


TILE_CASES = [
    ((56, 56), 7, 1, 1),
    ((28, 28), 7, 1, 2),
    ((14, 14), 7, 1, 3),
    ((7, 7), 7, 1, 3),
    ((56, 56), 7, 8, 1),
    ((28, 28), 7, 4, 2),
    ((5, 6), 7, 1, 3),
    ((13, 17), 3, (2, 3), 1),
    ((23, 29), 11, 1, 2),
]


@gpu
@pytest.mark.parametrize("setting", sorted(TILE_SETTINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_na_tile_settings(setting, dtype, monkeypatch):
    """The shipped tiles (``MEASURED_TILES``) and swept ones at NAT-T's 56 / 28 / 14 / 7 maps, DiNAT's dilation
    groups, a map smaller than the kernel and odd maps, with the bias table at head dim 32 and without it at 64."""
    _cuda_or_skip()
    from visionlin.kernels.triton import neighborhood as nt

    for key, value in TILE_SETTINGS[setting].items():
        monkeypatch.setitem(nt.TUNING, key, value)
    for spatial, kernel, dilation, batch in TILE_CASES:
        check_na(spatial, kernel, dilation, dtype, "cuda", rpb=True, batch=batch, heads=3, dim=32)
        check_na(spatial, kernel, dilation, dtype, "cuda", rpb=False, batch=batch, heads=2, dim=64)
