"""Gated mix of two RMS-normalised inputs (``visionlin.kernels.rms_mix``, ViG's gating locality injection): the
reference against a float64 computation written from the definition and against ViG's old module chain (timm's
``RmsNorm`` twice, the sigmoid mix, ``SiLU``), its gradients by ``gradcheck``, the Triton backend forward and backward
against the float64 reference, autocast's output dtype, and bad input.

Tolerance (flash-attention's rule): the relative error of the Triton path against the float64 reference on the same
rounded inputs is at most twice the unfused chain's in the same dtype (``F.rms_norm``, ``sigmoid`` and the mix, each
rounded, with autograd), or a floor of a few units of the dtype's rounding (float32: 2e-6). The ``gpu`` tests run on
the GPU machine; the interpreter test runs the Triton kernels on the CPU in a subprocess.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from interpreter_utils import run_in_interpreter
from timm.layers import RmsNorm

from visionlin.kernels import get_op, rms_gate_mix, rms_gate_mix_reference

FLOOR = {torch.float32: 2e-6, torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}
# (leading shape, C, x weight, y weight, silu, inputs strided (per-head views of wider rows))
CASES = [
    ((2, 9, 3), 64, True, True, False, True),  # ViG's layout: [B, L, H, D] views of [B, L, H * D]
    ((3, 100), 64, True, True, True, False),  # 300 rows: several row blocks per backward program, partial last
    ((37,), 200, True, False, True, True),
    ((2, 3, 5), 48, False, True, False, False),
    ((5, 7), 96, False, False, True, True),
    ((4,), 1, True, True, False, False),  # one channel: each row normalises to +-1
]


def _by_definition(x, y, g, wx, wy, ex, ey, silu):
    """Float64, written out: the mean square, the logistic sigmoid, SiLU from their formulas."""

    def rms(t, w, eps):
        t = t.double()
        t = t / ((t**2).sum(-1, keepdim=True) / t.shape[-1] + eps) ** 0.5
        return t if w is None else t * w.double()

    s = 1.0 / (1.0 + torch.exp(-g.double()))
    out = rms(x, wx, ex) * s + rms(y, wy, ey) * (1.0 - s)
    return out / (1.0 + torch.exp(-out)) if silu else out


def _chain(x, y, g, wx, wy, ex, ey, silu):
    """The unfused chain in the inputs' dtype (the tolerance's baseline)."""
    c = x.shape[-1]
    xn = F.rms_norm(x, (c,), None if wx is None else wx.to(x.dtype), ex)
    yn = F.rms_norm(y, (c,), None if wy is None else wy.to(x.dtype), ey)
    out = yn + (xn - yn) * torch.sigmoid(g)
    return F.silu(out) if silu else out


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double().cpu()
    err = (a.double().cpu() - ref).norm()
    return (err / ref.norm()).item() if ref.norm() > 0 else err.item()


def _inputs(lead, c, wx, wy, silu, strided, seed=0):
    """Float64 ``x``, ``y``, ``gate`` (as ``[..., 2C]`` sources when strided: the kernel reads the views in place),
    and the weights."""
    gen = torch.Generator().manual_seed(seed)
    width = 2 * c if strided else c
    x = 1.5 * torch.randn(*lead, width, generator=gen, dtype=torch.float64) + 0.3
    y = 0.7 * torch.randn(*lead, width, generator=gen, dtype=torch.float64) - 0.2
    g = 2.0 * torch.randn(*lead, width, generator=gen, dtype=torch.float64)
    w1 = 1.0 + 0.5 * torch.randn(c, generator=gen, dtype=torch.float64) if wx else None
    w2 = 1.0 + 0.5 * torch.randn(c, generator=gen, dtype=torch.float64) if wy else None
    return x, y, g, w1, w2


def _view(t: torch.Tensor, c: int) -> torch.Tensor:
    return t[..., c:] if t.shape[-1] == 2 * c else t


def _run(fn, srcs, weights, c, grad, eps, silu):
    """Forward and backward of ``fn``; returns ``(out, dx, dy, dgate, dx_weight, dy_weight)``."""
    leaves = [t.detach().clone().requires_grad_() for t in srcs]
    views = [_view(t, c) for t in leaves]
    if srcs[0].shape[-1] == 2 * c:
        assert not views[0].is_contiguous()
    ws = [None if w is None else w.detach().clone().requires_grad_() for w in weights]
    out = fn(*views, *ws, *eps, silu)
    out.backward(grad.to(out.device, out.dtype))
    return out, *(_view(t.grad, c) for t in leaves), *(None if w is None else w.grad for w in ws)


def check_triton(case, dtype, device, eps=(4e-6, 1e-6), direct=False):
    """Forward and every gradient of the Triton backend against float64 on the same rounded inputs, within twice the
    unfused chain's error in ``dtype`` (or the floor); ``direct``: the Triton backend function itself."""
    lead, c, *_, silu, _ = case
    x, y, g, wx, wy = _inputs(*case)
    srcs = [t.to(dtype).double() for t in (x, y, g)]  # the values the low-precision paths see
    grad = torch.randn(*lead, c, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref = _run(_by_definition, [t.to(device) for t in srcs], [w if w is None else w.to(device) for w in (wx, wy)],
               c, grad, eps, silu)  # fmt: skip
    low = [t.to(device, dtype) for t in srcs]
    w32 = [w if w is None else w.to(device, torch.float32) for w in (wx, wy)]
    if direct:
        from visionlin.kernels.triton.rms_mix import rms_gate_mix_triton as fast
    else:

        def fast(x, y, g, wx, wy, ex, ey, silu):
            return rms_gate_mix(x, y, g, wx, wy, ex, ey, silu=silu, backend="triton")

    ours = _run(fast, low, w32, c, grad, eps, silu)
    base = _run(_chain, low, w32, c, grad, eps, silu)
    assert ours[0].dtype == dtype and ours[0].shape == ref[0].shape
    names = ("out", "dx", "dy", "dgate", "dx_weight", "dy_weight")
    errs, bounds = {}, {}
    for name, o, r, t in zip(names, ours, ref, base, strict=True):
        if r is None:
            assert o is None, name
            continue
        errs[name] = _rel(o, r)
        bounds[name] = max(2 * _rel(t, r), FLOOR[dtype])
    bad = {n: f"{errs[n]:.2e} > {bounds[n]:.2e}" for n in errs if not errs[n] <= bounds[n]}
    assert not bad, (case, dtype, bad)


# The reference is the specification ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("eps", [(4e-6, 1e-6), (0.5, 1e-2)])
def test_reference_is_the_definition(case, eps):
    lead, c, *_, silu, _ = case
    x, y, g, wx, wy = _inputs(*case)
    views = [_view(t, c) for t in (x, y, g)]
    for dtype in (torch.float32, torch.float64):
        out = rms_gate_mix_reference(*(t.to(dtype) for t in views), wx, wy, *eps, silu)
        assert out.dtype == dtype
        want = _by_definition(*views, wx, wy, *eps, silu)
        assert _rel(out, want) < (1e-6 if dtype == torch.float32 else 1e-13), (case, dtype)


def test_reference_is_vigs_module_chain():
    """timm's ``RmsNorm`` on the attention output and on the locality branch, the sigmoid mix, ``SiLU``: what ViG's
    mixer computed before the op."""
    torch.manual_seed(0)
    c = 32
    g_norm, l_norm = RmsNorm(c, eps=4e-6), RmsNorm(c, eps=1e-6)
    with torch.no_grad():
        g_norm.weight.uniform_(0.5, 1.5)
        l_norm.weight.uniform_(0.5, 1.5)
    o, local, gl = (torch.randn(2, 10, 3, c) for _ in range(3))
    for silu in (False, True):
        want = l_norm(local) + (g_norm(o) - l_norm(local)) * torch.sigmoid(gl)
        want = F.silu(want) if silu else want
        got = rms_gate_mix(o, local, gl, g_norm.weight, l_norm.weight, g_norm.eps, l_norm.eps, silu=silu)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


def test_reference_gradients():
    x, y, g, wx, wy = (t.requires_grad_() for t in _inputs((3, 2), 5, True, True, True, False))
    for silu in (False, True):
        assert torch.autograd.gradcheck(
            lambda *a, silu=silu: rms_gate_mix_reference(*a, 1e-3, 1e-2, silu), (x, y, g, wx, wy)
        )


def test_autocast_returns_autocast_dtype():
    x, y, g = (torch.randn(2, 5, 16) for _ in range(3))
    w = torch.ones(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rms_gate_mix(x, y, g, w, w)
    assert out.dtype == torch.bfloat16
    assert rms_gate_mix(x.half(), y, g.double()).dtype == torch.float64  # promoted outside autocast


def test_backend_order():
    # Triton first (GPU-tested), the reference where Triton cannot run (CPU, more than 4096 channels)
    assert list(get_op("rms_gate_mix").backends) == ["triton", "reference"]


def test_empty_and_backend_reasons():
    x = torch.randn(0, 5, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    out = rms_gate_mix(x, torch.randn(0, 5, 16), torch.randn(0, 5, 16), w, None)
    assert out.shape == (0, 5, 16)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros(16))
    big = torch.randn(2, 5000)
    reasons = get_op("rms_gate_mix").supports(big, big, big, backend="triton")
    assert any("CUDA" in r for r in reasons) and any("5000" in r for r in reasons)
    with pytest.raises(NotImplementedError, match="CUDA"):
        rms_gate_mix(big, big, big, backend="triton")
    with pytest.raises(ValueError, match=r"unknown backend 'torch'.*reference.*triton"):
        rms_gate_mix(big, big, big, backend="torch")


_T = torch.randn(2, 8)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((_T, torch.randn(2, 7), _T), {}, r"one shape.*\(2, 8\).*\(2, 7\).*\(2, 8\)"),
        ((_T, _T, torch.randn(8)), {}, r"one shape"),
        ((_T, _T, _T, torch.randn(7)), {}, r"x_weight of shape \(7,\) must be \[C\] = \(8,\)"),
        ((_T, _T, _T, None, torch.randn(1, 8)), {}, r"y_weight of shape \(1, 8\)"),
        ((_T, _T, _T, None, None, 0.0), {}, r"x_eps=0.0 must be a finite real number > 0"),
        ((_T, _T, _T, None, None, 1e-6, float("nan")), {}, r"y_eps=nan"),
        ((_T, _T, _T, None, None, -1e-5), {}, r"x_eps=-1e-05"),
        ((_T, _T, _T), {"silu": 1}, r"silu=1 must be True or False, got int"),
        ((torch.arange(8).reshape(2, 4), torch.randn(2, 4), torch.randn(2, 4)), {}, r"x must be floating.*int64"),
        ((torch.randn(2, 4), torch.randn(2, 4), torch.ones(2, 4, dtype=torch.bool)), {}, r"gate must be floating"),
        ((_T, _T, _T, torch.ones(8, dtype=torch.int32)), {}, r"x_weight must be a floating"),
        (([1.0, 2.0], _T, _T), {}, r"x must be a torch.Tensor.*list"),
        ((torch.randn(()), torch.randn(()), torch.randn(())), {}, r"0-d"),
        ((torch.randn(3, 0),) * 3, {}, r"C = 0"),
        ((_T, torch.randn(2, 8, device="meta"), _T), {}, r"one device.*cpu.*meta"),
        ((_T, _T, _T, None, torch.randn(8, device="meta")), {}, r"y_weight is on meta but x is on cpu"),
    ],
)
def test_bad_input(args, kwargs, match):
    for fn in (rms_gate_mix, rms_gate_mix_reference):
        with pytest.raises(ValueError, match=match):
            fn(*args, **kwargs)


# Triton under the interpreter (CPU) ----------------------------------------------------------------------------------
_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from interpreter_utils import assert_fakes_match, assert_same_forward_backward
    from tests.test_kernels_rms_mix import CASES, check_triton
    from visionlin.kernels.triton.rms_mix import rms_gate_mix_bwd, rms_gate_mix_fwd, rms_gate_mix_triton
    for case in CASES:
        check_triton(case, torch.float32, "cpu", direct=True)
    check_triton(CASES[1], torch.float32, "cpu", eps=(0.5, 1e-2), direct=True)
    for dtype in (torch.float16, torch.bfloat16):
        check_triton(CASES[0], dtype, "cpu", direct=True)
        check_triton(CASES[2], dtype, "cpu", direct=True)
    # empty input (0 rows): shapes and zero weight gradients, no launch
    x = torch.randn(0, 3, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    out = rms_gate_mix_triton(x, torch.randn(0, 3, 64), torch.randn(0, 3, 64), w, None)
    assert out.shape == (0, 3, 64)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros(64)) and x.grad.shape == x.shape
    # the ops' real outputs have the shapes, dtypes and strides their fakes promise (torch.compile checks them)
    src = torch.randn(2, 5, 3, 128)
    for ws, silu in (((torch.randn(64), None), False), ((None, torch.randn(64).double()), True)):
        fwd_args = (src[..., :64], src[..., 64:], src[..., 64:].contiguous(), *ws, 1e-5, 1e-6, silu)
        g = torch.randn(2, 5, 3, 64)
        assert_fakes_match(lambda: (rms_gate_mix_fwd(*fwd_args),) + rms_gate_mix_bwd(g, *fwd_args))
    # the custom op's registrations through torch.library.opcheck, and the custom-op path (used under tracing)
    # equals the eager bypass
    src = torch.randn(3, 7, 2, 96).requires_grad_()
    x, y = src[..., :48], src[..., 48:]
    g = torch.randn(3, 7, 2, 48, requires_grad=True)
    wx, wy = torch.randn(48, requires_grad=True), torch.randn(48, requires_grad=True)
    torch.library.opcheck(rms_gate_mix_fwd, (x, y, g, wx, wy, 1e-5, 1e-6, True))
    via_op = rms_gate_mix_fwd(x, y, g, wx, wy, 1e-5, 1e-6, True)
    eager = rms_gate_mix_triton(x, y, g, wx, wy, 1e-5, 1e-6, True)
    assert_same_forward_backward(via_op, eager, (src, g, wx, wy))
    print("interpreter ok")
    """
)


def test_interpreter_matches_reference():
    """The Triton kernels' math on the CPU (Triton's interpreter): float32, float16, bfloat16, forward and backward."""
    pytest.importorskip("triton")
    run_in_interpreter(_INTERPRETER_SCRIPT, timeout=600)


# GPU (the H200) -------------------------------------------------------------------------------------------------------
def gpu(fn):
    """The ``gpu`` marker (deselected by default) and a skip on machines without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(fn))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "case",
    CASES + [((128, 196, 6), 64, True, True, False, True),  # ViG-S at 224 px, batch 128: 150,528 rows
             ((4, 3136, 3), 64, True, True, True, False), ((3,), 4096, True, False, True, False)],
)  # fmt: skip
def test_triton_matches_reference(case, dtype):
    check_triton(case, dtype, "cuda")


@gpu
def test_triton_compiles_fullgraph():
    """``torch.compile(fullgraph=True)`` and the eager bypass give the same tensors, forward and backward; autocast's
    dtype out."""
    torch.manual_seed(0)
    src = torch.randn(4, 49, 3, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(4, 49, 3, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    wx, wy = (torch.rand(64, device="cuda", requires_grad=True) + 0.5 for _ in range(2))

    def fn(src, g):
        return rms_gate_mix(src[..., :64], src[..., 64:], g, wx, wy, 4e-6, 1e-6, silu=True, backend="triton")

    eager = fn(src, g)
    compiled = torch.compile(fn, fullgraph=True)(src, g)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    do = torch.randn_like(eager)
    for a, b in zip(torch.autograd.grad(eager, (src, g, wx, wy), do),
                    torch.autograd.grad(compiled, (src, g, wx, wy), do), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert fn(src.float(), g.float()).dtype == torch.bfloat16
