"""Selective scan and (bidirectional) gated linear attention: the parallel references against naive float64 loops,
stability at large step sizes and long sequences, float64 gradcheck, bad input.

Tolerances: float64 inputs agree with the loops to 1e-10 (the algorithms differ only in summation order); float32 to
about 1e-5 relative to the output's scale (measured 1e-6 to 8e-6 over L <= 4096).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visionlin.kernels import (
    bidirectional_gated_linear_attention,
    bidirectional_gated_linear_attention_qkv,
    gated_linear_attention,
    get_op,
    linear_scan_reference,
    list_ops,
    selective_scan,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def naive_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Mamba's ``selective_scan_ref`` loop, float64, sequence-major: ``(y [B, L, D], last state [B, D, N])``."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()
    if delta_softplus:
        delta = F.softplus(delta)
    b, length, d = u.shape
    n = A.shape[1]
    if B.ndim == 3:
        B, C = B[:, :, None].expand(b, length, d, n), C[:, :, None].expand(b, length, d, n)
    else:
        B, C = B.repeat_interleave(d // B.shape[2], 2), C.repeat_interleave(d // C.shape[2], 2)
    h = torch.zeros(b, d, n, dtype=torch.float64)
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * B[:, t]
        ys.append((h * C[:, t]).sum(-1))
    y = torch.stack(ys, 1) if ys else u.new_zeros(b, 0, d)
    if D is not None:
        y = y + u * D.double()
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


def naive_gla(q, k, v, g, scale, reverse=False):
    """fla's ``naive_recurrent_gla`` loop, float64, heads-last."""
    q, k, v, g = (t.double() for t in (q, k, v, g))
    if reverse:
        q, k, v, g = (t.flip(1) for t in (q, k, v, g))
    b, length, h, dk = q.shape
    state = torch.zeros(b, h, dk, v.shape[-1], dtype=torch.float64)
    out = []
    for t in range(length):
        state = torch.exp(g[:, t])[..., None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, state))
    o = torch.stack(out, 1)
    return o.flip(1) if reverse else o


def _scan_inputs(b, length, d, n, groups=None, dtype=torch.float32, dt_shift=0.0, seed=0):
    g = _gen(seed)
    bc_shape = (b, length, n) if groups is None else (b, length, groups, n)
    return dict(
        u=torch.randn(b, length, d, generator=g, dtype=dtype),
        delta=(torch.randn(b, length, d, generator=g) + dt_shift).to(dtype),
        A=-torch.exp(torch.randn(d, n, generator=g)).to(dtype),
        B=torch.randn(*bc_shape, generator=g, dtype=dtype),
        C=torch.randn(*bc_shape, generator=g, dtype=dtype),
        D=torch.randn(d, generator=g, dtype=dtype),
        z=torch.randn(b, length, d, generator=g, dtype=dtype),
        delta_bias=torch.randn(d, generator=g, dtype=dtype),
    )


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


# Selective scan ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [1, 5, 63, 64, 65, 200])
@pytest.mark.parametrize("chunk_size", [2, 7, 16, 64])
def test_selective_scan_matches_loop_float64(length, chunk_size):
    x = _scan_inputs(2, length, 6, 4, dtype=torch.float64)
    y, last = selective_scan(**x, delta_softplus=True, return_last_state=True, chunk_size=chunk_size)
    y_ref, last_ref = naive_selective_scan(**x, delta_softplus=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, last_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("groups", [None, 1, 3])
@pytest.mark.parametrize("optional", ["none", "D", "z", "bias", "all"])
def test_selective_scan_options_float32(groups, optional):
    x = _scan_inputs(3, 97, 6, 5, groups=groups)
    keep = {"none": (), "D": ("D",), "z": ("z",), "bias": ("delta_bias",), "all": ("D", "z", "delta_bias")}[optional]
    for name in ("D", "z", "delta_bias"):
        if name not in keep:
            x[name] = None
    softplus = optional != "none"
    if not softplus:
        x["delta"] = x["delta"].abs()  # a step size is >= 0
    y = selective_scan(**x, delta_softplus=softplus, chunk_size=16)
    assert y.dtype == torch.float32
    assert _rel(y, naive_selective_scan(**x, delta_softplus=softplus)[0]) < 1e-5


def test_selective_scan_half_precision_inputs_compute_in_float32():
    x = _scan_inputs(2, 50, 4, 3)
    half = {k: v.to(torch.bfloat16) if k in ("u", "delta", "B", "C", "z") else v for k, v in x.items()}
    y = selective_scan(**half, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    ref = naive_selective_scan(**{k: v.float() for k, v in half.items()}, delta_softplus=True)[0]
    assert _rel(y, ref) < 1e-2  # bf16 rounding of the output only


@pytest.mark.parametrize("dt_shift", [0.0, 5.0, 10.0])
def test_selective_scan_stable_at_large_steps_float32(dt_shift):
    """Steps up to ~10 after softplus with |A| up to 16: per-step decays down to exp(-160), which make the
    cumulative-sum-and-divide formulations overflow; here every exponent is a sum of log-decays (<= 0)."""
    x = _scan_inputs(2, 1000, 8, 16, dt_shift=dt_shift)
    x["A"] = -torch.arange(1, 17, dtype=torch.float32).repeat(8, 1)  # S4D-real, as Mamba initialises it
    y = selective_scan(**x, delta_softplus=True, chunk_size=64)
    assert torch.isfinite(y).all()
    assert _rel(y, naive_selective_scan(**x, delta_softplus=True)[0]) < 1e-5


def test_selective_scan_long_sequence_float32():
    """L = 65536 (three chunk levels at chunk 64): finite, and the final state equals the float64 loop's."""
    x = _scan_inputs(1, 65536, 2, 2, seed=3)
    x["delta"] = x["delta"] * 0.05  # small steps: the state remembers far back, so errors would accumulate
    y, last = selective_scan(**x, delta_softplus=True, return_last_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(last).all()
    y_ref, last_ref = naive_selective_scan(**x, delta_softplus=True)
    assert _rel(y, y_ref) < 1e-4
    assert _rel(last, last_ref) < 1e-4


def test_selective_scan_gradients_finite_at_large_steps():
    x = _scan_inputs(1, 300, 4, 8, dt_shift=10.0)
    x = {k: v.requires_grad_() for k, v in x.items()}
    selective_scan(**x, delta_softplus=True).square().sum().backward()
    for name, t in x.items():
        assert t.grad is not None and torch.isfinite(t.grad).all(), name


def test_selective_scan_gradcheck_float64():
    x = _scan_inputs(2, 9, 3, 2, groups=None, dtype=torch.float64)
    names = list(x)

    def fn(*tensors):
        return selective_scan(**dict(zip(names, tensors, strict=True)), delta_softplus=True, chunk_size=4)

    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in x.values()))


def test_selective_scan_empty_sizes():
    x = _scan_inputs(0, 5, 3, 2)
    assert selective_scan(**x).shape == (0, 5, 3)
    x = _scan_inputs(2, 0, 3, 2)
    y, last = selective_scan(**x, return_last_state=True)
    assert y.shape == (2, 0, 3) and last.shape == (2, 3, 2) and not last.any()


def test_linear_scan_with_initial_state():
    g = _gen(4)
    a = -torch.rand(2, 150, 3, 2, generator=g, dtype=torch.float64) * 3
    x = torch.randn(2, 150, 3, 2, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, 3, 2, generator=g, dtype=torch.float64)
    h, ref = h0, []
    for t in range(150):
        h = torch.exp(a[:, t]) * h + x[:, t]
        ref.append(h)
    torch.testing.assert_close(linear_scan_reference(a, x, h0, chunk_size=8), torch.stack(ref, 1))


# Gated linear attention ----------------------------------------------------------------------------------------------
def _gla_inputs(b=2, length=37, h=3, dk=8, dv=5, dtype=torch.float32, gate_scale=1.0, seed=0):
    g = _gen(seed)
    return (
        torch.randn(b, length, h, dk, generator=g, dtype=dtype),
        torch.randn(b, length, h, dk, generator=g, dtype=dtype),
        torch.randn(b, length, h, dv, generator=g, dtype=dtype),
        (F.logsigmoid(torch.randn(b, length, h, dk, generator=g)) * gate_scale).to(dtype),
        (F.logsigmoid(torch.randn(b, length, h, dk, generator=g)) * gate_scale).to(dtype),
    )


@pytest.mark.parametrize("length", [1, 15, 16, 17, 100])
@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
def test_gla_matches_loop_float64(length, chunk_size):
    q, k, v, gf, gb = _gla_inputs(length=length, dtype=torch.float64)
    scale = 8**-0.5
    for reverse, g in ((False, gf), (True, gb)):
        out = gated_linear_attention(q, k, v, g, reverse=reverse, chunk_size=chunk_size)
        torch.testing.assert_close(out, naive_gla(q, k, v, g, scale, reverse), rtol=1e-10, atol=1e-10)
    both = bidirectional_gated_linear_attention(q, k, v, gf, gb, chunk_size=chunk_size)
    ref = (naive_gla(q, k, v, gf, scale) + naive_gla(q, k, v, gb, scale, reverse=True)) / 2
    torch.testing.assert_close(both, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gate_scale", [1 / 16, 1.0, 50.0])
def test_gla_stable_float32(gate_scale):
    """ViG's gates (logsigmoid / 16) up to strongly forgetting ones (decays down to exp(-50 * 5)) over 1000 tokens."""
    q, k, v, gf, gb = _gla_inputs(b=1, length=1000, h=2, gate_scale=gate_scale)
    out = bidirectional_gated_linear_attention(q, k, v, gf, gb, scale=0.3)
    assert torch.isfinite(out).all()
    ref = (naive_gla(q, k, v, gf, 0.3) + naive_gla(q, k, v, gb, 0.3, reverse=True)) / 2
    assert _rel(out, ref) < 1e-5


def test_gla_gradcheck_float64():
    inputs = tuple(t.requires_grad_() for t in _gla_inputs(b=1, length=7, h=2, dk=3, dv=2, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda q, k, v, gf, gb: bidirectional_gated_linear_attention(q, k, v, gf, gb, chunk_size=3), inputs
    )
    q, k, v, g, _ = inputs
    assert torch.autograd.gradcheck(lambda q, k, v, g: gated_linear_attention(q, k, v, g, chunk_size=4), (q, k, v, g))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gla_half_inputs_return_their_dtype(dtype):
    """Both GLA ops compute in float32 and return ``v``'s dtype, empty or not (the bidirectional reference returned
    float32: it had rebound ``v`` to its float32 copy before the final cast)."""
    q, k, v, gf, gb = (t.to(dtype) for t in _gla_inputs(b=1, length=9, h=2))
    ref = bidirectional_gated_linear_attention(*(t.double() for t in (q, k, v, gf, gb)))
    for b in (1, 0):
        args = [t[:b] for t in (q, k, v, gf, gb)]
        both = bidirectional_gated_linear_attention(*args)
        assert both.dtype == dtype and both.shape == args[2].shape
        assert gated_linear_attention(*args[:4]).dtype == dtype
    assert _rel(bidirectional_gated_linear_attention(q, k, v, gf, gb).double(), ref) < 1e-2


def test_gla_empty_batch():
    q, k, v, gf, gb = _gla_inputs(b=0)
    assert bidirectional_gated_linear_attention(q, k, v, gf, gb).shape == (0, 37, 3, 5)


# Ops, backends, bad input -------------------------------------------------------------------------------------------
def test_ops_registered_with_reference_backend():
    ops = list_ops()
    for name in ("selective_scan", "gated_linear_attention", "bidirectional_gated_linear_attention"):
        assert "reference" in ops[name]
    x = _scan_inputs(1, 4, 2, 2)
    selective_scan(**x, backend="reference")
    with pytest.raises(ValueError, match=r"unknown backend 'mamba_ssm'"):
        selective_scan(**x, backend="mamba_ssm")
    assert get_op("selective_scan").supports(x["u"].int(), x["delta"], x["B"], x["C"], None, backend="reference")


def _bad_scan(**changes):
    x = _scan_inputs(2, 10, 4, 3)
    kw = {"delta_softplus": True}
    for k, v in changes.items():
        (kw if k in ("delta_softplus", "return_last_state", "chunk_size", "check_values") else x)[k] = v
    return x, kw


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(u=torch.randn(2, 10)), r"u must be a tensor \[B, L, D\]"),
        (dict(u=torch.randint(0, 3, (2, 10, 4))), r"u must be real floating point, got u.dtype=torch.int64"),
        (dict(delta=torch.randn(2, 9, 4)), r"delta must be \[B, L, D\]=\(2, 10, 4\), got delta.shape=\(2, 9, 4\)"),
        (dict(A=torch.randn(5, 3)), r"A must be a tensor \[D, N\] with D=4"),
        (dict(A=torch.full((4, 3), 0.5)), r"every entry of A must be finite and <= 0.*12 of 12"),
        (dict(A=torch.full((4, 3), float("nan"))), r"every entry of A must be finite and <= 0"),
        (dict(B=torch.randn(2, 10, 2)), r"B must be \[B, L, N\]=\(2, 10, 3\), got B.shape=\(2, 10, 2\)"),
        (dict(C=torch.randn(2, 10, 3, 3)), r"C has G=3 groups, which must divide the D=4 channels"),
        (dict(D=torch.randn(5)), r"D must be \[D\]=\(4,\), got D.shape=\(5,\)"),
        (dict(z=torch.randn(2, 10, 5)), r"z must be \[B, L, D\]"),
        (dict(delta_bias=torch.randn(4).double().long()), r"delta_bias must be floating point"),
        (dict(delta_softplus="yes"), r"delta_softplus='yes' must be True or False"),
        (dict(chunk_size=1), r"chunk_size=1 must be an integer >= 2"),
        (dict(check_values="no"), r"check_values='no' must be True or False"),
    ],
)
def test_selective_scan_bad_input(changes, match):
    x, kw = _bad_scan(**changes)
    with pytest.raises(ValueError, match=match):
        selective_scan(**x, **kw)


def test_selective_scan_check_values_off_skips_the_value_read(monkeypatch):
    """``check_values=False`` skips the public function's read of ``A`` (a host sync per call on a GPU; the Triton
    backend reads nothing else; the reference, the CPU's backend, always checks); the MambaVision mixer passes it
    (its ``A = -exp(A_log)`` is <= 0 by construction)."""
    from visionlin.kernels import scan
    from visionlin.layers import MambaVisionMixer
    from visionlin.layers import mamba as mamba_layer

    reads = []
    check = scan._check_nonpositive
    monkeypatch.setattr(scan, "_check_nonpositive", lambda *a: reads.append(a[1]) or check(*a))
    x, kw = _bad_scan()
    selective_scan(**x, **kw)
    assert len(reads) == 2  # the public function's check, then the reference's own
    reads.clear()
    selective_scan(**x, **kw, check_values=False)
    assert len(reads) == 1  # the reference's own only
    seen = {}
    monkeypatch.setattr(mamba_layer, "selective_scan", lambda *a, **k: seen.update(k) or selective_scan(*a, **k))
    MambaVisionMixer(16, num_heads=2)(torch.randn(2, 9, 16), (3, 3))
    assert seen["check_values"] is False


def test_selective_scan_complex_not_supported():
    x, kw = _bad_scan(A=-torch.ones(4, 3, dtype=torch.complex64))
    with pytest.raises(NotImplementedError, match=r"complex A"):
        selective_scan(**x, **kw)


@pytest.mark.parametrize(
    ("index", "value", "match"),
    [
        (0, torch.randn(2, 37, 3), r"q must be a heads-last tensor \[B, L, H, D\]"),
        (1, torch.randn(2, 37, 3, 7), r"q and k must have one shape"),
        (2, torch.randn(2, 36, 3, 5), r"v must be \[B, L, H, V\] with q's B, L, H"),
        (3, torch.randn(2, 37, 3, 7), r"g_fwd must be \[B, L, H, K\]=\(2, 37, 3, 8\), got g_fwd.shape=\(2, 37, 3, 7\)"),
    ],
)
def test_gla_bad_input(index, value, match):
    args = list(_gla_inputs())
    args[index] = value
    with pytest.raises(ValueError, match=match):
        bidirectional_gated_linear_attention(*args)


def test_gla_bad_scalars():
    q, k, v, g, _ = _gla_inputs()
    with pytest.raises(ValueError, match=r"scale=inf must be a finite real number"):
        gated_linear_attention(q, k, v, g, scale=float("inf"))
    with pytest.raises(ValueError, match=r"chunk_size=-1 must be an integer >= 1"):
        gated_linear_attention(q, k, v, g, chunk_size=-1)
    with pytest.raises(ValueError, match=r"reverse=1 must be True or False"):
        gated_linear_attention(q, k, v, g, reverse=1)


# The packed call (ViG's projections' outputs as they are) ---------------------------------------------------------
def _packed(b=2, length=37, h=3, dk=8, dv=5, dtype=torch.float64, seed=0):
    """``qkv`` ``[B, L, H (2 dk + dv)]`` and ``gates`` ``[B, L, 2 H dk]`` (logsigmoid / 16), leaves."""
    g = _gen(seed)
    qkv = torch.randn(b, length, h * (2 * dk + dv), generator=g, dtype=dtype)
    gates = F.logsigmoid(torch.randn(b, length, 2 * h * dk, generator=g, dtype=dtype)) / 16
    return qkv.requires_grad_(), gates.requires_grad_()


def _split_call(qkv, gates, h, **kw):
    kw_ = gates.shape[-1] // 2
    q, k, v = (t.unflatten(-1, (h, -1)) for t in qkv.split([kw_, kw_, qkv.shape[-1] - 2 * kw_], -1))
    gf, gb = (t.unflatten(-1, (h, -1)) for t in gates.chunk(2, -1))
    return bidirectional_gated_linear_attention(q, k, v, gf, gb, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_gla_qkv_equals_the_split_call(dtype):
    """``bidirectional_gated_linear_attention_qkv`` is the split call of its views: the same output and packed
    gradients (the reference backend on the CPU: the same computation, bitwise), with a scale and a chunk size."""
    results = []
    for fn in (bidirectional_gated_linear_attention_qkv, _split_call):
        qkv, gates = _packed(dtype=dtype)
        out = fn(qkv, gates, 3, scale=0.3, chunk_size=8)
        out.double().square().sum().backward()
        results.append([out, qkv.grad, gates.grad])
    assert results[0][0].shape == (2, 37, 3, 5) and results[0][0].dtype == dtype
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gla_qkv_gradcheck_and_empty():
    qkv, gates = _packed(b=1, length=7, h=2, dk=3, dv=2)
    assert torch.autograd.gradcheck(
        lambda a, b: bidirectional_gated_linear_attention_qkv(a, b, 2, chunk_size=3), (qkv, gates)
    )
    qkv, gates = _packed(b=0)
    assert bidirectional_gated_linear_attention_qkv(qkv, gates, 3).shape == (0, 37, 3, 5)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.randn(2, 37, 3, 21), None, 3), r"qkv must be a tensor \[B, L, C\], got"),
        ((None, "gates", 3), r"gates must be a tensor \[B, L, C\], got"),
        ((None, torch.randn(2, 37), 3), r"gates must be a tensor \[B, L, C\], got"),
        ((None, None, 0), r"num_heads=0 must be an integer >= 1"),
        ((None, None, True), r"num_heads=True must be an integer >= 1"),
        ((None, None, 2.0), r"num_heads=2.0 must be an integer >= 1"),
        ((None, torch.randn(2, 36, 48), 3), r"qkv and gates must share B, L, got"),
        ((None, torch.randn(2, 37, 47), 3), r"gates width 47 \(K = 23.5\) and qkv width 63 \(V = 16\)"),
        ((None, torch.randn(2, 37, 44), 3), r"multiples of num_heads=3; got gates width 44 \(K = 22\)"),
        ((torch.randn(2, 37, 48), None, 3), r"qkv width 48 \(V = 0\)"),
        ((torch.randn(2, 37, 40), None, 3), r"qkv width 40 \(V = -8\)"),
        ((torch.randn(2, 37, 63).int(), None, 3), r"q, k and v must be floating point"),
    ],
)  # fmt: skip
def test_gla_qkv_bad_input(args, match):
    """Bad input is refused by name, as this function's call (never a shape error from the views)."""
    qkv, gates = _packed(h=3, dk=8, dv=5)
    qkv_, gates_, heads = args
    qkv_ = qkv if qkv_ is None else qkv_
    gates_ = gates if gates_ is None else gates_
    with pytest.raises(ValueError, match=r"bidirectional_gated_linear_attention_qkv.*" + match):
        bidirectional_gated_linear_attention_qkv(qkv_, gates_, heads)


def test_gla_qkv_named_backend_refusals():
    qkv, gates = _packed()
    with pytest.raises(ValueError, match=r"bidirectional_gated_linear_attention_qkv \(op bidirectional_gated_linear"):
        bidirectional_gated_linear_attention_qkv(qkv, gates, 3, backend="fla")
    with pytest.raises(NotImplementedError, match=r"backend 'triton' cannot run this call"):
        bidirectional_gated_linear_attention_qkv(qkv, gates, 3, backend="triton")
