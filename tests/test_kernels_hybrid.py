"""hybrid_attention and pooled_agent_attention: each backend vs an independently materialised formula, forward and
backward, on awkward grids; bad input."""

from __future__ import annotations

import math

import pytest
import torch

from visionlin.kernels import (
    hybrid_attention,
    hybrid_attention_reference,
    pooled_agent_attention,
    pooled_agent_attention_reference,
)

GRIDS = [(7,), (5, 7), (2, 3, 5), (1, 4, 4)]


def _inputs(grid, b=2, h=3, d=8, e=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(42)
    n = math.prod(grid)
    t = [torch.randn(b, n, h, d, generator=g, dtype=torch.float64) for _ in range(3)]
    extra = [torch.randn(b, e, h, d, generator=g, dtype=torch.float64) for _ in range(2)] if e else [None, None]
    return [x.to(device, dtype).requires_grad_() if x is not None else None for x in (*t, *extra)]


def _windows(grid, kernel):
    """Brute force: key j is in query i's window iff, per axis, j's coordinate is among the ``kernel`` positions
    nearest to i's, shifted inwards at borders (dilation 1)."""
    n = math.prod(grid)
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in grid], indexing="ij"), -1).reshape(n, -1)
    ok = torch.ones(n, n, dtype=torch.bool)
    for ax, length in enumerate(grid):
        k = min(kernel, length)
        start = (coords[:, ax] - k // 2).clamp(0, length - k)  # [N]
        cj = coords[:, ax]
        ok &= (cj[None, :] >= start[:, None]) & (cj[None, :] < start[:, None] + k)
    return ok


def _hybrid_brute(q, k, v, grid, kernel, gate, ak=None, av=None, eps=1e-6):
    s = q.shape[-1] ** -0.5
    logits = torch.einsum("bnhd,bmhd->bhnm", q, k) * s
    logits = logits.masked_fill(~_windows(grid, kernel).to(q.device), float("-inf"))
    vv = v
    if ak is not None:
        logits = torch.cat([logits, torch.einsum("bnhd,bmhd->bhnm", q, ak) * s], -1)
        vv = torch.cat([v, av], 1)
    local = torch.einsum("bhnm,bmhe->bnhe", logits.softmax(-1), vv)
    phi = lambda x: torch.nn.functional.elu(x) + 1  # noqa: E731
    a = torch.einsum("bnhd,bmhd->bhnm", phi(q), phi(k))
    n = q.shape[1]
    lin = torch.einsum("bhnm,bmhe->bnhe", a / n / (a.sum(-1, keepdim=True) / n + eps), v)
    return local + gate[:, None] * lin


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("extra", [0, 5], ids=["noextra", "extra5"])
@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_hybrid_matches_brute_force_forward_backward(grid, extra, backend):
    q, k, v, ak, av = _inputs(grid, e=extra)
    gate = torch.tensor([0.0, 0.7, -1.3], dtype=torch.float64, requires_grad=True)
    out = hybrid_attention(q, k, v, grid, 3, gate, additional_keys=ak, additional_values=av, backend=backend)
    ref = _hybrid_brute(q, k, v, grid, 3, gate, ak, av)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    do = torch.randn_like(out)
    leaves = [t for t in (q, k, v, gate, ak, av) if t is not None]
    g1 = torch.autograd.grad(out, leaves, do)
    g2 = torch.autograd.grad(ref, leaves, do)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_hybrid_zero_gate_is_neighborhood_and_full_window_plus_gate():
    grid = (4, 5)
    q, k, v, _, _ = _inputs(grid)
    zero = torch.zeros(3, dtype=torch.float64)
    # A window covering the whole grid with a zero gate is dense softmax attention.
    dense = torch.einsum("bhnm,bmhe->bnhe", (torch.einsum("bnhd,bmhd->bhnm", q, k) * 8**-0.5).softmax(-1), v)
    torch.testing.assert_close(hybrid_attention(q, k, v, grid, 9, zero), dense, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_hybrid_empty_batch_and_no_heads(backend):
    """B = 0 and H = 0 give empty outputs of the right shape (the torch backend's reshapes once inferred a -1 from
    zero elements and raised)."""
    q, k = torch.randn(2, 16, 2, 8), torch.randn(2, 16, 2, 8)
    v = torch.randn(2, 16, 2, 6)
    out = hybrid_attention(q[:0], k[:0], v[:0], (4, 4), 3, torch.randn(2), backend=backend)
    assert out.shape == (0, 16, 2, 6)
    out = hybrid_attention(q[:, :, :0], k[:, :, :0], v[:, :, :0], (4, 4), 3, torch.randn(0), backend=backend)
    assert out.shape == (2, 16, 0, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hybrid_torch_low_precision_near_reference(dtype):
    grid = (2, 6, 7)
    q, k, v, ak, av = _inputs(grid, e=3, dtype=dtype)
    gate = torch.full((3,), 0.5, dtype=torch.float32)
    ref = hybrid_attention_reference(*(t.double() for t in (q, k, v)), grid, 5, gate.double(),
                                     additional_keys=ak.double(), additional_values=av.double())  # fmt: skip
    out = hybrid_attention(q, k, v, grid, 5, gate, additional_keys=ak, additional_values=av, backend="torch")
    low = hybrid_attention_reference(q, k, v, grid, 5, gate, additional_keys=ak, additional_values=av)
    assert out.dtype == low.dtype == dtype
    # flash-attention's rule: at most twice the error of the plain computation (the reference in the same dtype:
    # float32 math, one rounding to the output dtype), plus a float32 floor.
    assert (out.double() - ref).abs().max() <= 2 * (low.double() - ref).abs().max() + 1e-6


def _agent_brute(q, k, v, grid, pool, s, sb, shortcut, ak=None, av=None):
    n = q.shape[1]
    coords = torch.stack(torch.meshgrid(*[torch.arange(x) for x in grid], indexing="ij"), -1).reshape(n, -1)
    cell = [tuple((c // p).tolist()) for c, p in zip(coords, [torch.tensor(pool)] * n, strict=True)]
    keys = sorted(set(cell))
    agents = torch.stack([q[:, [i for i in range(n) if cell[i] == c]].mean(1) for c in keys], 1)  # [B, n, H, D]
    kk, vv = (torch.cat([k, ak], 1), torch.cat([v, av], 1)) if ak is not None else (k, v)
    agg = (torch.einsum("bahd,bmhd->bham", agents, kk) * s).softmax(-1)
    bc = (torch.einsum("bnhd,bahd->bhna", q, agents) * sb).softmax(-1)
    va = torch.einsum("bham,bmhe->bahe", agg, vv)
    return torch.einsum("bhna,bahe->bnhe", bc, va) + shortcut * v


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("extra", [0, 4], ids=["noextra", "extra4"])
@pytest.mark.parametrize("grid,pool", [((7,), (2,)), ((5, 7), (2, 2)), ((3, 4, 5), (1, 2, 2)), ((3, 3), (3, 2))])
@pytest.mark.parametrize("sb_power", [0.3, 1.0, 2.5], ids=["sb>s", "sb=s", "sb<s"])  # the torch backend's 3 branches
def test_pooled_agent_matches_brute_force_forward_backward(grid, pool, extra, backend, sb_power):
    q, k, v, ak, av = _inputs(grid, e=extra)
    s, sb = 8**-0.5, (8**-0.5) ** sb_power
    out = pooled_agent_attention(
        q, k, v, grid, pool, broadcast_scale=sb, shortcut=0.075, additional_keys=ak, additional_values=av,
        backend=backend,
    )  # fmt: skip
    ref = _agent_brute(q, k, v, grid, pool, s, sb, 0.075, ak, av)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    do = torch.randn_like(out)
    leaves = [t for t in (q, k, v, ak, av) if t is not None]
    for a, b in zip(torch.autograd.grad(out, leaves, do), torch.autograd.grad(ref, leaves, do), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_pooled_agent_one_cell_is_mean_query_attention():
    # A cell covering the whole grid: one agent, the mean query; every query gets that agent's softmax attention.
    grid = (3, 4)
    q, k, v, _, _ = _inputs(grid)
    out = pooled_agent_attention(q, k, v, grid, (3, 4), shortcut=0.5)
    a = q.mean(1, keepdim=True)
    dense = torch.einsum("bhnm,bmhe->bnhe", (torch.einsum("bnhd,bmhd->bhnm", a, k) * 8**-0.5).softmax(-1), v)
    torch.testing.assert_close(out, dense.expand_as(out) + 0.5 * v, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"grid": (4, 4)}, r"grid=\(4, 4\) holds 16 tokens but the inputs have N=20"),
        ({"grid": (4, 0)}, r"grid=\(4, 0\) must be 1 to 3 positive ints"),
        ({"grid": (1, 2, 2, 5)}, r"must be 1 to 3 positive ints"),
        ({"kernel_size": 4}, r"kernel_size=4 must be odd"),
        ({"gate": torch.zeros(2)}, r"gate must be a floating \[H\] = \[3\]"),
        ({"feature_map": "tanh"}, r"unknown feature_map='tanh'"),
        ({"eps": 0.0}, r"eps=0.0 must be"),
        ({"scale": float("nan")}, r"scale=nan must be"),
    ],
)
def test_hybrid_bad_input(kwargs, match):
    q, k, v, _, _ = _inputs((4, 5))
    args = {"grid": (4, 5), "kernel_size": 3, "gate": torch.zeros(3, dtype=torch.float64), **kwargs}
    with pytest.raises(ValueError, match=match):
        hybrid_attention(q, k, v, args.pop("grid"), args.pop("kernel_size"), args.pop("gate"), **args)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"pool": 0}, r"pool=0 must be an int >= 1"),
        ({"pool": (2, 2, 2)}, r"pool=\(2, 2, 2\) must be an int >= 1 or 2 such"),
        ({"shortcut": float("inf")}, r"shortcut=inf must be"),
        ({"grid": (5, 5)}, r"holds 25 tokens but the inputs have N=20"),
        ({"scale": 0.0}, r"scale=0.0 must be a finite real number > 0.0"),  # (ZeroDivisionError in the torch backend)
        ({"broadcast_scale": -1.0}, r"broadcast_scale=-1.0 must be a finite real number > 0.0"),
    ],
)
def test_pooled_agent_bad_input(kwargs, match):
    q, k, v, _, _ = _inputs((4, 5))
    args = {"grid": (4, 5), "pool": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        pooled_agent_attention(q, k, v, args.pop("grid"), args.pop("pool"), **args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("s,sb", [(64**-0.5, (64**-0.5) ** -4), (64**-0.5, 1e-6), (1e-3, 1.0)])
def test_pooled_agent_scale_ratios_do_not_overflow_half_precision(dtype, s, sb):
    """The torch backend folds the second scale into the queries or keys by a factor of magnitude <= 1: scaling the
    queries by s_b / s = 32,768 (the converter's k_scale2=-4 at head_dim 64) overflowed float16 at |q| > 2."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 64, 2, 64, generator=g) * 4 for _ in range(3))
    out = pooled_agent_attention(*(t.to(dtype) for t in (q, k, v)), (8, 8), 2, scale=s, broadcast_scale=sb)
    ref = pooled_agent_attention_reference(q.double(), k.double(), v.double(), (8, 8), 2, scale=s, broadcast_scale=sb)
    assert torch.isfinite(out).all()
    # against the reference on the same half-precision inputs: the inputs' and agents' rounding, amplified by the
    # logits (up to |q . A| s_b ~ 1e3 here), is what remains
    low = pooled_agent_attention_reference(*(t.to(dtype) for t in (q, k, v)), (8, 8), 2, scale=s, broadcast_scale=sb)
    assert (out.double() - low.double()).abs().max() <= 0.05 * ref.abs().max()


def test_additional_keys_need_both():
    q, k, v, ak, _ = _inputs((4, 5), e=2)
    with pytest.raises(ValueError, match="both additional_keys and additional_values"):
        hybrid_attention(q, k, v, (4, 5), 3, torch.zeros(3, dtype=torch.float64), additional_keys=ak)
    with pytest.raises(ValueError, match="both additional_keys and additional_values"):
        pooled_agent_attention(q, k, v, (4, 5), additional_keys=ak)


# GPU: the lead runs these on the H200 (`pytest -m gpu tests/test_kernels_hybrid.py`).
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid,d", [((7, 7), 32), ((14, 14), 64), ((2, 9, 13), 80), ((3, 16, 16), 128)])
def test_gpu_hybrid_and_agent_vs_reference(grid, d, dtype):
    q, k, v, ak, av = _inputs(grid, b=3, h=2, d=d, e=7, dtype=dtype, device="cuda")
    gate = torch.tensor([0.3, -0.2], device="cuda", requires_grad=True)
    s = d**-0.5
    cases = [
        (hybrid_attention, hybrid_attention_reference, (grid, 5, gate), {},
         lambda *t: _hybrid_brute(*t[:3], grid, 5, gate.to(dtype), *t[3:])),
        (pooled_agent_attention, pooled_agent_attention_reference, (grid, 2), {"shortcut": 0.075},
         lambda *t: _agent_brute(*t[:3], grid, (2,) * len(grid), s, s, 0.075, *t[3:])),
    ]  # fmt: skip
    for fast, ref_fn, args, kw, plain in cases:
        kw = {**kw, "additional_keys": ak, "additional_values": av}
        out = fast(q, k, v, *args, backend="torch", **kw)
        leaves = [q, k, v, ak, av]
        f64 = [t.detach().double().requires_grad_() for t in leaves]
        args64 = tuple(a.detach().double().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
        ref = ref_fn(*f64[:3], *args64, **{**kw, "additional_keys": f64[3], "additional_values": f64[4]})
        low = plain(*leaves)  # the same math written plainly in the input dtype (flash-attention's baseline)
        # seeded: the bound below is on maximum errors, so the draw must not depend on what ran before in the process
        do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(11), dtype=ref.dtype).to(ref.device)
        g_fast = torch.autograd.grad(out, leaves, do.to(out.dtype))
        g_ref = torch.autograd.grad(ref, f64, do)
        g_low = torch.autograd.grad(low, leaves, do.to(low.dtype))
        # flash-attention's rule, against the float64 result: at most twice the error of the plain computation in
        # the input dtype (+ a floor for float32, where both are at rounding level).
        floor = 1e-5 if dtype == torch.float32 else 0.0
        name = fast.__name__
        err, err_low = (out.double() - ref).abs().max().item(), (low.double() - ref).abs().max().item()
        assert err <= 2 * err_low + floor, f"{name} output: error {err:.3g}, plain {err_low:.3g}"
        for leaf, a, b, c in zip(["q", "k", "v", "ak", "av"], g_fast, g_ref, g_low, strict=True):
            err, err_low = (a.double() - b).abs().max().item(), (c.double() - b).abs().max().item()
            assert err <= 2 * err_low + floor, f"{name} d{leaf}: error {err:.3g}, plain {err_low:.3g}"


@pytest.mark.parametrize("op", ["hybrid", "agent"])
def test_torch_compile_fullgraph(op):
    grid = (3, 4, 5)
    q, k, v, ak, av = (t.detach().float() for t in _inputs(grid, e=2))
    gate = torch.full((3,), 0.5)
    if op == "hybrid":

        def fn(q, k, v, ak, av):
            return hybrid_attention(q, k, v, grid, 3, gate, additional_keys=ak, additional_values=av, backend="torch")
    else:

        def fn(q, k, v, ak, av):
            return pooled_agent_attention(q, k, v, grid, (1, 2, 2), shortcut=0.1, additional_keys=ak,
                                          additional_values=av, backend="torch")  # fmt: skip

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, ak, av), fn(q, k, v, ak, av), rtol=1e-6, atol=1e-6)
