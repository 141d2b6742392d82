"""Shifted-window attention (Swin) against a dense reference built pair by pair from the definition."""

from __future__ import annotations

import pytest
import torch

from visionlin.layers import ShiftedWindowAttention
from visionlin.layers.window import MASK_VALUE, window_partition, window_reverse


def _dense_reference(layer: ShiftedWindowAttention, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Softmax over all H*W real tokens with the bias written out for each (query, key) pair from the definition:
    the table entry of their offset when both fall in one window of the padded, rolled map and come from one region
    of it, else -100 (whose weight, next to in-window logits, is far below float64 resolution)."""
    (h, w), (wh, ww), (sh, sw) = grid, *layer.window_and_shift(grid)
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    n, heads, d = h * w, layer.num_heads, layer.head_dim
    table = layer.relative_position_bias_table
    side = 2 * layer.window_size - 1

    def rolled(i, j):  # position of token (i, j) in the rolled padded map
        return (i - sh) % hp, (j - sw) % wp

    def region(pos, size, win, shift):
        return 0 if not shift or pos < size - win else (1 if pos < size - shift else 2)

    offsets = torch.zeros(n, n, dtype=torch.long)
    extra = torch.full((n, n), MASK_VALUE, dtype=torch.float64)
    for a in range(n):
        ra, ca = rolled(a // w, a % w)
        for b in range(n):
            rb, cb = rolled(b // w, b % w)
            if ra // wh == rb // wh and ca // ww == cb // ww:  # one window
                offsets[a, b] = (ra - rb + layer.window_size - 1) * side + (ca - cb + layer.window_size - 1)
                same = region(ra, hp, wh, sh) == region(rb, hp, wh, sh)
                same = same and region(ca, wp, ww, sw) == region(cb, wp, ww, sw)
                extra[a, b] = 0.0 if same else MASK_VALUE
    in_window = extra == 0.0
    bias = torch.where(in_window, table[offsets].permute(2, 0, 1), extra)  # [h, N, N]
    q, k, v = layer.qkv(x).unflatten(-1, (3, heads, d)).unbind(2)  # [B, N, h, d]
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * d**-0.5
    # Keys outside the window: exp(-100) next to in-window logits is below float32 resolution.
    attn = (logits + bias).softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", attn, v).flatten(2)
    return layer.proj(out)


@pytest.mark.parametrize(
    "grid,window,shift",
    [((8, 8), 4, False), ((8, 8), 4, True), ((6, 10), 4, True), ((3, 5), 4, True), ((5, 7), 3, False)],
    ids=["square", "shifted", "padded-shifted", "smaller-than-window", "padded"],
)
def test_matches_dense_reference(grid, window, shift):
    torch.manual_seed(0)
    layer = ShiftedWindowAttention(16, 2, window_size=window, shift=shift).double()
    torch.nn.init.normal_(layer.relative_position_bias_table, std=1.0)
    x = torch.randn(2, grid[0] * grid[1], 16, dtype=torch.float64, requires_grad=True)
    out = layer(x, grid)
    torch.testing.assert_close(out, _dense_reference(layer, x, grid))
    out.square().sum().backward()
    assert layer.relative_position_bias_table.grad.abs().sum() > 0


def test_backward_matches_reference():
    torch.manual_seed(0)
    layer = ShiftedWindowAttention(16, 2, window_size=3, shift=True).double()
    x = torch.randn(1, 7 * 6, 16, dtype=torch.float64)
    params = dict(layer.named_parameters())
    g1 = torch.autograd.grad(layer(x, (7, 6)).square().sum(), list(params.values()))
    g2 = torch.autograd.grad(_dense_reference(layer, x, (7, 6)).square().sum(), list(params.values()))
    for name, a, b in zip(params, g1, g2, strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_index_and_mask_are_kept_between_forwards_per_mode(monkeypatch):
    """The bias index and the Swin mask depend on sizes only: built once per (grid, window, shift, dtype, device,
    inference mode) in eager mode and reused, with the same outputs; a mask built under ``inference_mode`` never
    reaches a training forward (its own entry), large masks are not kept, and nothing is kept while compiling or while
    a CUDA graph is captured."""
    from visionlin.layers import window as wmod

    monkeypatch.setattr(wmod, "_cache", {})
    built = []
    real = wmod.window_mask
    monkeypatch.setattr(wmod, "window_mask", lambda *a: built.append(a) or real(*a))
    torch.manual_seed(0)
    layer = ShiftedWindowAttention(16, 2, window_size=4, shift=True).double()
    x = torch.randn(2, 6 * 10, 16, dtype=torch.float64, requires_grad=True)
    first = layer(x, (6, 10))
    torch.testing.assert_close(layer(x, (6, 10)), first)
    assert len(built) == 1  # kept
    with torch.inference_mode():
        torch.testing.assert_close(layer(x.detach(), (6, 10)), first.detach())
    assert len(built) == 2  # its own entry
    layer(x, (6, 10)).square().sum().backward()  # the training forward uses the non-inference tensors
    assert x.grad is not None and len(built) == 2
    layer(x[:, :48], (6, 8))
    assert len(built) == 3  # another grid
    monkeypatch.setattr(wmod, "_MAX_CACHED_MASK", 10)
    layer(x[:, :40], (5, 8))
    layer(x[:, :40], (5, 8))
    assert len(built) == 5  # too large to keep
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "is_initialized", lambda: True)  # (a capture needs a context)
        m.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        layer(x, (6, 10))
        layer(x, (6, 10))
    assert len(built) == 7  # not while a CUDA graph is captured (nor is a kept entry used)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    layer(x, (6, 10))
    assert len(built) == 8  # not while compiling


def test_window_and_shift_follow_the_grid():
    layer = ShiftedWindowAttention(8, 1, window_size=7, shift=True)
    assert layer.window_and_shift((14, 14)) == ((7, 7), (3, 3))
    assert layer.window_and_shift((7, 7)) == ((7, 7), (0, 0))  # the authors: shift dropped when the window fits
    assert layer.window_and_shift((4, 14)) == ((4, 7), (0, 3))


def test_prefix_tokens_attend_everywhere():
    torch.manual_seed(0)
    layer = ShiftedWindowAttention(8, 2, window_size=2, shift=True)
    x = torch.randn(2, 1 + 16, 8)
    out = layer(x, (4, 4), 1)
    assert out.shape == x.shape
    x2 = x.clone()
    x2[:, -1] += 1.0  # the last grid token is in another window than the first: only the prefix row sees it
    out2 = layer(x2, (4, 4), 1)
    assert not torch.allclose(out2[:, 0], out[:, 0])
    torch.testing.assert_close(out2[:, 1], out[:, 1])


def test_partition_roundtrip_with_shift():
    x = torch.randn(2, 5 * 7, 3)
    windows = window_partition(x, (5, 7), (2, 3), (1, 1))
    assert windows.shape == (2 * 3 * 3, 6, 3)
    torch.testing.assert_close(window_reverse(windows, (5, 7), (2, 3), (1, 1)), x)


def test_checkpoint_table_for_another_window_is_resized():
    small = ShiftedWindowAttention(8, 2, window_size=7)
    big = ShiftedWindowAttention(8, 2, window_size=12)
    sd = big.adapt_state_dict(
        ShiftedWindowAttention.convert_official_state_dict(
            {**small.state_dict(), "relative_position_index": torch.zeros(49, 49, dtype=torch.long)}
        )
    )
    assert "relative_position_index" not in sd and sd["relative_position_bias_table"].shape == (23 * 23, 2)
    big.load_state_dict(sd)
    with pytest.raises(ValueError, match=r"relative_position_bias_table of shape \(10, 2\) is not"):
        big.adapt_state_dict({"relative_position_bias_table": torch.zeros(10, 2)})


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(window_size=0), ValueError, r"window_size=0 must be a positive integer"),
        (dict(qk_norm=True), NotImplementedError, "qk_norm"),
        (dict(attn_drop=1.0), ValueError, r"attn_drop=1.0 must be in \[0, 1\)"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ShiftedWindowAttention(8, 2, **kwargs)


def test_bad_tokens():
    layer = ShiftedWindowAttention(8, 2)
    with pytest.raises(ValueError, match=r"16 tokens do not match"):
        layer(torch.randn(1, 16, 8), (3, 3))


def _plain_attention(q, k, v, *, scale=None, attn_bias=None, dropout_p=0.0, backend=None):
    """Softmax attention written out in the inputs' dtype (no upcast): the error baseline of a half-precision path."""
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if attn_bias is not None:
        s = s + attn_bias.to(q.dtype)
    return torch.einsum("bhnm,bmhe->bnhe", s.softmax(dim=-1), v)


# (batch, grid, dim, heads, window, shift, prefix): 56 x 40 and 14 x 14 as in Swin-T's stages at 224 / 160 px, padded
# odd grids, head dims 32 / 80 / 64, a class token.
GPU_CASES = [
    (3, (56, 40), 96, 3, 7, True, 0),
    (1, (14, 14), 384, 12, 7, True, 0),
    (3, (9, 13), 160, 2, 7, True, 1),
    (2, (7, 7), 128, 2, 7, False, 0),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"B{c[0]}-{c[1][0]}x{c[1][1]}-C{c[2]}-h{c[3]}-p{c[6]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_gpu_sdpa_matches_float64(case, dtype, monkeypatch):
    """The layer on CUDA (SDPA with the window bias) against the float64 reference forward and backward: within about
    twice the error of the same layer with attention written out in ``dtype`` (flash-attention's rule)."""
    import visionlin.layers.window as window_module

    b, grid, dim, heads, window, shift, prefix = case
    torch.manual_seed(0)
    ref_layer = ShiftedWindowAttention(dim, heads, window_size=window, shift=shift).double()
    torch.nn.init.normal_(ref_layer.relative_position_bias_table, std=1.0)
    x = torch.randn(b, prefix + grid[0] * grid[1], dim, dtype=torch.float64)
    grad_out = torch.randn_like(x)

    def run(layer, inp, plain=False):
        inp = inp.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        with monkeypatch.context() as m:
            if plain:
                m.setattr(window_module, "softmax_attention", _plain_attention)
            out = layer(inp, grid, prefix)
        out.backward(grad_out.to(out))
        return [out.double().cpu(), inp.grad.double().cpu(), layer.relative_position_bias_table.grad.double().cpu()]

    ref = run(ref_layer, x)
    fast_layer = ShiftedWindowAttention(dim, heads, window_size=window, shift=shift).to("cuda", dtype)
    fast_layer.load_state_dict(ref_layer.state_dict())
    fast_layer.backend = "sdpa"
    fast = run(fast_layer, x.to("cuda", dtype))
    plain = run(fast_layer, x.to("cuda", dtype), plain=True)
    for name, r, f, p in zip(("out", "dx", "dtable"), ref, fast, plain, strict=True):
        err, base = (f - r).abs().max().item(), (p - r).abs().max().item()
        assert err <= 2 * base + 1e-5 * r.abs().max().item(), (name, err, base)
