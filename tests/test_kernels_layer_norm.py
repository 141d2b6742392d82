"""``visionlin.kernels.layer_norm`` (a LayerNorm whose output dtype may differ from its input's: the pre-norm blocks'
float32 LayerNorm fused with the bfloat16 cast of the Linear after it) and the :class:`~visionlin.layers.PreNorm`
module that uses it.

Tolerance (as for the gated LayerNorm): a backend's relative error against a float64 computation on the same inputs is
at most twice the ``"torch"`` backend's (``F.layer_norm`` then the cast), or a floor of a few roundings of the output's
dtype (float32: 2e-6); gradients against float64 at the input's dtype's floor or twice the torch backend's error. The
Triton kernels run under Triton's interpreter on the CPU here and on the GPU in the ``gpu`` tests.
"""

from __future__ import annotations

import textwrap

import pytest
import timm
import torch
from interpreter_utils import run_in_interpreter
from test_kernels_gated_norm import FLOOR, _rel, gpu, norm_by_definition
from torch import nn

from visionlin.kernels import layer_norm, layer_norm_reference
from visionlin.layers import PreNorm, as_pre_norm
from visionlin.layers import norm as norm_module

# (leading shape, C, weight, bias, x dtype, out dtype)
CASES = [
    ((2, 9), 96, True, True, torch.float32, torch.bfloat16),  # the pre-norm case: float32 stream, bfloat16 out
    ((3, 100), 64, True, True, torch.float32, torch.float16),  # several row blocks per backward program
    ((37,), 200, True, False, torch.float32, torch.float32),
    ((2, 3, 5), 96, False, True, torch.bfloat16, torch.bfloat16),
    ((5, 7), 64, False, False, torch.float16, torch.float32),
    ((4,), 1, True, True, torch.float32, torch.bfloat16),  # one channel: every row normalises to exactly 0
]


def _inputs(lead, c, weight, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(*lead, c, generator=gen, dtype=torch.float64) + 0.3
    w = 1.0 + 0.5 * torch.randn(c, generator=gen, dtype=torch.float64) if weight else None
    b = 0.5 * torch.randn(c, generator=gen, dtype=torch.float64) if bias else None
    return x, w, b


def _run(fn, x, w, b, grad):
    leaves = [t if t is None else t.detach().clone().requires_grad_() for t in (x, w, b)]
    out = fn(*leaves)
    out.backward(grad.to(out.device, out.dtype))
    return out, *(None if t is None else t.grad for t in leaves)


def check_backend(case, device, backend, eps=1e-5, direct=False):
    """Output and gradients of ``backend`` against float64 on the same rounded input, within twice the ``"torch"``
    backend's error (or the floor); ``direct``: the Triton backend function itself."""
    lead, c, weight, bias, x_dtype, out_dtype = case
    x, w, b = _inputs(lead, c, weight, bias)
    x = x.to(x_dtype).double()  # the values the low-precision path sees
    grad = torch.randn(*lead, c, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grad = grad.to(out_dtype).double()  # the gradient arrives in the output's dtype
    ref = _run(lambda *a: norm_by_definition(*a, eps), x, w, b, grad)

    def args():
        return x.to(device, x_dtype), *(None if t is None else t.to(device, torch.float32) for t in (w, b))

    if direct:
        from visionlin.kernels.triton.gated_norm import layer_norm_triton

        def fast(*a):
            return layer_norm_triton(*a, eps, out_dtype)
    else:

        def fast(*a):
            return layer_norm(*a, eps, out_dtype=out_dtype, backend=backend)

    ours = _run(fast, *args(), grad)
    base = _run(lambda *a: layer_norm(*a, eps, out_dtype=out_dtype, backend="torch"), *args(), grad)
    assert ours[0].dtype == out_dtype and ours[0].shape == ref[0].shape
    assert ours[1].dtype == x_dtype
    errs, bounds = {}, {}
    for name, o, r, t, dt in zip(
        ("out", "dx", "dweight", "dbias"),
        ours,
        ref,
        base,
        (out_dtype, x_dtype, torch.float32, torch.float32),
        strict=True,
    ):
        if r is None:
            continue
        errs[name] = _rel(o, r)
        bounds[name] = max(2 * _rel(t, r), FLOOR[dt])
    bad = {n: f"{errs[n]:.2e} > {bounds[n]:.2e}" for n in errs if not errs[n] <= bounds[n]}
    assert not bad, (case, backend, bad)


# The reference is the specification ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_reference_matches_definition(case):
    lead, c, weight, bias, x_dtype, out_dtype = case
    x, w, b = _inputs(lead, c, weight, bias)
    x = x.to(x_dtype)
    out = layer_norm_reference(x, w, b, 1e-5, out_dtype)
    assert out.dtype == out_dtype
    # one rounding of the float64 value (the reference computes in float32 first: within a float32 rounding of it)
    exact = norm_by_definition(x, w, b, 1e-5)
    assert _rel(out, exact) <= FLOOR[out_dtype]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_cpu_backends(case, backend):
    check_backend(case, "cpu", backend)


def test_torch_backend_is_layernorm_then_cast():
    """The ``"torch"`` backend is what a pre-norm block computed before: ``nn.LayerNorm`` then the consumer's cast."""
    ln = nn.LayerNorm(48)
    nn.init.normal_(ln.weight)
    nn.init.normal_(ln.bias)
    x = torch.randn(2, 10, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ln(x).to(torch.bfloat16)
        got = layer_norm(x, ln.weight, ln.bias, ln.eps, out_dtype=torch.bfloat16, backend="torch")
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert layer_norm(x.half(), ln.weight, ln.bias).dtype == torch.float16  # out_dtype defaults to x's


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(x=torch.randn(2, 8), out_dtype=torch.int32), r"out_dtype must be None or a floating torch.dtype"),
        (dict(x=torch.randn(2, 8), out_dtype="bfloat16"), r"out_dtype must be None or a floating"),
        (dict(x=torch.arange(8).reshape(2, 4)), r"x must be a floating torch.Tensor"),
        (dict(x=[1.0, 2.0]), r"x must be a floating torch.Tensor"),
        (dict(x=torch.randn(2, 8), weight=torch.randn(4)), r"weight of shape \(4,\) must be \[C\] = \(8,\)"),
        (dict(x=torch.randn(2, 8), eps=-1.0), r"eps=-1.0"),
        (dict(x=torch.randn(3, 0)), r"C = 0"),
    ],
)
def test_bad_input(kwargs, match):
    x = kwargs.pop("x")
    for fn in (layer_norm, layer_norm_reference):
        with pytest.raises(ValueError, match=match):
            fn(x, **kwargs)


def test_triton_backend_refused_on_cpu():
    with pytest.raises(NotImplementedError, match=r"layer_norm: backend 'triton' cannot run this call"):
        layer_norm(torch.randn(2, 8), backend="triton")


# PreNorm -------------------------------------------------------------------------------------------------------------
def test_pre_norm_is_layer_norm_off_cuda(monkeypatch):
    """On the CPU (and, on CUDA, with the switch off, without autocast or under torch.compile) PreNorm is
    nn.LayerNorm: same output, same parameters and state-dict keys."""
    ln = nn.LayerNorm(32, eps=1e-6)
    nn.init.normal_(ln.weight)
    ref_state = {k: v.clone() for k, v in ln.state_dict().items()}
    x = torch.randn(2, 7, 32)
    want = ln(x)
    pre = as_pre_norm(ln)
    assert pre is ln and isinstance(pre, PreNorm) and isinstance(pre, nn.LayerNorm)
    assert list(pre.state_dict()) == list(ref_state) and all(
        torch.equal(pre.state_dict()[k], ref_state[k]) for k in ref_state
    )
    for on in (False, True):
        monkeypatch.setitem(norm_module.FAST_PATHS, "pre_norm", on)
        assert torch.equal(pre(x), want)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert pre(x).dtype == torch.float32  # CPU autocast: unchanged, LayerNorm in float32
    rms = timm.layers.RmsNorm(32)
    assert as_pre_norm(rms) is rms and type(rms) is timm.layers.RmsNorm  # only exact nn.LayerNorm is converted


def test_pre_norm_takes_the_fast_path_only_without_gradients(monkeypatch):
    """On (fake) CUDA tensors under autocast with the switch on, PreNorm calls the ``layer_norm`` op with autocast's
    dtype only where no gradient is taken (no_grad, inference_mode, or nothing requiring grad); with gradients (a
    host-bound training step, where the op's call path costs more than ``F.layer_norm``) it is ``nn.LayerNorm``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls = []

    def recorder(x, weight, bias, eps, *, out_dtype):
        calls.append(out_dtype)
        return x.to(out_dtype)

    monkeypatch.setattr(norm_module, "layer_norm", recorder)
    monkeypatch.setitem(norm_module.FAST_PATHS, "pre_norm", True)
    # CUDA autocast as PreNorm sees it (torch disables a real autocast context without a CUDA device)
    autocast = [True]
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device=None: autocast[0] and device == "cuda")
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device: torch.bfloat16)
    pre, off = as_pre_norm(nn.LayerNorm(16)), as_pre_norm(nn.LayerNorm(16))
    with FakeTensorMode(allow_non_fake_inputs=True):
        pre, off = pre.cuda(), off.cuda()
        x = torch.randn(2, 5, 16, device="cuda")
        assert pre(x).dtype == torch.float32 and calls == []  # the weight requires grad
        assert pre(x.requires_grad_()).dtype == torch.float32 and calls == []
        for ctx in (torch.no_grad(), torch.inference_mode()):
            with ctx:
                assert pre(x).dtype == torch.bfloat16
        pre.requires_grad_(False)
        assert pre(x.detach()).dtype == torch.bfloat16
        assert len(calls) == 3
        autocast[0] = False
        with torch.no_grad():
            assert pre(x).dtype == torch.float32
        autocast[0] = True
        monkeypatch.setitem(norm_module.FAST_PATHS, "pre_norm", False)
        with torch.no_grad():
            assert off(x).dtype == torch.float32
    assert calls == [torch.bfloat16] * 3


def test_blocks_use_pre_norm_only_before_projections():
    """The blocks' norm1 / norm2 are PreNorm; stem, downsampling and final norms (whose outputs are the residual
    stream or the features) stay nn.LayerNorm."""
    model = timm.create_model("nat_mini")
    pre = {n for n, m in model.named_modules() if type(m) is PreNorm}
    plain = {n for n, m in model.named_modules() if type(m) is nn.LayerNorm}
    assert pre and all(n.split(".")[-1] in ("norm1", "norm2") for n in pre)
    assert plain and not any(n.split(".")[-1] in ("norm1", "norm2") for n in plain)
    vit = timm.create_model("infvit_tiny")
    assert type(vit.blocks[0].norm1) is PreNorm and type(vit.norm) is nn.LayerNorm
    nala = timm.create_model("nalaformer_tiny")
    assert {type(m) for n, m in nala.named_modules() if n.endswith(("norm1", "norm2"))} == {PreNorm}


# Triton under the interpreter (CPU) ----------------------------------------------------------------------------------
_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from interpreter_utils import assert_fakes_match, assert_same_forward_backward
    from tests.test_kernels_layer_norm import CASES, check_backend
    from visionlin.kernels.triton.gated_norm import gated_layer_norm_bwd, gated_layer_norm_fwd, layer_norm_triton
    for case in CASES:
        check_backend(case, "cpu", "triton", direct=True)
    check_backend(CASES[0], "cpu", "triton", eps=0.1, direct=True)
    # the one-channel row: exactly 0 out (before the bias) and exactly 0 dx
    x = torch.randn(5, 1, requires_grad=True)
    out = layer_norm_triton(x, None, None, 1e-5, torch.bfloat16)
    assert torch.equal(out.float(), torch.zeros(5, 1))
    out.float().sum().backward()
    assert torch.equal(x.grad, torch.zeros(5, 1))
    # empty input: shapes and zero weight / bias gradients
    x = torch.randn(0, 3, 64, requires_grad=True)
    w, b = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    out = layer_norm_triton(x, w, b, 1e-5, torch.bfloat16)
    assert out.shape == (0, 3, 64) and out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert torch.equal(w.grad, torch.zeros(64)) and torch.equal(b.grad, torch.zeros(64))
    # real outputs as the fakes promise, without a gate and with another output dtype
    x = torch.randn(2, 5, 96)
    fwd_args = (x, None, torch.randn(96), torch.randn(96), 1e-5, torch.bfloat16)
    real = gated_layer_norm_fwd(*fwd_args)
    bwd_args = (torch.randn(2, 5, 96, dtype=torch.bfloat16), x, None, fwd_args[2], fwd_args[3], real[1], real[2])
    assert_fakes_match(lambda: gated_layer_norm_fwd(*fwd_args) + gated_layer_norm_bwd(*bwd_args))
    x = torch.randn(3, 7, 64, requires_grad=True)
    w, b = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    torch.library.opcheck(gated_layer_norm_fwd, (x, None, w, b, 1e-5, torch.bfloat16))
    direct = gated_layer_norm_fwd(x, None, w, b, 1e-5, torch.bfloat16)[0]
    eager = layer_norm_triton(x, w, b, 1e-5, torch.bfloat16)
    assert_same_forward_backward(direct, eager, (x, w, b))
    print("interpreter ok")
    """
)


def test_interpreter_matches_reference():
    """The gate-less Triton path on the CPU (Triton's interpreter): every case, forward and backward."""
    run_in_interpreter(_INTERPRETER_SCRIPT, timeout=600)


# GPU (the H200) -------------------------------------------------------------------------------------------------------
# NAT-T / NaLaFormer-T / DeiT-S pre-norm shapes at their benchmark batches: float32 stream, bfloat16 out
GPU_SHAPES = [((128, 3136), 64), ((128, 784), 128), ((256, 197), 384), ((128, 49), 512), ((3, 17), 4096)]


@gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"rows{s[0][0] * s[0][1]}-C{s[1]}")
def test_triton_matches_reference(shape, out_dtype):
    lead, c = shape
    check_backend((lead, c, True, True, torch.float32, out_dtype), "cuda", "triton")


@gpu
@pytest.mark.parametrize("case", CASES)
def test_triton_cases(case):
    check_backend(case, "cuda", "triton")


@gpu
def test_triton_compiles_and_matches_eager():
    ln = nn.LayerNorm(96).cuda()
    x = torch.randn(4, 49, 96, device="cuda", requires_grad=True)

    def fn(x):
        return layer_norm(x, ln.weight, ln.bias, ln.eps, out_dtype=torch.bfloat16, backend="triton")

    eager = fn(x)
    compiled = torch.compile(fn, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    do = torch.randn_like(eager)
    for a, b in zip(torch.autograd.grad(eager, (x, ln.weight, ln.bias), do),
                    torch.autograd.grad(compiled, (x, ln.weight, ln.bias), do), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@gpu
@pytest.mark.parametrize(
    ("switch", "name"),
    [
        *(("pre_norm", n) for n in ("nat_tiny", "nalaformer_tiny", "flatten_pvt_small", "infvit_small", "mavit_tiny")),
        *(("stem_channels_last", n) for n in ("nalaformer_tiny", "mavit_tiny", "nat_tiny", "mambavision_tiny")),
        *(("patch_gemm", n) for n in ("infvit_small", "flatten_swin_tiny")),
    ],
)
def test_models_with_fast_path(switch, name, monkeypatch):
    """With a ``FAST_PATHS`` switch on, a model under bf16 autocast is as close to the float32 model (TF32 off, every
    switch off) as with the switch off: the training step's logits and every parameter gradient, and the inference
    logits, each within twice the switch-off path's relative error (or 2e-2, a few bfloat16 roundings over the
    depth). Comparing the two bf16 runs with each other instead measures chaos, not error: a random-init ViT-S in
    training mode turns a one-ulp difference in its stem into 3% in the gradients (the patch_gemm case read 0.030).
    The pre-norm switch (with the Triton LayerNorm, through the op or its lean inference path) must reach the kernel
    in inference only (``nn.LayerNorm`` where gradients are taken)."""

    torch.manual_seed(0)
    model = timm.create_model(name).cuda()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def run(half: bool = True):
        model.load_state_dict(state)  # the same BatchNorm running statistics before each step
        torch.manual_seed(1)  # the same stochastic-depth draws (a model's default drop_path_rate may be non-zero)
        model.train()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=half):
            out = model(x)
        out.float().square().mean().backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        model.eval()
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=half):
            infer = model(x).float()
        return out.detach().float(), grads, infer

    for key in norm_module.FAST_PATHS:
        monkeypatch.setitem(norm_module.FAST_PATHS, key, False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ref = run(half=False)
    off = run()
    monkeypatch.setitem(norm_module.FAST_PATHS, switch, True)
    grad_modes = []

    def counted(*args, **kwargs):
        grad_modes.append(torch.is_grad_enabled())
        return layer_norm(*args, **kwargs, backend="triton")

    lean = norm_module.inference_layer_norm

    def counted_lean(*args):
        out = lean(*args)
        if out is not None:
            grad_modes.append(torch.is_grad_enabled())
        return out

    monkeypatch.setattr(norm_module, "layer_norm", counted)
    monkeypatch.setattr(norm_module, "inference_layer_norm", counted_lean)
    on = run()
    names = ("logits", "grads", "inference")
    errs = {k: _rel(a, r) for k, a, r in zip(names, on, ref, strict=True)}
    bounds = {k: max(2 * _rel(a, r), 2e-2) for k, a, r in zip(names, off, ref, strict=True)}
    assert all(errs[k] <= bounds[k] for k in names), (errs, bounds)
    if switch == "pre_norm":
        assert grad_modes and not any(grad_modes)  # the op ran, in inference only


def test_stem_memory_format_off_cuda(monkeypatch):
    """The convolutional stems' switch leaves CPU tensors (and everything with the switch off) as they are."""
    x = torch.randn(2, 3, 8, 8)
    for on in (False, True):
        monkeypatch.setitem(norm_module.FAST_PATHS, "stem_channels_last", on)
        assert norm_module.stem_memory_format(x) is x


# The lean inference path (PreNorm's) ---------------------------------------------------------------------------------
def test_inference_layer_norm_declines_what_it_does_not_take():
    """``None`` (the caller then runs the op) for CPU tensors, fake tensors, non-float dtypes, zero or too many
    channels, a weight that is not a unit-stride ``[C]`` tensor, and a non-positive eps."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from visionlin.kernels.gated_norm import MAX_TRITON_CHANNELS, inference_layer_norm

    w = torch.ones(8)
    bf = torch.bfloat16
    assert inference_layer_norm(torch.randn(2, 8), w, None, 1e-5, bf) is None  # CPU
    with FakeTensorMode():
        assert inference_layer_norm(torch.randn(2, 8, device="cuda"), None, None, 1e-5, bf) is None
    # the remaining refusals come before any device work: checked on CPU tensors posing as CUDA is not possible, so
    # they are checked on CUDA where there is one
    if torch.cuda.is_available():
        x = torch.randn(2, 8, device="cuda")
        wc = w.cuda()
        for args in (
            (x.int(), wc, None, 1e-5, bf),
            (torch.randn(2, 0, device="cuda"), None, None, 1e-5, bf),
            (torch.randn(2, MAX_TRITON_CHANNELS + 1, device="cuda"), None, None, 1e-5, bf),
            (x, torch.ones(16, device="cuda")[::2], None, 1e-5, bf),
            (x, torch.ones(9, device="cuda"), None, 1e-5, bf),
            (x, wc, None, 0.0, bf),
            (x, wc, None, 1e-5, torch.float64),
        ):
            assert inference_layer_norm(*args) is None, [getattr(a, "shape", a) for a in args]


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c", [1, 64, 384, 1000, 4096])
def test_inference_layer_norm_equals_the_triton_op(dtype, c):
    """Bit for bit the op's ``"triton"`` backend, for each out dtype, with and without weight / bias, a half-precision
    weight, and a row-strided view (a chunk of a wider tensor)."""
    from visionlin.kernels.gated_norm import inference_layer_norm

    torch.manual_seed(0)
    wide = torch.randn(3, 7, 2 * c, device="cuda", dtype=dtype) * 3 + 1
    w, b = torch.randn(c, device="cuda"), torch.randn(c, device="cuda")
    for x in (wide[..., :c], wide[..., :c].contiguous()):
        for weight, bias in ((w, b), (None, b), (w, None), (None, None), (w.bfloat16(), b.half())):
            for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
                with torch.inference_mode():
                    lean = inference_layer_norm(x, weight, bias, 1e-5, out_dtype)
                    op = layer_norm(x, weight, bias, 1e-5, out_dtype=out_dtype, backend="triton")
                assert lean is not None and lean.dtype == out_dtype
                torch.testing.assert_close(lean, op, rtol=0, atol=0)
    empty = inference_layer_norm(wide[:0, :, :c], w, b, 1e-5, torch.bfloat16)
    assert empty.shape == (0, 7, c)
