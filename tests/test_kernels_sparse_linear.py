"""Block-sparse and sparse-linear (SLA) ops vs independently materialised formulas, gradients, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visionlin.kernels import (
    block_sparse_attention,
    block_sparse_attention_reference,
    sla_block_map,
    softmax_attention_reference,
    sparse_linear_attention,
    sparse_linear_attention_reference,
)
from visionlin.kernels.sparse_linear import SLA_FEATURE_MAPS, sla_block_counts

BACKENDS = ("torch", "reference")


def _qkv(b=2, n=37, h=3, d=5, dv=None, m=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    dv = d if dv is None else dv
    return (
        torch.randn(b, n, h, d, generator=g, dtype=dtype),
        torch.randn(b, m, h, d, generator=g, dtype=dtype),
        torch.randn(b, m, h, dv, generator=g, dtype=dtype),
    )


def _brute_block_map(q, k, topk, k_low, bq, bk):
    """Per row, rank blocks by pooled score with plain Python loops (independent of the op's vectorised code)."""
    b, n, h, _ = q.shape
    m = k.shape[1]
    nqb, nkb = -(-n // bq), -(-m // bk)
    n_c, n_l = sla_block_counts(nkb, topk, k_low)
    out = torch.zeros(b, h, nqb, nkb, dtype=torch.int8)
    for bi in range(b):
        for hi in range(h):
            for i in range(nqb):
                qm = q[bi, i * bq : (i + 1) * bq, hi].double().mean(0)
                scores = [float(qm @ k[bi, j * bk : (j + 1) * bk, hi].double().mean(0)) for j in range(nkb)]
                order = sorted(range(nkb), key=lambda j: (-scores[j], j))
                for r, j in enumerate(order):
                    out[bi, hi, i, j] = 1 if r < n_c else (-1 if r >= nkb - n_l else 0)
    return out


def _materialised_sla(q, k, v, w, bias, block_map, bq, bk, phi, variant, eps=1e-5):
    """O_s + proj(O_l) with explicit [N, M] masks, float64."""
    q, k, v = q.double(), k.double(), v.double()
    n, m = q.shape[1], k.shape[1]
    cls = block_map[:, :, torch.arange(n) // bq][:, :, :, torch.arange(m) // bk]
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) / q.shape[-1] ** 0.5
    s = torch.where(cls == 1, s, torch.full_like(s, -torch.inf))
    o_s = torch.einsum("bhnm,bmhe->bnhe", torch.softmax(s, -1), v)
    a = torch.einsum("bnhd,bmhd->bhnm", phi(q), phi(k))
    if variant == "paper":
        a = torch.where(cls == 0, a, torch.zeros_like(a))
    o_l = torch.einsum("bhnm,bmhe->bnhe", a, v) / (a.sum(-1).transpose(1, 2)[..., None] + eps)
    o_l = o_l @ w.double().T + (0 if bias is None else bias.double())
    return o_s + o_l


@pytest.mark.parametrize("n,m,bq,bk", [(37, 37, 8, 4), (16, 16, 4, 4), (20, 9, 64, 64), (33, 45, 7, 5)])
def test_block_map_matches_brute_force(n, m, bq, bk):
    q, k, _ = _qkv(n=n, m=m)
    got = sla_block_map(q, k, topk=0.3, k_low=0.2, block_q=bq, block_k=bk)
    assert torch.equal(got, _brute_block_map(q, k, 0.3, 0.2, bq, bk))
    n_c, n_l = sla_block_counts(got.shape[-1], 0.3, 0.2)
    assert ((got == 1).sum(-1) == n_c).all() and ((got == -1).sum(-1) == n_l).all()


@pytest.mark.parametrize("n,block", [(64, 16), (70, 16), (5, 64), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_block_mean_sums_in_the_accumulation_dtype(n, block, dtype):
    """The selection's pooling (CPU path: summed in the accumulation dtype, no converted or padded copy): float64 block
    means within that dtype's rounding, the last block over its real tokens, views of a fused projection, float16
    values whose block sums overflow float16 (6e4 x 16 tokens) still finite."""
    from visionlin.kernels.sparse_linear import _block_mean

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(2, n, 3, 2, 8, dtype=torch.float64)[:, :, 1]
    x[0, :, 0, 0] = 6e4
    x = x.to(dtype)
    got = _block_mean(x, block, acc)
    nb = -(-n // block)
    ref = torch.stack([x[:, i * block : (i + 1) * block].double().mean(dim=1) for i in range(nb)], dim=2)
    assert got.dtype == acc and got.shape == ref.shape == (2, 2, nb, 8)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-6 if acc == torch.float32 else 1e-12, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["paper", "code"])
@pytest.mark.parametrize("feature_map", sorted(SLA_FEATURE_MAPS))
@pytest.mark.parametrize("shape", [(2, 37, 3, 5, 5, 8, 4), (1, 49, 2, 8, 6, 16, 16), (3, 10, 1, 3, 3, 64, 64)])
def test_sla_matches_materialised(backend, variant, feature_map, shape):
    b, n, h, d, dv, bq, bk = shape
    q, k, v = _qkv(b, n, h, d, dv)
    g = torch.Generator().manual_seed(1)
    w, bias = torch.randn(dv, dv, generator=g) * 0.3, torch.randn(dv, generator=g) * 0.1
    k_low = 0.2 if variant == "paper" else 0.0
    got = sparse_linear_attention(
        q, k, v, w, bias, topk=0.3, k_low=k_low, block_q=bq, block_k=bk, feature_map=feature_map,
        variant=variant, backend=backend,
    )  # fmt: skip
    block_map = _brute_block_map(q, k, 0.3, k_low, bq, bk)
    want = _materialised_sla(q, k, v, w, bias, block_map, bq, bk, SLA_FEATURE_MAPS[feature_map], variant)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-5)  # float32 math vs float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 37, 3, 5, 8, 4), (1, 50, 2, 7, 16, 8)])
def test_block_sparse_matches_materialised(backend, shape):
    b, n, h, d, bq, bk = shape
    q, k, v = _qkv(b, n, h, d)
    got = block_sparse_attention(q, k, v, topk=0.4, block_q=bq, block_k=bk, backend=backend)
    block_map = _brute_block_map(q, k, 0.4, 0.0, bq, bk)
    want = _materialised_sla(q, k, v, torch.zeros(d, d), None, block_map, bq, bk, SLA_FEATURE_MAPS["relu"], "paper")
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_all_critical_is_dense_softmax(variant):
    q, k, v = _qkv(n=45)
    dense = softmax_attention_reference(q, k, v)
    zero = torch.zeros(5, 5)
    ref = sparse_linear_attention_reference(q, k, v, zero, topk=1.0, k_low=0.0, block_q=8, block_k=4, variant=variant)
    assert torch.equal(ref, dense)  # the reference is the dense formula exactly (linear branch adds exact zeros)
    assert torch.equal(block_sparse_attention_reference(q, k, v, topk=1.0, block_q=8, block_k=4), dense)
    torch.testing.assert_close(
        sparse_linear_attention(q, k, v, zero, topk=1.0, k_low=0.0, block_q=8, block_k=4, variant=variant),
        dense, atol=1e-6, rtol=1e-6,
    )  # fmt: skip
    torch.testing.assert_close(block_sparse_attention(q, k, v, topk=1.0, block_q=8, block_k=4), dense)


def test_sparsity_edge_cases():
    q, k, v = _qkv(n=32)
    w = torch.randn(5, 5) * 0.3
    # One key block only: it is critical whatever topk; the paper variant has no marginal keys so O_l = 0.
    one = sparse_linear_attention(q, k, v, w, topk=0.01, k_low=0.0, block_q=64, block_k=64)
    torch.testing.assert_close(one, softmax_attention_reference(q, k, v), atol=1e-6, rtol=1e-6)
    # Everything not critical is negligible: the linear branch is empty, output = block-sparse attention.
    skip_all = sparse_linear_attention(q, k, v, w, topk=0.25, k_low=0.75, block_q=4, block_k=4)
    torch.testing.assert_close(skip_all, block_sparse_attention(q, k, v, topk=0.25, block_q=4, block_k=4))
    # Zero projection: SLA = block-sparse attention for any selection.
    z = sparse_linear_attention(q, k, v, torch.zeros(5, 5), topk=0.25, k_low=0.25, block_q=4, block_k=4)
    torch.testing.assert_close(z, block_sparse_attention(q, k, v, topk=0.25, block_q=4, block_k=4))


def test_blocks_longer_than_the_sequence_are_one_block_without_its_padding():
    """``block_q`` / ``block_k`` past the sequence length select exactly as blocks of the length (one block) and do
    not allocate the padding to them (the torch backend padded 40 tokens to 10**8 and asked for 6.4 GB)."""
    q, k, v = _qkv(n=40)
    w = torch.randn(5, 5) * 0.3
    huge = 10**8
    for backend in BACKENDS:
        out = sparse_linear_attention(q, k, v, w, topk=0.5, block_q=huge, block_k=huge, backend=backend)
        torch.testing.assert_close(out, sparse_linear_attention(q, k, v, w, topk=0.5, block_q=40, block_k=40))
        out = block_sparse_attention(q, k, v, topk=0.5, block_q=huge, block_k=8, backend=backend)
        torch.testing.assert_close(out, block_sparse_attention(q, k, v, topk=0.5, block_q=40, block_k=8))


def test_empty_batch_and_dtypes():
    q, k, v = _qkv(b=0)
    assert sparse_linear_attention(q, k, v, torch.zeros(5, 5), block_q=8, block_k=8).shape == q.shape
    q, k, v = _qkv(dtype=torch.bfloat16)
    out = sparse_linear_attention(q, k, v, torch.zeros(5, 5), topk=0.3, block_q=8, block_k=4)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["paper", "code"])
def test_sla_gradcheck(backend, variant):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 11, 2, 3, dtype=torch.float64))
    w = (torch.randn(3, 3, dtype=torch.float64) * 0.5).requires_grad_()
    bias = (torch.randn(3, dtype=torch.float64) * 0.1).requires_grad_()
    k_low = 0.25 if variant == "paper" else 0.0

    def f(q, k, v, w, bias):
        return sparse_linear_attention(
            q, k, v, w, bias, topk=0.5, k_low=k_low, block_q=4, block_k=3, variant=variant, backend=backend
        )

    assert torch.autograd.gradcheck(f, (q, k, v, w, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_sparse_gradcheck(backend):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 11, 2, 3, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda q, k, v: block_sparse_attention(q, k, v, topk=0.5, block_q=4, block_k=3, backend=backend), (q, k, v)
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"topk": 0.0}, "topk=0.0"),
        ({"topk": 1.5}, "topk=1.5"),
        ({"k_low": 1.0}, "k_low=1.0"),
        ({"k_low": -0.1}, "k_low=-0.1"),
        ({"topk": 0.6, "k_low": 0.5}, "topk=0.6, k_low=0.5"),
        ({"topk": np.float32(0.75), "k_low": 0.5}, "topk=np.float32.0.75., k_low=0.5"),  # (was not summed)
        ({"block_q": np.int64(64)}, "block_q=np.int64.64. must be a positive int"),
        ({"block_q": 0}, "block_q=0"),
        ({"block_k": 2.5}, "block_k=2.5"),
        ({"variant": "sla2"}, "variant='sla2'"),
        ({"variant": "code", "k_low": 0.1}, "k_low=0.1"),
        ({"feature_map": "hedgehog"}, "feature_map='hedgehog'"),
        ({"eps": 0.0}, "eps=0.0"),
    ],
)
def test_sla_bad_input(kwargs, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        sparse_linear_attention(q, k, v, torch.zeros(5, 5), **kwargs)


def test_bad_proj_and_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"\[5, 5\].*\(4, 4\)"):
        sparse_linear_attention(q, k, v, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="proj_bias"):
        sparse_linear_attention(q, k, v, torch.zeros(5, 5), torch.zeros(3))
    with pytest.raises(ValueError, match="head counts differ"):
        block_sparse_attention(q, k[:, :, :2], v)
    with pytest.raises(ValueError, match="topk=0"):
        block_sparse_attention(q, k, v, topk=0)
    with pytest.raises(ValueError, match="floating point"):
        sparse_linear_attention(q.int(), k.int(), v.int(), torch.zeros(5, 5), backend="torch")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        sparse_linear_attention(q, k, v, torch.zeros(5, 5), backend="nope")
    with pytest.raises(NotImplementedError, match="not on a CUDA device.*block sizes block_q=64, block_k=4"):
        sparse_linear_attention(q, k, v, torch.zeros(5, 5), block_k=4, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["paper", "code"])
def test_additional_keys_join_the_softmax(backend, variant):
    q, k, v = _qkv(2, 37, 3, 5)
    kt, vt = _qkv(2, 6, 3, 5, seed=5)[1:]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 5, generator=g) * 0.3
    k_low = 0.2 if variant == "paper" else 0.0
    got = sparse_linear_attention(
        q, k, v, w, topk=0.3, k_low=k_low, block_q=8, block_k=4, variant=variant, additional_keys=kt,
        additional_values=vt, backend=backend,
    )  # fmt: skip
    # Materialised: one softmax over [critical image keys, all additional keys]; the linear branch is image-only.
    block_map = _brute_block_map(q, k, 0.3, k_low, 8, 4)
    cls = block_map[:, :, torch.arange(37) // 8][:, :, :, torch.arange(37) // 4]
    s = torch.einsum("bnhd,bmhd->bhnm", q.double(), torch.cat([k, kt], 1).double()) / 5**0.5
    s[..., :37] = torch.where(cls == 1, s[..., :37], torch.full_like(s[..., :37], -torch.inf))
    o_s = torch.einsum("bhnm,bmhe->bnhe", s.softmax(-1), torch.cat([v, vt], 1).double())
    o_l = _materialised_sla(q, k, v, w, None, block_map, 8, 4, SLA_FEATURE_MAPS["softmax"], variant)
    o_l = o_l - _materialised_sla(
        q, k, v, torch.zeros(5, 5), None, block_map, 8, 4, SLA_FEATURE_MAPS["softmax"], variant
    )
    torch.testing.assert_close(got.double(), o_s + o_l, atol=2e-6, rtol=2e-5)
    # All critical and a zero projection: dense softmax over the concatenated keys.
    dense = softmax_attention_reference(q, torch.cat([k, kt], 1), torch.cat([v, vt], 1))
    full = block_sparse_attention(q, k, v, topk=1.0, block_q=8, block_k=4, additional_keys=kt, additional_values=vt,
                                  backend=backend)  # fmt: skip
    torch.testing.assert_close(full, dense, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_additional_keys_gradcheck(backend):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 11, 2, 3, dtype=torch.float64))
    kt, vt = (t.requires_grad_() for t in _qkv(1, 4, 2, 3, dtype=torch.float64, seed=7)[1:])
    w = torch.randn(3, 3, dtype=torch.float64) * 0.5

    def f(q, k, v, kt, vt):
        return sparse_linear_attention(
            q, k, v, w, topk=0.5, k_low=0.25, block_q=4, block_k=3, additional_keys=kt, additional_values=vt,
            backend=backend,
        )  # fmt: skip

    assert torch.autograd.gradcheck(f, (q, k, v, kt, vt))


def test_additional_keys_bad_input():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="both additional_keys and additional_values"):
        block_sparse_attention(q, k, v, additional_keys=k)
    with pytest.raises(ValueError, match="additional_values head dim 4 differs"):
        sparse_linear_attention(q, k, v, torch.zeros(5, 5), additional_keys=k, additional_values=v[..., :4])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_backend_half_inputs_match_reference(dtype):
    # Both backends compute in float32 from the half inputs and round once at the end: at most one half ulp apart.
    q, k, v = _qkv(2, 45, 3, 8, dtype=dtype)
    w = (torch.randn(8, 8, generator=torch.Generator().manual_seed(2)) * 0.3).to(dtype)
    kwargs = {"topk": 0.3, "k_low": 0.2, "block_q": 8, "block_k": 4}
    got = sparse_linear_attention(q, k, v, w, backend="torch", **kwargs)
    ref = sparse_linear_attention(q, k, v, w, backend="reference", **kwargs)
    assert got.dtype == dtype
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(got.float(), ref.float(), atol=ulp, rtol=ulp)
