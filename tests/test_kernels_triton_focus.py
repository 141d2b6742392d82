"""FLatten's joint-head focusing map as a Triton kernel (``visionlin.kernels.triton.focus``) against
:func:`visionlin.kernels.focused.focus` in float64, forward and backward (the input and the channel scale).

Tolerance: float32 1e-5 relative; half precision four units of the dtype's rounding (the kernel computes in float32 on
the inputs' values and rounds the features once). The ``gpu`` tests run on the GPU machine; the interpreter test runs
the kernels on the CPU in a subprocess.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from interpreter_utils import run_in_interpreter

from visionlin.kernels.focused import focus

FLOOR = {torch.float32: 1e-5, torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_focus(
    shape, dtype, device, p=3.0, scale=True, std=1.0, zero_token=False, non_contiguous=False, heads_strided=False
):
    from visionlin.kernels.triton.focus import _focus, _focus_grad, _scale_vector

    b, n, h, d = shape
    g = torch.Generator().manual_seed(0)
    if non_contiguous:  # a head-split view of a fused projection
        x = (std * torch.randn(b, n, 3, h, d, generator=g, dtype=torch.float64))[:, :, 1]
    else:
        x = std * torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
    if zero_token:
        x[:, 0] = -1.0  # all negative: relu gives 0, only eps remains (or nothing with eps = 0)
    x = x.to(dtype).double()
    if heads_strided:  # heads not contiguous (stride(H) != D * stride(D)): the kernels' per-channel head / dim split
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # .to() below keeps these strides
    c = (torch.rand(h, d, generator=g, dtype=torch.float64) + 0.5) if scale else None
    grad = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
    errors = {}
    for eps in (1e-6, 0.0):
        ref_in = [x.clone().requires_grad_(), None if c is None else c.clone().requires_grad_()]
        ref = focus(ref_in[0], p, channel_scale=ref_in[1], eps=eps)
        ref.backward(grad)
        # the launch functions the focused op calls: the features, then their gradient for the input and the scale
        xd = x.to(device, dtype)
        cv = _scale_vector(xd, None if c is None else c.to(device).float())
        out = _focus(xd, cv, p, eps)
        assert out.dtype == dtype and out.shape == ref.shape
        g_out = grad.to(device, dtype)
        if heads_strided:  # and a gradient laid out the same way
            g_out = g_out.transpose(-1, -2).contiguous().transpose(-1, -2)
        dx, dc = _focus_grad(xd, cv, g_out, p, eps, c is not None)
        errors[f"f eps={eps}"] = _rel(out, ref.detach())
        errors[f"dx eps={eps}"] = _rel(dx, ref_in[0].grad)
        if c is not None:
            errors[f"dc eps={eps}"] = _rel(dc.view(h, d), ref_in[1].grad)
    floor = FLOOR[dtype] if dtype != torch.float32 else 1e-5
    # dc sums dt * t over every token: one float32 sum of B * N terms (atomics), held to 4x the float32 floor
    bad = {k: f"{e:.2e}" for k, e in errors.items() if not e <= (4 * floor if k.startswith("dc") else floor)}
    assert not bad, (shape, dtype, p, bad)
    return errors


def check_focused_op(shape, dtype, device, non_contiguous=False, scale=True, dv=None, m=None, seed=0):
    """The one-op focused linear attention (``focused_linear_attention_triton``: features and state recomputed in the
    backward) against the float64 reference, forward and backward for ``q``, ``k``, ``v`` and the channel scale.
    Bound: float32 ``1e-5`` relative (``dc``, one float32 sum over every token, 4x); half precision twice the error of
    the native ``torch`` backend on the same inputs plus four units of the dtype's rounding (the same rule as the
    linear kernels' tests). Returns the errors."""
    from visionlin.kernels.focused import _focused_native, focused_linear_attention_reference
    from visionlin.kernels.triton.focus import focused_linear_attention_triton

    b, n, h, d = shape
    dv = d if dv is None else dv
    g = torch.Generator().manual_seed(seed)
    if non_contiguous:  # q, k, v as views of one fused projection, as the FLatten layer makes them
        qkv = torch.randn(b, n, 3, h, max(d, dv), generator=g, dtype=torch.float64)
        q, k, v = qkv[..., 0, :, :d], qkv[..., 1, :, :d], qkv[..., 2, :, :dv]
    else:  # m: a key set of another length than the queries'
        q = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
        k = torch.randn(b, m or n, h, d, generator=g, dtype=torch.float64)
        v = torch.randn(b, m or n, h, dv, generator=g, dtype=torch.float64)
    q, k, v = (t.to(dtype).double() for t in (q, k, v))
    c = (torch.rand(h, d, generator=g, dtype=torch.float64) + 0.5) if scale else None
    grad = torch.randn(b, n, h, dv, generator=g, dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)] + [None if c is None else c.clone().requires_grad_()]
    ref = focused_linear_attention_reference(*ref_in[:3], channel_scale=ref_in[3])
    ref.backward(grad)
    refs = [ref.detach(), *(t.grad for t in ref_in if t is not None)]
    errors = {}
    for name, fn in (("triton", focused_linear_attention_triton), ("torch", _focused_native)):
        ins = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
        ins.append(None if c is None else c.to(device).float().requires_grad_())
        if name == "triton":
            out = fn(*ins[:3], 3.0, channel_scale=ins[3])
        else:
            out = fn(*ins[:3], focusing_factor=3.0, channel_scale=ins[3])
        assert out.dtype == dtype and out.shape == ref.shape
        out.backward(grad.to(device, dtype))
        got = [out.detach(), *(t.grad for t in ins if t is not None)]
        errors[name] = [_rel(x, r) for x, r in zip(got, refs, strict=True)]
    floor = FLOOR[dtype]
    bound = [
        (4 * floor if i == 4 else floor) if dtype == torch.float32 else 2 * e + floor
        for i, e in enumerate(errors["torch"])
    ]
    bad = {
        i: f"{e:.2e} > {bnd:.2e}"
        for i, (e, bnd) in enumerate(zip(errors["triton"], bound, strict=True))
        if not e <= bnd
    }
    assert not bad, (shape, dtype, non_contiguous, bad)
    return errors


def check_focused_op_paths(device):
    """The op through the dispatcher (registered autograd, as ``torch.compile`` / export see it) equals the eager
    bypass bitwise, and its registrations (schema, fake, autograd) pass ``torch.library.opcheck``."""
    from visionlin.kernels.triton import focus as tf

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 13, 3, 8, generator=g).to(device) for _ in range(3))
    c = (torch.rand(24, generator=g) + 0.5).to(device)
    grad = torch.randn(2, 13, 3, 8, generator=g).to(device)
    results = []
    for call in (tf._focused_linear_fwd_call, tf.focused_linear_fwd):
        ins = [t.clone().requires_grad_() for t in (q, k, v, c)]
        out = call(*ins, 3.0, 1e-6)
        out.backward(grad)
        results.append([out.detach(), *(t.grad for t in ins)])
    for a, b in zip(*results, strict=True):
        # equal up to the order of float32 atomic adds (the state's key splits, the scale gradient's token blocks),
        # which may differ between two runs of the same kernels on a GPU; bitwise on the CPU (the interpreter)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.library.opcheck(tf.focused_linear_fwd, (q, k, v, c.clone().requires_grad_(), 3.0, 1e-6))
    torch.library.opcheck(tf.focused_linear_bwd, (q, k, v, c, grad, 3.0, 1e-6, True))
    torch.library.opcheck(tf.focused_linear_fwd, (q, k, v, None, 2.0, 1e-4))
    # what the op keeps for the backward: its inputs, nothing it computed (features, output, float32 state)
    from interpreter_utils import saved_for_backward

    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    scale = (c.view(3, 8) + 0.0).requires_grad_()
    saved = saved_for_backward(tf.focused_linear_attention_triton, *ins, 3.0, channel_scale=scale)
    assert sorted(saved, key=str) == sorted([(tuple(t.shape), t.dtype) for t in ins] + [((24,), c.dtype)], key=str), (
        saved
    )


def check_focused_keep(device):
    """``TUNING["keep_features"]``: the op that keeps the features and the state from the forward gives what the
    recomputing op gives (bitwise on the CPU, up to the order of float32 atomic adds on a GPU), through the dispatcher
    as through the eager bypass; it keeps exactly its inputs, the two feature tensors and the float32 state; its
    registrations pass ``torch.library.opcheck``."""
    from interpreter_utils import saved_for_backward

    from benchmarks._timing import tuned
    from visionlin.kernels.triton import focus as tf

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 13, 3, 8, generator=g).to(device) for _ in range(3))
    k, v = k[:, :11], v[:, :11, :, :6]  # another key count and value width: a view, strided
    scale = (torch.rand(3, 8, generator=g) + 0.5).to(device)
    grad = torch.randn(2, 13, 3, 6, generator=g).to(device)
    results = []
    for keep, call in ((False, None), (True, None), (True, tf.focused_linear_keep_fwd)):
        ins = [t.clone().requires_grad_() for t in (q, k, v, scale)]
        with tuned(tf.TUNING, keep_features=keep):
            if call is None:
                out = tf.focused_linear_attention_triton(*ins[:3], 3.0, channel_scale=ins[3])
            else:  # the op through the dispatcher (as torch.compile sees it)
                out = call(*ins[:3], ins[3].view(24), 3.0, 1e-6)[0]
        out.backward(grad)
        results.append([out.detach(), *(t.grad for t in ins)])
    exact = device == "cpu"
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            if exact:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    with tuned(tf.TUNING, keep_features=True):
        saved = saved_for_backward(tf.focused_linear_attention_triton, *ins, 3.0, channel_scale=scale)
    bd, bdv = tf._pad_dims(8, 6)
    want = [(tuple(t.shape), t.dtype) for t in (q, k, v)] + [((24,), torch.float32)]
    want += [(tuple(q.shape), q.dtype), (tuple(k.shape), k.dtype), ((2 * 3, bd * bdv + bd + bdv), torch.float32)]
    assert sorted(saved, key=str) == sorted(want, key=str), saved
    torch.library.opcheck(tf.focused_linear_keep_fwd, (q, k, v, scale.view(24).clone().requires_grad_(), 3.0, 1e-6))
    torch.library.opcheck(tf.focused_linear_keep_fwd, (q, k, v, None, 2.0, 1e-4))
    fq, fk, state = tf.focused_linear_keep_fwd(q, k, v, None, 2.0, 1e-4)[1:]
    torch.library.opcheck(tf.focused_linear_bwd, (q, k, v, None, grad, 2.0, 1e-4, False, fq, fk, state))
    with pytest.raises(ValueError, match="keep_features"), tuned(tf.TUNING, keep_features=2):
        tf.focused_linear_attention_triton(q, k, v, 3.0)
    # without a backward to follow (no_grad, or no input asking for a gradient) nothing is kept
    keep_call, tf._focused_linear_keep_call = tf._focused_linear_keep_call, None  # a call would raise TypeError
    try:
        with tuned(tf.TUNING, keep_features=True):
            with torch.no_grad():
                out = tf.focused_linear_attention_triton(q.requires_grad_(), k, v, 3.0, channel_scale=scale)
            assert torch.equal(out, results[0][0]) and not out.requires_grad
            out = tf.focused_linear_attention_triton(q.detach(), k, v, 3.0, channel_scale=scale)
            assert torch.equal(out, results[0][0])
    finally:
        tf._focused_linear_keep_call = keep_call


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from tests.test_kernels_triton_focus import check_focus, check_focused_keep, check_focused_op
    from tests.test_kernels_triton_focus import check_focused_op_paths
    for dtype in (torch.float32, torch.float16):
        check_focus((2, 9, 3, 16), dtype, "cpu")
        check_focus((1, 5, 2, 24), dtype, "cpu", p=1.5, scale=False, zero_token=True)
    check_focus((2, 7, 6, 16), torch.float32, "cpu", p=4.0, std=30.0, non_contiguous=True)
    check_focus((2, 7, 3, 8), torch.float32, "cpu", heads_strided=True)
    from benchmarks._timing import tuned
    from visionlin.kernels.triton import focus as tf
    with tuned(tf.TUNING, fwd_tokens=1, bwd_tokens=2, bwd_programs=1):  # token blocks walked one after another
        check_focus((2, 9, 3, 16), torch.float32, "cpu")
    for prefetch in (False, True):  # the forward walking too, with and without the next tile loaded ahead
        with tuned(tf.TUNING, fwd_tokens=2, bwd_tokens=2, fwd_programs=1, bwd_programs=1, prefetch=prefetch):
            check_focus((2, 9, 3, 16), torch.float32, "cpu")
            check_focus((1, 9, 2, 8), torch.float16, "cpu", non_contiguous=True)
    check_focused_op((2, 37, 3, 16), torch.float32, "cpu")
    check_focused_op((1, 23, 2, 16), torch.float32, "cpu", m=41)
    check_focused_op((1, 45, 2, 20), torch.float32, "cpu", non_contiguous=True, scale=False, dv=24)
    check_focused_op((1, 70, 2, 32), torch.float16, "cpu", non_contiguous=True)
    check_focused_op_paths("cpu")
    check_focused_keep("cpu")
    print("interpreter ok")
    """
)


def test_interpreter_focus_matches_reference():
    """The focusing kernels' math and the one-op focused linear attention on the CPU (Triton's interpreter), float32
    and float16."""
    run_in_interpreter(_INTERPRETER_SCRIPT, timeout=600)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("fwd_tokens", 3, "must be a power of two"),
        ("bwd_tokens", 0, "must be an integer >= 1 or None"),
        ("fwd_elements", 0, "must be an integer >= 1"),
        ("bwd_elements", 1024.0, "must be an integer >= 1"),
        ("warp_elements", 0, "must be an integer >= 1"),
        ("warp_elements", 384, "must be a power of two"),
        ("bwd_warp_elements", True, "must be an integer >= 1"),
        ("bwd_programs", -1, "must be an integer >= 1"),
        ("fwd_programs", "8", "must be an integer >= 1 or None"),
        ("prefetch", "no", "must be True or False"),
    ],
)
def test_bad_tuning_is_refused(key, value, message):
    """A launch setting that would divide by zero, fail inside a launch or read a string as on is refused before
    anything runs, naming the key and the value (checked on the CPU: the launch arithmetic is plain Python)."""
    from benchmarks._timing import tuned
    from visionlin.kernels.triton import focus as tf

    with tuned(tf.TUNING, **{key: value}), pytest.raises(ValueError, match=message) as e:
        tf._meta(3, 16, 9, backward=False)
        tf._meta(3, 16, 9, backward=True)
        tf._setting("bwd_programs")
        tf._setting("fwd_programs", allow_none=True)
        tf._prefetch()
    assert repr(key) in str(e.value) and repr(value) in str(e.value)


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(3, 197, 6, 64), (1, 3136, 3, 32), (2, 49, 12, 64), (1, 65536, 2, 32)])
def test_triton_focus(shape, dtype):
    check_focus(shape, dtype, "cuda")
    check_focus(shape, dtype, "cuda", p=2.0, scale=False, zero_token=True, non_contiguous=True)
    check_focus(shape, dtype, "cuda", heads_strided=True)


#: launch settings besides the shipped one: the narrow tiles before stop 41, the largest tiles and most warps the sweep
#: (benchmarks/focus_op.py) times, one token per tile, many backward programs (more float32 atomics into dc)
SETTINGS = {
    "narrow": {"fwd_tokens": 8, "bwd_tokens": 4, "warp_elements": 128, "bwd_warp_elements": 128, "prefetch": False},
    "no_prefetch": {"prefetch": False},
    "wide": {"fwd_elements": 4096, "bwd_elements": 4096, "warp_elements": 512, "bwd_warp_elements": 256},
    "one_token": {"fwd_tokens": 1, "bwd_tokens": 1, "warp_elements": 64, "bwd_warp_elements": 64},
    "many_programs": {"bwd_elements": 1024, "bwd_programs": 32},
    "prefetch": {"fwd_programs": 8, "prefetch": True},
    "prefetch_small_tiles": {"fwd_elements": 512, "bwd_elements": 512, "fwd_programs": 16, "prefetch": True},
    "walk_no_prefetch": {"fwd_programs": 4, "prefetch": False},
}


@gpu
@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("shape", [(3, 3136, 1, 64), (2, 197, 5, 64), (4, 49, 8, 64), (2, 784, 6, 32)])
def test_triton_focus_settings(shape, setting, monkeypatch):
    """Every launch setting the sweep times computes the map and its gradients (float32, bf16), at FLatten-PVT /
    Swin / DeiT channel counts. The launch arithmetic sees one SM, so every setting that walks (the backward, the
    forward with ``fwd_programs``) walks several tiles per program at these small batches, prefetching or not."""
    from benchmarks._timing import tuned
    from visionlin.kernels.triton import focus as tf

    monkeypatch.setattr(tf, "_num_sms", lambda device: 1)
    with tuned(tf.TUNING, **SETTINGS[setting]):
        check_focus(shape, torch.float32, "cuda")
        check_focus(shape, torch.bfloat16, "cuda", non_contiguous=True)


@gpu
def test_triton_focus_large_magnitudes_half():
    check_focus((2, 197, 6, 64), torch.float16, "cuda", std=300.0)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "shape", [(3, 197, 6, 64), (1, 3136, 3, 32), (2, 49, 4, 80), (1, 65536, 2, 32), (1, 197, 2, 128)]
)
def test_triton_focused_op(shape, dtype):
    """The one-op focused linear attention forward and backward at the issue's awkward shapes (65k tokens, head dims
    32 / 64 / 80 / 128, batch 1 and 3), contiguous and as views of one fused projection."""
    check_focused_op(shape, dtype, "cuda")
    check_focused_op(shape, dtype, "cuda", non_contiguous=True, scale=False)
    check_focused_op(shape, dtype, "cuda", m=shape[1] // 2 + 3)


@gpu
def test_triton_focused_op_paths():
    check_focused_op_paths("cuda")


@gpu
def test_triton_focused_keep_paths():
    check_focused_keep("cuda")


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(3, 197, 6, 64), (1, 65536, 2, 32)])
def test_triton_focused_op_keeping_features(shape, dtype):
    """``TUNING["keep_features"]``: the op that keeps the features and the state against float64."""
    from benchmarks._timing import tuned
    from visionlin.kernels.triton import focus as tf

    with tuned(tf.TUNING, keep_features=True):
        check_focused_op(shape, dtype, "cuda")
        check_focused_op(shape, dtype, "cuda", non_contiguous=True, scale=False)
