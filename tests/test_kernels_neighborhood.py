"""Neighborhood attention: the reference against a brute-force dense computation, windows, gradients, backends.

Tolerances: float64 comparisons use 1e-10 (the same sums in another order); float32 against NATTEN 1e-5.
"""

from __future__ import annotations

import itertools
import math
import re
import types
import warnings

import pytest
import torch

from visionlin.kernels import (
    get_op,
    neighborhood_attention,
    neighborhood_attention_qkv,
    neighborhood_attention_reference,
    neighborhood_indices,
)
from visionlin.kernels import neighborhood as na
from visionlin.layers import NeighborhoodAttention


# Brute force ----------------------------------------------------------------------------------------------------------
def _natten_window(i: int, length: int, k: int, d: int) -> list[int]:
    """NATTEN's neighbours of ``i`` (valid when ``k * d <= length``), written as NATTEN v0.17 computes them."""
    g, ip = i % d, i // d
    group_len = math.ceil((length - g) / d)
    start = max(ip - k // 2, 0) + (ip + k // 2 >= group_len) * (group_len - ip - k // 2 - 1)
    return [(start + a) * d + g for a in range(k)]


def _window(i: int, length: int, k: int, d: int) -> tuple[list[int], int]:
    """Neighbours and effective dilation under the documented small-axis rule."""
    if k >= length:
        return list(range(length)), 1
    d = min(d, length // k)
    return _natten_window(i, length, k, d), d


def _dense(q, k, v, kernel, dilation, rpb=None, scale=None, extra_k=None, extra_v=None):
    """Dense attention over all tokens with a -inf mask outside each query's window, float64."""
    nd = q.ndim - 3
    spatial = q.shape[1 : 1 + nd]
    b, h, dim = q.shape[0], q.shape[-2], q.shape[-1]
    positions = list(itertools.product(*[range(n) for n in spatial]))
    n = len(positions)
    bias = torch.full((h, n, n), float("-inf"), dtype=torch.float64)
    for qi, qp in enumerate(positions):
        windows = [_window(qp[a], spatial[a], kernel[a], dilation[a]) for a in range(nd)]
        for ki, kp in enumerate(positions):
            if all(kp[a] in windows[a][0] for a in range(nd)):
                if rpb is None:
                    bias[:, qi, ki] = 0.0
                else:
                    idx = tuple((kp[a] - qp[a]) // windows[a][1] + kernel[a] - 1 for a in range(nd))
                    bias[:, qi, ki] = rpb[(slice(None), *idx)].double()
    scale = dim**-0.5 if scale is None else scale
    qf, kf, vf = (t.double().reshape(b, n, h, -1) for t in (q, k, v))
    s = torch.einsum("bnhd,bmhd->bhnm", qf, kf) * scale + bias
    values = vf
    if extra_k is not None:
        s = torch.cat([s, torch.einsum("bnhd,behd->bhne", qf, extra_k.double()) * scale], dim=-1)
        values = torch.cat([vf, extra_v.double()], dim=1)
    out = torch.einsum("bhnm,bmhe->bnhe", s.softmax(-1), values)
    return out.reshape(*q.shape[:-1], v.shape[-1])


# (spatial, kernel, dilation): borders, dilation groups, per-axis values, and axes smaller than kernel x dilation.
CASES = [
    ((13,), (5,), (2,)),
    ((9,), (3,), (1,)),
    ((5,), (7,), (2,)),  # kernel > axis: whole axis
    ((9, 11), (5, 5), (1, 2)),
    ((7, 7), (7, 7), (1, 1)),
    ((6, 10), (3, 3), (3, 3)),
    ((4, 6), (7, 7), (1, 1)),  # smaller than the kernel: global
    ((10, 10), (3, 3), (8, 8)),  # dilation capped at 10 // 3 = 3
    ((12, 5), (5, 3), (2, 4)),  # capped on one axis only
    ((4, 5, 6), (3, 3, 3), (1, 1, 2)),
    ((3, 4, 9), (3, 5, 3), (1, 1, 4)),
]
IDS = ["x".join(map(str, s)) + f"_k{'-'.join(map(str, k))}_d{'-'.join(map(str, d))}" for s, k, d in CASES]


def _qkv(spatial, heads=2, dim=4, dv=3, batch=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, *spatial, heads, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, *spatial, heads, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, *spatial, heads, dv, generator=g, dtype=dtype)
    return q, k, v


def _rpb(kernel, heads=2, seed=1):
    return torch.randn(heads, *(2 * ks - 1 for ks in kernel), generator=torch.Generator().manual_seed(seed)).double()


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "rpb"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_matches_dense_brute_force(case, bias):
    spatial, kernel, dilation = case
    q, k, v = _qkv(spatial)
    rpb = _rpb(kernel) if bias else None
    out = neighborhood_attention_reference(q, k, v, kernel, dilation, rpb=rpb, scale=0.7)
    torch.testing.assert_close(out, _dense(q, k, v, kernel, dilation, rpb, scale=0.7), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[6], CASES[9]], ids=[IDS[0], IDS[3], IDS[6], IDS[9]])
def test_additional_keys_join_the_softmax(case):
    spatial, kernel, dilation = case
    q, k, v = _qkv(spatial)
    g = torch.Generator().manual_seed(5)
    ek, ev = torch.randn(2, 3, 2, 4, generator=g).double(), torch.randn(2, 3, 2, 3, generator=g).double()
    rpb = _rpb(kernel)
    out = neighborhood_attention(q, k, v, kernel, dilation, rpb=rpb, additional_keys=ek, additional_values=ev)
    expected = _dense(q, k, v, kernel, dilation, rpb, extra_k=ek, extra_v=ev)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_indices_match_natten_wherever_natten_runs():
    """Our clamped-start formula equals NATTEN's for every (length, kernel, dilation) NATTEN accepts, and every window
    holds k distinct positions of the query's dilation group, the query among them; bias indices stay in range."""
    for length in range(1, 24):
        for kernel in (1, 3, 5, 7):
            for dilation in range(1, 6):
                nb, bi = neighborhood_indices(length, kernel, dilation)
                eff = min(kernel, length)
                assert nb.shape == bi.shape == (length, eff)
                assert int(bi.min()) >= 0 and int(bi.max()) <= 2 * kernel - 2
                for i in range(length):
                    row = nb[i].tolist()
                    window, d = _window(i, length, kernel, dilation)
                    assert row == window, (length, kernel, dilation, i)
                    assert len(set(row)) == eff and i in row and all((n - i) % d == 0 for n in row)
                    if kernel * dilation <= length:
                        assert row == _natten_window(i, length, kernel, dilation)


def test_effective_window_rule():
    assert na.effective_window(56, 7, 8) == (7, 8)  # DiNAT stage 1 at 224 px: unchanged
    assert na.effective_window(16, 7, 8) == (7, 2)  # the same layer at 64 px: dilation 16 // 7
    assert na.effective_window(10, 7, 4) == (7, 1)
    assert na.effective_window(4, 7, 1) == (4, 1)  # smaller than the kernel: the whole axis
    assert na.effective_window(7, 7, 2) == (7, 1)


@pytest.mark.parametrize(
    "length,kernel,dilation,match",
    [
        (4, 3, -1, r"dilation=-1 must be an integer >= 1"),  # gave index 5 on a length-4 axis
        (4, 3, 0, r"dilation=0 must be"),  # ZeroDivisionError
        (4, 0, 1, r"kernel_size=0 must be"),
        (-2, 3, 1, r"length=-2 must be an integer >= 0"),
        (4, 4, 1, r"kernel_size=4 must be odd"),
        (4, 3, 1.5, r"dilation=1.5 must be an integer"),
        (4.0, 3, 1, r"length=4.0 must be an integer"),
        (4, True, 1, r"kernel_size=True must be an integer"),
    ],
)
def test_window_helpers_refuse_bad_arguments(length, kernel, dilation, match):
    for fn in (na.effective_window, neighborhood_indices):
        with pytest.raises(ValueError, match=match):
            fn(length, kernel, dilation)
    nb, bi = neighborhood_indices(0, 3, 1)  # an empty axis has no neighbours
    assert nb.shape == bi.shape == (0, 0)


@pytest.mark.parametrize(
    "spatial,kernel,dilation",
    [((7,), (3,), (2,)), ((5, 4), (3, 3), (1, 2)), ((3, 5), (5, 3), (1, 1)), ((2, 3, 4), (1, 3, 3), (1, 1, 2))],
    ids=["1d", "2d", "2d_small", "3d"],
)
def test_gradcheck_float64(spatial, kernel, dilation):
    q, k, v = _qkv(spatial, heads=2, dim=3, dv=2, batch=1)
    rpb = _rpb(kernel)
    ek = torch.randn(1, 2, 2, 3, dtype=torch.float64)
    ev = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, rpb, ek, ev)]

    def fn(q, k, v, rpb, ek, ev):
        return neighborhood_attention_reference(
            q, k, v, kernel, dilation, rpb=rpb, additional_keys=ek, additional_values=ev
        )

    assert torch.autograd.gradcheck(fn, inputs)


def test_trains_in_float32_on_cpu():
    """Backward through the public op (automatic backend: the reference on CPU) reaches q, k, v and the bias."""
    q, k, v = (t.float().requires_grad_() for t in _qkv((8, 9), dtype=torch.float32))
    rpb = _rpb((5, 5)).float().requires_grad_()
    neighborhood_attention(q, k, v, 5, 2, rpb=rpb).square().mean().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in (q, k, v, rpb))


def test_half_precision_inputs_keep_their_dtype():
    q, k, v = _qkv((6, 7), dtype=torch.float32)
    rpb = _rpb((3, 3)).float()
    ref = neighborhood_attention(q, k, v, 3, rpb=rpb)
    out = neighborhood_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 3, rpb=rpb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_dropout_only_when_asked():
    q, k, v = _qkv((6, 6), dtype=torch.float32)
    a = neighborhood_attention(q, k, v, 3)
    torch.testing.assert_close(neighborhood_attention(q, k, v, 3), a)
    torch.manual_seed(0)
    dropped = neighborhood_attention(q, k, v, 3, dropout_p=0.5)
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, a)


def test_large_grid_without_quadratic_memory():
    """A 128 x 128 grid (N = 16384: a dense N x N float mask would take 1 GiB) runs through the gather reference."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 128, 128, 1, 8, generator=g) for _ in range(3))
    with torch.no_grad():
        out = neighborhood_attention(q, k, v, 7, 2, rpb=torch.zeros(1, 13, 13))
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_empty_batch():
    q, k, v = _qkv((5, 6), batch=0, dtype=torch.float32)
    assert neighborhood_attention(q, k, v, 3).shape == (0, 5, 6, 2, 3)


# NATTEN ---------------------------------------------------------------------------------------------------------------
def _natten_or_skip():
    natten = na._natten_module()
    if natten is None:
        pytest.skip("natten is not installed")
    return natten


@pytest.mark.parametrize(
    "spatial,kernel,dilation",
    [((13,), 5, 2), ((9, 11), 5, (1, 2)), ((15, 18), 7, 2), ((4, 5, 7), 3, (1, 1, 2))],
    ids=["1d", "2d", "2d_dil", "3d"],
)
def test_reference_matches_natten_forward(spatial, kernel, dilation):
    """NATTEN's own result (its CPU Flex path, forward only) for shapes NATTEN accepts, no bias."""
    natten = _natten_or_skip()
    q, k, v = _qkv(spatial, heads=2, dim=8, dv=8, batch=1, dtype=torch.float32)
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(spatial)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Flex without torch.compile warns that it is unfused
        theirs = fn(q, k, v, kernel_size=kernel, dilation=dilation)
    ours = neighborhood_attention_reference(q, k, v, kernel, dilation)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_automatic_backend_is_the_chunked_reference_on_cpu():
    q, k, v = _qkv((6, 6), dtype=torch.float32)
    op = get_op("neighborhood_attention")
    assert list(op.backends) == ["natten", "triton", "flex", "chunked", "reference"]
    chosen = op.select(q, k, v, (3, 3), (1, 1), rpb=None, scale=None, dropout_p=0.0, backend=None)
    assert chosen.name == "chunked"  # the reference's math in bounded memory
    with pytest.raises(NotImplementedError, match=r"backend 'natten' cannot run this call: .*(natten|libnatten)"):
        neighborhood_attention(q, k, v, 3, backend="natten")


def _fake_natten(version="0.21.7", libnatten=True):
    calls = []

    def na2d(q, k, v, **kwargs):
        calls.append(kwargs)
        return v.clone()

    return types.SimpleNamespace(__version__=version, HAS_LIBNATTEN=libnatten, na1d=None, na2d=na2d, na3d=None), calls


def _reasons(monkeypatch, module, *, rpb=False, dtype=torch.float32, dim=8, grad=False, dropout=0.0):
    monkeypatch.setattr(na, "_natten_module", lambda: module)
    q, k, v = (t.to(dtype).requires_grad_(grad) for t in _qkv((6, 6), heads=2, dim=dim, dv=dim))
    bias = torch.zeros(2, 5, 5, dtype=torch.float32) if rpb else None
    return na._natten_supports(q, k, v, (3, 3), (1, 1), rpb=bias, dropout_p=dropout)


def test_natten_supports_reasons(monkeypatch):
    assert _reasons(monkeypatch, None) == [
        "natten is not installed (pip install natten, with libnatten for CUDA kernels)"
    ]
    old, _ = _fake_natten("0.17.5")
    assert "older than 0.20" in _reasons(monkeypatch, old)[0]
    nolib, _ = _fake_natten(libnatten=False)
    assert any("has no libnatten" in r for r in _reasons(monkeypatch, nolib))
    fake, _ = _fake_natten()
    joined = "; ".join(_reasons(monkeypatch, fake, rpb=True, dim=12, dtype=torch.float64, grad=True, dropout=0.1))
    for words in (
        "no relative positional bias",
        "no attention dropout",
        "need CUDA tensors, got cpu",
        "no backward on CPU",
        "dtype torch.float64",
        "multiples of 8 for natten, got D=12",
    ):
        assert words in joined, (words, joined)
    # On CPU the only remaining reason for a plain float32 call is the device.
    assert _reasons(monkeypatch, fake) == ["libnatten's kernels need CUDA tensors, got cpu"]


def test_natten_backend_passes_the_effective_window(monkeypatch):
    """The natten call gets the window NATTEN accepts (kernel / dilation clamped to the grid) and our default scale."""
    fake, calls = _fake_natten()
    monkeypatch.setattr(na, "_natten_module", lambda: fake)
    q, k, v = _qkv((5, 16), dim=8, dv=8, dtype=torch.float32)
    na._natten(q, k, v, (7, 7), (1, 8))
    assert calls[0]["kernel_size"] == (5, 7) and calls[0]["dilation"] == (1, 2)
    assert calls[0]["scale"] == 8**-0.5


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool], ids=str)
def test_every_backend_names_a_non_floating_dtype(dtype):
    q, k, v = (t.to(dtype) for t in _qkv((5, 5)))
    op = get_op("neighborhood_attention")
    for backend in op.backends:
        with pytest.raises(ValueError, match="must be floating point"):
            neighborhood_attention(q, k, v, 3, backend=backend)
        reasons = op.supports(q, k, v, (3, 3), (1, 1), backend=backend)
        if na._natten_module() is not None or backend in ("chunked", "reference"):
            assert any(str(dtype) in r for r in reasons), (backend, reasons)


# Bad input ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kernel_size=4), r"kernel_size=4 must be odd"),
        (dict(kernel_size=0), r"kernel_size=0 must be an odd integer >= 1"),
        (dict(kernel_size=(3, 3, 3)), r"kernel_size=\(3, 3, 3\) must be .* tuple of 2"),
        (dict(dilation=0), r"dilation=0 must be an integer >= 1"),
        (dict(dilation=1.5), r"dilation=1.5 must be an integer"),
        (dict(scale=float("nan")), r"scale=nan must be a finite real number"),
        (dict(dropout_p=1.0), r"dropout_p=1.0 must be"),
        (dict(rpb=torch.zeros(2, 7, 7)), r"rpb of shape \(2, 7, 7\) does not fit heads=2 and kernel_size=\(3, 3\)"),
        (dict(additional_keys=torch.zeros(2, 1, 2, 4)), r"additional_keys and additional_values together"),
        (
            dict(additional_keys=torch.zeros(2, 1, 3, 4), additional_values=torch.zeros(2, 1, 3, 3)),
            r"additional_keys \(2, 1, 3, 4\)",
        ),
    ],
)
def test_bad_arguments(kwargs, match):
    q, k, v = _qkv((6, 6), dtype=torch.float32)
    args = dict(kernel_size=3, dilation=1) | kwargs
    with pytest.raises(ValueError, match=match):
        neighborhood_attention(q, k, v, **args)


def test_bad_tensors():
    q, k, v = _qkv((6, 6), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"expected heads-last tensors of one rank"):
        neighborhood_attention(q[0, 0], k[0, 0], v[0, 0], 3)
    with pytest.raises(ValueError, match=r"must share batch, spatial size and heads"):
        neighborhood_attention(q, k[:, :5], v, 3)
    with pytest.raises(ValueError, match=r"query and key head dims differ"):
        neighborhood_attention(q, k[..., :2], v, 3)
    with pytest.raises(ValueError, match=r"must be floating point"):
        neighborhood_attention(q.long(), k, v, 3)
    with pytest.raises(ValueError, match=r"every spatial size must be >= 1"):
        neighborhood_attention(q[:, :0], k[:, :0], v[:, :0], 3)


# Packed q, k, v -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spatial", "kernel", "dilation"), [((11,), 5, 2), ((6, 7), 3, (1, 2)), ((4, 5, 3), (3, 3, 1), 1)], ids=str
)
def test_qkv_packed_matches_the_split_call(spatial, kernel, dilation):
    """``neighborhood_attention_qkv(qkv)`` is ``neighborhood_attention(*qkv.unbind(-3))``: output and every gradient
    (the packed one against the split call's three), 1-D / 2-D / 3-D, with the bias table."""
    torch.manual_seed(0)
    nd, heads = len(spatial), 2
    qkv = torch.randn(2, *spatial, 3, heads, 8, dtype=torch.float64, requires_grad=True)
    ks = (kernel,) * nd if isinstance(kernel, int) else kernel
    rpb = torch.randn(heads, *(2 * k - 1 for k in ks), dtype=torch.float64, requires_grad=True)
    out = neighborhood_attention_qkv(qkv, kernel, dilation, rpb=rpb, scale=0.3)
    grad = torch.randn_like(out)
    dqkv, drpb = torch.autograd.grad(out, (qkv, rpb), grad)
    split = qkv.detach().clone().requires_grad_()
    ref = neighborhood_attention(*split.unbind(-3), kernel, dilation, rpb=rpb, scale=0.3)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close((dqkv, drpb), torch.autograd.grad(ref, (split, rpb), grad))


def test_qkv_packed_bad_input():
    qkv = torch.randn(1, 4, 4, 3, 2, 8)
    with pytest.raises(ValueError, match="qkv must be a torch.Tensor, got list"):
        neighborhood_attention_qkv([qkv], 3)
    for bad in (qkv[..., :2, :, :], qkv[0, 0], torch.randn(1, 4, 4, 4, 4, 3, 2, 8)):
        shape = re.escape(str(tuple(bad.shape)))
        with pytest.raises(ValueError, match=r"qkv must be \[B, \*spatial, 3, H, D\].*" + shape):
            neighborhood_attention_qkv(bad, 3)
    with pytest.raises(ValueError, match=r"neighborhood_attention_qkv \(q, k, v = qkv.unbind\(-3\)\): kernel_size=2 "):
        neighborhood_attention_qkv(qkv, 2)  # the split call's checks too (even kernel), named as this call
    with pytest.raises(ValueError, match=r"neighborhood_attention_qkv .*: q, k and v must be floating point"):
        neighborhood_attention_qkv(qkv.long(), 3)
    with pytest.raises(NotImplementedError, match="neighborhood_attention_qkv .*triton"):
        neighborhood_attention_qkv(qkv, 3, backend="triton")  # (no CUDA here: named reasons)


def test_layer_takes_the_packed_call_without_prefix_or_qk_norm(monkeypatch):
    """Without prefix tokens or q / k norms the layer hands its projection's output to ``neighborhood_attention_qkv``
    packed (one gradient in the Triton backward); the result is the split call's."""
    import visionlin.layers.neighborhood as layer_mod

    torch.manual_seed(0)
    layer = NeighborhoodAttention(16, num_heads=2, kernel_size=3, dilation=(1, 2)).eval()
    x = torch.randn(2, 5 * 6, 16)
    calls = []
    assert layer_mod.FAST_PATHS["qkv_packed"]  # shipped on since s50
    packed = layer_mod.neighborhood_attention_qkv
    monkeypatch.setattr(layer_mod, "neighborhood_attention_qkv", lambda *a, **kw: calls.append(a) or packed(*a, **kw))
    out = layer(x, (5, 6))
    assert len(calls) == 1 and calls[0][0].shape == (2, 5, 6, 3, 2, 8)
    q, k, v = layer.qkv(x).unflatten(-1, (3, 2, 8)).unbind(2)
    grid = neighborhood_attention_reference(*(t.unflatten(1, (5, 6)) for t in (q, k, v)), (3, 3), (1, 2), rpb=layer.rpb)
    torch.testing.assert_close(out, layer.proj(grid.flatten(1, 2).flatten(2)), rtol=1e-5, atol=1e-6)
    normed = NeighborhoodAttention(16, num_heads=2, kernel_size=3, qk_norm=True).eval()
    normed(x, (5, 6))
    layer(torch.randn(2, 1 + 5 * 6, 16), (5, 6), num_prefix_tokens=1)
    assert len(calls) == 1  # q / k norms or prefix tokens: the split call
    monkeypatch.setitem(layer_mod.FAST_PATHS, "qkv_packed", False)  # switched off: the split call, the same result
    torch.testing.assert_close(layer(x, (5, 6)), out, rtol=1e-6, atol=1e-6)
    assert len(calls) == 1


# Layer ----------------------------------------------------------------------------------------------------------------
def test_layer_prefix_tokens():
    """Grid tokens attend to their window plus the prefix tokens; prefix tokens attend to everything."""
    torch.manual_seed(0)
    layer = NeighborhoodAttention(16, num_heads=2, kernel_size=3, dilation=(1, 2)).eval()
    x = torch.randn(2, 1 + 5 * 6, 16)
    out = layer(x, (5, 6), num_prefix_tokens=1)
    q, k, v = layer.qkv(x).unflatten(-1, (3, 2, 8)).unbind(2)  # [B, N, H, D] each
    grid = neighborhood_attention_reference(
        *(t[:, 1:].unflatten(1, (5, 6)) for t in (q, k, v)),
        (3, 3),
        (1, 2),
        rpb=layer.rpb,
        additional_keys=k[:, :1],
        additional_values=v[:, :1],
    ).flatten(1, 2)
    prefix = torch.softmax(torch.einsum("bhd,bmhd->bhm", q[:, 0] * 8**-0.5, k), -1)
    prefix = torch.einsum("bhm,bmhd->bhd", prefix, v)[:, None]
    expected = layer.proj(torch.cat([prefix, grid], dim=1).flatten(2))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_layer_rpb_resize_and_checks():
    small = NeighborhoodAttention(8, num_heads=2, kernel_size=7)
    big = NeighborhoodAttention(8, num_heads=2, kernel_size=11)
    adapted = big.adapt_state_dict(small.state_dict())
    assert adapted["rpb"].shape == (2, 21, 21)
    big.load_state_dict(adapted)
    assert "rpb" not in dict(NeighborhoodAttention(8, num_heads=2, rel_pos_bias=False).named_parameters())
    with pytest.raises(ValueError, match=r"kernel_size=6 must be an odd integer"):
        NeighborhoodAttention(8, num_heads=2, kernel_size=6)
    with pytest.raises(ValueError, match=r"dilation=\(1, 0\)"):
        NeighborhoodAttention(8, num_heads=2, dilation=(1, 0))
    with pytest.raises(ValueError, match=r"do not match num_prefix_tokens=0 \+ H\*W"):
        small(torch.randn(1, 10, 8), (3, 3))
