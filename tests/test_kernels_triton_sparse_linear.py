"""Triton block-sparse / sparse-linear attention (SLA) against float64 formulas, forward and backward.

The truth is the op's math in float64 on the very values the kernels see (inputs rounded to the test dtype), with the
block map the op selects from those inputs (:func:`sla_block_map`; also checked equal to what the LUT encodes), so a
near-tie in the pooled scores cannot make the comparison flaky. Tolerance (DESIGN.md, flash-attention's rule): the
relative error (``||x - ref|| / ||ref||`` over the output and every gradient) is at most twice that of the plain
PyTorch computation in the test dtype (the materialised formula run in bf16 / fp16), plus four units of the dtype's
rounding; in float32 a fixed 2e-5 (the kernels' products run in IEEE float32).

The ``gpu`` tests run on the GPU machine (``pytest -m gpu tests/test_kernels_triton_sparse_linear.py``);
``test_interpreter_*`` runs the same kernels on the CPU through Triton's interpreter (float32 and float16: the
interpreter's bfloat16 products are wrong, a Triton limitation) in a subprocess.
"""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
from interpreter_utils import ROOT, run_in_interpreter

from visionlin.kernels import block_sparse_attention, sla_block_map, sparse_linear_attention
from visionlin.kernels.sparse_linear import SLA_FEATURE_MAPS, sla_block_counts

FLOOR = {torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}
F32_TOL = 2e-5


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _inputs(b, n, m, h, d, dv, dtype, seed=0, non_contiguous=False):
    g = torch.Generator().manual_seed(seed)
    if non_contiguous:  # views of one fused [B, N, 3, H, D] projection, as attention layers produce them
        q, k, v = torch.randn(b, n, 3, h, d, generator=g, dtype=torch.float64).unbind(2)
    else:
        q = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
        k = torch.randn(b, m, h, d, generator=g, dtype=torch.float64)
        v = torch.randn(b, m, h, dv, generator=g, dtype=torch.float64)
    dvv = v.shape[-1]
    w = 0.3 * torch.randn(dvv, dvv, generator=g, dtype=torch.float64)
    bias = 0.1 * torch.randn(dvv, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)], w.float(), bias.float()


def _materialised(q, k, v, w, bias, block_map, bq, bk, fmap, variant, scale, eps, dt, kt=None, vt=None):
    """The op's formula with explicit ``[N, M]`` masks, in ``dt`` (float64: the truth; half: the plain baseline).
    ``w is None``: block-sparse attention (no linear branch). ``kt`` / ``vt``: additional keys / values, extra
    columns of the one softmax (not in the linear branch)."""
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    n, m = q.shape[1], k.shape[1]
    cls = block_map[:, :, torch.arange(n) // bq][:, :, :, torch.arange(m) // bk].to(q.device)
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    s = torch.where(cls == 1, s, torch.full_like(s, -torch.inf))
    if kt is not None:
        s = torch.cat([s, torch.einsum("bnhd,bthd->bhnt", q, kt.to(dt)) * scale], dim=-1)  # [B, H, N, M + T]
    p = torch.softmax(s.float() if dt != torch.float64 else s, -1).to(dt)
    out = torch.einsum("bhnm,bmhe->bnhe", p[..., :m], v)
    if kt is not None:
        out = out + torch.einsum("bhnt,bthe->bnhe", p[..., m:], vt.to(dt))
    if w is None:
        return out
    phi = SLA_FEATURE_MAPS[fmap]
    a = torch.einsum("bnhd,bmhd->bhnm", phi(q), phi(k))
    if variant == "paper":
        a = torch.where(cls == 0, a, torch.zeros_like(a))
    o_l = torch.einsum("bhnm,bmhe->bnhe", a, v) / (a.sum(-1).transpose(1, 2)[..., None] + eps)
    return out + o_l @ w.to(dt).T + bias.to(dt)


def check(shape, dtype, device, *, method="sla", variant="paper", fmap="softmax", topk=0.4, k_low=0.2, bq=64, bk=64,
          direct=False, non_contiguous=False, seed=0, long=False, text=0):  # fmt: skip
    """Output and gradients (q, k, v, the additional keys and values if any and, for SLA, the projection's weight and
    bias) of the Triton backend against float64 (``direct``: call the backend function itself, as the interpreter
    runs it on the CPU). ``long``: sequences whose ``[N, M]`` float64 masks do not fit: the truth is the block-wise
    ``"torch"`` backend (float32 math, itself tested against the reference) on the same inputs, and the bound the
    dtype's four-unit floor alone. ``text``: that many additional (joint, always attended) keys ``T``."""
    from visionlin.kernels import sparse_linear as sl

    b, n, m, h, d, dv = shape
    (q, k, v), w, bias = _inputs(b, n, m, h, d, dv, dtype, seed=seed, non_contiguous=non_contiguous)
    extra = []
    if text:
        gt = torch.Generator().manual_seed(seed + 3)
        extra = [torch.randn(b, text, h, e, generator=gt, dtype=torch.float64).to(dtype) for e in (d, v.shape[-1])]
    k_low = k_low if (method == "sla" and variant == "paper") else 0.0
    scale = d**-0.5
    block_map = sla_block_map(q, k, topk=topk, k_low=k_low, block_q=bq, block_k=bk)
    n_c, n_l = sla_block_counts(block_map.shape[-1], topk, k_low)
    grad = torch.randn(b, n, h, v.shape[-1], generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
    sla = method == "sla"

    def run(dt, fn):
        ins = [t.detach().clone().to(device).requires_grad_() for t in (q, k, v, *extra)]
        params = [t.detach().clone().to(device).requires_grad_() for t in (w, bias)] if sla else []
        out = fn(*ins[:3], *params, *ins[3:])
        out.backward(grad.to(device=device, dtype=out.dtype))
        return [out.detach().cpu(), *(t.grad.cpu() for t in ins + params)]

    def joint(fn, **kw):
        """``fn(q, k, v, *params, **kw)`` called as ``(q, k, v, *params, *extra)``."""

        def call(*a):
            if not text:
                return fn(*a, **kw)
            return fn(*a[:-2], additional_keys=a[-2], additional_values=a[-1], **kw)

        return call

    def formula(dt):
        def fn(q, k, v, *p, additional_keys=None, additional_values=None):
            wb = p if sla else (None, None)
            args = (block_map.to(q.device), bq, bk, fmap, variant, scale, 1e-5, dt, additional_keys, additional_values)
            return _materialised(q, k, v, *wb, *args)

        return joint(fn)

    if sla:
        kw = dict(topk=topk, k_low=k_low, block_q=bq, block_k=bk, feature_map=fmap, variant=variant)
        op = sparse_linear_attention
    else:
        kw = dict(topk=topk, block_q=bq, block_k=bk)
        op = block_sparse_attention
    fast = joint(sl._sla_triton if sla else sl._bsa_triton, **kw) if direct else joint(op, backend="triton", **kw)
    ours = run(dtype, fast)
    truth = run(dtype, joint(op, backend="torch", **kw)) if long else run(torch.float64, formula(torch.float64))
    errs = [_rel(x, y) for x, y in zip(ours, truth, strict=True)]
    if long:
        bounds = [FLOOR.get(dtype, F32_TOL)] * len(errs)
    elif dtype == torch.float32:
        bounds = [F32_TOL] * len(errs)
    else:
        base = [_rel(x, y) for x, y in zip(run(dtype, formula(dtype)), truth, strict=True)]
        bounds = [2 * e + FLOOR[dtype] for e in base]
    names = ["out", "dq", "dk", "dv", *(["d_additional_keys", "d_additional_values"] if text else []), "dw", "db"]
    names = names[: len(errs)]
    bad = {nm: f"{e:.2e} > {bd:.2e}" for nm, e, bd in zip(names, errs, bounds, strict=True) if not e <= bd}
    assert ours[0].dtype == dtype and ours[0].shape == truth[0].shape
    assert not bad, (shape, dtype, method, variant, fmap, text, (n_c, n_l), bad)
    return errs


gpu = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("method", ["sla-paper", "sla-code", "sparse"])
@pytest.mark.parametrize(
    "shape,bq,bk",
    [((1, 1000, 1000, 2, 64, 64), 64, 64), ((3, 777, 777, 3, 80, 80), 64, 64), ((1, 1500, 1300, 2, 128, 128), 128, 64),
     ((3, 300, 300, 2, 128, 128), 128, 128), ((1, 65, 200, 1, 64, 64), 64, 128), ((2, 256, 256, 4, 64, 64), 32, 32),
     ((1, 300, 250, 2, 128, 128), 32, 64)],
)  # fmt: skip
def test_triton_sla_shapes(shape, bq, bk, method, dtype):
    """Awkward shapes: N not a multiple of the block, batch 1 and 3, head dims 64, 80 (padded) and 128, N != M."""
    meth, _, variant = method.partition("-")
    check(shape, dtype, "cuda", method=meth, variant=variant or "paper", bq=bq, bk=bk, topk=0.3, k_low=0.2)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("sparsity", [0.8, 0.9, 0.95])
@pytest.mark.parametrize("method", ["sla-paper", "sla-code", "sparse"])
def test_triton_sla_sparsity_levels(method, sparsity, dtype):
    meth, _, variant = method.partition("-")
    check((1, 2000, 2000, 2, 64, 64), dtype, "cuda", method=meth, variant=variant or "paper", topk=1 - sparsity,
          k_low=0.1)  # fmt: skip


@gpu
@pytest.mark.parametrize("fmap", sorted(SLA_FEATURE_MAPS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_sla_feature_maps_and_views(fmap, dtype):
    check((2, 500, 500, 3, 64, 64), dtype, "cuda", fmap=fmap, non_contiguous=True)
    check((2, 500, 500, 3, 64, 64), dtype, "cuda", fmap=fmap, variant="code", non_contiguous=True)


@gpu
@pytest.mark.parametrize("method", ["sla-paper", "sla-code", "sparse"])
def test_triton_sla_wan_length(method):
    """N = 32,760 (Wan2.1 480p x 81 frames), head dim 128, bf16, 90% sparsity."""
    meth, _, variant = method.partition("-")
    check((1, 32760, 32760, 2, 128, 128), torch.bfloat16, "cuda", method=meth, variant=variant or "paper",
          topk=0.1, k_low=0.1, bq=128, bk=64, long=True)  # fmt: skip


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize(
    "b,n,h,d,block", [(1, 32760, 12, 128, 128), (2, 1000, 3, 80, 64), (1, 5, 1, 16, 64), (3, 777, 2, 64, 1)]
)  # fmt: skip
def test_triton_block_mean_matches_torch(b, n, h, d, block, dtype):
    """The pooling kernel (shared by both backends' block selection on CUDA) against float64 sums: within float32
    rounding; a ragged last block averaged over its real tokens; views of a fused projection."""
    from visionlin.kernels.sparse_linear import _block_mean

    x = torch.randn(b, n, 3, h, d, dtype=torch.float64)[:, :, 1].to(dtype)
    got = _block_mean(x.cuda(), block, torch.float32)
    nb = -(-n // block)
    pad = torch.nn.functional.pad(x.double(), (0, 0, 0, 0, 0, nb * block - n)).view(b, nb, block, h, d).sum(2)
    counts = torch.tensor([min(block, n - i * block) for i in range(nb)], dtype=torch.float64)
    ref = (pad / counts[None, :, None, None]).transpose(1, 2)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert _rel(got.cpu(), ref) <= 1e-6, _rel(got.cpu(), ref)
    # The torch path (CPU) agrees as well.
    assert _rel(_block_mean(x, block, torch.float32), ref) <= 1e-6


def _select_torch(q, k, topk, k_low, bq, bk, marginal, monkeypatch):
    from visionlin.kernels.triton import sparse_linear as sl

    with monkeypatch.context() as m:
        m.setattr(sl, "SELECT_MAX_BLOCKS", 0)  # the stable-sort path
        return sl.select_blocks(q, k, topk, k_low, bq, bk, marginal)


@gpu
@pytest.mark.parametrize(
    "n,m,bq,bk,topk,k_low",
    [(32760, 32760, 128, 64, 0.05, 0.1), (1000, 1000, 64, 64, 0.3, 0.2), (65, 200, 64, 128, 0.5, 0.0),
     (5000, 190000, 128, 64, 0.01, 0.3), (64, 64, 64, 64, 1.0, 0.0), (300, 4000, 32, 1, 0.1, 0.5)],
)  # fmt: skip
def test_triton_select_kernel_ranks_as_the_stable_sort(n, m, bq, bk, topk, k_low, monkeypatch):
    """``_select_kernel`` (one in-register sort of unique int64 keys per row) returns the LUT and marginal mask of the
    stable descending sort exactly: random scores, rows of equal scores (constant blocks: ties go to the lower block),
    a NaN key block (ranked first, as ``torch.sort`` ranks NaN), a head whose scores are all far below zero, 1 to 4,000
    key blocks (past 4,096: the sort)."""
    from visionlin.kernels.triton import sparse_linear as sl

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, n, 3, 32, device="cuda", generator=g).to(torch.bfloat16)
    k = torch.randn(2, m, 3, 32, device="cuda", generator=g).to(torch.bfloat16)
    k[1, :, 1] = 0.5  # every key block of this head scores the same
    q[0, :, 2] = 0.0  # and every query block of this one
    k[0, bk : 2 * bk, 0, 3] = float("nan")  # one NaN key block in head 0 of batch 0
    q[1, :, 2] += 3.0  # every pooled score of this head far below zero (once left LUT slots unset: an illegal
    k[1, :, 2] -= 3.0  # address in the forward kernel, found on Wan2.1's 27th layer)
    for marginal in (False, True):
        lut, mask = sl.select_blocks(q, k, topk, k_low, bq, bk, marginal)
        ref_lut, ref_mask = _select_torch(q, k, topk, k_low, bq, bk, marginal, monkeypatch)
        assert lut.dtype == torch.int32 and torch.equal(lut, ref_lut)
        assert (mask is None) == (not marginal) and (mask is None or torch.equal(mask, ref_mask))


def block_states_f64(k, v, block, fmap):
    """Float64 per-key-block states of keys / values ``[B, M, H, D|Dv]`` (on the CPU): ``h_j = phi(K_j)^T V_j``
    ``[B, H, nkb, D, Dv]`` and ``z_j = phi(K_j)^T 1`` ``[B, H, nkb, D]``, the last block ragged."""
    b, m, h, d = k.shape
    nkb, pad = -(-m // block), -m % block
    fk = SLA_FEATURE_MAPS[fmap](k.double().cpu())
    fkb = torch.nn.functional.pad(fk, (0, 0, 0, 0, 0, pad)).view(b, nkb, block, h, d)  # padded keys: phi rows 0
    vb = torch.nn.functional.pad(v.double().cpu(), (0, 0, 0, 0, 0, pad)).view(b, nkb, block, h, v.shape[-1])
    return torch.einsum("bjthd,bjthe->bhjde", fkb, vb), fkb.sum(dim=2).transpose(1, 2)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fmap", sorted(SLA_FEATURE_MAPS))
@pytest.mark.parametrize(
    "shape,bq,bk", [((1, 1000, 2, 64, 64), 64, 64), ((3, 777, 3, 80, 80), 128, 32), ((1, 32760, 2, 128, 128), 128, 64)]
)  # fmt: skip
def test_triton_sla_paper_block_states(shape, bq, bk, fmap, dtype):
    """The paper variant's no-gradient states (per-key-block states by the kernel, summed through the marginal mask by
    one bfloat16 GEMM of their high / low halves, float32 accumulation) against float64 within 1e-3 (as the code
    variant's state kernel: the kernel's bf16x2 / bf16x3 products), views of a fused projection, a ragged last block."""
    from visionlin.kernels.triton import sparse_linear as sl

    b, m, h, d, dv = shape
    kv = torch.randn(b, m, 2, h, max(d, dv), dtype=torch.float64)
    k, v = kv[:, :, 0, :, :d].to(dtype).cuda(), kv[:, :, 1, :, :dv].to(dtype).cuda()
    nqb, nkb = -(-m // bq), -(-m // bk)
    marginal = (torch.rand(b, h, nqb, nkb, generator=torch.Generator().manual_seed(1)) < 0.85).float()
    with torch.no_grad():
        hi, zi = sl.linear_states(k, v, marginal.cuda(), bk, fmap)
    hj, zj = block_states_f64(k, v, bk, fmap)
    ref_h = (marginal.double() @ hj.reshape(b, h, nkb, d * dv)).view(b, h, nqb, d, dv)
    ref_z = marginal.double() @ zj
    assert hi.dtype == zi.dtype == torch.float32 and hi.shape == ref_h.shape and zi.shape == ref_z.shape
    errs = _rel(hi.cpu(), ref_h), _rel(zi.cpu(), ref_z)
    assert max(errs) <= 1e-3, errs


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("fmap", sorted(SLA_FEATURE_MAPS))
@pytest.mark.parametrize(
    "shape",
    [(1, 1000, 2, 64, 64), (3, 777, 3, 80, 80), (1, 32760, 2, 128, 128), (2, 1, 1, 16, 16), (1, 70001, 1, 32, 32)],
)  # fmt: skip
def test_triton_sla_code_state_kernel(shape, fmap, dtype):
    """The code variant's state kernel (no-gradient calls) against float64: ``H = phi(K)^T V`` within 2e-5 for float32
    inputs (``tf32x3`` products), 1e-3 for half inputs (TF32 products: ``phi(k)`` keeps 10 mantissa bits, the values
    are exact), ``Z`` likewise; views of a fused projection; 70,001 keys (several splits, a ragged last tile)."""
    from visionlin.kernels.triton import sparse_linear as sl

    b, m, h, d, dv = shape
    kv = torch.randn(b, m, 2, h, max(d, dv), dtype=torch.float64)
    k, v = kv[:, :, 0, :, :d].to(dtype), kv[:, :, 1, :, :dv].to(dtype)
    with torch.no_grad():
        hi, zi = sl.linear_states(k.cuda(), v.cuda(), None, 64, fmap)
    fk = SLA_FEATURE_MAPS[fmap](k.double())
    ref_h = torch.einsum("bmhd,bmhe->bhde", fk, v.double()).unsqueeze(2)
    ref_z = fk.sum(dim=1).unsqueeze(2)
    tol = F32_TOL if dtype == torch.float32 else 1e-3
    assert hi.dtype == zi.dtype == torch.float32 and hi.shape == ref_h.shape and zi.shape == ref_z.shape
    assert _rel(hi.cpu(), ref_h) <= tol and _rel(zi.cpu(), ref_z) <= tol, (_rel(hi.cpu(), ref_h), _rel(zi.cpu(), ref_z))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("variant", ["code", "paper"])
@pytest.mark.parametrize("shape,bq,bk", [((1, 1500, 1300, 2, 128, 128), 128, 64), ((3, 777, 777, 3, 80, 80), 64, 64)])
def test_triton_sla_inference_matches_training_forward(shape, bq, bk, variant, dtype):
    """A no-gradient SLA call (code variant: the state kernel, projection folded into the state; paper variant, half
    inputs: per-key-block states by the kernel, summed through the marginal mask by one bfloat16 GEMM of their halves)
    equals the differentiable forward (torch states, in-kernel projection) within the dtype's rounding."""
    b, n, m, h, d, dv = shape
    (q, k, v), w, bias = _inputs(b, n, m, h, d, dv, dtype)
    q, k, v, w, bias = (t.cuda() for t in (q, k, v, w, bias))
    k_low = 0.0 if variant == "code" else 0.2
    kw = dict(topk=0.3, k_low=k_low, block_q=bq, block_k=bk, variant=variant, backend="triton")
    with torch.no_grad():
        fast = sparse_linear_attention(q, k, v, w, bias, **kw)
    slow = sparse_linear_attention(q, k.requires_grad_(), v, w, bias, **kw).detach()
    assert _rel(fast, slow) <= FLOOR.get(dtype, F32_TOL), _rel(fast, slow)


@gpu
def test_triton_sla_is_chosen_and_compiles_fullgraph():
    from visionlin.kernels import get_op

    q = torch.randn(1, 130, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.zeros(64, 64, device="cuda", requires_grad=True)
    assert get_op("sparse_linear_attention").select(q, q, q, w).name == "triton"
    assert get_op("block_sparse_attention").select(q, q, q).name == "triton"
    fn = torch.compile(lambda q, w: sparse_linear_attention(q, q, q, w, topk=0.5, k_low=0.0), fullgraph=True)
    out = fn(q, w)
    out.float().square().sum().backward()
    torch.testing.assert_close(out, sparse_linear_attention(q, q, q, w, topk=0.5, k_low=0.0, backend="triton"))
    assert q.grad is not None and w.grad is not None
    # Inference (no gradient): the state kernels, the paper variant's bfloat16 GEMM of the state halves included.
    x = q.detach()
    for variant, k_low in (("paper", 0.2), ("code", 0.0)):
        kw = dict(topk=0.3, k_low=k_low, variant=variant)
        fn = torch.compile(lambda x, w, kw=kw: sparse_linear_attention(x, x, x, w, **kw), fullgraph=True)
        with torch.no_grad():
            torch.testing.assert_close(fn(x, 0.1 * w.detach() + 0.01), sparse_linear_attention(
                x, x, x, 0.1 * w.detach() + 0.01, backend="triton", **kw))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["paper", "code"])
def test_sla_linear_states_stay_float32_under_autocast(variant, dtype):
    """The linear branch's states with gradients (training: the torch einsums) are float32 under autocast too, equal
    to those computed without it: autocast's matmuls rounded them to bfloat16, and the forward kernel then failed to
    compile (``tl.dot`` of a float32 and a bfloat16 tile) in a converted DiT's fine-tune."""
    from visionlin.kernels.triton import sparse_linear as sl

    (q, k, v), _, _ = _inputs(1, 100, 100, 2, 32, 32, dtype)
    lut, marginal = sl.select_blocks(q, k, 0.3, 0.2 if variant == "paper" else 0.0, 32, 32, variant == "paper")
    k.requires_grad_()
    plain = sl.linear_states(k, v, marginal, 32, "softmax")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = sl.linear_states(k, v, marginal, 32, "softmax")
    for a, p in zip(auto, plain, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, p)


@gpu
@pytest.mark.parametrize("text", [0, 7])
@pytest.mark.parametrize("method", ["sla-paper", "sla-code", "sparse"])
def test_triton_sla_trains_under_autocast(method, text, monkeypatch):
    """A training step under ``torch.autocast`` (bfloat16 projections, float32 parameters, as a converted DiT's
    fine-tune runs it; additional keys by both modes) equals the same step on the same bfloat16 inputs without
    autocast: output and every gradient."""
    from visionlin.kernels.triton import sparse_linear as sl

    sla, variant = method.startswith("sla"), method.split("-")[-1]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 256, 4, 64, generator=g).to(torch.bfloat16).cuda() for _ in range(3))
    kt, vt = (torch.randn(2, text, 4, 64, generator=g).to(torch.bfloat16).cuda() for _ in range(2))
    w, bias = 0.1 * torch.randn(64, 64, generator=g).cuda(), 0.1 * torch.randn(64, generator=g).cuda()
    extra = dict(additional_keys=kt, additional_values=vt) if text else {}
    kw = dict(topk=0.25, block_q=32, block_k=32, backend="triton", **extra)
    for mode in ("kernel", "torch") if text else ("kernel",):
        monkeypatch.setitem(sl.TUNING, "additional_keys", mode)
        results = []
        for autocast in (False, True):
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, w, bias)]
            used = leaves if sla else leaves[:3]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                if sla:
                    out = sparse_linear_attention(*used, k_low=0.25 if variant == "paper" else 0.0, variant=variant,
                                                  **kw)  # fmt: skip
                else:
                    out = block_sparse_attention(*used, **kw)
            out.float().square().sum().backward()
            results.append([out.detach(), *(t.grad for t in used)])
        for a, b in zip(*results, strict=True):
            assert _rel(a, b) <= FLOOR[torch.bfloat16], (mode, _rel(a, b))


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from tests.test_kernels_triton_sparse_linear import check
    cases = [
        dict(shape=(2, 150, 300, 2, 20, 24)),
        dict(shape=(1, 70, 330, 1, 16, 16), fmap="elu"),
        dict(shape=(1, 200, 260, 2, 32, 32), bq=128, bk=64, fmap="relu"),
        dict(shape=(1, 150, 140, 1, 100, 100), bq=128, bk=128),  # head dim 100: 64-row tiles, two per block
        dict(shape=(1, 150, 300, 2, 20, 24), variant="code"),  # batch 1: the first case covers batch strides
        dict(shape=(1, 130, 130, 2, 16, 16), non_contiguous=True),
        dict(shape=(1, 150, 300, 2, 20, 24), method="sparse"),
        dict(shape=(1, 70, 200, 1, 32, 16), method="sparse", bq=64, bk=128),
        dict(shape=(1, 100, 90, 1, 64, 64), bq=32, bk=32),  # 32-token blocks (a 256-token DiT's 8 x 8 blocks)
        dict(shape=(1, 70, 130, 1, 32, 32), bq=32, bk=64, variant="code"),
        dict(shape=(1, 90, 90, 1, 64, 64), bq=32, bk=32, method="sparse"),
    ]
    for case in cases:
        for dtype in (torch.float32, torch.float16):
            check(device="cpu", dtype=dtype, direct=True, **case)
    # The custom op's registrations (schema, fake, autograd), and the eager path equal to the dispatcher's bitwise.
    from visionlin.kernels.triton import sparse_linear as sl
    q, k, v = (torch.randn(1, 70, 2, 16).requires_grad_() for _ in range(3))
    w, b = torch.randn(16, 16).requires_grad_(), torch.randn(16).requires_grad_()
    lut, marginal = sl.select_blocks(q, k, 0.5, 0.0, 64, 64, True)
    hi, zi = (t.detach().requires_grad_() for t in sl.linear_states(k, v, marginal, 64, "softmax"))
    args = (q, k, v, lut, hi, zi, w, b, 0.25, 1e-5, 64, 64, 0)
    torch.library.opcheck(sl.sla_fwd, args)
    eager, dispatched = sl._fwd(*args)[0], torch.ops.visionlin.sla_fwd(*args)[0]
    g = torch.randn_like(eager)
    ga = torch.autograd.grad(eager, [q, k, v, hi, zi, w, b], g)
    gb = torch.autograd.grad(dispatched, [q, k, v, hi, zi, w, b], g)
    assert torch.equal(eager, dispatched) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    print("interpreter ok")
    """
)


def test_interpreter_sla_kernels_match_formula():
    """The fused forward and the backward kernels' math on the CPU (Triton's interpreter), float32 and float16."""
    pytest.importorskip("triton")
    run_in_interpreter(_INTERPRETER_SCRIPT)


_SELECT_POOL_INTERPRETER_SCRIPT = textwrap.dedent(
    """
import torch
from visionlin.kernels.triton import sparse_linear as sl
g = torch.Generator().manual_seed(0)
cases = [(2, 3, 5, 37, 4, 6, 0.0), (1, 1, 3, 1, 1, 0, 0.0), (1, 2, 4, 512, 26, 51, 0.0),
         (1, 2, 3, 64, 6, 10, -10.0), (1, 1, 3, 100, 12, 30, -1e30), (1, 1, 3, 16, 3, 4, 5e3)]
for (b, h, nqb, nkb, n_c, n_l, shift) in cases:
    # shift: every score far below zero, or large (the n_c-th best key's int64 image near the bottom of its range)
    s = torch.randn(b, h, nqb, nkb, generator=g) * (1.0 + abs(shift) / 10) + shift
    s[0, 0, 0, :] = 0.25 + shift  # a row of ties
    if nkb > 3:
        s[0, 0, 1, 2] = float("nan")
        s[0, 0, 2, :3] = float("-inf")
    # The LUT is the same code with or without the mask: the wide rows (slow in the interpreter) run with it only.
    for marginal in (False, True) if nkb < 64 else (True,):
        lut, mask = sl.sla_select(s, n_c, nkb - n_l, marginal)
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices
        ref_lut = order[..., :n_c].sort(dim=-1).values.to(torch.int32)
        assert torch.equal(lut, ref_lut), (lut, ref_lut)
        if marginal:
            rank = torch.zeros(nkb); rank[n_c:nkb - n_l] = 1.0
            ref = torch.empty_like(s).scatter_(-1, order, rank.expand(order.shape).contiguous())
            assert torch.equal(mask, ref)
x = torch.randn(2, 77, 3, 3, 20, generator=g)[:, :, 1].to(torch.float16)
got = sl.sla_pool(x, 16)
nb = -(-77 // 16)
ref = torch.stack([x[:, i * 16:(i + 1) * 16].double().mean(dim=1) for i in range(nb)], dim=2)
assert got.is_contiguous()
assert got.shape == ref.shape and ((got.double() - ref).abs().max() < 1e-6), (got.double() - ref).abs().max()
print("interpreter ok")
    """
)


def test_interpreter_sla_select_and_pool_kernels():
    """The ranking kernel (``sla_select``) gives the stable descending sort's LUT and marginal mask exactly (a row of
    ties, NaN ranked first, -inf, 1 to 512 key blocks, rows of scores far below zero: a sentinel above their keys once
    left LUT entries unwritten) and the pooling kernel (``sla_pool``) the block means (a ragged
    last block, a strided view, float16), on the CPU through Triton's interpreter."""
    pytest.importorskip("triton")
    run_in_interpreter(_SELECT_POOL_INTERPRETER_SCRIPT)


_BLOCK_STATES_INTERPRETER_SCRIPT = textwrap.dedent(
    """
import torch
from tests.test_kernels_triton_sparse_linear import block_states_f64
from visionlin.kernels.triton import sparse_linear as sl
g = torch.Generator().manual_seed(0)
for (b, m, h, d, dv, block, fmap) in [(2, 70, 2, 16, 8, 32, "softmax"), (1, 64, 1, 8, 16, 16, "elu"),
                                      (1, 33, 3, 16, 16, 64, "relu")]:
    kv = torch.randn(b, m, 2, h, max(d, dv), dtype=torch.float64, generator=g)
    k, v = kv[:, :, 0, :, :d].half(), kv[:, :, 1, :, :dv].half()  # views of a fused projection
    hs, zj = sl.sla_block_states(k, v, sl.FMAPS[fmap], block)
    nkb = -(-m // block)
    assert hs.dtype == torch.bfloat16 and hs.shape == (b * h, 2 * nkb, d * dv) and zj.shape == (b, h, nkb, d)
    ref_h, ref_z = block_states_f64(k, v, block, fmap)
    got_h = (hs[:, :nkb].double() + hs[:, nkb:].double()).view(b, h, nkb, d, dv)
    err_h = ((got_h - ref_h).abs().max() / ref_h.abs().max()).item()
    err_z = ((zj.double() - ref_z).abs().max() / ref_z.abs().max()).item()
    assert err_h < 1e-4 and err_z < 1e-5, (err_h, err_z)
    # the no-gradient paper-variant states through a marginal mask, against the differentiable torch route
    nqb = 3
    marginal = (torch.rand(b, h, nqb, nkb, generator=g) < 0.6).float()
    with torch.no_grad():
        hi, zi = sl.linear_states(k, v, marginal, block, fmap)
    k.requires_grad_(True)
    ref_hi, ref_zi = (t.detach() for t in sl.linear_states(k, v, marginal, block, fmap))
    k.requires_grad_(False)
    assert hi.shape == ref_hi.shape == (b, h, nqb, d, dv) and zi.shape == ref_zi.shape
    assert ((hi - ref_hi).abs().max() / ref_hi.abs().max().clamp_min(1e-30)).item() < 1e-4
    assert ((zi - ref_zi).abs().max() / ref_zi.abs().max().clamp_min(1e-30)).item() < 1e-5
print("interpreter ok")
    """
)


def test_interpreter_sla_block_states():
    """The paper variant's per-key-block states (``sla_block_states``: one split of the state kernel per key block,
    written as high / low bfloat16 halves) equal float64 sums within 1e-4 (ragged last block, views, every feature
    map), and the no-gradient route through the marginal mask equals the differentiable torch one, on the CPU
    through Triton's interpreter."""
    pytest.importorskip("triton")
    run_in_interpreter(_BLOCK_STATES_INTERPRETER_SCRIPT)


def test_triton_backend_declines_with_reasons_on_cpu():
    (q, k, v), w, bias = _inputs(1, 40, 40, 2, 16, 16, torch.float32)
    with pytest.raises(NotImplementedError, match="not on a CUDA device"):
        sparse_linear_attention(q, k, v, w, bias, backend="triton")
    with pytest.raises(NotImplementedError, match="not on a CUDA device"):
        block_sparse_attention(q, k, v, backend="triton")
    # Automatic selection on the CPU falls through to the torch backend.
    torch.testing.assert_close(
        sparse_linear_attention(q, k, v, w, bias, topk=0.5, k_low=0.0),
        sparse_linear_attention(q, k, v, w, bias, topk=0.5, k_low=0.0, backend="torch"),
    )


def test_triton_supports_reasons():
    from visionlin.kernels import get_op

    op = get_op("sparse_linear_attention")
    meta = torch.empty(1, 8, 1, 256, device="meta", dtype=torch.float64)
    w = torch.empty(256, 256, device="meta")
    reasons = " ".join(op.supports(meta, meta, meta, w, backend="triton", block_q=48, additional_keys=meta))
    for part in ("CUDA", "float64", "block_q=48", "head dims"):
        assert part in reasons, (part, reasons)
    # Additional (joint) keys are no reason to refuse: a call the kernels can run otherwise runs with them.
    assert "additional" not in reasons, reasons


def test_sla_op_benchmark_refuses_the_cpu_and_plots_its_rows(tmp_path):
    """``benchmarks/sla_op.py``: no GPU, no run; speedups over the best dense row per mode, per-call and CUDA-graph
    (forward); its plot draws every measured row of a result (made-up times)."""
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU refusal")
    from benchmarks import sla_op

    with pytest.raises(SystemExit):
        sla_op.main(["--iters", "1"])
    pytest.importorskip("matplotlib")
    rows = [dict(method=m, sparsity=None, mode=mode, status="ok", ms=10.0, speedup_vs_best_sdpa=1.0)
            for mode in sla_op.MODES for m in sla_op.DENSE]  # fmt: skip
    rows += [dict(method=m, sparsity=s, mode=mode, status="ok", ms=1.0 + s, speedup_vs_best_sdpa=10.0 / (1.0 + s))
             for mode in sla_op.MODES for s in (0.8, 0.9) for m in sla_op.SPARSE]  # fmt: skip
    rows.append(dict(method="sparse", sparsity=0.95, mode="fwd", status="oom", error="out of memory"))
    for r in rows:  # CUDA-graph times of the forward rows: dense 9 ms (the best), the sparse ops 0.5 ms under theirs
        if r["mode"] == "fwd" and r["status"] == "ok":
            r["graph_ms"] = 9.0 + (r["method"] == "sdpa") if r["sparsity"] is None else r["ms"] - 0.5
    sla_op._speedups(rows)
    sparse_fwd = next(r for r in rows if r["method"] == "sparse" and r["mode"] == "fwd" and r["sparsity"] == 0.8)
    assert sparse_fwd["graph_speedup_vs_best_sdpa"] == pytest.approx(9.0 / 1.3)
    assert sparse_fwd["speedup_vs_best_sdpa"] == pytest.approx(10.0 / 1.8)
    assert not any("graph_speedup_vs_best_sdpa" in r for r in rows if r["mode"] == "fwd+bwd")
    meta = dict(commit="0123456789abcdef", gpu="NVIDIA H200", cpu="x", torch="2", triton="3", date="2026-11-30")
    shape = dict(batch=1, tokens=32760, heads=12, head_dim=128, dtype="bf16")
    sla_op.plot({"benchmark": "sla_op", "meta": meta, "shape": shape, "rows": rows}, tmp_path / "sla_op.png")
    assert (tmp_path / "sla_op.png").stat().st_size > 10_000


def test_sla_fwd_variants_benchmark_checks_its_variant_kernel_in_the_interpreter(tmp_path):
    """``benchmarks/sla_fwd_variants.py``: without a GPU it refuses (exit 2); under Triton's interpreter its variant
    kernel (pointer and TMA-descriptor loads, several tiles, a ragged last key block) reproduces the shipped forward
    kernel's output and log-sum-exp."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("checks the CPU paths")
    import json
    import subprocess
    import sys

    script = os.path.join(ROOT, "benchmarks", "sla_fwd_variants.py")
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, script, "--out", str(tmp_path)], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, script, "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "sla_fwd_variants.json").read_text())
    rows = doc["rows"]
    assert "partial" not in doc  # the run's last write (the ones before it say "partial": true)
    assert len(rows) == 3 and {"tma" in r["name"] for r in rows} == {True, False}
    assert all(r["err"] < 1e-5 and r["lse_err"] < 1e-5 for r in rows), rows


def test_sla_parts_benchmark_refuses_bad_input_and_the_cpu_and_plots(tmp_path, capsys):
    """``benchmarks/sla_parts.py``: a sparsity outside [0, 1) is refused by name; no GPU, no run (exit 2, a message);
    its plot draws the measured rows (made-up times) and leaves out the tile sweep's and the failed ones."""
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU refusal")
    from benchmarks import sla_parts

    with pytest.raises(SystemExit):
        sla_parts.main(["--sparsity", "1.5"])
    assert "--sparsity must be in [0, 1), got 1.5" in capsys.readouterr().err
    assert sla_parts.main(["--iters", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    pytest.importorskip("matplotlib")
    rows = [
        dict(name=nm, status="ok", ms=ms, dense_over_this=11.5 / ms)
        for nm, ms in (("dense:cudnn", 11.5), ("total:sla-code", 1.7), ("part:pool", 0.1), ("tiles:x", 9.0))
    ]
    rows.append(dict(name="part:states-paper", status="error", error="RuntimeError: boom"))  # fmt: skip
    meta = dict(commit="0123456789abcdef", gpu="NVIDIA H200", cpu="x", torch="2", triton="3", date="2026-12-01")
    shape = dict(tokens=32760, heads=12, head_dim=128, sparsity=0.95)
    sla_parts.plot({"benchmark": "sla_parts", "meta": meta, "shape": shape, "rows": rows}, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000


def lse_grad_check(device, dtype=torch.float32, method="sla"):
    """The op's log2-sum-exp output alone differentiated (the ``delta`` shift in ``sla_bwd_sparse``): gradients of
    ``sum(c * lse)`` for q, k, v against float64 autograd of the masked scores' ``logsumexp / ln 2`` (v: zero)."""
    from visionlin.kernels.triton import sparse_linear as sl

    (q, k, v), w, bias = _inputs(2, 100, 130, 2, 20, 24, dtype, seed=3)
    c = torch.randn(2, 2, 100, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    block_map = sla_block_map(q, k, topk=0.4, block_q=64, block_k=64)
    linear = method == "sla"
    lut, marginal = sl.select_blocks(q.to(device), k.to(device), 0.4, 0.0, 64, 64, marginal=linear)
    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    extra = [None] * 4
    if linear:
        hi, zi = sl.linear_states(leaves[1].detach(), leaves[2].detach(), marginal, 64, "softmax")
        extra = [hi, zi, w.to(device), bias.to(device)]
    lse = sl._fwd(*leaves, lut, *extra, 20**-0.5, 1e-5, 64, 64, 0)[2]
    ours = torch.autograd.grad((lse.double() * c.to(device)).sum(), leaves, materialize_grads=True)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    cls = block_map[:, :, torch.arange(100) // 64][:, :, :, torch.arange(130) // 64]
    s = torch.einsum("bnhd,bmhd->bhnm", ref_leaves[0], ref_leaves[1]) * 20**-0.5
    lse2 = torch.where(cls == 1, s, torch.full_like(s, -torch.inf)).logsumexp(-1) / torch.log(torch.tensor(2.0))
    assert _rel(lse.cpu(), lse2) <= (F32_TOL if dtype == torch.float32 else FLOOR[dtype])
    ref = torch.autograd.grad((lse2 * c).sum(), ref_leaves, materialize_grads=True)
    tol = F32_TOL if dtype == torch.float32 else FLOOR[dtype]  # half inputs: dS rounds to their dtype for its products
    for nm, a, r in zip(("dq", "dk"), ours[:2], ref[:2], strict=True):
        assert _rel(a.cpu(), r) <= tol, (method, dtype, nm, _rel(a.cpu(), r))
    assert not ours[2].any(), "the log-sum-exp does not depend on v"


def readout_check(shape, dtype, device, *, variant="paper", fmap="softmax", bq=64, bk=64, seed=0, tol=1e-5):
    """The fused linear read-out backward (``TUNING["fused_readout_bwd"]``) against the torch
    ``_readout_backward``: its five outputs on the same inputs, then forward + backward of the whole Triton op with
    the switch on and off (gradients of q, k, v, the projection's weight and bias). Both paths run float32 math on
    the same values (relative bound ``tol``: float32's in the interpreter, whose products are IEEE float32)."""
    from visionlin.kernels.triton import sparse_linear as sl

    b, n, m, h, d, dv = shape
    (q, k, v), w, bias = _inputs(b, n, m, h, d, dv, dtype, seed=seed)
    q, k, v, w, bias = (t.to(device) for t in (q, k, v, w, bias))
    g = torch.randn(b, n, h, dv, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    k_low = 0.2 if variant == "paper" else 0.0
    lut, marginal = sl.select_blocks(q, k, 0.4, k_low, bq, bk, marginal=variant == "paper")
    hi, zi = sl.linear_states(k, v, marginal, bk, fmap)
    ref = sl._readout_backward(q, hi, zi, w, bias, g, fmap, 1e-5, bq)
    ours = sl._readout_backward_fused(q, hi, zi, w, bias, g, fmap, 1e-5, bq)
    names = ["dq", "dH_i", "dZ_i", "dW", "db"]
    for nm, a, r in zip(names, ours, ref, strict=True):
        assert a.shape == r.shape and a.dtype == r.dtype, (nm, a.shape, r.shape, a.dtype, r.dtype)
        assert _rel(a, r) <= tol, (shape, dtype, variant, fmap, nm, _rel(a, r))
    grads = []
    before = sl.TUNING["fused_readout_bwd"]
    for fused in (False, True):
        sl.TUNING["fused_readout_bwd"] = fused
        try:
            leaves = [t.clone().requires_grad_() for t in (q, k, v, w, bias)]
            out = sl.sparse_linear_attention_triton(
                *leaves, topk=0.4, k_low=k_low, block_q=bq, block_k=bk, feature_map=fmap, variant=variant
            )
            grads.append((out, *torch.autograd.grad(out, leaves, g)))
        finally:
            sl.TUNING["fused_readout_bwd"] = before
    for nm, a, r in zip(["out", "dq", "dk", "dv", "dw", "dbias"], grads[1], grads[0], strict=True):
        bound = tol + (FLOOR[a.dtype] / 4 if a.dtype in FLOOR else 0.0)  # + one rounding of a half-precision result
        assert a.dtype == r.dtype and _rel(a, r) <= bound, (shape, dtype, variant, fmap, nm, _rel(a, r))


_READOUT_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from tests.test_kernels_triton_sparse_linear import readout_check
    f32, f16 = torch.float32, torch.float16
    cases = [
        (dict(shape=(2, 100, 130, 2, 20, 24)), (f32, f16)),  # partial last query block, padded head dims, batch 2
        (dict(shape=(1, 150, 200, 2, 20, 24), variant="code"), (f32, f16)),
        (dict(shape=(1, 70, 130, 1, 16, 16), fmap="elu"), (f32,)),
        (dict(shape=(1, 200, 130, 1, 32, 32), fmap="relu", bq=128), (f16,)),  # two 64-row tiles per query block
        (dict(shape=(1, 90, 100, 1, 100, 72), variant="code"), (f32,)),  # head dim 100: 32-row tiles
    ]
    for case, dtypes in cases:
        for dtype in dtypes:
            readout_check(device="cpu", dtype=dtype, **case)
    print("interpreter ok")
    """
)


def test_interpreter_sla_readout_backward_matches_torch():
    """The fused read-out backward on the CPU (Triton's interpreter) equal to the torch path, float32 and float16."""
    pytest.importorskip("triton")
    run_in_interpreter(_READOUT_INTERPRETER_SCRIPT)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("fmap", sorted(SLA_FEATURE_MAPS))
@pytest.mark.parametrize("variant", ["paper", "code"])
@pytest.mark.parametrize(
    "shape,bq,bk",
    [((1, 1000, 900, 2, 64, 64), 64, 64), ((3, 777, 777, 3, 128, 128), 128, 64), ((2, 300, 500, 2, 128, 128), 64, 128),
     ((1, 65, 200, 1, 80, 80), 128, 128)],
)  # fmt: skip
def test_triton_sla_readout_backward_fused(shape, bq, bk, variant, fmap, dtype):
    """The fused read-out backward on the GPU at awkward shapes (N not a multiple of the block, head dims 64, 80 and
    128), switch on, against the torch path. Half inputs' read-out products run as one TF32 product (``LIN_PREC``,
    as the forward's), so their bound is the dtype's four-unit floor; float32 inputs' (``tf32x3``) float32's."""
    readout_check(shape, dtype, "cuda", variant=variant, fmap=fmap, bq=bq, bk=bk, tol=FLOOR.get(dtype, F32_TOL))


_ADDITIONAL_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from tests.test_kernels_triton_sparse_linear import check, lse_grad_check
    from visionlin.kernels import sparse_linear as ksl
    from visionlin.kernels.triton import sparse_linear as sl
    f32, f16 = torch.float32, torch.float16
    cases = [
        dict(shape=(2, 150, 130, 2, 20, 24), text=70),  # N, M not multiples of 64, batch 2, padded head dims
        dict(shape=(1, 100, 200, 1, 16, 16), text=1, variant="code"),
        dict(shape=(1, 200, 130, 2, 32, 32), text=70, bq=128, bk=64, fmap="elu"),
        dict(shape=(1, 150, 130, 2, 20, 24), text=70, method="sparse"),
        dict(shape=(1, 70, 200, 1, 32, 16), text=1, method="sparse", bq=64, bk=128),
    ]
    assert sl.TUNING["additional_keys"] == "kernel"  # the default
    for mode in sl.ADDITIONAL_MODES:  # the dense part over the additional keys by the kernels, by torch
        sl.TUNING["additional_keys"] = mode
        # the torch mode changes only that part: two cases (SLA, sparse) suffice for it
        for case in cases if mode == "kernel" else cases[::3]:
            for dtype in (f32, f16):
                check(device="cpu", dtype=dtype, direct=True, **case)
    # The torch mode in several chunks of query rows (40, the last one 30).
    sl.ADDITIONAL_CHUNK = 40 * 2 * 70
    check(shape=(1, 150, 130, 2, 20, 24), text=70, device="cpu", dtype=f32, direct=True)
    check(shape=(1, 150, 130, 2, 20, 24), text=70, device="cpu", dtype=f16, direct=True, method="sparse")
    sl.TUNING["additional_keys"] = "nope"
    try:
        check(shape=(1, 70, 70, 1, 16, 16), text=1, device="cpu", dtype=f32, direct=True)
        raise AssertionError("an unknown TUNING['additional_keys'] ran")
    except ValueError as e:
        assert "choose one of ('kernel', 'torch')" in str(e), e
    sl.TUNING["additional_keys"] = "kernel"
    for method in ("sla", "sparse"):
        lse_grad_check("cpu", f32, method)
    lse_grad_check("cpu", f16, "sla")
    # The custom ops' registrations with the log-sum-exp gradient and the fused read-out backward.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 70, 2, 16, generator=g).requires_grad_() for _ in range(3))
    lut, marginal = sl.select_blocks(q, k, 0.5, 0.0, 64, 64, True)
    hi, zi = (t.detach().requires_grad_() for t in sl.linear_states(k, v, marginal, 64, "softmax"))
    w = torch.randn(16, 16, generator=g)
    out, o_s, lse = sl._fwd(q, k, v, lut, hi, zi, w, None, 0.25, 1e-5, 64, 64, 0)
    go, glse = torch.randn_like(out), torch.randn_like(lse)
    qd, kd, vd, osd, lsed, hid, zid = (t.detach() for t in (q, k, v, o_s, lse, hi, zi))  # backward ops: no autograd
    torch.library.opcheck(sl.sla_bwd_sparse, (qd, kd, vd, osd, lsed, go, lut, 0.25, 64, 64, glse))
    torch.library.opcheck(sl.sla_readout_bwd, (qd, go, hid, zid, w, 1e-5, 64, 0))
    torch.library.opcheck(sl.sla_fwd, (q, k, v, lut, None, None, None, None, 0.25, 1.0, 64, 64, 0))
    # torch.compile(fullgraph=True) through the custom ops and the chunked dense part, forward and backward, equal to
    # eager (aot_eager: the same kernels, traced through the fake registrations).
    kt, vt = (torch.randn(1, 9, 2, 16, generator=g).requires_grad_() for _ in range(2))
    w.requires_grad_()

    def f(q, k, v, kt, vt, w):
        kw = dict(block_q=64, block_k=64, additional_keys=kt, additional_values=vt)
        return ksl._sla_triton(q, k, v, w, None, topk=0.5, k_low=0.0, **kw) + ksl._bsa_triton(q, k, v, topk=0.5, **kw)

    leaves = (q, k, v, kt, vt, w)
    for mode in sl.ADDITIONAL_MODES:
        sl.TUNING["additional_keys"] = mode
        torch._dynamo.reset()
        eager = f(*leaves)
        ge = torch.autograd.grad(eager.square().sum(), leaves)
        traced = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
        gt = torch.autograd.grad(traced.square().sum(), leaves)
        for a, b in zip((eager, *ge), (traced, *gt)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    print("interpreter ok")
    """
)


def test_interpreter_sla_additional_keys_match_formula():
    """SLA (paper, code) and block-sparse attention with additional keys (T = 1 and 70) on the CPU (Triton's
    interpreter), float32 and float16, their dense part by the kernels and by torch: output and every gradient (q, k,
    v, the additional keys and values, W, b) vs float64, the chunked torch part, the log-sum-exp's own gradient, the
    custom ops' registrations and a fullgraph compile."""
    pytest.importorskip("triton")
    run_in_interpreter(_ADDITIONAL_INTERPRETER_SCRIPT)


@gpu
@pytest.mark.parametrize("mode", ["kernel", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("method", ["sla-paper", "sla-code", "sparse"])
@pytest.mark.parametrize(
    "shape,bq,bk,text",
    [((1, 1000, 1000, 2, 64, 64), 64, 64, 77), ((3, 777, 777, 3, 80, 80), 64, 64, 77),
     ((1, 1000, 900, 2, 128, 128), 128, 64, 77), ((2, 300, 300, 2, 128, 128), 128, 128, 1),
     ((1, 65, 200, 1, 64, 64), 64, 128, 70)],
)  # fmt: skip
def test_triton_additional_keys_shapes(shape, bq, bk, text, method, dtype, mode, monkeypatch):
    """Additional (joint text) keys at awkward shapes: N not a multiple of the block, T = 1, 70 and 77, batch 1, 2 and
    3, head dims 64, 80 (padded) and 128; their dense part by the kernels and by torch; output and every gradient
    against float64."""
    from visionlin.kernels.triton import sparse_linear as sl

    monkeypatch.setitem(sl.TUNING, "additional_keys", mode)
    meth, _, variant = method.partition("-")
    check(shape, dtype, "cuda", method=meth, variant=variant or "paper", bq=bq, bk=bk, topk=0.3, k_low=0.2, text=text)


@gpu
@pytest.mark.parametrize("mode", ["kernel", "torch"])
@pytest.mark.parametrize("method", ["sla-paper", "sla-code", "sparse"])
def test_triton_additional_keys_flux_shape(method, mode, monkeypatch):
    """FLUX.1 at 1024 px: 4,096 image tokens, 512 text tokens, 24 heads of 128, bf16, 90% sparsity; the truth is the
    ``"torch"`` backend (``long``)."""
    from visionlin.kernels.triton import sparse_linear as sl

    monkeypatch.setitem(sl.TUNING, "additional_keys", mode)
    meth, _, variant = method.partition("-")
    check((1, 4096, 4096, 24, 128, 128), torch.bfloat16, "cuda", method=meth, variant=variant or "paper", topk=0.1,
          k_low=0.1, text=512, long=True)  # fmt: skip


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_additional_keys_chunked(dtype, monkeypatch):
    """The torch mode of the dense part over the additional keys in several chunks of query rows (the last one
    short)."""
    from visionlin.kernels.triton import sparse_linear as sl

    monkeypatch.setitem(sl.TUNING, "additional_keys", "torch")
    monkeypatch.setattr(sl, "ADDITIONAL_CHUNK", 300 * 2 * 77)
    check((2, 1000, 1000, 2, 64, 64), dtype, "cuda", topk=0.3, text=77)
    check((2, 1000, 1000, 2, 64, 64), dtype, "cuda", method="sparse", topk=0.3, text=77)


@gpu
def test_triton_additional_keys_lse_gradient():
    for method in ("sla", "sparse"):
        lse_grad_check("cuda", torch.float32, method)
        lse_grad_check("cuda", torch.bfloat16, method)


@gpu
@pytest.mark.parametrize("mode", ["kernel", "torch"])
def test_triton_additional_keys_chosen_and_compile_fullgraph(mode, monkeypatch):
    """With additional keys the automatic backend of a CUDA call is ``"triton"``; ``torch.compile(fullgraph=True)``
    runs it forward and backward, equal to eager."""
    from visionlin.kernels import get_op
    from visionlin.kernels.triton import sparse_linear as sl

    monkeypatch.setitem(sl.TUNING, "additional_keys", mode)
    torch._dynamo.reset()

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 300, 2, 64, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    kt, vt = (torch.randn(1, 77, 2, 64, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
              for _ in range(2))  # fmt: skip
    w = (0.1 * torch.randn(64, 64, device="cuda", generator=g)).requires_grad_()
    extra = dict(additional_keys=kt, additional_values=vt)
    assert get_op("sparse_linear_attention").select(q, q, q, w, **extra).name == "triton"
    assert get_op("block_sparse_attention").select(q, q, q, **extra).name == "triton"

    def f(q, kt, vt, w):
        kw = dict(additional_keys=kt, additional_values=vt)
        sla = sparse_linear_attention(q, q, q, w, topk=0.5, k_low=0.2, **kw)
        return sla + block_sparse_attention(q, q, q, topk=0.5, **kw)

    leaves = (q, kt, vt, w)
    eager = f(*leaves)
    ge = torch.autograd.grad(eager.float().square().sum(), leaves)
    compiled = torch.compile(f, fullgraph=True)(*leaves)
    gc = torch.autograd.grad(compiled.float().square().sum(), leaves)
    for a, b in zip((eager, *ge), (compiled, *gc), strict=True):
        assert _rel(b, a) <= FLOOR[torch.bfloat16], _rel(b, a)
