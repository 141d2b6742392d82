"""Neighborhood attention's ``"flex"`` (FlexAttention with a window ``mask_mod``) and ``"chunked"`` (the reference's
math over chunks of the queries) backends against :func:`visionlin.kernels.neighborhood_attention_reference`.

On the CPU: the ``mask_mod`` allows exactly :func:`neighborhood_indices`' keys (plus every additional key), the block
mask built from the windows equals ``create_block_mask``'s, the ``score_mod`` adds the reference's bias, FlexAttention's
unfused CPU forward (through the backend function) matches the reference, and the mods' dense evaluation matches its
gradients (FlexAttention has no CPU backward). The chunked backend matches the reference forward and backward with a
tiny budget, within which every chunk stays. The ``gpu`` tests run the fused kernels on the GPU machine.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.nn.attention import flex_attention as fa

from visionlin.kernels import get_op, neighborhood_attention, neighborhood_attention_reference
from visionlin.kernels import neighborhood as na

# (spatial, kernel, dilation, additional keys): 1-D / 2-D / 3-D, dilation groups, windows capped on small axes
# (kernel >= axis: the whole axis; kernel * dilation > axis: dilation capped), per-axis tuples.
CASES = [
    ((13,), 5, 2, 0),
    ((6,), 7, 1, 3),
    ((9, 11), (5, 3), (1, 2), 3),
    ((5, 16), 7, (1, 8), 0),
    ((4, 5, 7), 3, (1, 1, 2), 5),
    ((3, 6, 5), (5, 3, 7), (1, 2, 1), 0),
]
IDS = ["1d_dil", "1d_capped_extra", "2d_extra", "2d_capped", "3d_extra", "3d_capped"]


def _tuples(spatial, kernel, dilation):
    nd = len(spatial)
    as_tuple = lambda x: (x,) * nd if isinstance(x, int) else tuple(x)  # noqa: E731
    return as_tuple(kernel), as_tuple(dilation)


def _inputs(spatial, kernel, extra, *, batch=2, heads=2, dim=16, dv=16, dtype=torch.float64, device="cpu", rpb=True):
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)  # noqa: E731
    q, k = make(batch, *spatial, heads, dim), make(batch, *spatial, heads, dim)
    v = make(batch, *spatial, heads, dv)
    bias = make(heads, *(2 * ks - 1 for ks in kernel)) if rpb else None
    ek = make(batch, extra, heads, dim) if extra else None
    ev = make(batch, extra, heads, dv) if extra else None
    return q, k, v, dict(rpb=bias, additional_keys=ek, additional_values=ev)


# A tile per case for the tiled token order (edge tiles smaller than the others); None: row-major.
TILES = [(4,), (4,), (2, 4), (4, 4), (2, 2, 4), (2, 4, 2)]
ORDERS = ["rowmajor", "tiled"]


def _layout(spatial, kernel, dilation, extra, tile, block=128):
    return na._flex_layout(spatial, kernel, dilation, extra, torch.device("cpu"), block, tile)


def _dense_mask(block_mask, n, extra):
    return fa.create_mask(block_mask.mask_mod, None, None, n, n + extra, device="cpu")[0, 0]  # [N, N + E]


def _case(case, order):
    spatial, kernel, dilation, extra = CASES[case]
    kernel, dilation = _tuples(spatial, kernel, dilation)
    return spatial, kernel, dilation, extra, (TILES[case] if order == "tiled" else None)


CASE_IDS = list(range(len(CASES)))


# Masks and scores -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_IDS, ids=IDS)
def test_mask_mod_allows_exactly_the_window(case, order):
    spatial, kernel, dilation, extra, tile = _case(case, order)
    n = math.prod(spatial)
    block_mask, perm, inv, _ = _layout(spatial, kernel, dilation, extra, tile)
    assert (perm is None) == (tile is None)
    if perm is not None:  # a permutation, and inv its inverse
        assert torch.equal(perm.sort().values, torch.arange(n)) and torch.equal(perm[inv], torch.arange(n))
    flat, _ = na._flat_windows(spatial, kernel, dilation, torch.device("cpu"))
    windows = flat if perm is None else inv[flat[perm]]  # position p holds token perm[p]
    want = torch.zeros(n, n + extra, dtype=torch.bool)
    want[torch.arange(n)[:, None], windows] = True
    want[:, n:] = True
    got = _dense_mask(block_mask, n, extra)
    assert torch.equal(got, want), (got.sum().item(), want.sum().item())
    assert (got[:, :n].sum(-1) == flat.shape[1]).all()  # every query keeps exactly K neighbours


@pytest.mark.parametrize("block", [16, 128])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_IDS, ids=IDS)
def test_block_mask_equals_create_block_mask(case, order, block):
    spatial, kernel, dilation, extra, tile = _case(case, order)
    n = math.prod(spatial)
    ours = _layout(spatial, kernel, dilation, extra, tile, block)[0]
    theirs = fa.create_block_mask(ours.mask_mod, None, None, n, n + extra, device="cpu", BLOCK_SIZE=block)
    assert ours.seq_lengths == theirs.seq_lengths and ours.BLOCK_SIZE == theirs.BLOCK_SIZE
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


def _visited(block_mask):
    return int(block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum())


def test_tiled_order_visits_fewer_blocks_and_is_cached():
    """A 3-D window on a grid much larger than the kernel: few key blocks per query block, fewer in the chosen tiles
    than row-major; one layout per configuration."""
    spatial, kernel, dilation = (8, 16, 16), (3, 3, 3), (1, 1, 1)
    tile = na._flex_tile(spatial, kernel, dilation)
    assert tile is not None and math.prod(tile) == 128
    tiled = _layout(spatial, kernel, dilation, 0, tile)[0]
    row_major = _layout(spatial, kernel, dilation, 0, None)[0]
    blocks = math.ceil(math.prod(spatial) / 128)
    assert _visited(tiled) < _visited(row_major) <= 8 * blocks < blocks**2
    # Small grids keep row-major when no tile does better.
    assert na._flex_tile((5, 6), (3, 3), (1, 1)) is None
    args = (spatial, kernel, dilation, 0, torch.device("cpu"), 128, tile)
    assert na._flex_layout_cached(*args) is na._flex_layout_cached(*args)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_IDS, ids=IDS)
def test_score_mod_adds_the_reference_bias(case, order):
    spatial, kernel, dilation, extra, tile = _case(case, order)
    n, heads = math.prod(spatial), 2
    rpb = torch.randn(heads, *(2 * ks - 1 for ks in kernel), dtype=torch.float64)
    _, perm, inv, coords = _layout(spatial, kernel, dilation, extra, tile)
    _, score_mod = na._flex_mods(spatial, kernel, dilation, rpb, coords)
    scores = torch.randn(heads, n, n + extra, dtype=torch.float64)
    dense = _dense_scores(score_mod, scores)
    flat, bias_index = na._flat_windows(spatial, kernel, dilation, torch.device("cpu"))
    want = rpb[(slice(None), *bias_index)].reshape(heads, n, -1)  # the reference's bias, row-major tokens
    if perm is not None:
        flat, want = inv[flat[perm]], want[:, perm]
    rows = torch.arange(n)[:, None]
    torch.testing.assert_close(dense[:, rows, flat] - scores[:, rows, flat], want, rtol=0, atol=1e-12)
    assert torch.equal(dense[:, :, n:], scores[:, :, n:])  # no bias on the additional keys


def _dense_scores(score_mod, scores):
    """``score_mod`` applied to every (head, query, key) of ``scores`` ``[H, Q, KV]`` (differentiable)."""
    heads, nq, nkv = scores.shape
    h, qi, ki = torch.meshgrid(torch.arange(heads), torch.arange(nq), torch.arange(nkv), indexing="ij")
    return score_mod(scores, torch.zeros_like(h), h, qi, ki)


def _dense_flex_math(q, k, v, kernel, dilation, tile, *, rpb=None, additional_keys=None, additional_values=None):
    """What the backend has FlexAttention compute, densely: tokens in the layout's order, scores, ``score_mod``,
    ``mask_mod``, softmax, back to row-major."""
    nd = q.ndim - 3
    spatial = tuple(q.shape[1 : 1 + nd])
    n, extra = math.prod(spatial), 0 if additional_keys is None else additional_keys.shape[1]
    block_mask, perm, inv, coords = _layout(spatial, kernel, dilation, extra, tile)
    qf, kf, vf = q.flatten(1, nd), k.flatten(1, nd), v.flatten(1, nd)
    if perm is not None:
        qf, kf, vf = qf[:, perm], kf[:, perm], vf[:, perm]
    if extra:
        kf, vf = torch.cat([kf, additional_keys], 1), torch.cat([vf, additional_values], 1)
    s = torch.einsum("bnhd,bmhd->bhnm", qf, kf) * q.shape[-1] ** -0.5
    _, score_mod = na._flex_mods(spatial, kernel, dilation, rpb, coords)
    if score_mod is not None:
        s = torch.stack([_dense_scores(score_mod, sb) for sb in s])
    s = s.masked_fill(~_dense_mask(block_mask, n, extra), float("-inf"))
    out = torch.einsum("bhnm,bmhe->bnhe", s.softmax(-1), vf)
    if inv is not None:
        out = out[:, inv]
    return out.reshape(q.shape[0], *spatial, q.shape[-2], v.shape[-1])


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_IDS, ids=IDS)
def test_flex_mods_match_the_reference_forward_and_backward(case, order):
    """Gradients of q, k, v, rpb and the additional keys / values through the mods (dense, float64)."""
    spatial, kernel, dilation, extra, tile = _case(case, order)
    q, k, v, kw = _inputs(spatial, kernel, extra, batch=1, dv=12)
    leaves = [q, k, v] + [t for t in kw.values() if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    grad = torch.randn(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    ours = _dense_flex_math(q, k, v, kernel, dilation, tile, **kw)
    ours_grads = torch.autograd.grad(ours, leaves, grad)
    ref = neighborhood_attention_reference(q, k, v, kernel, dilation, **kw)
    ref_grads = torch.autograd.grad(ref, leaves, grad)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_IDS, ids=IDS)
def test_flex_backend_cpu_forward_matches_reference(monkeypatch, case, order):
    """The backend function itself on FlexAttention's unfused CPU forward (supports() sends CPU calls elsewhere)."""
    spatial, kernel, dilation, extra, tile = _case(case, order)
    monkeypatch.setattr(na, "_flex_tile", lambda *args: tile)
    q, k, v, kw = _inputs(spatial, kernel, extra, dtype=torch.float32, dv=24)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unfused without torch.compile
        out = na._flex(q, k, v, kernel, dilation, scale=0.3, **kw)
    ref = neighborhood_attention_reference(q, k, v, kernel, dilation, scale=0.3, **kw)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_flex_layout_built_under_inference_mode_serves_autograd_calls():
    """The cached layout (token order, its inverse, coordinates) is made of normal tensors even when its first call
    ran under ``torch.inference_mode()``: a later call with autograd on indexes its inputs with it, which saves the
    permutation for backward (an inference tensor there raised in the converter's inference-then-fine-tune use)."""
    spatial, kernel, dilation = (8, 16, 16), (3, 3, 3), (1, 1, 1)
    tile = na._flex_tile(spatial, kernel, dilation)
    assert tile is not None  # a tiled order: a permutation to index with
    na._flex_layout_cached.cache_clear()
    with torch.inference_mode():
        _, perm, inv, coords = na._flex_layout_cached(spatial, kernel, dilation, 2, torch.device("cpu"), 128, tile)
    assert not any(t.is_inference() for t in [perm, inv, *coords])
    x = torch.randn(1, perm.numel(), 2, requires_grad=True)
    x[:, perm].sum().backward()  # saves perm for backward
    assert x.grad is not None and torch.equal(x.grad, torch.ones_like(x))


def test_flex_backend_traces_without_graph_break():
    """Under torch.compile the backend (token order, block mask, mods, FlexAttention) is one graph (fullgraph=True);
    the grid is one where a tiled order is chosen."""
    spatial, kernel, dilation, extra = (8, 16, 16), (3, 3, 3), (1, 1, 1), 3
    assert na._flex_tile(spatial, kernel, dilation) is not None
    q, k, v, kw = _inputs(spatial, kernel, extra, dtype=torch.float32)
    fn = torch.compile(lambda *a: na._flex(*a, kernel, dilation, **kw), backend="eager", fullgraph=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn(q, k, v)
    torch.testing.assert_close(out, neighborhood_attention_reference(q, k, v, kernel, dilation, **kw))


def test_flex_past_the_recompile_limit_runs_the_chunked_reference(monkeypatch):
    """The compiled FlexAttention (faked on the CPU) runs under a raised recompile limit; past it (dynamo raises, as
    ``fullgraph=True`` makes it) the call warns and runs the chunked backend, never FlexAttention's dense eager path."""
    spatial, kernel, dilation, extra = (3, 4, 5), (3, 3, 3), (1, 1, 1), 2
    q, k, v, kw = _inputs(spatial, kernel, extra, dtype=torch.float32)
    ref = neighborhood_attention_reference(q, k, v, kernel, dilation, **kw)
    limits = []

    def fused(*args, **kwargs):
        limits.append(torch._dynamo.config.recompile_limit)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fa.flex_attention(*args, **kwargs)

    monkeypatch.setattr(na, "_flex_fused", lambda q: True)
    monkeypatch.setattr(na, "_flex_compiled", lambda: fused)
    before = torch._dynamo.config.recompile_limit  # 8 by default; other code in the process may have raised it
    with torch.no_grad():
        torch.testing.assert_close(na._flex(q, k, v, kernel, dilation, **kw), ref)
    assert limits == [max(before, na._FLEX_RECOMPILE_LIMIT)]
    assert torch._dynamo.config.recompile_limit == before  # restored after the call

    def over_the_limit(*args, **kwargs):
        raise torch._dynamo.exc.FailOnRecompileLimitHit("Hard failure due to fullgraph=True")

    monkeypatch.setattr(na, "_flex_compiled", lambda: over_the_limit)
    with pytest.warns(RuntimeWarning, match=r"recompile limit .* runs the chunked reference"):
        out = na._flex(q, k, v, kernel, dilation, **kw)
    torch.testing.assert_close(out, ref)


def test_flex_supports_reasons():
    op = get_op("neighborhood_attention")
    q, k, v = (torch.randn(1, 3, 4, 5, 2, 8, dtype=torch.float64) for _ in range(3))
    reasons = "; ".join(op.supports(q, k, v, (3, 3, 3), (1, 1, 1), dropout_p=0.1, backend="flex"))
    for words in ("need CUDA tensors, got cpu", "no attention dropout", "dtype torch.float64", "D=8, Dv=8"):
        assert words in reasons, (words, reasons)
    q, k, v = (torch.randn(1, 3, 4, 5, 2, 16) for _ in range(3))
    extra = torch.zeros(1, 2, 2, 16, dtype=torch.bfloat16)
    reasons = op.supports(q, k, v, (3, 3, 3), (1, 1, 1), additional_keys=extra, additional_values=extra, backend="flex")
    assert any("mixed dtypes torch.bfloat16, torch.float32" in r for r in reasons), reasons
    with pytest.raises(NotImplementedError, match=r"backend 'flex' cannot run this call: .*CUDA"):
        neighborhood_attention(q, k, v, 3, backend="flex")


# Chunked --------------------------------------------------------------------------------------------------------------
def test_backend_order_and_cpu_choice():
    op = get_op("neighborhood_attention")
    assert list(op.backends) == ["natten", "triton", "flex", "chunked", "reference"]
    q, k, v = (torch.randn(1, 3, 4, 5, 2, 8) for _ in range(3))
    assert op.select(q, k, v, (3, 3, 3), (1, 1, 1), dropout_p=0.1, backend=None).name == "chunked"


@pytest.mark.parametrize(("spatial", "kernel", "dilation", "extra"), CASES, ids=IDS)
def test_chunked_matches_reference_within_a_small_budget(monkeypatch, spatial, kernel, dilation, extra):
    """With a budget of a few queries, several checkpointed chunks, each within the budget; forward and gradients
    (q, k, v, rpb, additional keys / values) equal the reference's."""
    kernel, dilation = _tuples(spatial, kernel, dilation)
    q, k, v, kw = _inputs(spatial, kernel, extra, dv=12)
    n, n_win = na._flat_windows(spatial, kernel, dilation, torch.device("cpu"))[0].shape
    per_query = 2 * 2 * (n_win * (16 + 12) + 3 * (n_win + extra)) * 8  # B * H * (gathers + scores) * float64
    monkeypatch.setattr(na, "CHUNK_BYTES", 3 * per_query + 5)
    rows = []
    chunk_fn = na._na_chunk

    def spy(qf, kf, vf, flat, *args):
        rows.append(flat.shape[0])
        return chunk_fn(qf, kf, vf, flat, *args)

    monkeypatch.setattr(na, "_na_chunk", spy)
    leaves = [q, k, v] + [t for t in kw.values() if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    grad = torch.randn(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    out = neighborhood_attention(q, k, v, kernel, dilation, backend="chunked", **kw)
    forward_rows = list(rows)
    grads = torch.autograd.grad(out, leaves, grad)
    assert max(rows) == 3 and sum(forward_rows) == n and len(forward_rows) == math.ceil(n / 3)
    assert len(rows) == 2 * len(forward_rows)  # checkpointed: each chunk recomputed once in the backward
    ref = neighborhood_attention_reference(q, k, v, kernel, dilation, **kw)
    ref_grads = torch.autograd.grad(ref, leaves, grad)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_chunked_one_chunk_is_the_reference_with_dropout():
    """Within the budget: one chunk, no checkpoint, the reference's dropout mask (same RNG draws)."""
    q, k, v, kw = _inputs((5, 6), (3, 3), 2, dtype=torch.float32)
    torch.manual_seed(3)
    out = neighborhood_attention(q, k, v, 3, dropout_p=0.3, backend="chunked", **kw)
    torch.manual_seed(3)
    ref = neighborhood_attention_reference(q, k, v, 3, dropout_p=0.3, **kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.allclose(out, neighborhood_attention_reference(q, k, v, 3, **kw))


def test_chunked_dropout_replays_its_masks_in_the_backward(monkeypatch):
    """Checkpointed chunks restore the RNG state: gradients equal those of the same chunks run without checkpoints."""
    monkeypatch.setattr(na, "CHUNK_BYTES", 4096)
    q, k, v, _ = _inputs((7, 8), (3, 3), 0)
    for t in (q, k, v):
        t.requires_grad_(True)
    torch.manual_seed(5)
    out = na._chunked(q, k, v, (3, 3), (1, 1), dropout_p=0.4)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda fn, *args, **kwargs: fn(*args))
    torch.manual_seed(5)
    plain = na._chunked(q, k, v, (3, 3), (1, 1), dropout_p=0.4)
    plain_grads = torch.autograd.grad(plain.square().sum(), (q, k, v))
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    for a, b in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_chunked_exports_with_a_dynamic_batch(monkeypatch):
    """Several chunks under torch.export with a symbolic batch: the chunking is fixed at the traced batch (no guard on
    it) and the exported program is right at another batch."""
    monkeypatch.setattr(na, "CHUNK_BYTES", 20_000)
    spatial, kernel, extra = (3, 5, 6), (3, 3, 3), 2

    class Layer(torch.nn.Module):
        def forward(self, q, k, v, ek, ev):
            return neighborhood_attention(q, k, v, 3, additional_keys=ek, additional_values=ev, backend="chunked")

    q, k, v, kw = _inputs(spatial, kernel, extra, dtype=torch.float32, rpb=False)
    assert na._chunk_queries(q, v, 27, extra, 4) < math.prod(spatial)  # several chunks
    batch = torch.export.Dim("batch", max=64)
    args = (q, k, v, kw["additional_keys"], kw["additional_values"])
    with torch.no_grad():
        program = torch.export.export(Layer(), args, dynamic_shapes=[{0: batch}] * 5)
        q, k, v, kw = _inputs(spatial, kernel, extra, batch=5, dtype=torch.float32, rpb=False)
        out = program.module()(q, k, v, kw["additional_keys"], kw["additional_values"])
    torch.testing.assert_close(out, neighborhood_attention_reference(q, k, v, 3, **kw))


def test_chunk_size_follows_the_budget():
    q = torch.zeros(2, 1, 12, 128)
    per_query = 2 * 12 * (343 * 256 + 3 * (343 + 512)) * 4
    assert na._chunk_queries(q, q, 343, 512, 4) == na.CHUNK_BYTES // per_query
    assert na._chunk_queries(torch.zeros(4096, 1, 64, 256), torch.zeros(4096, 1, 64, 256), 343, 0, 8) == 1


# GPU ------------------------------------------------------------------------------------------------------------------
gpu = pytest.mark.gpu


def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def _rel(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


GPU_CASES = [
    ((5, 9, 13), 3, 1, 0, True),
    ((5, 9, 13), 3, 2, 7, True),
    ((5, 9, 13), 3, (1, 2, 1), 16, False),
    ((6, 7, 9), (5, 3, 7), 1, 0, False),
    ((3, 4, 5), 7, 1, 5, True),  # kernel larger than every axis: all of the grid
    ((17, 19), 5, (1, 2), 9, True),  # 2-D with additional keys (the Triton kernels cannot)
    ((29,), 7, 3, 4, True),
]
GPU_IDS = ["3d_k3", "3d_k3_d2_extra", "3d_mixed_dil_extra_nobias", "3d_mixed_k", "3d_capped", "2d_extra", "1d"]


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("spatial", "kernel", "dilation", "extra", "rpb"), GPU_CASES, ids=GPU_IDS)
def test_gpu_flex_matches_reference(spatial, kernel, dilation, extra, rpb, dtype):
    """Forward and gradients against the float64 reference on the same inputs. float32: 1e-4 relative; bfloat16: at
    most twice the error of the reference's math run in bfloat16 (DESIGN.md's rule), plus 1e-3 slack."""
    _cuda_or_skip()
    kernel, dilation = _tuples(spatial, kernel, dilation)
    q, k, v, kw = _inputs(spatial, kernel, extra, heads=3, dim=32, dv=64, dtype=dtype, device="cuda", rpb=rpb)
    if kw["rpb"] is not None:
        kw["rpb"] = kw["rpb"].float()
    leaves = [q, k, v] + [t for t in kw.values() if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    grad = torch.randn(*q.shape[:-1], v.shape[-1], device="cuda", dtype=dtype)
    assert get_op("neighborhood_attention").supports(q, k, v, kernel, dilation, backend="flex", **kw) == []
    out = neighborhood_attention(q, k, v, kernel, dilation, backend="flex", **kw)
    grads = torch.autograd.grad(out, leaves, grad)
    as64 = [t.detach().double().requires_grad_(True) for t in leaves]
    kw64 = dict(zip([n for n, t in kw.items() if t is not None], as64[3:], strict=True))
    ref = neighborhood_attention_reference(*as64[:3], kernel, dilation, **kw64)
    ref_grads = torch.autograd.grad(ref, as64, grad.double())
    if dtype == torch.float32:
        bounds = [1e-4] * (1 + len(leaves))
    else:  # the reference's formula with every intermediate in bfloat16
        low = [t.detach().requires_grad_(True) for t in leaves]
        kw_low = dict(zip([n for n, t in kw.items() if t is not None], low[3:], strict=True))
        plain = _plain_low(*low[:3], kernel, dilation, **kw_low)
        plain_grads = torch.autograd.grad(plain, low, grad)
        bounds = [2 * _rel(plain, ref) + 1e-3] + [
            2 * _rel(a, b) + 1e-3 for a, b in zip(plain_grads, ref_grads, strict=True)
        ]
    errors = [_rel(out, ref)] + [_rel(a, b) for a, b in zip(grads, ref_grads, strict=True)]
    names = ["out", "dq", "dk", "dv"] + [f"d{n}" for n, t in kw.items() if t is not None]
    for name, err, bound in zip(names, errors, bounds, strict=True):
        assert err <= bound, (name, err, bound)


def _plain_low(q, k, v, kernel, dilation, *, rpb=None, additional_keys=None, additional_values=None):
    """The reference's gather formula in the inputs' dtype (the bias table in float32 rounded to it)."""
    nd = q.ndim - 3
    spatial = tuple(q.shape[1 : 1 + nd])
    flat, bias_index = na._flat_windows(spatial, kernel, dilation, q.device)
    qf = q.flatten(1, nd) * q.shape[-1] ** -0.5
    s = torch.einsum("bnhd,bnkhd->bnhk", qf, k.flatten(1, nd)[:, flat])
    if rpb is not None:
        bias = rpb.to(q.dtype)[(slice(None), *bias_index)]
        s = s + bias.reshape(q.shape[-2], *flat.shape).transpose(0, 1)
    n_win = s.shape[-1]
    if additional_keys is not None:
        s = torch.cat([s, torch.einsum("bnhd,behd->bnhe", qf, additional_keys)], -1)
    w = s.softmax(-1)
    out = torch.einsum("bnhk,bnkhe->bnhe", w[..., :n_win], v.flatten(1, nd)[:, flat])
    if additional_keys is not None:
        out = out + torch.einsum("bnhe,behf->bnhf", w[..., n_win:], additional_values)
    return out.reshape(q.shape[0], *spatial, q.shape[-2], v.shape[-1])


@gpu
def test_gpu_wan_like_memory():
    """A Wan2.1-like layer at 8 frames (grid 8 x 30 x 52, kernel 7: K = 343, 64 text keys, 4 heads, head dim 128,
    bfloat16), forward and backward: the peak memory stays below 1/20 of what the reference's gathers alone need
    (``B N K H (D + Dv)`` float32 numbers), and the output matches the chunked backend's."""
    _cuda_or_skip()
    spatial, kernel, extra, heads, dim = (8, 30, 52), (7, 7, 7), 64, 4, 128
    q, k, v, kw = _inputs(spatial, kernel, extra, batch=1, heads=heads, dim=dim, dv=dim, dtype=torch.bfloat16,
                          device="cuda", rpb=False)  # fmt: skip
    n, n_win = math.prod(spatial), math.prod(kernel)
    reference_gathers = n * n_win * heads * 2 * dim * 4
    leaves = [q, k, v, kw["additional_keys"], kw["additional_values"]]
    for t in leaves:
        t.requires_grad_(True)
    op = get_op("neighborhood_attention")
    assert op.select(q, k, v, kernel, (1, 1, 1), backend=None, **kw).name == "flex"
    neighborhood_attention(q, k, v, kernel, **kw).sum().backward()  # compile and build the block mask first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = neighborhood_attention(q, k, v, kernel, **kw)
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < reference_gathers / 20, (peak, reference_gathers)
    with torch.no_grad():
        chunked = neighborhood_attention(q, k, v, kernel, backend="chunked", **kw)
    assert _rel(out.detach(), chunked) < 2e-2


@gpu
def test_gpu_automatic_selection():
    _cuda_or_skip()
    op = get_op("neighborhood_attention")
    q3, k3, v3, kw3 = _inputs((4, 6, 8), (3, 3, 3), 4, dtype=torch.bfloat16, device="cuda", dim=32, dv=32)
    assert op.select(q3, k3, v3, (3, 3, 3), (1, 1, 1), backend=None, **kw3).name == "flex"  # rpb: not natten
    kw3["rpb"] = None
    if na._natten_module() is None:
        assert op.select(q3, k3, v3, (3, 3, 3), (1, 1, 1), backend=None, **kw3).name == "flex"
    q2, k2, v2, kw2 = _inputs((9, 11), (3, 3), 0, dtype=torch.bfloat16, device="cuda", dim=32, dv=32)
    assert op.select(q2, k2, v2, (3, 3), (1, 1), backend=None, rpb=kw2["rpb"]).name == "triton"
    assert op.select(q3, k3, v3, (3, 3, 3), (1, 1, 1), backend=None, dropout_p=0.1).name == "chunked"
    q8, k8, v8, _ = _inputs((4, 6, 8), (3, 3, 3), 0, dtype=torch.bfloat16, device="cuda", dim=8, dv=8)
    assert op.select(q8, k8, v8, (3, 3, 3), (1, 1, 1), backend=None).name in ("natten", "chunked")
