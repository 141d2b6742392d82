"""Gated LayerNorm (``visionlin.kernels.gated_norm``): the reference against a float64 computation written from the
definition (and its gradients by ``gradcheck``), every backend forward and backward against the float64 reference,
the NaLa layers' old ``ln(x) * SiLU(g)`` chain, autocast's output dtype, and bad input.

Tolerance (flash-attention's rule): the relative error of a fast path against the float64 reference on the same
rounded inputs is at most twice the ``"torch"`` backend's in the same dtype (``F.layer_norm`` and ``F.silu`` with
their own roundings and autograd), or a floor of a few units of the dtype's rounding (float32: 2e-6; the statistics
are float32 sums over ``C`` channels, the weight / bias gradients sums over every row). The ``gpu`` tests run on the
GPU machine; the interpreter test runs the Triton kernels on the CPU in a subprocess.
"""

from __future__ import annotations

import functools
import textwrap

import pytest
import torch
import torch.nn.functional as F
from interpreter_utils import run_in_interpreter
from torch import nn

from visionlin.kernels import gated_layer_norm, gated_layer_norm_reference, get_op

FLOOR = {torch.float32: 2e-6, torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}
# (leading shape, C, weight, bias, gate a strided chunk of a [..., 4C] projection)
CASES = [
    ((2, 9), 96, True, True, True),
    ((3, 100), 96, True, True, True),  # 300 rows: several row blocks per backward program, a partial last block
    ((37,), 200, True, False, False),
    ((2, 3, 5), 200, False, True, True),
    ((5, 7), 64, False, False, True),
    ((4,), 1, True, True, False),  # one channel: every row normalises to 0, only the bias passes
]


def norm_by_definition(x: torch.Tensor, w, b, eps: float) -> torch.Tensor:
    """The LayerNorm in float64, written out: the biased variance from its formula (also layer_norm's tests')."""
    x = x.double()
    c = x.shape[-1]
    mean = x.sum(-1, keepdim=True) / c
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / c
    y = (x - mean) / (var + eps) ** 0.5
    if w is not None:
        y = y * w.double()
    if b is not None:
        y = y + b.double()
    return y


def _by_definition(x: torch.Tensor, g: torch.Tensor, w, b, eps: float) -> torch.Tensor:
    """Float64, written out: the LayerNorm and the logistic sigmoid from their formulas."""
    g = g.double()
    return norm_by_definition(x, w, b, eps) * g / (1.0 + torch.exp(-g))


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double().cpu()
    err = (a.double().cpu() - ref).norm()
    return (err / ref.norm()).item() if ref.norm() > 0 else err.item()


def _inputs(lead, c, weight, bias, strided, seed=0):
    """Float64 ``x``, the ``[..., 4C]`` projection the gate is chunk 1 of (or ``[..., C]``), weight, bias."""
    gen = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(*lead, c, generator=gen, dtype=torch.float64) + 0.3
    proj = 2.0 * torch.randn(*lead, 4 * c if strided else c, generator=gen, dtype=torch.float64)
    w = 1.0 + 0.5 * torch.randn(c, generator=gen, dtype=torch.float64) if weight else None
    b = 0.5 * torch.randn(c, generator=gen, dtype=torch.float64) if bias else None
    return x, proj, w, b


def _gate(proj: torch.Tensor, c: int) -> torch.Tensor:
    return proj.chunk(4, dim=-1)[1] if proj.shape[-1] == 4 * c else proj


def _run(fn, x, proj, w, b, c, grad, eps):
    """Forward and backward of ``fn``; returns ``(out, dx, dgate, dweight, dbias)``."""
    leaves = [t if t is None else t.detach().clone().requires_grad_() for t in (x, proj, w, b)]
    g = _gate(leaves[1], c)
    if proj.shape[-1] == 4 * c:
        assert g.stride(-2) == 4 * c and not g.is_contiguous()  # the kernel must read the view in place
    out = fn(leaves[0], g, leaves[2], leaves[3], eps)
    out.backward(grad.to(out.device, out.dtype))
    dgate = None if leaves[1].grad is None else _gate(leaves[1].grad, c)
    return out, leaves[0].grad, dgate, *(None if t is None else t.grad for t in leaves[2:])


def check_backend(case, dtype, device, backend, eps=1e-5, direct=False):
    """Forward and every gradient of ``backend`` against float64 on the same rounded inputs, within twice the
    ``"torch"`` backend's error in ``dtype`` (or the floor); ``direct``: the Triton backend function itself."""
    lead, c, *_ = case
    x, proj, w, b = _inputs(*case)
    x, proj = x.to(dtype).double(), proj.to(dtype).double()  # the values the low-precision paths see
    grad = torch.randn(*lead, c, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    # the float64 reference and the "torch" baseline on the device too (the GPU tests' rows reach 401,408)
    ref = _run(
        gated_layer_norm_reference, *(None if t is None else t.to(device) for t in (x, proj, w, b)), c, grad, eps
    )

    def args(dev, dt):
        return x.to(dev, dt), proj.to(dev, dt), *(None if t is None else t.to(dev, torch.float32) for t in (w, b))

    if direct:
        from visionlin.kernels.triton.gated_norm import gated_layer_norm_triton as fast
    else:

        def fast(*a):
            return gated_layer_norm(*a, backend=backend)

    ours = _run(fast, *args(device, dtype), c, grad, eps)
    base = _run(lambda *a: gated_layer_norm(*a, backend="torch"), *args(device, dtype), c, grad, eps)
    assert ours[0].dtype == dtype and ours[0].shape == ref[0].shape
    names = ("out", "dx", "dgate", "dweight", "dbias")
    errs, bounds = {}, {}
    for name, o, r, t in zip(names, ours, ref, base, strict=True):
        if r is None:
            assert o is None, name
            continue
        errs[name] = _rel(o, r)
        bounds[name] = max(2 * _rel(t, r), FLOOR[dtype])
    bad = {n: f"{errs[n]:.2e} > {bounds[n]:.2e}" for n in errs if not errs[n] <= bounds[n]}
    assert not bad, (case, dtype, backend, bad)


# The reference is the specification ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_reference_is_the_definition(case, eps):
    x, proj, w, b = _inputs(*case)
    g = _gate(proj, case[1])
    torch.testing.assert_close(gated_layer_norm_reference(x, g, w, b, eps), _by_definition(x, g, w, b, eps))
    # float32 inputs: float32 math, float32 out
    out32 = gated_layer_norm_reference(x.float(), g.float(), *(None if t is None else t.float() for t in (w, b)), eps)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), _by_definition(x, g, w, b, eps), rtol=1e-5, atol=1e-5)


def test_reference_gradients():
    x, proj, w, b = (t.requires_grad_() for t in _inputs((3, 4), 6, True, True, True))
    assert torch.autograd.gradcheck(lambda *a: gated_layer_norm_reference(a[0], _gate(a[1], 6), a[2], a[3]),
                                    (x, proj, w, b))  # fmt: skip


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_cpu_backends(case, backend):
    check_backend(case, torch.float32, "cpu", backend)


def test_torch_backend_is_the_layernorm_silu_chain():
    """In float32 the default backend is exactly the NaLa layers' old ``ln(x) * F.silu(g)``."""
    torch.manual_seed(0)
    ln = nn.LayerNorm(40, eps=1e-5)
    nn.init.normal_(ln.weight)
    nn.init.normal_(ln.bias)
    x, g = torch.randn(2, 11, 40), torch.randn(2, 11, 160).chunk(4, -1)[2]
    assert get_op("gated_layer_norm").select(x, g, ln.weight, ln.bias, ln.eps).name == "torch"
    torch.testing.assert_close(gated_layer_norm(x, g, ln.weight, ln.bias, ln.eps), ln(x) * F.silu(g), rtol=0, atol=0)


def test_autocast_returns_autocast_dtype():
    """Under autocast the op gives what the next Linear consumes (autocast's dtype), close to the float32 chain."""
    torch.manual_seed(0)
    ln = nn.LayerNorm(32)
    x, g = torch.randn(3, 5, 32), torch.randn(3, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chain = ln(x) * F.silu(g)
        outs = {bk: gated_layer_norm(x, g, ln.weight, ln.bias, ln.eps, backend=bk) for bk in ("torch", "reference")}
    assert chain.dtype == torch.float32
    ref = gated_layer_norm_reference(x.bfloat16(), g.bfloat16(), ln.weight, ln.bias).double()
    for bk, out in outs.items():
        assert out.dtype == torch.bfloat16, bk
        assert _rel(out, ref) <= 8 * 2.0**-8, bk
    outs["reference"].float().sum().backward()  # differentiable through the casts


def test_mixed_dtypes_promote_outside_autocast():
    x, g = torch.randn(4, 8), torch.randn(4, 8)
    out = gated_layer_norm(x.bfloat16(), g)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, gated_layer_norm_reference(x.bfloat16().float(), g))
    assert gated_layer_norm_reference(x.bfloat16(), g.half()).dtype == torch.float32
    assert any("one dtype" in r for r in get_op("gated_layer_norm").supports(x, g.half(), backend="triton"))


def test_empty_and_backend_reasons():
    x = torch.randn(0, 5, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    out = gated_layer_norm(x, torch.randn(0, 5, 16), w, None)
    assert out.shape == (0, 5, 16)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros(16))
    reasons = get_op("gated_layer_norm").supports(torch.randn(2, 9000), torch.randn(2, 9000), backend="triton")
    assert any("CUDA" in r for r in reasons) and any("9000" in r for r in reasons)
    with pytest.raises(NotImplementedError, match="CUDA"):
        gated_layer_norm(torch.randn(2, 8), torch.randn(2, 8), backend="triton")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.randn(2, 8), torch.randn(2, 7)), r"one shape.*\(2, 8\).*\(2, 7\)"),
        ((torch.randn(2, 8), torch.randn(8)), r"one shape"),
        ((torch.randn(2, 8), torch.randn(2, 8), torch.randn(7)), r"weight of shape \(7,\) must be \[C\] = \(8,\)"),
        ((torch.randn(2, 8), torch.randn(2, 8), None, torch.randn(1, 8)), r"bias of shape \(1, 8\)"),
        ((torch.randn(2, 8), torch.randn(2, 8), None, None, 0.0), r"eps=0.0 must be a finite real number > 0"),
        ((torch.randn(2, 8), torch.randn(2, 8), None, None, float("nan")), r"eps=nan"),
        ((torch.randn(2, 8), torch.randn(2, 8), None, None, -1e-5), r"eps=-1e-05"),
        ((torch.randn(2, 8), torch.randn(2, 8), None, None, "1e-5"), r"eps='1e-5'"),
        ((torch.arange(8).reshape(2, 4), torch.randn(2, 4)), r"x must be floating point, got x.dtype=torch.int64"),
        ((torch.randn(2, 4), torch.ones(2, 4, dtype=torch.bool)), r"gate must be floating point.*torch.bool"),
        ((torch.randn(2, 4), torch.randn(2, 4), torch.ones(4, dtype=torch.int32)), r"weight must be a floating"),
        (([1.0, 2.0], torch.randn(2)), r"x must be a torch.Tensor.*list"),
        ((torch.randn(()), torch.randn(())), r"0-d"),
        ((torch.randn(3, 0), torch.randn(3, 0)), r"C = 0"),
        ((torch.randn(2, 4), torch.randn(2, 4, device="meta")), r"one device.*cpu.*meta"),
        ((torch.randn(2, 4), torch.randn(2, 4), torch.randn(4, device="meta")), r"weight is on meta but x is on cpu"),
    ],
)
def test_bad_input(args, match):
    for fn in (gated_layer_norm, gated_layer_norm_reference):
        with pytest.raises(ValueError, match=match):
            fn(*args)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'.*reference.*torch.*triton"):
        gated_layer_norm(torch.randn(2, 4), torch.randn(2, 4), backend="cuda")


# Triton under the interpreter (CPU) ----------------------------------------------------------------------------------
_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from interpreter_utils import assert_fakes_match, assert_same_forward_backward
    from tests.test_kernels_gated_norm import CASES, check_backend
    from visionlin.kernels.triton.gated_norm import gated_layer_norm_bwd, gated_layer_norm_fwd, gated_layer_norm_triton
    for case in CASES:
        check_backend(case, torch.float32, "cpu", "triton", direct=True)
    check_backend(CASES[1], torch.float32, "cpu", "triton", eps=0.1, direct=True)
    for dtype in (torch.float16, torch.bfloat16):
        check_backend(CASES[0], dtype, "cpu", "triton", direct=True)
        check_backend(CASES[3], dtype, "cpu", "triton", direct=True)
    # empty input (0 rows): shapes and zero weight / bias gradients, no launch
    x = torch.randn(0, 3, 96, requires_grad=True)
    w, b = torch.randn(96, requires_grad=True), torch.randn(96, requires_grad=True)
    out = gated_layer_norm_triton(x, torch.randn(0, 3, 96), w, b)
    assert out.shape == (0, 3, 96)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros(96)) and torch.equal(b.grad, torch.zeros(96)) and x.grad.shape == x.shape
    # the ops' real outputs have the shapes, dtypes and strides their fakes promise (torch.compile checks them)
    xg = torch.randn(2, 5, 384).chunk(4, -1)
    for wb in ((torch.randn(96), None), (None, torch.randn(96).double())):
        fwd_args = (xg[0].contiguous(), xg[1], *wb, 1e-5)
        real = gated_layer_norm_fwd(*fwd_args)
        bwd_args = (torch.randn(2, 5, 96), xg[0], xg[1], *wb, real[1], real[2])
        assert_fakes_match(lambda: gated_layer_norm_fwd(*fwd_args) + gated_layer_norm_bwd(*bwd_args))
    # the custom op's registrations (schema, fake, autograd) through torch.library.opcheck, and the custom-op path
    # (used under tracing) equals the eager bypass
    x = torch.randn(3, 7, 96, requires_grad=True)
    g = torch.randn(3, 7, 384).chunk(4, -1)[1].detach().requires_grad_()
    w, b = torch.randn(96, requires_grad=True), torch.randn(96, requires_grad=True)
    torch.library.opcheck(gated_layer_norm_fwd, (x, g, w, b, 1e-5))
    direct = gated_layer_norm_fwd(x, g, w, b, 1e-5)[0]
    eager = gated_layer_norm_triton(x, g, w, b, 1e-5)
    assert_same_forward_backward(direct, eager, (x, g, w, b))
    print("interpreter ok")
    """
)


def test_interpreter_matches_reference():
    """The Triton kernels' math on the CPU (Triton's interpreter): float32, float16, bfloat16, forward and backward."""
    run_in_interpreter(_INTERPRETER_SCRIPT, timeout=600)


# GPU (the H200) -------------------------------------------------------------------------------------------------------
def gpu(fn):
    """The ``gpu`` marker (deselected by default) and a skip on machines without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(fn))


# NaLaFormer-T at 224 px, batch 128: rows and widths of its four stages (and NaLa-L's 640, plus awkward widths).
NALA_SHAPES = [((128, 56 * 56), 64), ((128, 28 * 28), 128), ((128, 14 * 14), 320), ((128, 7 * 7), 512)]


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "case",
    CASES + [((3, 49), 640, True, True, True), ((2, 17), 4096, True, True, False), ((3,), 3000, False, True, True)],
)
def test_triton_matches_reference(case, dtype):
    check_backend(case, dtype, "cuda", "triton")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", NALA_SHAPES, ids=lambda s: f"rows{s[0][0] * s[0][1]}-C{s[1]}")
def test_triton_matches_reference_at_nala_shapes(shape, dtype):
    lead, c = shape
    check_backend((lead, c, True, True, True), dtype, "cuda", "triton")


@gpu
def test_triton_chosen_explicitly_compiles_and_exports():
    """``torch.compile(fullgraph=True)`` and the eager bypass give the same tensors, forward and backward."""
    torch.manual_seed(0)
    ln = nn.LayerNorm(64).cuda()
    x = torch.randn(4, 49, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(4, 49, 256, device="cuda", dtype=torch.bfloat16).chunk(4, -1)[3].detach().requires_grad_()

    def fn(x, g):
        return gated_layer_norm(x, g, ln.weight, ln.bias, ln.eps, backend="triton")

    eager = fn(x, g)
    compiled = torch.compile(fn, fullgraph=True)(x, g)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    do = torch.randn_like(eager)
    for a, b in zip(torch.autograd.grad(eager, (x, g, ln.weight), do),
                    torch.autograd.grad(compiled, (x, g, ln.weight), do), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert fn(x.float(), g.float()).dtype == torch.bfloat16


def _gate_norm(ln: nn.LayerNorm, backend: str, out: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return gated_layer_norm(out, g, ln.weight, ln.bias, ln.eps, backend=backend)


@gpu
@pytest.mark.parametrize("mixer", ["nala", "softmax"])
def test_nala_layer_triton_matches_torch_under_autocast(mixer):
    """The NaLa mixers with the Triton gated norm against the ``"torch"`` backend, bf16 autocast, forward and
    backward (the rest of the layer runs the same kernels on both sides)."""
    from visionlin.layers import NormAwareAttention
    from visionlin.models.mavit import NormGatedRoPESoftmaxAttention

    torch.manual_seed(0)
    cls = NormAwareAttention if mixer == "nala" else NormGatedRoPESoftmaxAttention
    layer = cls(128, 4).cuda()
    x = torch.randn(2, 28 * 28, 128, device="cuda")
    results = {}
    for bk in ("torch", "triton"):
        layer.zero_grad()
        layer.gate_norm = functools.partial(_gate_norm, layer.ln, bk)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x, (28, 28))
        out.float().square().mean().backward()
        results[bk] = (out.float(), layer.ln.weight.grad.clone(), layer.qkvg.weight.grad.clone())
    for a, b in zip(results["triton"], results["torch"], strict=True):
        assert _rel(a, b) <= 2e-2
