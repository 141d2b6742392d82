"""AgentAttention and InLineAttention layers: shapes, gradients, prefix tokens, non-square grids, bias resampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import visionlin
from visionlin.kernels import linear_attention
from visionlin.layers import AgentAttention, InLineAttention, create_attn, resample_agent_biases
from visionlin.layers._cache import kept
from visionlin.layers.inline import KERNEL_FUNCS, dynamic_depthwise_conv2d

torch.set_num_threads(1)


def _randomize(layer: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter O(1) random values so that each part moves the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            std = 0.5 if name.endswith("_bias") else p.shape[-1] ** -0.5 if p.ndim == 2 else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return layer


def _x(b, n, c, seed=1):
    return torch.randn(b, n, c, generator=torch.Generator().manual_seed(seed))


def _agent(dim=32, heads=2, agent_num=9, bias_size=(7, 7), prefix=0, **kw):
    return _randomize(
        AgentAttention(
            dim, heads, qkv_bias=True, agent_num=agent_num, bias_size=bias_size, num_prefix_tokens=prefix, **kw
        )
    ).eval()


def _inline(dim=32, heads=2, **kw):
    return _randomize(InLineAttention(dim, heads, qkv_bias=True, **kw)).eval()


LAYERS = {
    "agent": lambda prefix, grid: _agent(bias_size=grid, prefix=prefix),
    "inline": lambda prefix, grid: _inline(),
}


# Shapes, gradients, registry ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(7, 7), (7, 9), (3, 2)], ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_shapes(kind, prefix, grid):
    layer = LAYERS[kind](prefix, grid)
    x = _x(3, prefix + grid[0] * grid[1], 32)
    out = layer(x, grid, prefix)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", list(LAYERS))
def test_backward_reaches_every_parameter(kind):
    layer = LAYERS[kind](1, (7, 9)).train()
    x = _x(2, 1 + 7 * 9, 32).requires_grad_()
    layer(x, (7, 9), 1).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_backward_reaches_every_parameter_when_resampling():
    layer = _agent(bias_size=(14, 14), prefix=1).train()
    layer(_x(2, 1 + 7 * 9, 32), (7, 9), 1).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_create_attn_by_name():
    a = create_attn("agent", 64, num_heads=4, agent_num=16, bias_size=(8, 8))
    i = create_attn("inline", 64, num_heads=4, kernel_func="relu")
    assert isinstance(a, AgentAttention) and isinstance(i, InLineAttention)
    assert visionlin.ATTN_LAYERS["agent"] is AgentAttention and visionlin.ATTN_LAYERS["inline"] is InLineAttention
    assert AgentAttention.size_dependent and AgentAttention.grid_kwarg == "bias_size"
    assert not InLineAttention.size_dependent


def test_parameter_names_and_shapes_match_the_authors():
    layer = AgentAttention(32, 2, qkv_bias=True, agent_num=16, bias_size=(8, 8), num_prefix_tokens=1)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {
        "an_bias": (2, 16, 7, 7),
        "na_bias": (2, 16, 7, 7),
        "ah_bias": (1, 2, 16, 8, 1),
        "aw_bias": (1, 2, 16, 1, 8),
        "ha_bias": (1, 2, 8, 1, 16),
        "wa_bias": (1, 2, 1, 8, 16),
        "ac_bias": (1, 2, 16, 1),
        "ca_bias": (1, 2, 1, 16),
        "qkv.weight": (96, 32),
        "qkv.bias": (96,),
        "proj.weight": (32, 32),
        "proj.bias": (32,),
        "dwc.weight": (32, 1, 3, 3),
        "dwc.bias": (32,),
    }
    inline = InLineAttention(32, 2, qkv_bias=True)
    assert {k: tuple(v.shape) for k, v in inline.state_dict().items()} == {
        "qkv.weight": (96, 32),
        "qkv.bias": (96,),
        "proj.weight": (32, 32),
        "proj.bias": (32,),
        "residual.0.weight": (32, 16, 1),
        "residual.0.bias": (32,),
        "residual.2.weight": (288, 16, 1),
        "residual.2.bias": (288,),
    }


def test_agent_bias_init_is_trunc_normal_002():
    layer = AgentAttention(64, 4, agent_num=49, bias_size=(14, 14), num_prefix_tokens=1)
    for name in ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias", "ac_bias", "ca_bias"):
        std = getattr(layer, name).std().item()
        assert 0.015 < std < 0.025, (name, std)


def test_constructor_errors():
    with pytest.raises(ValueError, match="agent_num=10"):
        AgentAttention(32, 2, agent_num=10)
    with pytest.raises(ValueError, match="agent_num=0"):
        AgentAttention(32, 2, agent_num=0)
    with pytest.raises(NotImplementedError, match="qk_norm"):
        AgentAttention(32, 2, qk_norm=True)
    with pytest.raises(ValueError, match="bias_size"):
        AgentAttention(32, 2, bias_size=(0, 4))
    with pytest.raises(ValueError, match="dwc_kernel=4"):
        AgentAttention(32, 2, dwc_kernel=4)
    with pytest.raises(NotImplementedError, match="qk_norm"):
        InLineAttention(32, 2, qk_norm=True)
    with pytest.raises(NotImplementedError, match="attn_drop=0.1"):
        InLineAttention(32, 2, attn_drop=0.1)
    with pytest.raises(ValueError, match="kernel_func='softplus'"):
        InLineAttention(32, 2, kernel_func="softplus")
    with pytest.raises(ValueError, match="dim=30 is not divisible by num_heads=4"):
        InLineAttention(30, 4)
    # a float, a string or a bool (qkv_bias=True passed positionally) as a size: refused, not a failing forward
    for args, name in (((64, 4.0), "num_heads=4.0"), (("64", 4), "dim='64'"), ((64, True), "num_heads=True")):
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            create_attn("inline", *args)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_bad_feat_size(kind):
    layer = LAYERS[kind](0, (7, 7))
    x = _x(2, 49, 32)
    with pytest.raises(ValueError, match=r"feat_size=\(7, 8\)"):
        layer(x, (7, 8))
    with pytest.raises(ValueError, match=r"feat_size=\(0, 49\)"):
        layer(x, (0, 49))
    with pytest.raises(ValueError, match="num_prefix_tokens=1"):
        layer(x, (7, 7), 1)


# Prefix tokens --------------------------------------------------------------------------------------------------------
def test_agent_prefix_mismatch_and_unbiased_prefix():
    layer = _agent(prefix=1)
    with pytest.raises(ValueError, match=r"built with prefix-token biases for 1 prefix tokens.*num_prefix_tokens=2"):
        layer(_x(2, 2 + 49, 32), (7, 7), 2)
    # Built without prefix biases: any number of prefix tokens attend and are attended without position bias.
    plain = _agent(prefix=0)
    out = plain(_x(2, 3 + 49, 32), (7, 7), 3)
    assert out.shape == (2, 52, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", list(LAYERS))
def test_prefix_tokens_get_no_local_term(kind):
    layer = LAYERS[kind](1, (7, 7))
    x = _x(2, 1 + 49, 32)
    out = layer(x, (7, 7), 1)
    local = layer.dwc.weight if kind == "agent" else layer.residual[2].weight
    with torch.no_grad():
        local.zero_()
        if kind == "agent":
            layer.dwc.bias.zero_()
        else:
            layer.residual[2].bias.zero_()
    no_local = layer(x, (7, 7), 1)
    torch.testing.assert_close(out[:, :1], no_local[:, :1])
    assert (out[:, 1:] - no_local[:, 1:]).abs().max() > 1e-2


def test_agent_prefix_biases_are_used():
    layer = _agent(prefix=1)
    x = _x(2, 50, 32)
    out = layer(x, (7, 7), 1)
    with torch.no_grad():
        layer.ca_bias.zero_()
    assert (layer(x, (7, 7), 1)[:, 0] - out[:, 0]).abs().max() > 1e-3


# Non-square grids -----------------------------------------------------------------------------------------------------
def _transpose_tokens(x, grid, prefix):
    hh, ww = grid
    g = x[:, prefix:].unflatten(1, (hh, ww)).transpose(1, 2).flatten(1, 2)
    return torch.cat([x[:, :prefix], g], dim=1)


@pytest.mark.parametrize("prefix", [0, 1])
def test_agent_non_square_grid_transposes(prefix):
    """A 7x9 grid and its 9x7 transpose, with transposed bias tables and kernels, give transposed outputs."""
    a = _agent(agent_num=16, bias_size=(7, 9), prefix=prefix)
    b = AgentAttention(32, 2, qkv_bias=True, agent_num=16, bias_size=(9, 7), num_prefix_tokens=prefix).eval()
    sd = a.state_dict()
    sd["an_bias"], sd["na_bias"] = sd["an_bias"].transpose(-1, -2), sd["na_bias"].transpose(-1, -2)
    sd["ah_bias"], sd["aw_bias"] = sd["aw_bias"].transpose(-1, -2), sd["ah_bias"].transpose(-1, -2)
    sd["ha_bias"], sd["wa_bias"] = sd["wa_bias"].transpose(2, 3), sd["ha_bias"].transpose(2, 3)
    sd["dwc.weight"] = sd["dwc.weight"].transpose(-1, -2)
    # Agents are pooled row-major from a p x p grid; the transposed grid pools them in transposed order.
    perm = torch.arange(16).view(4, 4).t().flatten()
    for key in ("an_bias", "na_bias"):
        sd[key] = sd[key][:, perm]
    sd["ah_bias"], sd["aw_bias"] = sd["ah_bias"][:, :, perm], sd["aw_bias"][:, :, perm]
    sd["ha_bias"], sd["wa_bias"] = sd["ha_bias"][..., perm], sd["wa_bias"][..., perm]
    if prefix:
        sd["ac_bias"], sd["ca_bias"] = sd["ac_bias"][:, :, perm], sd["ca_bias"][..., perm]
    b.load_state_dict(sd)
    x = _x(2, prefix + 63, 32)
    out_a = a(x, (7, 9), prefix)
    out_b = b(_transpose_tokens(x, (7, 9), prefix), (9, 7), prefix)
    torch.testing.assert_close(_transpose_tokens(out_a, (7, 9), prefix), out_b, rtol=1e-5, atol=1e-5)


def test_dynamic_depthwise_conv_matches_per_sample_loop():
    x = torch.randn(3, 5, 7, 9)
    w = torch.randn(3, 5, 3, 3)
    out = dynamic_depthwise_conv2d(x, w)
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], F.conv2d(x[i : i + 1], w[i].unsqueeze(1), padding=1, groups=5))


def test_inline_non_square_grid_local_term():
    """The local residual of a 7x9 grid equals a per-sample depthwise convolution of the value map."""
    layer = _inline()
    x = _x(2, 1 + 63, 32)
    weights = layer.local_kernels(x)  # [B, C, 3, 3], from the mean of all tokens incl. the prefix
    assert weights.shape == (2, 32, 3, 3)
    manual_w = layer.residual(x.mean(1)[:, :, None]).view(2, 32, 9)
    torch.testing.assert_close(weights.flatten(2), manual_w)
    v = layer.qkv(x)[..., 64:][:, 1:]  # grid values [B, 63, C]
    vmap = v.transpose(1, 2).reshape(2, 32, 7, 9)
    local = torch.stack([F.conv2d(vmap[i : i + 1], weights[i].unsqueeze(1), padding=1, groups=32)[0] for i in range(2)])
    with torch.no_grad():
        full = layer(x, (7, 9), 1)
        layer.residual[2].weight.zero_()
        layer.residual[2].bias.zero_()
        no_local = layer(x, (7, 9), 1)
    # proj is affine: the difference is proj.weight applied to the local term.
    expected = local.flatten(2).transpose(1, 2) @ layer.proj.weight.t()
    torch.testing.assert_close((full - no_local)[:, 1:], expected, rtol=1e-4, atol=1e-5)


# Agent bias resampling ------------------------------------------------------------------------------------------------
def test_forward_resampling_equals_state_dict_resampling():
    big = _agent(bias_size=(14, 14), prefix=1)
    small = AgentAttention(32, 2, qkv_bias=True, agent_num=9, bias_size=(7, 9), num_prefix_tokens=1).eval()
    sd = small.adapt_state_dict(AgentAttention.convert_official_state_dict(big.state_dict()))
    assert sd["ah_bias"].shape == (1, 2, 9, 7, 1) and sd["wa_bias"].shape == (1, 2, 1, 9, 9)
    small.load_state_dict(sd, strict=True)
    x = _x(2, 1 + 63, 32)
    torch.testing.assert_close(big(x, (7, 9), 1), small(x, (7, 9), 1), rtol=1e-5, atol=1e-6)


def test_native_size_is_not_resampled():
    layer = _agent(bias_size=(8, 8), prefix=1)
    sd = layer.state_dict()
    same = resample_agent_biases(sd, (8, 8))
    for k, v in sd.items():
        assert same[k] is v
    # The on-the-fly path hands the parameters themselves to the bias computation.
    agent_bias, query_bias = layer.position_biases((8, 8), 1)
    an = F.interpolate(layer.an_bias, size=(8, 8), mode="bilinear", align_corners=False).reshape(1, 2, 9, 64)
    expected = torch.cat([layer.ac_bias, an + (layer.ah_bias + layer.aw_bias).reshape(1, 2, 9, 64)], dim=-1)
    assert torch.equal(agent_bias, expected)
    na = F.interpolate(layer.na_bias, size=(8, 8), mode="bilinear", align_corners=False).reshape(1, 2, 9, 64)
    expected_q = torch.cat(
        [layer.ca_bias, na.transpose(-1, -2) + (layer.ha_bias + layer.wa_bias).reshape(1, 2, 64, 9)], -2
    )
    assert torch.equal(query_bias, expected_q)


def test_resampling_is_bilinear_on_the_summed_table():
    """Resampling ah and aw separately equals bilinearly resampling their (H, W) sum (the tables are separable)."""
    layer = _agent(bias_size=(14, 14))
    sd = resample_agent_biases({f"blocks.3.attn.{k}": v for k, v in layer.state_dict().items()}, (7, 9))
    summed = (layer.ah_bias + layer.aw_bias)[0]  # [h, n, 14, 14]
    expected = F.interpolate(summed, size=(7, 9), mode="bilinear", align_corners=False)
    torch.testing.assert_close((sd["blocks.3.attn.ah_bias"] + sd["blocks.3.attn.aw_bias"])[0], expected)
    torch.testing.assert_close(sd["blocks.3.attn.qkv.weight"], layer.qkv.weight)
    with pytest.raises(ValueError, match="new_size"):
        resample_agent_biases({}, (0, 3))


# Conversion -----------------------------------------------------------------------------------------------------------
def test_convert_pvt_form():
    layer = _agent()
    sd = layer.state_dict()
    pvt = {k: v for k, v in sd.items() if not k.startswith("qkv.")}
    pvt["q.weight"], pvt["kv.weight"] = sd["qkv.weight"][:32], sd["qkv.weight"][32:]
    pvt["q.bias"], pvt["kv.bias"] = sd["qkv.bias"][:32], sd["qkv.bias"][32:]
    converted = AgentAttention.convert_official_state_dict(pvt)
    assert converted.keys() == sd.keys()
    for k in sd:
        torch.testing.assert_close(converted[k], sd[k])
    with pytest.raises(NotImplementedError, match="sr.weight"):
        AgentAttention.convert_official_state_dict({**pvt, "sr.weight": torch.zeros(1)})
    assert InLineAttention.convert_official_state_dict(_inline().state_dict()).keys() == _inline().state_dict().keys()


# Backends, dropout, precision -----------------------------------------------------------------------------------------
def test_agent_backends_agree():
    a = _agent(prefix=1)
    b = _agent(prefix=1)
    visionlin.set_backend(b, "reference")
    x = _x(2, 50, 32)
    torch.testing.assert_close(a(x, (7, 7), 1), b(x, (7, 7), 1), rtol=1e-5, atol=1e-5)


def test_agent_attention_dropout_only_in_training():
    layer = _agent(attn_drop=0.5)
    x = _x(2, 49, 32)
    torch.testing.assert_close(layer(x, (7, 7)), layer(x, (7, 7)))
    layer.train()
    torch.manual_seed(0)
    assert not torch.allclose(layer(x, (7, 7)), layer.eval()(x, (7, 7)))


@pytest.mark.parametrize("kernel_func", sorted(KERNEL_FUNCS))
def test_inline_kernel_funcs_run(kernel_func):
    layer = _inline(kernel_func=kernel_func)
    out = layer(_x(2, 50, 32), (7, 7), 1)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", list(LAYERS))
def test_autocast_bf16_is_finite(kind):
    layer = LAYERS[kind](1, (7, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(_x(2, 50, 32), (7, 7), 1)
    assert torch.isfinite(out.float()).all()


# InLine's injective weights -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel_func", ["identity", "relu"])
def test_inline_weights_sum_to_one(kernel_func):
    """Through the kernel with one-hot values, the layer's attention weights are ``s/N (q.k_j - q.mean k) + 1/N``."""
    layer = _inline(kernel_func=kernel_func).double()
    x = _x(2, 50, 32).double()
    q, k, _ = layer.qkv(x).unflatten(-1, (3, 2, 16)).unbind(2)  # [B, N, h, d]
    n = x.shape[1]
    eye = torch.eye(n, dtype=torch.float64).expand(2, n, n)[:, :, None].expand(2, n, 2, n)  # v_j = e_j
    w = linear_attention(q, k, eye, feature_map=KERNEL_FUNCS[kernel_func], normalize="subtract", scale=16**-0.5)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, n, 2, dtype=torch.float64))
    fq, fk = (F.relu(t) if kernel_func == "relu" else t for t in (q, k))
    a = torch.einsum("bnhd,bmhd->bnhm", fq, fk) * 16**-0.5 / n
    torch.testing.assert_close(w, a - a.mean(-1, keepdim=True) + 1.0 / n)


# Agent pooling: tests/test_kernels_pool.py


@pytest.mark.parametrize(("shape", "dim", "size"), [((1, 3, 49, 14, 1), 3, 256), ((1, 3, 49, 1, 14), 4, 64),
                                                    ((1, 2, 7, 1, 5), 2, 3), ((1, 2, 1, 13, 5), 3, 100),
                                                    ((1, 2, 9, 1, 4), 4, 1), ((2, 3, 1), 2, 7)])  # fmt: skip
def test_resample_axis_is_linear_interpolation(shape, dim, size):
    """The agent tables' 1-D resampling (one matrix product) is ``F.interpolate(mode="linear",
    align_corners=False)`` along ``dim``, up and down, forward and backward, and stays float32 under bf16 autocast."""
    from visionlin.layers.agent import _resample_axis

    def interpolate(t):
        moved = t.movedim(dim, -1)
        flat = F.interpolate(moved.reshape(1, -1, moved.shape[-1]), size=size, mode="linear", align_corners=False)
        return flat.reshape(*moved.shape[:-1], size).movedim(-1, dim)

    torch.manual_seed(0)
    t = torch.randn(shape, requires_grad=True)
    got, want = _resample_axis(t, size, dim), interpolate(t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, t, g)[0], torch.autograd.grad(want, t, g)[0], rtol=1e-5,
                               atol=2e-6)  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = _resample_axis(t, size, dim)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, want, rtol=1e-5, atol=2e-6)


def test_position_biases_are_kept_between_inference_forwards_until_a_parameter_changes():
    """Without gradients the same grid's biases are returned again (the same tensors); an in-place parameter
    update, another grid or prefix count, autocast, or a call with gradients recomputes them, always equal to a
    fresh computation."""
    layer = _agent(bias_size=(8, 8), prefix=1)

    def fresh(size, p):
        return layer._position_biases(size, p)

    with torch.no_grad():
        first = layer.position_biases((8, 8), 1)
        assert layer.position_biases((8, 8), 1)[0] is first[0]  # kept
        other = layer.position_biases((6, 10), 1)
        assert other[0] is not first[0] and other[0].shape[-1] == 1 + 60
        for got, want in zip(other, fresh((6, 10), 1), strict=True):
            assert torch.equal(got, want)
        layer.an_bias.add_(1.0)  # an optimizer step or load_state_dict: the version counter moves
        updated = layer.position_biases((6, 10), 1)
        assert updated[0] is not other[0]
        for got, want in zip(updated, fresh((6, 10), 1), strict=True):
            assert torch.equal(got, want)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer.position_biases((6, 10), 1)[0] is not updated[0]
    with_grad = layer.position_biases((6, 10), 1)
    assert with_grad[0].requires_grad and "biases" not in layer.__dict__.get(
        "_derived_cache", {}
    )  # nothing kept where grads flow
    out = layer(_x(2, 1 + 60, 32), (6, 10), 1)
    out.sum().backward()
    assert layer.an_bias.grad is not None  # the biases stay differentiable when gradients are on


def test_position_biases_of_large_grids_are_not_kept():
    from visionlin.layers.agent import _BIAS_CACHE_ELEMENTS

    layer = _agent(bias_size=(8, 8), prefix=1)
    assert _BIAS_CACHE_ELEMENTS < 2 * 9 * 512 * 512  # 2 heads x 9 agents x 262,144 tokens
    with torch.no_grad():
        big = layer.position_biases((512, 512), 1)
        assert "biases" not in kept(layer) and big[0].shape[-1] == 1 + 512 * 512


def test_agent_keeps_its_biases_cast_for_sdpa_and_stays_exact():
    """The automatic (SDPA) path keeps the biases in the queries' dtype between inference forwards; the result equals a
    forward that keeps nothing (biases rebuilt and cast every call; with gradients on, CPU SDPA picks another kernel,
    so the yardstick is a no-grad forward with ``KEEP`` off); an explicit reference backend gets them uncast."""
    from visionlin.layers import _cache

    layer = _agent(bias_size=(8, 8), prefix=1)
    x = _x(2, 1 + 64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _cache.KEEP = False
        try:
            with torch.no_grad():
                want = layer(x, (8, 8), 1)
        finally:
            _cache.KEEP = True
        assert not kept(layer)
        with torch.no_grad():
            first = layer(x, (8, 8), 1)
            cast = kept(layer)["biases_cast"]
            assert all(t.dtype == torch.bfloat16 for t in cast) and "biases" not in kept(layer)
            again = layer(x, (8, 8), 1)
            assert kept(layer)["biases_cast"] is cast
    torch.testing.assert_close(first, want, rtol=0, atol=0)
    torch.testing.assert_close(again, want, rtol=0, atol=0)
    layer.backend = "reference"
    with torch.no_grad():
        layer(x, (8, 8), 1)
    assert all(t.dtype == torch.float32 for t in kept(layer)["biases"])


@pytest.mark.parametrize("prefix", [0, 1])
def test_focused_key_positions_out_of_place_in_training(prefix):
    """FLatten's key positional encoding: the training path (out of place over the projection's whole width) gives the
    no-grad path's output (in place into the key slice) and the explicit formula's gradients, ``k + pe`` on the grid
    keys; and its backward holds no copy of the projection gradient (autograd's backward of an in-place op on a view
    showed as ``new_zeros`` / ``new_empty_strided`` / ``copy_`` in the traced step)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from visionlin.kernels import focused_linear_attention
    from visionlin.layers.focused import FocusedLinearAttention

    torch.manual_seed(0)
    layer = _randomize(FocusedLinearAttention(32, 2, qkv_bias=True, pos_size=(4, 5))).double()
    x = torch.randn(2, prefix + 20, 32, dtype=torch.float64, requires_grad=True)
    out = layer(x, (4, 5), prefix)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, (4, 5), prefix), out, rtol=0, atol=0)
    out.square().sum().backward()
    got = [x.grad, layer.positional_encoding.grad, layer.qkv.weight.grad]

    def formula(x):  # the module's math written out, the encoding added to a new k
        q, k, v = layer.qkv(x).chunk(3, dim=-1)
        k = torch.cat([k[:, :prefix], k[:, prefix:] + layer.positional_encoding], dim=1)
        q, k, v = (t.unflatten(-1, (2, 16)) for t in (q, k, v))
        o = focused_linear_attention(q, k, v, focusing_factor=layer.focusing_factor,
                                     channel_scale=torch.nn.functional.softplus(layer.scale).view(2, 16))  # fmt: skip
        from visionlin.kernels.conv import token_depthwise_conv2d

        w = layer.dwc.weight[:, 0].repeat(2, 1, 1)
        o = token_depthwise_conv2d(v.flatten(-2), w, layer.dwc.bias.repeat(2), feat_size=(4, 5),
                                   num_prefix_tokens=prefix, residual=o.flatten(-2))  # fmt: skip
        return layer.proj(o)

    layer.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    want = formula(x2)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    want.square().sum().backward()
    for a, b in zip(got, [x2.grad, layer.positional_encoding.grad, layer.qkv.weight.grad], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    def step(x):
        return torch.autograd.grad(layer(x, (4, 5), prefix).sum(), [x, layer.positional_encoding])

    targets = {str(n.target) for n in make_fx(step)(x.detach().requires_grad_()).graph.nodes}
    copies = {"aten.copy_.default", "aten.new_zeros.default", "aten.new_empty_strided.default"}  # (CopySlices')
    assert not targets & copies, targets & copies
