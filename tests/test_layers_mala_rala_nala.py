"""MALA, RALA, NaLa and Efficient Attention layers: shapes, gradients, prefix tokens, errors, conversion, registry."""

from __future__ import annotations

import pytest
import torch

from visionlin.kernels import rope_2d_tables
from visionlin.layers import (
    ATTN_LAYERS,
    EfficientAttention,
    MagnitudeAwareAttention,
    NormAwareAttention,
    RankAugmentedAttention,
    create_attn,
)

torch.set_num_threads(1)

CLASSES = {
    "mala": MagnitudeAwareAttention,
    "rala": RankAugmentedAttention,
    "nala": NormAwareAttention,
    "efficient": EfficientAttention,
}
ROPE_KINDS = ["mala", "rala", "nala"]


def _randomize(layer: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """O(1) random parameters so that every part moves the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("ln.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 4
                p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)
    return layer


def _layer(kind: str, dim: int = 32, heads: int = 2, **kw) -> torch.nn.Module:
    return _randomize(CLASSES[kind](dim, heads, qkv_bias=True, **kw)).eval()


def _x(b, n, c, seed=1):
    return torch.randn(b, n, c, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("grid", [(7, 7), (7, 9), (3, 2)], ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("kind", list(CLASSES))
def test_shapes(kind, prefix, grid):
    layer = _layer(kind)
    x = _x(3, prefix + grid[0] * grid[1], 32)
    out = layer(x, grid, prefix)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", list(CLASSES))
def test_backward_reaches_every_parameter(kind):
    layer = _layer(kind).train()
    x = _x(2, 1 + 6 * 5, 32).requires_grad_()
    layer(x, (6, 5), 1).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", list(CLASSES))
def test_registry_and_timm_signature(kind):
    layer = create_attn(kind, 64, num_heads=4, qkv_bias=True, attn_drop=0.0, proj_drop=0.1, norm_layer=None)
    assert type(layer) is CLASSES[kind] and ATTN_LAYERS[kind] is CLASSES[kind]
    assert layer.attn_name == kind and layer.backend is None
    out = layer(_x(1, 16, 64), (4, 4))
    assert out.shape == (1, 16, 64)


@pytest.mark.parametrize("kind", list(CLASSES))
def test_bad_feat_size(kind):
    layer = _layer(kind)
    with pytest.raises(ValueError, match="feat_size"):
        layer(_x(1, 49, 32), (7, 8))
    with pytest.raises(ValueError, match="num_prefix_tokens=1"):
        layer(_x(1, 49, 32), (7, 7), 1)
    with pytest.raises(ValueError, match="feat_size"):
        layer(_x(1, 0, 32), (0, 7))


@pytest.mark.parametrize("kind", list(CLASSES))
def test_unsupported_arguments_raise(kind):
    with pytest.raises(NotImplementedError, match="qk_norm"):
        CLASSES[kind](32, 2, qk_norm=True)
    with pytest.raises(NotImplementedError, match="attn_drop=0.1"):
        CLASSES[kind](32, 2, attn_drop=0.1)


@pytest.mark.parametrize("kind", ROPE_KINDS)
def test_rope_head_dim_checked_at_construction(kind):
    with pytest.raises(ValueError, match="head_dim=6"):
        CLASSES[kind](12, 2)
    with pytest.raises(ValueError, match="lepe_kernel=4"):
        CLASSES[kind](32, 2, lepe_kernel=4)


@pytest.mark.parametrize("kind", list(CLASSES))
def test_backend_is_passed_to_the_kernel(kind):
    layer = _layer(kind)
    x = _x(1, 16, 32)
    layer.backend = "reference"
    ref = layer(x, (4, 4))
    layer.backend = "nope"
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        layer(x, (4, 4))
    layer.backend = None
    torch.testing.assert_close(layer(x, (4, 4)), ref)


@pytest.mark.parametrize("kind", ROPE_KINDS)
def test_prefix_token_has_no_rotation_and_no_lepe(kind):
    layer = _layer(kind)
    grid = (5, 6)
    x = _x(2, 1 + 30, 32)
    out = layer(x, grid, 1)
    # No lepe on the prefix token: changing lepe moves the grid tokens only.
    with torch.no_grad():
        layer.lepe.weight.mul_(3.0)
        layer.lepe.bias.add_(1.0)
    out2 = layer(x, grid, 1)
    torch.testing.assert_close(out2[:, :1], out[:, :1])
    assert not torch.allclose(out2[:, 1:], out[:, 1:])
    # No rotation: without lepe, a prefix token equal to grid token (0, 0) (phase 0) gets the same output ...
    with torch.no_grad():
        layer.lepe.weight.zero_()
        layer.lepe.bias.zero_()
    x = x.clone()
    x[:, 0] = x[:, 1]
    out = layer(x, grid, 1)
    torch.testing.assert_close(out[:, 0], out[:, 1])
    # ... but not the output of grid token (0, 1) when it copies that one.
    x[:, 0] = x[:, 2]
    out = layer(x, grid, 1)
    assert not torch.allclose(out[:, 0], out[:, 2], atol=1e-4)


@pytest.mark.parametrize("kind", ROPE_KINDS)
def test_rope_tables_cached_and_prefix_aware(kind):
    layer = _layer(kind)
    a = layer.rope_tables((4, 5), 1, torch.device("cpu"), torch.float32)
    assert layer.rope_tables((4, 5), 1, torch.device("cpu"), torch.bfloat16) is a  # tables stay float32
    sin, cos = rope_2d_tables((4, 5), 16, num_prefix_tokens=1)
    assert torch.equal(a[0], sin) and torch.equal(a[1], cos)
    b = layer.rope_tables((4, 5), 0, torch.device("cpu"), torch.float64)
    assert b[0].dtype == torch.float64 and b[0].shape == (20, 16)
    assert "_rope_cache" not in dict(layer.state_dict()) and not list(layer.buffers())


@pytest.mark.parametrize("kind", ROPE_KINDS)
def test_rope_tables_not_kept_while_a_cuda_graph_is_captured(kind, monkeypatch):
    """Tables built during CUDA-graph capture live in the graph's pool: built for the call, never kept or reused."""
    layer = _layer(kind)
    kept = layer.rope_tables((4, 5), 1, torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # (a capture needs a context)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    a = layer.rope_tables((4, 5), 1, torch.device("cpu"), torch.float32)
    b = layer.rope_tables((3, 3), 0, torch.device("cpu"), torch.float32)
    assert a is not kept and torch.equal(a[0], kept[0]) and b[0].shape == (9, 16)
    assert layer.rope_tables((3, 3), 0, torch.device("cpu"), torch.float32) is not b
    monkeypatch.undo()
    assert layer.rope_tables((4, 5), 1, torch.device("cpu"), torch.float32) is kept
    assert len(layer._rope_cache) == 1


def test_may_keep_tensors(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from visionlin.kernels._common import may_keep_tensors

    assert may_keep_tensors()
    with FakeTensorMode():
        assert not may_keep_tensors()
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not may_keep_tensors()
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "is_initialized", lambda: True)  # (a capture needs a context)
        m.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        assert not may_keep_tensors()


@pytest.mark.parametrize("kind", ROPE_KINDS)
def test_training_after_inference_mode(kind):
    layer = _layer(kind)
    x = _x(1, 16, 32)
    with torch.inference_mode():
        ref = layer(x, (4, 4))
    out = layer(x.requires_grad_(), (4, 4))  # cached inference tensors would fail to be saved for backward
    out.sum().backward()
    torch.testing.assert_close(out.detach(), ref)


@pytest.mark.parametrize("kind", list(CLASSES))
def test_half_precision_and_dtype_kwargs(kind):
    layer = _randomize(CLASSES[kind](32, 2, qkv_bias=True, dtype=torch.float64)).eval()
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    x = _x(2, 1 + 49, 32).double()
    ref = layer(x, (7, 7), 1)
    layer = layer.to(torch.bfloat16)
    out = layer(x.to(torch.bfloat16), (7, 7), 1)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert ((out.double() - ref).abs().max() / ref.std()).item() < 0.1


# Conversion of the authors' state dicts -------------------------------------------------------------------------------
OFFICIAL_KEYS = {
    "mala": {"qkvo.weight": (128, 32, 1, 1), "qkvo.bias": (128,), "lepe.weight": (32, 1, 5, 5), "lepe.bias": (32,),
             "proj.weight": (32, 32, 1, 1), "proj.bias": (32,)},
    "nala": {"qkvg.weight": (128, 32), "qkvg.bias": (128,), "lepe.weight": (32, 1, 5, 5), "lepe.bias": (32,),
             "out_proj.weight": (32, 32), "out_proj.bias": (32,), "ln.weight": (32,), "ln.bias": (32,)},
    "efficient": {"keys.weight": (32, 32, 1, 1), "keys.bias": (32,), "queries.weight": (32, 32, 1, 1),
                  "queries.bias": (32,), "values.weight": (32, 32, 1, 1), "values.bias": (32,),
                  "reprojection.weight": (32, 32, 1, 1), "reprojection.bias": (32,)},
}  # fmt: skip
OFFICIAL_KEYS["rala"] = OFFICIAL_KEYS["mala"]


@pytest.mark.parametrize("kind", list(CLASSES))
def test_convert_official_state_dict(kind):
    official = {k: torch.randn(s) for k, s in OFFICIAL_KEYS[kind].items()}
    cls = CLASSES[kind]
    layer = cls(32, 2, qkv_bias=True)
    converted = cls.convert_official_state_dict(official)
    layer.load_state_dict(converted, strict=True)
    assert set(converted) == set(official)
    for key, value in official.items():
        torch.testing.assert_close(converted[key].flatten(), value.flatten())
    again = cls.convert_official_state_dict(converted)  # idempotent
    assert all(torch.equal(again[k], converted[k]) for k in converted)


def test_convert_rejects_non_1x1_weights():
    with pytest.raises(ValueError, match="not a 1x1"):
        MagnitudeAwareAttention.convert_official_state_dict({"qkvo.weight": torch.randn(128, 32, 3, 3)})


# Mechanism-specific ---------------------------------------------------------------------------------------------------
def test_efficient_residual_and_dims():
    layer = _layer("efficient", key_dim=16, value_dim=48)
    x = _x(2, 20, 32)
    with_res = EfficientAttention(32, 2, qkv_bias=True, key_dim=16, value_dim=48, residual=True).eval()
    with_res.load_state_dict(layer.state_dict())
    torch.testing.assert_close(with_res(x, (4, 5)), layer(x, (4, 5)) + x)
    assert layer.keys.out_features == layer.queries.out_features == 16 and layer.values.out_features == 48
    with pytest.raises(ValueError, match="value_dim=50"):
        EfficientAttention(32, 4, value_dim=50)


def test_nala_norm_eps_layer():
    x = torch.zeros(1, 16, 32)
    layer = NormAwareAttention(32, 2, qkv_bias=False)  # zero input -> all-zero queries
    assert torch.isnan(layer(x, (4, 4))).any()  # the authors' behaviour
    fixed = NormAwareAttention(32, 2, qkv_bias=False, norm_eps=1e-6)
    fixed.load_state_dict(layer.state_dict())
    assert torch.isfinite(fixed(x, (4, 4))).all()
    with pytest.raises(ValueError, match="norm_eps=-1"):
        NormAwareAttention(32, 2, norm_eps=-1.0)
