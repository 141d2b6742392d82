"""Triton linear attention against its float64 reference, forward and backward.

Tolerance (DESIGN.md, flash-attention's rule): in half precision the kernel's relative error (``||x - ref|| / ||ref||``
over the output and each input gradient) is at most twice that of the plain PyTorch computation in the same dtype
(the native ``"torch"`` backend, run on the same half-precision inputs), plus a floor of four units of the dtype's
rounding; where that plain computation overflows (NaN or inf), the floor alone. In float32 the kernel is held to a
fixed 1e-5 (its products run in IEEE float32).

The ``gpu`` tests run on the GPU machine; ``test_interpreter_*`` runs the same kernels on the CPU through Triton's
interpreter (float32 and float16: the interpreter's bfloat16 products are wrong, a Triton limitation) in a
subprocess, since the interpreter is chosen when the kernels are defined.
"""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
from interpreter_utils import run_in_interpreter

from visionlin.kernels.linear import linear_attention_native, linear_attention_reference

FMAPS = ["identity", "relu", "elu", "sigmoid", "cosine"]
NORMS = ["divide", "subtract", "none"]
FLOOR = {torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8, torch.float32: 1e-5}


def _inputs(b, n, m, h, d, dv, fmap, norm, dtype, device, non_contiguous=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    if non_contiguous:  # q, k, v as views of one fused [B, N, 3, H, D] projection, as the layers produce them
        qkv = torch.randn(b, n, 3, h, d, generator=g, dtype=torch.float64)
        q, k, v = qkv.unbind(2)
    else:
        q = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
        k = torch.randn(b, m, h, d, generator=g, dtype=torch.float64)
        v = torch.randn(b, m, h, dv, generator=g, dtype=torch.float64)
    if norm == "divide" and fmap in ("identity", "cosine"):  # keep the denominators away from zero
        q, k = q.abs() + 0.1, k.abs() + 0.1
    out = []
    for t in (q, k, v):
        t = t.to(device=device, dtype=dtype)
        out.append(t.requires_grad_())
    return out


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``||a - ref|| / ||ref||``, both clamped to ``a``'s dtype range: a true value beyond float16 (un-normalised
    attention at long sequences) must come out as inf, and counts as exact where it does."""
    big = torch.finfo(a.dtype).max
    a, ref = a.double().clamp(-big, big), ref.clamp(-big, big)
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _errors(fn, inputs, fmap, norm, grad):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, feature_map=fmap, normalize=norm)
    out.backward(grad.to(out.dtype))
    return out, [t.grad for t in leaves]


def _check(inputs, fmap, norm, dtype):
    from visionlin.kernels.triton.linear import linear_attention_triton

    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = linear_attention_reference(*ref_in, feature_map=fmap, normalize=norm)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(ref.device)
    ref.backward(grad)
    refs = [ref.detach(), *(t.grad for t in ref_in)]
    out, grads = _errors(linear_attention_triton, inputs, fmap, norm, grad)
    assert out.dtype == dtype and out.shape == ref.shape
    ours = [_rel(x, r) for x, r in zip([out, *grads], refs, strict=True)]
    if dtype == torch.float32:
        bound = [FLOOR[dtype]] * 4
    else:
        nout, ngrads = _errors(linear_attention_native, inputs, fmap, norm, grad)
        base = [_rel(x, r) for x, r in zip([nout, *ngrads], refs, strict=True)]
        # Where the plain computation overflows (NaN / inf: un-normalised fp16 at thousands of tokens), the floor alone.
        bound = [2 * e + FLOOR[dtype] if math.isfinite(e) else FLOOR[dtype] for e in base]
    names = ["out", "dq", "dk", "dv"]
    bad = {n: f"{e:.2e} > {b:.2e}" for n, e, b in zip(names, ours, bound, strict=True) if not e <= b}
    assert not bad, bad


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("fmap", FMAPS)
def test_triton_every_map_and_normalisation(fmap, norm, dtype):
    _check(_inputs(3, 197, 197, 3, 32, 32, fmap, norm, dtype, "cuda"), fmap, norm, dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    ("b", "n", "m", "h", "d", "dv"),
    [(1, 49, 49, 2, 64, 64), (3, 3136, 3136, 3, 32, 32), (1, 197, 100, 4, 80, 80), (1, 65536, 65536, 2, 128, 128)],
)
def test_triton_awkward_shapes(b, n, m, h, d, dv, dtype):
    for fmap, norm in (("relu", "divide"), ("identity", "subtract"), ("elu", "none")):
        _check(_inputs(b, n, m, h, d, dv, fmap, norm, dtype, "cuda"), fmap, norm, dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_non_contiguous_views(dtype):
    _check(
        _inputs(2, 197, 197, 3, 64, 64, "relu", "divide", dtype, "cuda", non_contiguous=True), "relu", "divide", dtype
    )


@gpu
def test_triton_compiles_fullgraph():
    from visionlin.kernels.triton.linear import linear_attention_triton

    q, k, v = _inputs(2, 197, 197, 3, 32, 32, "relu", "divide", torch.bfloat16, "cuda")
    fn = torch.compile(linear_attention_triton, fullgraph=True)
    out = fn(q, k, v, feature_map="relu", normalize="divide")
    out.float().square().sum().backward()
    eager = linear_attention_triton(q, k, v, feature_map="relu", normalize="divide")
    torch.testing.assert_close(out, eager)
    assert q.grad is not None and k.grad is not None and v.grad is not None


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from tests.test_kernels_triton import FMAPS, NORMS, _check, _check_reduced, _inputs, check_fused, check_splits
    for fmap in FMAPS:  # batch 2 for the first map (batch strides), 1 for the others (the interpreter's time)
        for norm in NORMS:
            b = 2 if fmap == FMAPS[0] else 1
            _check(_inputs(b, 37, 45, 3, 20, 24, fmap, norm, torch.float32, "cpu"), fmap, norm, torch.float32)
    for fmap, norm in (("elu", "divide"), ("relu", "subtract"), ("sigmoid", "none")):
        _check(_inputs(1, 70, 130, 2, 32, 16, fmap, norm, torch.float16, "cpu"), fmap, norm, torch.float16)
    # head dims above 64: divide's backward without the saved output (linear._setup)
    for dtype in (torch.float32, torch.float16):
        _check(_inputs(1, 21, 19, 1, 80, 72, "cosine", "divide", dtype, "cpu"), "cosine", "divide", dtype)
    for dtype, batch in ((torch.float32, 2), (torch.float16, 1)):
        _check_reduced(dtype, "cpu", direct=True, batch=batch)
    check_fused("cpu")
    check_splits("cpu")
    print("interpreter ok")
    """
)


def check_fused(device, shapes=((2, 37, 45, 3, 20, 24), (1, 70, 130, 2, 32, 16))):
    """The single-kernel forward (forced on), with the backward on the state it saves, and without a saved state
    under ``no_grad`` (same output as the two-kernel forward)."""
    from visionlin.kernels.triton import linear as tlin

    before = tlin.TUNING["fused"]
    try:
        for shape in shapes:
            for dtype, (fmap, norm) in ((torch.float32, ("elu", "divide")), (torch.float16, ("identity", "subtract"))):
                tlin.TUNING["fused"] = True
                _check(_inputs(*shape, fmap, norm, dtype, device), fmap, norm, dtype)
                q, k, v = _inputs(*shape, "relu", "none", dtype, device)
                with torch.no_grad():
                    fused = tlin.linear_attention_triton(q, k, v, feature_map="relu", normalize="none")
                    tlin.TUNING["fused"] = False
                    split = tlin.linear_attention_triton(q, k, v, feature_map="relu", normalize="none")
                assert _rel(fused, split.double()) <= FLOOR[dtype], (shape, dtype)
    finally:
        tlin.TUNING["fused"] = before


def check_splits(device, shape=(1, 70, 130, 2, 32, 16)):
    """The two-kernel forward and the backward with several row blocks per program (read-out, state and backward
    splits at one program per SM, 16-row steps) against the reference."""
    from visionlin.kernels.triton import linear as tlin

    before = dict(tlin.TUNING)
    try:
        tlin.TUNING.update(fused=False, rows=16, rows_backward=16, readout_per_sm=1, state_per_sm=1, backward_per_sm=1)
        _check(_inputs(*shape, "elu", "divide", torch.float32, device), "elu", "divide", torch.float32)
    finally:
        tlin.TUNING.clear()
        tlin.TUNING.update(before)


@pytest.mark.parametrize(("key", "value"), [("rows", 0), ("warps", 3), ("rows_backward", -64), ("stages", 1.5)])
def test_launch_settings_refuse_bad_tuning(key, value):
    from visionlin.kernels.triton import linear as tlin

    before = dict(tlin.TUNING)
    try:
        tlin.TUNING[key] = value
        allowed = "(a power of two|an integer >= [01] or None)"
        with pytest.raises(ValueError, match=rf"linear\.TUNING\['{key}'\] = {value}: must be {allowed}"):
            tlin._forward_settings(32, 32, False) if "backward" not in key else tlin._backward_settings(32, 32)
    finally:
        tlin.TUNING.clear()
        tlin.TUNING.update(before)


def test_launch_settings_defaults_and_overrides():
    """The measured defaults per head dim, and a TUNING entry taking the place of one default only."""
    from visionlin.kernels.triton import linear as tlin

    assert tlin._forward_settings(32, 32, False) == dict(rows=64, warps=2, stages=1, state_per_sm=4, readout_per_sm=0)
    assert tlin._forward_settings(64, 64, True)["warps"] == 2
    assert tlin._backward_settings(64, 64)["rows_backward"] == 64
    before = dict(tlin.TUNING)
    try:
        tlin.TUNING["warps"] = 8
        assert tlin._forward_settings(32, 32, False) == dict(
            rows=64, warps=8, stages=1, state_per_sm=4, readout_per_sm=0
        )
        assert tlin._backward_settings(32, 32)["warps_backward"] == 4  # the forward's knob only
    finally:
        tlin.TUNING.clear()
        tlin.TUNING.update(before)


@gpu
def test_triton_splits():
    check_splits("cuda", shape=(2, 3136, 3136, 3, 32, 32))


@gpu
@pytest.mark.parametrize("shape", [(64, 197, 197, 10, 32, 32), (256, 197, 197, 6, 64, 64), (1, 49, 49, 2, 64, 64)])
def test_triton_fused_forward(shape):
    check_fused("cuda", shapes=(shape,))


def test_interpreter_matches_reference():
    """The Triton kernels' math on the CPU (Triton's interpreter), fp32 and fp16, every map and normalisation."""
    run_in_interpreter(_INTERPRETER_SCRIPT, timeout=600)


def _check_reduced(dtype, device, direct=False, batch=2):
    """FLatten's focused attention and per-query InfSA through the fused kernels (``direct``: the backend functions
    themselves, as the interpreter runs them on the CPU) against their float64 references, forward and backward,
    with the same tolerance rule as above against their native backends (``batch`` x 97 tokens x 3 heads)."""
    from visionlin.kernels import focused, infsa

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(batch, 97, 3, 16, generator=g, dtype=torch.float64) for _ in range(3))
    scale = torch.rand(3, 16, generator=g, dtype=torch.float64) + 0.5
    cases = [
        (focused._focused_triton, focused._focused_native, focused.focused_linear_attention_reference,
         dict(channel_scale=scale)),
        (infsa._per_query_triton, infsa._per_query_native, infsa.linear_infsa_attention_reference,
         dict(per_query=True, rho=torch.tensor([0.9, 0.5, 0.7], dtype=torch.float64))),
    ]  # fmt: skip
    for fast, native, reference, kwargs in cases:
        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = reference(*ref_in, **kwargs)
        grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        ref.backward(grad)
        refs = [ref.detach(), *(t.grad for t in ref_in)]
        errors = []
        for fn in (fast, native):
            ins = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
            kw = {n: (x.to(device=device, dtype=dtype) if torch.is_tensor(x) else x) for n, x in kwargs.items()}
            if not direct and fn is fast:
                op = (
                    focused.focused_linear_attention
                    if fast is focused._focused_triton
                    else infsa.linear_infsa_attention
                )
                out = op(*ins, backend="triton", **kw)
            else:
                out = fn(*ins, **kw)
            out.backward(grad.to(device=device, dtype=dtype))
            errors.append([_rel(x.cpu(), r) for x, r in zip([out, *(t.grad for t in ins)], refs, strict=True)])
        ours, base = errors
        floor = FLOOR[dtype]
        bound = [floor if dtype == torch.float32 else 2 * b + floor for b in base]
        bad = {i: f"{e:.2e} > {b:.2e}" for i, (e, b) in enumerate(zip(ours, bound, strict=True)) if not e <= b}
        assert not bad, (fast.__name__, bad)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_triton_focused_and_per_query_infsa(dtype):
    _check_reduced(dtype, "cuda")


def test_triton_backend_declines_cpu_with_reasons():
    from visionlin.kernels import get_op, linear_attention

    q = torch.randn(1, 4, 1, 8)
    assert "tensors are not on a CUDA device" in get_op("linear_attention").supports(q, q, q, backend="triton")
    assert get_op("linear_attention").select(q, q, q).name == "torch"  # automatic choice falls through
    with pytest.raises(NotImplementedError, match="not on a CUDA device"):
        linear_attention(q, q, q, backend="triton")
    reasons = get_op("linear_attention").supports(q, q, q, backend="triton", feature_map=torch.exp)
    assert any("is not one the kernels apply themselves" in r for r in reasons)


@gpu
def test_triton_is_chosen_in_models_and_matches_the_reference():
    import timm

    import visionlin
    from visionlin.kernels import get_op

    q = torch.randn(1, 4, 1, 8, device="cuda", dtype=torch.bfloat16)
    assert get_op("linear_attention").select(q, q, q).name == "triton"
    torch.manual_seed(0)
    model = timm.create_model("inline_deit_tiny").cuda().eval()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad():
        visionlin.set_backend(model, "triton")
        fast = model(x)
        visionlin.set_backend(model, "reference")
        ref = model(x)
    assert _rel(fast, ref.double()) < 1e-4  # float32 model: IEEE products in the kernel


@gpu
def test_triton_offsets_beyond_int32():
    """Views into one fused projection whose offsets pass 2^31 elements (the layers' layout at about 23,000 px): the
    linear, pooled-InfSA and depthwise-convolution kernels must index in int64, not wrap around into other memory."""
    from visionlin.kernels import linear_attention
    from visionlin.kernels.conv import token_depthwise_conv2d
    from visionlin.kernels.infsa import linear_infsa_context

    side, h, d = 1449, 6, 64  # 1 + 1449^2 = 2,099,602 tokens x 3 * 384 channels = 2.4e9 elements
    n = 1 + side * side
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(1, n, 3, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = qkv.unbind(2)
    for fmap in ("relu", "elu"):
        fast = linear_attention(q, k, v, feature_map=fmap, backend="triton")
        ref = linear_attention(q, k, v, feature_map=fmap, backend="torch")
        assert _rel(fast[:, -4096:], ref[:, -4096:].double()) < 2e-2
    ctx = linear_infsa_context(q, k, v, rho=0.9, backend="triton")
    ref_ctx = linear_infsa_context(q, k, v, rho=0.9, backend="torch")
    assert _rel(ctx, ref_ctx.double()) < 1e-2
    x = qkv.flatten(2)[..., 2 * h * d :]  # the value view, token stride 3 * 384
    w = torch.randn(h * d, 3, 3, device="cuda", generator=g).to(torch.bfloat16)
    fast = token_depthwise_conv2d(x, w, feat_size=(side, side), num_prefix_tokens=1, backend="triton")
    ref = token_depthwise_conv2d(x, w, feat_size=(side, side), num_prefix_tokens=1, backend="torch")
    assert _rel(fast[:, -8192:], ref[:, -8192:].double()) < 2e-2


def _heads_last(b: int, h: int, n: int = 8, d: int = 16) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty(b, n, h, d, device="meta") for _ in range(3))


# Every op whose Triton kernels put a program row per (sample, head) on a CUDA grid's second or third dimension:
# (name, extra positional tensors per (b, h), extra keyword arguments)
GRID_OPS = {
    "linear_attention": ((), {}),
    "focused_linear_attention": ((), {}),
    "linear_infsa_attention": ((), {}),
    "efficient_attention": ((), {}),
    "magnitude_aware_linear_attention": ((), {}),
    "norm_aware_linear_attention": ((), {}),
    "rank_augmented_linear_attention": ((), {}),
    "pure_infsa_attention": ((), {}),
    "agent_attention": ((lambda b, h: torch.empty(b, 4, h, 16, device="meta"),), {}),
    "gated_linear_attention": ((lambda b, h: torch.empty(b, 8, h, 16, device="meta"),), {}),
    "sparse_linear_attention": ((lambda b, h: torch.empty(16, 16, device="meta"),), {}),
}


@pytest.mark.parametrize("name", sorted(GRID_OPS))
def test_triton_refuses_more_sample_head_rows_than_the_grid_holds(name):
    """65,536 (sample, head) rows exceed a CUDA grid's second dimension: each Triton backend gives that reason (the
    automatic choice then takes the next backend) instead of failing at launch; 65,535 pass that check. Shapes only,
    on the meta device."""
    from visionlin.kernels import get_op

    extra, kwargs = GRID_OPS[name]
    for b, h, over in ((16_384, 4, True), (65_535, 1, False)):
        args = (*_heads_last(b, h), *(make(b, h) for make in extra))
        if name == "pure_infsa_attention":  # its supports() stops at "not CUDA" so as never to import the kernels
            from visionlin.kernels.triton.infsa_pure import triton_pure_infsa_supports

            reasons = triton_pure_infsa_supports(*args)
        else:
            reasons = get_op(name).supports(*args, backend="triton", **kwargs)
        assert any("batch x heads" in r for r in reasons) == over, (name, b, h, reasons)


def test_neighborhood_and_scan_refuse_beyond_the_grid():
    from visionlin.kernels import get_op

    q = torch.empty(70_000, 4, 4, 1, 16, device="meta")  # [B, X, Y, H, D]
    reasons = get_op("neighborhood_attention").supports(q, q, q, (3, 3), (1, 1), backend="triton")
    assert any("batch x heads = 70000 x 1" in r for r in reasons), reasons
    u = torch.empty(70_000, 8, 16, device="meta")  # [B, D, L]
    bc = torch.empty(70_000, 4, 16, device="meta")
    a = torch.empty(8, 4, device="meta")
    reasons = get_op("selective_scan").supports(u, u, bc, bc, None, A=a, D=None, delta_bias=None, backend="triton")
    assert any("batch 70000 > 65535" in r for r in reasons), reasons


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["linear_attention", "agent_attention"])
def test_calls_beyond_the_grid_take_the_next_backend_on_cuda(name):
    """65,536 (sample, head) rows on CUDA: the automatic choice skips the Triton kernels (no launch failure) and the
    result matches the reference."""
    from visionlin.kernels import agent_attention, get_op, linear_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(65_536, 8, 1, 16, device="cuda", generator=g) for _ in range(3))
    if name == "agent_attention":
        agents = torch.randn(65_536, 4, 1, 16, device="cuda", generator=g)
        args, fn = (q, k, v, agents), agent_attention
    else:
        args, fn = (q, k, v), linear_attention
    assert get_op(name).select(*args).name != "triton"
    torch.testing.assert_close(fn(*args), fn(*args, backend="reference"), rtol=1e-4, atol=1e-5)
