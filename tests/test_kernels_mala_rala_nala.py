"""MALA, RALA and NaLa kernels and the 2-D RoPE: each reference vs its materialised O(N^2) form, half precision, RoPE.

The materialised forms build the ``N x M`` weight matrix from the papers' / authors' formulas with the RoPE written
independently as explicit per-token ``D x D`` block-diagonal rotation matrices, then multiply by V. They are compared
with the linear-time references in float64 (rtol 1e-9, atol 1e-10 forward; x10 for input gradients). Half-precision
inputs (bf16 / fp16, ~20000 tokens) must give finite outputs within 2e-2 (relative to the output's std) of the float32
result on the same rounded inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from golden_utils import fixture_names, load_fixture

from visionlin.kernels import (
    apply_rope_2d,
    get_op,
    magnitude_aware_linear_attention,
    magnitude_aware_linear_attention_reference,
    norm_aware_linear_attention,
    norm_aware_linear_attention_reference,
    rank_augmented_linear_attention,
    rank_augmented_linear_attention_reference,
    rope_2d_tables,
)

torch.set_num_threads(1)

F64 = torch.float64


# Independent RoPE: explicit rotation matrices -------------------------------------------------------------------------
def _rotation_matrices(feat_size, d, prefix=0, theta=10000.0):
    """``[prefix + H*W, D, D]``: channel pair ``(2m, 2m+1)`` of the token at row i, column j is rotated by the angle
    ``i * a_m`` (first D/2 channels) or ``j * a_(m - D/4)`` (last D/2), ``a = 1/theta**linspace(0, 1, D/4)``."""
    n4 = d // 4
    freqs = [1.0 / theta ** (m / (n4 - 1) if n4 > 1 else 0.0) for m in range(n4)]
    mats = [torch.eye(d, dtype=F64) for _ in range(prefix)]
    for i in range(feat_size[0]):
        for j in range(feat_size[1]):
            r = torch.zeros(d, d, dtype=F64)
            for m in range(d // 2):
                phase = i * freqs[m] if m < n4 else j * freqs[m - n4]
                c, s = torch.cos(torch.tensor(phase, dtype=F64)), torch.sin(torch.tensor(phase, dtype=F64))
                r[2 * m, 2 * m], r[2 * m, 2 * m + 1] = c, -s
                r[2 * m + 1, 2 * m], r[2 * m + 1, 2 * m + 1] = s, c
            mats.append(r)
    return torch.stack(mats)


def _rot(x, mats):
    """Rotate ``[B, N, H, D]`` by ``[N, D, D]`` matrices (identity when ``mats`` is None)."""
    return x if mats is None else torch.einsum("nde,bnhe->bnhd", mats, x)


def _elu1(x):
    return F.elu(x) + 1.0


def _apply(w, v):
    """w ``[B, H, N, M]``, v ``[B, M, H, Dv]`` -> ``[B, N, H, Dv]``."""
    return torch.einsum("bhnm,bmhe->bnhe", w, v)


def _dots(a, b):
    """``[B, N, H, D] x [B, M, H, D] -> [B, H, N, M]``."""
    return torch.einsum("bnhd,bmhd->bhnm", a, b)


# Materialised O(N^2) forms --------------------------------------------------------------------------------------------
def mala_materialised(q, k, v, mats=None, eps=1e-6):
    m, s = k.shape[1], q.shape[-1] ** -0.5
    fq, fk = _elu1(q), _elu1(k)
    z = s / m * _dots(fq, fk).sum(-1, keepdim=True)  # [B, H, N, 1] from un-rotated features
    w = (1 + 1 / (z + eps)) * s / m * _dots(_rot(fq, mats), _rot(fk, mats)) - z / m
    return _apply(w, v)


def rala_materialised(q, k, v, mats=None, eps=1e-6):
    m, s = k.shape[1], q.shape[-1] ** -0.5
    fq, fk = _elu1(q), _elu1(k)
    q_global = fq.mean(dim=1, keepdim=True)  # [B, 1, H, D]
    alpha = (s * _dots(q_global, fk)).softmax(dim=-1)  # [B, H, 1, M]
    kt = fk * alpha.squeeze(2).transpose(1, 2).unsqueeze(-1) * m  # [B, M, H, D]
    den = _dots(fq, kt).sum(-1, keepdim=True) / m + eps  # un-rotated
    w = _dots(_rot(fq, mats), _rot(kt, mats)) / m / den
    return _apply(w, v)


def nala_materialised(q, k, v, mats=None, eps=1e-6, norm_eps=0.0):
    m = k.shape[1]
    norm = q.pow(2).sum(-1, keepdim=True).sqrt()
    p = 3 * (0.5 + torch.tanh(norm))
    q1, q2 = torch.pow(q.clamp(min=0) / (norm + norm_eps), p), torch.pow((-q).clamp(min=0) / (norm + norm_eps), p)
    k1, k2 = (k**3).clamp(min=0), (-(k**3)).clamp(min=0)
    den = (_dots(q1, k1) + _dots(q2, k2)).sum(-1, keepdim=True) / m + eps
    w = (_dots(_rot(q1, mats), _rot(k1, mats)) + _dots(_rot(q2, mats), _rot(k2, mats))) / m / den
    return _apply(w, v)


KERNELS = {
    "mala": (magnitude_aware_linear_attention_reference, magnitude_aware_linear_attention, mala_materialised),
    "rala": (rank_augmented_linear_attention_reference, rank_augmented_linear_attention, rala_materialised),
    "nala": (norm_aware_linear_attention_reference, norm_aware_linear_attention, nala_materialised),
}

# (batch, grid, prefix, heads, head_dim): N = 49 (7x7), 63 (7x9), 197 (cls + 14x14); D = 32, 64, 80; batch 1 and 3
ROPE_SHAPES = [
    (1, (7, 7), 0, 2, 32),
    (3, (7, 9), 0, 1, 64),
    (2, (9, 7), 0, 2, 80),
    (3, (14, 14), 1, 2, 32),
]


def _qkv(b, n, m, h, d, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, n, h, d), (b, m, h, d), (b, m, h, d))
    return [torch.randn(s, generator=g, dtype=F64).to(dtype).requires_grad_() for s in shapes]


def _fwd_bwd(fn_a, fn_b, tensors, rtol=1e-9, atol=1e-10):
    ta = tensors
    tb = [t.detach().clone().requires_grad_() for t in ta]
    out_a, out_b = fn_a(*ta), fn_b(*tb)
    torch.testing.assert_close(out_a, out_b, rtol=rtol, atol=atol)
    w = torch.randn(out_a.shape, generator=torch.Generator().manual_seed(7), dtype=out_a.dtype)
    (out_a * w).sum().backward()
    (out_b * w).sum().backward()
    for a, b in zip(ta, tb, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol * 10, atol=atol * 10)


@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=lambda s: f"b{s[0]}-{s[1][0]}x{s[1][1]}+{s[2]}-h{s[3]}-d{s[4]}")
@pytest.mark.parametrize("kind", list(KERNELS))
def test_reference_equals_materialised_with_rope(kind, shape):
    b, grid, prefix, h, d = shape
    n = prefix + grid[0] * grid[1]
    reference, _, materialised = KERNELS[kind]
    rope = rope_2d_tables(grid, d, num_prefix_tokens=prefix, dtype=F64)
    mats = _rotation_matrices(grid, d, prefix)
    _fwd_bwd(lambda *t: reference(*t, rope=rope), lambda *t: materialised(*t, mats), _qkv(b, n, n, h, d))


@pytest.mark.parametrize("kind", list(KERNELS))
def test_reference_equals_materialised_without_rope_cross_length(kind):
    reference, public, materialised = KERNELS[kind]
    tensors = _qkv(3, 49, 30, 2, 24)  # M != N and D % 4 != 0 are fine without RoPE
    _fwd_bwd(reference, materialised, tensors)
    _fwd_bwd(public, materialised, [t.detach().clone().requires_grad_() for t in tensors])


@pytest.mark.parametrize("kind", list(KERNELS))
def test_public_equals_reference_fp32(kind):
    reference, public, _ = KERNELS[kind]
    q, k, v = _qkv(2, 63, 63, 2, 32, dtype=torch.float32)
    rope = rope_2d_tables((7, 9), 32)
    torch.testing.assert_close(public(q, k, v, rope=rope, backend="reference"), reference(q, k, v, rope=rope))
    # the fused kernels are preferred (every GPU test passed, RALA's at dee6de5) but run on CUDA only
    assert list(get_op(public.__name__).backends) == ["triton", "reference"]
    assert get_op(public.__name__).select(q, k, v, rope=rope).name == "reference"


@pytest.mark.parametrize(
    "fn", [magnitude_aware_linear_attention, rank_augmented_linear_attention], ids=["mala", "rala"]
)
def test_elu_features_of_very_negative_inputs_keep_float32_accuracy(fn):
    """ELU + 1 of x < -16: ``(exp(x) - 1) + 1`` in float32 rounds to a multiple of 6e-8 (a query at -15 / -17 gave
    MALA 0.287 against 0.323, RALA 0.344 against 0.388 in float64); ``exp(x)`` keeps the relative precision."""
    q = torch.tensor([-15.0, -17.0]).reshape(1, 1, 1, 2)
    k = torch.tensor([[5.0, -5.0], [-5.0, 5.0]]).reshape(1, 2, 1, 2)
    v = torch.tensor([1.0, -1.0]).reshape(1, 2, 1, 1)
    want = fn(q.double(), k.double(), v.double())
    torch.testing.assert_close(fn(q, k, v), want.float(), rtol=1e-5, atol=0)


def test_mala_rows_sum_to_one_without_rope():
    """MALA's weights sum to 1 (eps = 0): attending to a constant value returns it."""
    q, k, _ = _qkv(2, 49, 49, 2, 16)
    v = torch.full((2, 49, 2, 5), 3.0, dtype=F64)
    out = magnitude_aware_linear_attention(q, k, v, eps=0.0)
    torch.testing.assert_close(out, torch.full_like(out, 3.0))


@pytest.mark.parametrize("kind", ["rala", "nala"])
def test_divide_kernels_rows_sum_to_one_without_rope(kind):
    _, public, _ = KERNELS[kind]
    q, k, _ = _qkv(2, 49, 49, 2, 16)
    v = torch.full((2, 49, 2, 5), -2.0, dtype=F64)
    out = public(q, k, v, eps=0.0)
    torch.testing.assert_close(out, torch.full_like(out, -2.0))


# Half precision, long sequences ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", list(KERNELS))
def test_half_precision_long_sequence(kind, dtype):
    grid = (140, 143)  # 20020 tokens
    n = grid[0] * grid[1]
    _, public, _ = KERNELS[kind]
    g = torch.Generator().manual_seed(3)
    # x3 inputs: NaLa's cubed keys summed over 20000 tokens exceed the float16 range unless kept in float32.
    q, k, v = (3 * torch.randn(1, n, 2, 32, generator=g) for _ in range(3))
    q, k, v = (t.to(dtype) for t in (q, k, v))
    rope = rope_2d_tables(grid, 32)
    out = public(q, k, v, rope=rope)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    ref = public(q.float(), k.float(), v.float(), rope=rope)
    err = ((out.float() - ref).abs().max() / ref.std()).item()
    assert err < 2e-2, err


def test_half_precision_under_autocast_stays_fp32_inside():
    q, k, v = _qkv(1, 49, 49, 2, 32, dtype=torch.float32)
    rope = rope_2d_tables((7, 7), 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm_aware_linear_attention(q, k, v, rope=rope)
    torch.testing.assert_close(out, norm_aware_linear_attention(q, k, v, rope=rope))


# NaLa's query-norm epsilon --------------------------------------------------------------------------------------------
def test_nala_zero_query_nan_by_default_and_norm_eps_fixes_it():
    q, k, v = _qkv(1, 49, 49, 2, 16)
    q = q.detach().clone()
    q[0, 5, 1] = 0.0
    q.requires_grad_()
    assert torch.isnan(norm_aware_linear_attention(q, k, v)[0, 5, 1]).all()  # the authors' behaviour
    out = norm_aware_linear_attention(q, k, v, norm_eps=1e-6)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 5, 1], torch.zeros_like(out[0, 5, 1]))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    # Away from zero queries norm_eps is a tiny perturbation.
    q2, k2, v2 = _qkv(1, 49, 49, 2, 16)
    torch.testing.assert_close(
        norm_aware_linear_attention(q2, k2, v2, norm_eps=1e-9), norm_aware_linear_attention(q2, k2, v2)
    )


def test_nala_matches_materialised_with_norm_eps():
    tensors = _qkv(2, 49, 49, 1, 16)
    _fwd_bwd(
        lambda *t: norm_aware_linear_attention(*t, norm_eps=0.5),
        lambda *t: nala_materialised(*t, norm_eps=0.5),
        tensors,
    )


# RoPE -----------------------------------------------------------------------------------------------------------------
def test_rope_tables_match_rotation_matrices():
    grid, d = (5, 3), 16
    sin, cos = rope_2d_tables(grid, d, num_prefix_tokens=1, dtype=F64)
    x = torch.randn(2, 16, 3, d, dtype=F64)
    torch.testing.assert_close(apply_rope_2d(x, sin, cos), _rot(x, _rotation_matrices(grid, d, prefix=1)))


@pytest.mark.parametrize("name", ["mala_attention", "rala_attention", "nala_attention"])
def test_rope_tables_match_fixture(name):
    if name not in fixture_names():
        pytest.skip(f"fixture {name} not present")
    spec, _, io = load_fixture(name)
    sin, cos = rope_2d_tables(tuple(spec["architecture"]["grid"]), spec["architecture"]["head_dim"])
    torch.testing.assert_close(sin, io["sin"], rtol=0, atol=0)
    torch.testing.assert_close(cos, io["cos"], rtol=0, atol=0)


def _rotated_gram(grid, d, q, k):
    """``G[i1, j1, i2, j2] = <R(i1, j1) q, R(i2, j2) k>`` for one query and one key vector ``[D]``."""
    n = grid[0] * grid[1]
    sin, cos = rope_2d_tables(grid, d, dtype=F64)
    rq = apply_rope_2d(q.expand(1, n, 1, d), sin, cos)[0, :, 0]
    rk = apply_rope_2d(k.expand(1, n, 1, d), sin, cos)[0, :, 0]
    return (rq @ rk.T).reshape(*grid, *grid)


@pytest.mark.parametrize("shift", [(1, 0), (0, 1), (3, 2)])
def test_rope_relative_position_invariance(shift):
    grid, d = (9, 8), 32
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    gram = _rotated_gram(grid, d, q, k)
    a, b = shift
    h, w = grid
    torch.testing.assert_close(gram[a:, b:, a:, b:], gram[: h - a, : w - b, : h - a, : w - b])


def test_rope_first_half_follows_rows_last_half_columns():
    grid, d = (6, 7), 16
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    row_only, col_only = q.clone(), q.clone()
    row_only[d // 2 :] = 0
    col_only[: d // 2] = 0
    gram_rows = _rotated_gram(grid, d, row_only, k)  # must not depend on the columns
    torch.testing.assert_close(gram_rows, gram_rows[:, :1, :, :1].expand_as(gram_rows))
    gram_cols = _rotated_gram(grid, d, col_only, k)  # must not depend on the rows
    torch.testing.assert_close(gram_cols, gram_cols[:1, :, :1, :].expand_as(gram_cols))
    assert not torch.allclose(gram_rows[0, 0, 0, 0], gram_rows[0, 0, 1, 0])


def test_rope_prefix_rows_identity_and_norm_preserved():
    sin, cos = rope_2d_tables((4, 5), 8, num_prefix_tokens=2)
    sin0, cos0 = rope_2d_tables((4, 5), 8)
    assert sin.shape == cos.shape == (22, 8)
    assert (sin[:2] == 0).all() and (cos[:2] == 1).all()
    assert torch.equal(sin[2:], sin0) and torch.equal(cos[2:], cos0)
    x = torch.randn(3, 22, 2, 8)
    rx = apply_rope_2d(x, sin, cos)
    torch.testing.assert_close(rx[:, :2], x[:, :2])
    torch.testing.assert_close(rx.norm(dim=-1), x.norm(dim=-1))


def test_rope_dtype_and_device():
    sin, cos = rope_2d_tables((3, 3), 8, dtype=torch.bfloat16, device="cpu")
    assert sin.dtype == cos.dtype == torch.bfloat16
    sin64, _ = rope_2d_tables((3, 3), 8, dtype=F64)
    torch.testing.assert_close(sin.double(), sin64, rtol=1e-2, atol=1e-2)


# Bad input ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head_dim", [30, 6, 0])
def test_rope_bad_head_dim(head_dim):
    with pytest.raises(ValueError, match=f"head_dim={head_dim}"):
        rope_2d_tables((4, 4), head_dim)


def test_rope_bad_feat_size_and_prefix():
    with pytest.raises(ValueError, match=r"feat_size=\(0, 3\)"):
        rope_2d_tables((0, 3), 8)
    with pytest.raises(ValueError, match="num_prefix_tokens=-1"):
        rope_2d_tables((2, 3), 8, num_prefix_tokens=-1)


def test_apply_rope_bad_tables():
    sin, cos = rope_2d_tables((4, 4), 8)
    with pytest.raises(ValueError, match=r"\(17, 8\).*\(16, 8\)"):
        apply_rope_2d(torch.randn(1, 17, 2, 8), sin, cos)


@pytest.mark.parametrize("kind", list(KERNELS))
def test_kernel_bad_input(kind):
    _, public, _ = KERNELS[kind]
    q, k, v = _qkv(1, 16, 16, 2, 8, dtype=torch.float32)
    rope = rope_2d_tables((4, 4), 8)
    with pytest.raises(ValueError, match=r"\(16, 8\).*\(12, 8\)"):
        public(q, k, v, rope=rope_2d_tables((3, 4), 8))
    with pytest.raises(ValueError, match="k.shape"):
        public(q, k[:, :12], v[:, :12], rope=rope)  # RoPE needs equal query and key lengths
    with pytest.raises(ValueError, match="eps=-1"):
        public(q, k, v, eps=-1.0)
    with pytest.raises(ValueError, match="head counts differ"):
        public(q, k[:, :, :1], v)
    with pytest.raises(ValueError, match="rope must be a"):
        public(q, k, v, rope=rope[0])
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        public(q, k, v, rope=rope, backend="nope")


def test_nala_bad_norm_eps():
    q, k, v = _qkv(1, 16, 16, 2, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="norm_eps=-0.1"):
        norm_aware_linear_attention(q, k, v, norm_eps=-0.1)


# eps where it matters ------------------------------------------------------------------------------------------------
# On unit-variance inputs eps is ~1e-6 of each denominator, below the float64 tolerance: a wrong eps would pass the
# tests above. Queries far below zero (ELU + 1 = exp(q) ~ 1e-6) or tiny keys (NaLa's cubes ~ 1e-6) make it count.
@pytest.mark.parametrize("kind", list(KERNELS))
def test_eps_where_it_matters(kind):
    reference, public, materialised = KERNELS[kind]
    q, k, v = (t.detach() for t in _qkv(2, 49, 49, 2, 16))
    if kind == "nala":
        k = k * 1e-2
    else:
        q = q - (14.0 if kind == "mala" else 15.0)
    rope = rope_2d_tables((7, 7), 16, dtype=F64)
    mats = _rotation_matrices((7, 7), 16)
    exact = materialised(q, k, v, mats)
    other = materialised(q, k, v, mats, eps=2e-6)
    assert ((exact - other).abs().max() / exact.abs().max()).item() > 0.05  # the test can see a wrong eps
    tensors = [t.clone().requires_grad_() for t in (q, k, v)]
    _fwd_bwd(lambda *t: reference(*t, rope=rope), lambda *t: materialised(*t, mats), tensors)
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    _fwd_bwd(lambda *t: public(*t, rope=rope), lambda *t: materialised(*t, mats), tensors)
