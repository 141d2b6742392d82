"""Kernels vs their specifications: softmax, linear (3 normalisations), focused (FLatten), InfSA; and dispatch.

Each linear-time reference is checked against the materialised O(N^2) weight matrix it claims to compute, forward and
backward (input gradients), in float64 so that the comparison is exact up to rounding (rtol 1e-9). Fast paths (SDPA)
are checked against the reference in fp32 (rtol 1e-5) and bf16 / fp16 (rtol/atol 2e-2).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import visionlin
from visionlin.kernels import (
    efficient_attention,
    focused_linear_attention,
    get_op,
    linear_attention,
    linear_attention_reference,
    linear_infsa_attention,
    pure_infsa_attention,
    softmax_attention,
    softmax_attention_reference,
)
from visionlin.kernels.focused import focus
from visionlin.kernels.linear import apply_feature_map

# (batch, tokens, heads, head_dim): batch 1 and 3, N = 49 (7x7), 197 (cls + 14x14), 63 (7x9), odd head dims
SHAPES = [(1, 49, 2, 32), (3, 197, 3, 64), (2, 63, 1, 80), (1, 50, 2, 128)]


def _qkv(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(3)]


def _check_fwd_bwd(fn_a, fn_b, shape, rtol=1e-9, atol=1e-10, dtype=torch.float64):
    qa = _qkv(shape, dtype)
    qb = [t.detach().clone().requires_grad_() for t in qa]
    out_a, out_b = fn_a(*qa), fn_b(*qb)
    torch.testing.assert_close(out_a, out_b, rtol=rtol, atol=atol)
    w = torch.randn_like(out_a)
    (out_a * w).sum().backward()
    (out_b * w).sum().backward()
    for ta, tb in zip(qa, qb, strict=True):
        torch.testing.assert_close(ta.grad, tb.grad, rtol=rtol * 10, atol=atol * 10)


def _apply_weights(w, v):
    """w [B, H, N, M], v [B, M, H, Dv] -> [B, N, H, Dv]."""
    return torch.einsum("bhnm,bmhe->bnhe", w, v)


# Linear attention ----------------------------------------------------------------------------------------------------
def _linear_materialised(q, k, v, feature_map, normalize, scale, eps=1e-6):
    fq, fk = apply_feature_map(q, feature_map), apply_feature_map(k, feature_map)
    m = k.shape[1]
    a = torch.einsum("bnhd,bmhd->bhnm", fq, fk) * scale / m  # a_ij = s phi(q_i).phi(k_j) / M
    if normalize == "divide":
        w = a / (a.sum(-1, keepdim=True) + eps)
    elif normalize == "subtract":
        w = a - a.mean(-1, keepdim=True) + 1.0 / m
    else:
        w = a * m
    return _apply_weights(w, v)


# "divide" is only meaningful with non-negative feature maps (signed scores can cancel to a zero denominator).
LINEAR_CASES = [
    (fm, norm)
    for norm in ("divide", "subtract", "none")
    for fm in ("identity", "relu", "elu", "sigmoid", "cosine")
    if not (norm == "divide" and fm in ("identity", "cosine"))
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("feature_map,normalize", LINEAR_CASES)
def test_linear_equals_materialised(shape, feature_map, normalize):
    scale = shape[-1] ** -0.5 if normalize == "subtract" else 1.0
    _check_fwd_bwd(
        lambda q, k, v: linear_attention(q, k, v, feature_map=feature_map, normalize=normalize),
        lambda q, k, v: _linear_materialised(q, k, v, feature_map, normalize, scale),
        shape,
    )


def test_subtract_rows_sum_to_one():
    q, k, _ = _qkv((2, 30, 2, 16))
    v = torch.ones(2, 30, 2, 1, dtype=torch.float64)  # output = row sum of the weights
    out = linear_attention(q, k, v, feature_map="identity", normalize="subtract")
    torch.testing.assert_close(out, torch.ones_like(out))


def test_linear_cross_attention_lengths():
    q = torch.randn(2, 10, 2, 8)
    k, v = torch.randn(2, 17, 2, 8), torch.randn(2, 17, 2, 4)
    assert linear_attention(q, k, v).shape == (2, 10, 2, 4)


# Softmax -------------------------------------------------------------------------------------------------------------
def _softmax_materialised(q, k, v):
    w = (torch.einsum("bnhd,bmhd->bhnm", q, k) * q.shape[-1] ** -0.5).softmax(-1)
    return _apply_weights(w, v)


@pytest.mark.parametrize("shape", SHAPES)
def test_softmax_reference(shape):
    _check_fwd_bwd(softmax_attention_reference, _softmax_materialised, shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-2)], ids=["fp32", "bf16", "fp16"]
)
def test_softmax_sdpa_vs_reference(shape, dtype, tol):
    q, k, v = (t.detach().to(dtype) for t in _qkv(shape))
    ref = softmax_attention(q.float(), k.float(), v.float(), backend="reference")
    out = softmax_attention(q, k, v, backend="sdpa")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    if dtype == torch.float32:
        _check_fwd_bwd(
            lambda a, b, c: softmax_attention(a, b, c, backend="sdpa"),
            lambda a, b, c: softmax_attention(a, b, c, backend="reference"),
            shape,
            rtol=1e-5,
            atol=1e-5,
            dtype=torch.float32,
        )


# Focused (FLatten) ---------------------------------------------------------------------------------------------------
def _raw_focus(x, p, cs=None, eps=1e-6, joint=True):
    """The focusing map as the authors write it (no rescaling): ||t|| * t**p / ||t**p||, t = (relu(x) + eps) / cs."""
    t = F.relu(x) + eps
    t = t if cs is None else t / cs
    dims = (-2, -1) if joint else (-1,)
    return t.pow(2).sum(dims, keepdim=True).sqrt() * t**p / (t**p).pow(2).sum(dims, keepdim=True).sqrt()


def _focused_materialised(q, k, v, p, cs, eps=1e-6, joint=True):
    fq, fk = _raw_focus(q, p, cs, eps, joint), _raw_focus(k, p, cs, eps, joint)
    a = torch.einsum("bnhd,bmhd->bhnm", fq, fk) / k.shape[1]
    return _apply_weights(a / (a.sum(-1, keepdim=True) + eps), v)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("joint", [True, False])
def test_focused_equals_materialised(shape, joint):
    cs = torch.rand(shape[2], shape[3], dtype=torch.float64) + 0.5
    _check_fwd_bwd(
        lambda q, k, v: focused_linear_attention(q, k, v, focusing_factor=3, channel_scale=cs, joint_heads=joint),
        lambda q, k, v: _focused_materialised(q, k, v, 3, cs, joint=joint),
        shape,
    )


@pytest.mark.parametrize("joint", [True, False])
def test_focus_equals_the_raw_formula_forward_and_backward(joint):
    """`focus` divides each token by its largest entry first; with D = 8 many tokens have one dominant entry, where
    ||t**p|| rounds to exactly 1 (a clamp there once dropped that norm's gradient)."""
    _check_fwd_bwd(
        lambda q, k, v: focus(q, 3.0, channel_scale=k[0, 0].abs() + 0.5, joint_heads=joint) * v,
        lambda q, k, v: _raw_focus(q, 3.0, k[0, 0].abs() + 0.5, joint=joint) * v,
        (2, 300, 1, 8),
    )


def test_focus_preserves_norm():
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0] = -1.0  # an all-negative head: relu gives zeros, the eps keeps the map defined
    f = focus(x, 3.0, eps=1e-6, joint_heads=False)
    assert torch.isfinite(f).all()
    torch.testing.assert_close(f.norm(dim=-1), (F.relu(x) + 1e-6).norm(dim=-1))


# InfSA ---------------------------------------------------------------------------------------------------------------
def _infsa_linear_materialised(q, k, v, rho, eps=1e-6):
    d = q.shape[-1]
    e = (q / d**0.5).norm(dim=-1)  # [B, N, H]
    w = e / (e.sum(1, keepdim=True) + eps)
    q_bar = torch.einsum("bnh,bnhd->bhd", w, q / d**0.5)
    a = F.relu(torch.einsum("bhd,bmhd->bhm", q_bar, k / d**0.5))
    a = a / (a.sum(-1, keepdim=True) + eps)
    weights = a[:, :, None, :].expand(-1, -1, q.shape[1], -1)  # rank 1: the same row for every query
    return rho * _apply_weights(weights, v)


def _infsa_per_query_materialised(q, k, v, rho, eps=1e-6):
    d = q.shape[-1]
    a = torch.einsum("bnhd,bmhd->bhnm", F.relu(q), F.relu(k)) / d
    return rho * _apply_weights(a / (a.sum(-1, keepdim=True) + eps), v)


def _infsa_pure_materialised(q, k, v, rho, eps=1e-6):
    a = F.relu(torch.einsum("bnhd,bmhd->bhnm", q, k) / q.shape[-1])
    fro = a.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt()
    return rho * _apply_weights(a / (fro + eps), v)


@pytest.mark.parametrize("shape", SHAPES)
def test_linear_infsa_equals_materialised(shape):
    _check_fwd_bwd(
        lambda q, k, v: linear_infsa_attention(q, k, v, rho=0.9),
        lambda q, k, v: _infsa_linear_materialised(q, k, v, 0.9),
        shape,
    )
    _check_fwd_bwd(
        lambda q, k, v: linear_infsa_attention(q, k, v, rho=0.9, per_query=True),
        lambda q, k, v: _infsa_per_query_materialised(q, k, v, 0.9),
        shape,
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_pure_infsa_equals_materialised(shape):
    rho = torch.rand(shape[2], dtype=torch.float64)  # one rho per head
    _check_fwd_bwd(
        lambda q, k, v: pure_infsa_attention(q, k, v, rho=rho),
        lambda q, k, v: _infsa_pure_materialised(q, k, v, rho[:, None]),
        shape,
    )


def test_linear_infsa_output_is_token_independent():
    q, k, v = (t.detach() for t in _qkv((2, 20, 2, 8)))
    out = linear_infsa_attention(q, k, v, rho=0.9)
    torch.testing.assert_close(out, out[:, :1].expand_as(out))
    assert not torch.allclose(linear_infsa_attention(q, k, v, rho=0.9, per_query=True)[:, 0], out[:, 1])


# Half precision at long sequence lengths ---------------------------------------------------------------------------
LONG = 32768


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "op",
    [
        lambda q, k, v: linear_attention(q, k, v, feature_map="elu"),
        lambda q, k, v: linear_attention(q, k, v, feature_map="identity", normalize="subtract"),
        lambda q, k, v: efficient_attention(q, k, v),
        lambda q, k, v: focused_linear_attention(q, k, v),
        lambda q, k, v: linear_infsa_attention(q, k, v, rho=0.9),
        lambda q, k, v: linear_infsa_attention(q, k, v, rho=0.9, per_query=True),
    ],
    ids=["elu-divide", "inline-subtract", "efficient", "focused", "infsa", "infsa-per-query"],
)
def test_long_sequence_half_precision_no_overflow(op, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, LONG, 1, 32, generator=g) * 4 for _ in range(3))
    ref = op(q, k, v)
    out = op(q.to(dtype), k.to(dtype), v.to(dtype))
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2 * ref.abs().max().item())


# Dispatch and bad input ----------------------------------------------------------------------------------------------
def test_dispatch_errors():
    q = k = v = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        linear_attention(q, k, v, backend="nope")
    with pytest.raises(NotImplementedError, match="dtype torch.int64 is not floating point"):
        get_op("linear_attention")(q.long(), k.long(), v.long(), backend="reference")
    with pytest.raises(ValueError, match="normalize='bad'"):
        linear_attention(q, k, v, normalize="bad")
    with pytest.raises(ValueError, match="feature_map='bad'"):
        linear_attention_reference(q, k, v, feature_map="bad")
    with pytest.raises(ValueError, match=r"q.shape=torch.Size\(\[1, 4, 8\]\)"):
        softmax_attention(q[:, :, 0], k, v)
    with pytest.raises(ValueError, match="head counts differ"):
        linear_attention(q, torch.randn(1, 4, 2, 8), v)
    with pytest.raises(ValueError, match="focusing_factor=0"):
        focused_linear_attention(q, k, v, focusing_factor=0)
    # public functions that run on another op name themselves in its messages (they named the inner op only)
    from visionlin.kernels import linear_infsa_attention
    from visionlin.kernels.gated_norm import layer_norm

    with pytest.raises(NotImplementedError, match=r"^linear_infsa_attention \(op linear_infsa_context\): backend"):
        linear_infsa_attention(q, k, v, backend="triton")  # (CPU tensors: triton refuses them)
    with pytest.raises(ValueError, match=r"^layer_norm: weight of shape \(3,\) must be \[C\] = \(8,\)"):
        layer_norm(q, weight=torch.randn(3))
    with pytest.raises(ValueError, match=r"^layer_norm: eps=-1.0 must be a finite real number > 0.0"):
        layer_norm(q, eps=-1.0)


def test_set_backend_is_per_instance():
    a = visionlin.create_attn("softmax", 32, 2)
    b = visionlin.create_attn("softmax", 32, 2)
    assert visionlin.set_backend(a, "reference") == 1
    assert a.backend == "reference" and b.backend is None
    with pytest.raises(ValueError, match="unknown backend"):
        visionlin.set_backend(a, "bogus")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(a(x, (4, 4)), b(x, (4, 4)), rtol=1e-5, atol=1e-6)


def test_linear_reference_is_fp32_under_autocast():
    q, k, v = (torch.randn(1, 16, 1, 8) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_attention_reference(q, k, v)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, linear_attention_reference(q, k, v))


# Native-precision ("torch") backends vs the references ---------------------------------------------------------------
NATIVE_OPS = {
    "linear-elu-divide": lambda q, k, v, b: linear_attention(q, k, v, feature_map="elu", backend=b),
    "linear-relu-divide": lambda q, k, v, b: linear_attention(q, k, v, feature_map="relu", backend=b),
    "inline-subtract": lambda q, k, v, b: linear_attention(
        q, k, v, feature_map="identity", normalize="subtract", backend=b
    ),
    "cosine-none": lambda q, k, v, b: linear_attention(q, k, v, feature_map="cosine", normalize="none", backend=b),
    "focused": lambda q, k, v, b: focused_linear_attention(
        q, k, v, channel_scale=torch.full(q.shape[-2:], 0.7, dtype=q.dtype), backend=b
    ),
    "infsa-pure": lambda q, k, v, b: pure_infsa_attention(
        q, k, v, rho=torch.tensor([0.8, 0.9, 0.7])[: q.shape[2]], backend=b
    ),
    "infsa-per-query": lambda q, k, v, b: linear_infsa_attention(q, k, v, rho=0.9, per_query=True, backend=b),
}
# Forward: max error relative to the reference's largest magnitude. Backward: norm-relative error ||g - g_ref|| /
# ||g_ref||; the q/k gradients of normalised forms can be ill-conditioned (for pure InfSA at (2, 63, 1, 80) a 4e-3
# relative perturbation of the inputs moves the float64 reference's q/k gradients by 5%), so the bf16 bound is the
# conditioning floor that bf16 inputs imply, not the arithmetic's.
NATIVE_TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (3e-2, 6e-2), torch.float16: (5e-3, 1e-2)}


@pytest.mark.parametrize("shape", [*SHAPES, (1, 3136, 2, 32)])  # + a 56 x 56 stage-1 grid
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("op", sorted(NATIVE_OPS))
def test_native_backend_vs_reference(op, dtype, shape):
    fn = NATIVE_OPS[op]
    fwd_tol, bwd_tol = NATIVE_TOL[dtype]
    # Both paths see the same (rounded) inputs: the test isolates the backend's arithmetic.
    nat_in = [t.detach().to(dtype).requires_grad_() for t in _qkv(shape, seed=2)]
    ref_in = [t.detach().float().requires_grad_() for t in nat_in]
    ref = fn(*ref_in, "reference")
    out = fn(*nat_in, "torch")
    assert out.dtype == dtype
    scale = ref.abs().max()
    assert ((out.float() - ref).abs().max() / scale).item() <= fwd_tol
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
    (ref * w).sum().backward()
    (out.float() * w).sum().backward()
    for a, b in zip(nat_in, ref_in, strict=True):
        err = ((a.grad.float() - b.grad).norm() / b.grad.norm().clamp_min(1e-12)).item()
        assert err <= bwd_tol, f"gradient error {err:.2e} > {bwd_tol}"


def test_native_is_the_automatic_choice_and_refuses_mixed_dtypes():
    q = torch.randn(1, 8, 1, 4)
    assert get_op("linear_attention").select(q, q, q).name == "torch"
    reasons = get_op("linear_attention").supports(q, q.half(), q, backend="torch")
    assert reasons == ["mixed dtypes torch.float32, torch.float16, torch.float32"]
    assert get_op("linear_attention").select(q, q.half(), q).name == "reference"
    assert get_op("linear_infsa_context").select(q, q, q).name == "torch"  # float32 math on any input dtype
    assert get_op("linear_infsa_attention").select(q, q, q, per_query=True).name == "torch"


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1.5e-2), (torch.float16, 3e-3)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n,mu", [(196, 1.0), (4096, 1.0), (16384, 8.0)])
def test_subtract_native_no_cancellation_with_mean_shifted_inputs(n, mu, dtype, tol):
    """InLine's weights cancel two large terms when q, k have a mean; the native path must not lose precision there
    (same rounded inputs for both paths, so only the backend's arithmetic is measured)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = ((torch.randn(1, n, 2, 64, generator=g) + mu).to(dtype) for _ in range(3))
    ref = linear_attention(q.float(), k.float(), v.float(), feature_map="identity", normalize="subtract")
    out = linear_attention(q, k, v, feature_map="identity", normalize="subtract", backend="torch")
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() <= tol


def test_pure_infsa_native_fp16_does_not_overflow():
    g = torch.Generator().manual_seed(0)
    q = k = torch.randn(1, 4096, 1, 64, generator=g) * 0.3 + 1
    v = torch.randn(1, 4096, 1, 64, generator=g) + 10  # A V exceeds float16, A V / ||A||_F does not
    ref = pure_infsa_attention(q, k, v, rho=0.9, backend="reference")
    out = pure_infsa_attention(q.half(), k.half(), v.half(), rho=0.9, backend="torch")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_unnormalised_half_precision_is_inf_only_where_the_output_is(dtype):
    """``normalize="none"`` with a small ``scale``: the key-side state of 16k keys of values about 4 is past float16's
    range while the output (about 52) is not; the native backend once gave inf everywhere (its state in the inputs'
    dtype). Where the true output is past the range, the output is inf of the right sign, not NaN."""
    g = torch.Generator().manual_seed(0)
    n = 16384
    q, k = (torch.randn(1, n, 1, 4, generator=g).to(dtype) for _ in range(2))
    v = (torch.randn(1, n, 1, 4, generator=g) + 4).to(dtype)
    ref = linear_attention(q.double(), k.double(), v.double(), normalize="none", scale=1 / n, backend="reference")
    out = linear_attention(q, k, v, normalize="none", scale=1 / n, backend="torch")
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 4 * torch.finfo(dtype).eps
    big = torch.full((1, 4096, 1, 4), 1e3, dtype=torch.float16)
    out = linear_attention(big, big, -big, normalize="none", backend="torch")  # true value -1.6e13: past float16
    assert out.isinf().all() and (out < 0).all()


# eps and scales where they matter ------------------------------------------------------------------------------------
# On unit-variance inputs every eps above is ~1e-6 of its denominator and the 1/D of pure InfSA cancels in the
# Frobenius normalisation: a wrong eps or scale moves the output by ~1e-7, inside the float64 tolerance above (two
# planted bugs went unnoticed that way). Here the inputs are shrunk until each term is a large part of its
# denominator; `_sensitive` proves the test would see a wrong value, and every backend must match the materialised
# formula in float64, forward and backward.
def _scaled_qkv(shape, c, seed=0):
    q, k, v = _qkv(shape, seed=seed)
    return [(q * c).detach().requires_grad_(), (k * c).detach().requires_grad_(), v]


def _check_on(fn_a, fn_b, tensors, rtol=1e-9, atol=1e-12):
    ta = [t.detach().clone().requires_grad_() for t in tensors]
    tb = [t.detach().clone().requires_grad_() for t in tensors]
    out_a, out_b = fn_a(*ta), fn_b(*tb)
    torch.testing.assert_close(out_a, out_b, rtol=rtol, atol=atol * out_b.abs().max().item())
    w = torch.randn(out_a.shape, generator=torch.Generator().manual_seed(1), dtype=out_a.dtype)
    (out_a * w).sum().backward()
    (out_b * w).sum().backward()
    for a, b in zip(ta, tb, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol * 10, atol=atol * 10 * b.grad.abs().max().item())


def _sensitive(out, other, minimum=0.05):
    """The test distinguishes ``out`` from the output of a wrong eps / scale ``other`` by >= ``minimum`` (relative)."""
    assert ((out - other).abs().max() / out.abs().max()).item() >= minimum


EPS_SHAPE = (2, 49, 2, 16)


@pytest.mark.parametrize("eps", [1e-6, 1e-4])
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("feature_map", ["relu", "elu", "sigmoid"])
def test_linear_divide_eps_where_it_matters(feature_map, backend, eps):
    # relu: tiny inputs; elu / sigmoid: inputs far below zero (features exp(x), sigmoid(x) ~ 1e-4)
    t = _scaled_qkv(EPS_SHAPE, 1e-3) if feature_map == "relu" else _qkv(EPS_SHAPE)
    if feature_map != "relu":
        t = [(t[0] - 9).detach().requires_grad_(), (t[1] - 9).detach().requires_grad_(), t[2]]
    exact = _linear_materialised(*t, feature_map, "divide", 1.0, eps=eps)
    _sensitive(exact, _linear_materialised(*t, feature_map, "divide", 1.0, eps=eps * 2))
    _check_on(
        lambda q, k, v: linear_attention(q, k, v, feature_map=feature_map, eps=eps, backend=backend),
        lambda q, k, v: _linear_materialised(q, k, v, feature_map, "divide", 1.0, eps=eps),
        t,
    )
    # A scale s != 1 weighs against eps: s * sum_j a_ij / (s * sum_j a_ij + eps).
    _check_on(
        lambda q, k, v: linear_attention(q, k, v, feature_map=feature_map, scale=0.1, backend=backend),
        lambda q, k, v: _linear_materialised(q, k, v, feature_map, "divide", 0.1),
        t,
    )


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_focused_eps_where_it_matters(backend, eps):
    """eps enters twice (after the ReLU and in the denominator); checked against the raw formula (not `focus`)."""

    def raw_focus(x, p, eps):
        x = F.relu(x) + eps
        return x.pow(2).sum((-2, -1), keepdim=True).sqrt() * x**p / (x**p).pow(2).sum((-2, -1), keepdim=True).sqrt()

    def materialised(q, k, v, eps):
        a = torch.einsum("bnhd,bmhd->bhnm", raw_focus(q, 3.0, eps), raw_focus(k, 3.0, eps)) / k.shape[1]
        return _apply_weights(a / (a.sum(-1, keepdim=True) + eps), v)

    t = _scaled_qkv(EPS_SHAPE, 3e-4)
    _sensitive(materialised(*t, eps), materialised(*t, eps * 2))
    _check_on(
        lambda q, k, v: focused_linear_attention(q, k, v, eps=eps, backend=backend),
        lambda q, k, v: materialised(q, k, v, eps),
        t,
    )


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_per_query_infsa_eps_where_it_matters(backend):
    """The reference divides SUMS by (sum + eps); the native path divides means, with eps / M."""
    t = _scaled_qkv(EPS_SHAPE, 1e-3)
    exact = _infsa_per_query_materialised(*t, 0.9)
    _sensitive(exact, _infsa_per_query_materialised(*t, 0.9, eps=1e-6 / EPS_SHAPE[1]))  # eps applied to means
    _check_on(
        lambda q, k, v: linear_infsa_attention(q, k, v, rho=0.9, per_query=True, backend=backend),
        lambda q, k, v: _infsa_per_query_materialised(q, k, v, 0.9),
        t,
    )


def test_pooled_infsa_eps_where_it_matters():
    t = _scaled_qkv(EPS_SHAPE, 1e-3)
    _sensitive(_infsa_linear_materialised(*t, 0.9), _infsa_linear_materialised(*t, 0.9, eps=2e-6))
    _check_on(
        lambda q, k, v: linear_infsa_attention(q, k, v, rho=0.9),
        lambda q, k, v: _infsa_linear_materialised(q, k, v, 0.9),
        t,
    )


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_pure_infsa_scale_and_eps_where_they_matter(backend):
    """relu(Q K^T / D) / (||.||_F + eps): the 1/D only shows once ||.||_F is comparable to eps."""
    t = _scaled_qkv(EPS_SHAPE, 1e-3)
    d = EPS_SHAPE[-1]
    exact = _infsa_pure_materialised(*t, 0.9)
    _sensitive(exact, _infsa_pure_materialised(t[0] * d**0.5, t[1], t[2], 0.9))  # 1/sqrt(D) instead of 1/D
    _sensitive(exact, _infsa_pure_materialised(*t, 0.9, eps=2e-6))
    _check_on(
        lambda q, k, v: pure_infsa_attention(q, k, v, rho=0.9, backend=backend),
        lambda q, k, v: _infsa_pure_materialised(q, k, v, 0.9),
        t,
    )
