"""MambaVision and ViG: published configurations (meta device), the authors' key names, layouts, small inputs, errors.

The timm contract runs in tests/test_models.py (at test depth); the golden fixtures in tests/test_golden.py.
"""

from __future__ import annotations

import re

import pytest
import timm
import torch

import visionlin
from visionlin.layers import GatedLinearAttention2D, MambaVisionMixer
from visionlin.models import mambavision, vig
from visionlin.models.hierarchical import HierarchicalBackbone, window_partition, window_reverse

# Millions of parameters: MambaVision README (NVlabs/MambaVision), ViG README (hustvl/ViG, rounded to 1M there).
PUBLISHED_PARAMS = {
    "mambavision_tiny": (31.8, 0.02),
    "mambavision_tiny2": (35.1, 0.02),
    "mambavision_small": (50.1, 0.02),
    "mambavision_base": (97.7, 0.02),
    "mambavision_large": (227.9, 0.02),
    "mambavision_large2": (241.5, 0.02),
    "vig_tiny": (6, 0.5 / 6),
    "vig_small": (23, 0.5 / 23),
    "vig_base": (89, 0.5 / 89),
}
DEPTHS = {
    "mambavision_tiny": (1, 3, 8, 4),
    "mambavision_tiny2": (1, 3, 11, 4),
    "mambavision_small": (3, 3, 7, 5),
    "mambavision_base": (3, 3, 10, 5),
    "mambavision_large": (3, 3, 10, 5),
    "mambavision_large2": (3, 3, 12, 5),
}


def test_names_registered_and_not_timm_own():
    ours = set(visionlin.list_models("mambavision*")) | set(visionlin.list_models("vig*"))
    assert ours == set(PUBLISHED_PARAMS)
    timm_own = {n for n in timm.list_models() if not timm.models.model_entrypoint(n).__module__.startswith("visionlin")}
    assert not ours & timm_own
    assert not {n for n in timm_own if n.startswith(("mamba_vision", "vig"))}  # the authors' own names are free too


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_published_parameter_counts(name):
    model = timm.create_model(name, device="meta")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    published, tol = PUBLISHED_PARAMS[name]
    assert abs(params - published) / published <= tol, params


@pytest.mark.parametrize("name", sorted(DEPTHS))
def test_mambavision_layout(name):
    model = timm.create_model(name, device="meta")
    depths = DEPTHS[name]
    assert [len(s.blocks) for s in model.stages] == list(depths)
    for stage in model.stages[:2]:
        assert (
            all(isinstance(b, mambavision.hierarchical.ConvBlock) for b in stage.blocks) and stage.window_size is None
        )
    for stage, d, w in zip(model.stages[2:], depths[2:], (14, 7), strict=True):
        kinds = [type(b.attn).__name__ for b in stage.blocks]
        mixers = d // 2 + 1 if d % 2 else d // 2  # the authors' transformer_blocks rule
        assert kinds == ["MambaVisionMixer"] * mixers + ["SoftmaxAttention"] * (d - mixers)
        assert stage.window_size == w
    layer_scale = name.startswith(("mambavision_base", "mambavision_large"))
    assert ("stages.2.blocks.0.ls1.gamma" in model.state_dict()) == layer_scale
    assert "stages.0.blocks.0.gamma" not in model.state_dict()
    assert model.stem.conv_down[0].out_channels == (32 if "tiny" in name else 64)


def test_vig_configuration():
    tiny, small = timm.create_model("vig_tiny", device="meta"), timm.create_model("vig_small", device="meta")
    assert tiny.blocks[0].attn.use_out_act and isinstance(tiny.blocks[0].attn.in_proj[1], torch.nn.SiLU)
    assert not small.blocks[0].attn.use_out_act and isinstance(small.blocks[0].attn.in_proj[1], torch.nn.Identity)
    assert small.blocks[0].mlp.fc1.weight.shape == (2 * 1024, 384)  # 256 * ceil(int(384 * 8 / 3) / 256) = 1024
    assert small.num_prefix_tokens == 0 and small.pos_embed.shape == (1, 196, 384)


def _authors_mambavision(model: HierarchicalBackbone) -> dict[str, torch.Tensor]:
    """Our state dict under the authors' names (mamba_vision.py): patch_embed, levels.i, mixer, gamma_1/2, each
    downsampler at the end of the previous level, DDP's module. prefix."""
    out = {}
    for k, v in model.state_dict().items():
        k = re.sub(r"^stem\.", "patch_embed.", k)
        k = re.sub(
            r"^stages\.(\d+)\.downsample\.reduction\.",
            lambda m: f"levels.{int(m.group(1)) - 1}.downsample.reduction.0.",
            k,
        )
        k = re.sub(r"\.attn\.", ".mixer.", k)
        k = re.sub(r"\.ls(\d)\.gamma$", r".gamma_\1", k)
        k = re.sub(r"^stages\.", "levels.", k)
        out["module." + k] = v.clone()
    return out


def test_mambavision_authors_keys_load():
    torch.manual_seed(0)
    kw = dict(depths=(1, 1, 3, 2), embed_dim=16, in_dim=8, num_classes=5, init_values=1e-3, conv_init_values=1e-3)
    src = timm.create_model("mambavision_base", **kw).eval()
    authors = _authors_mambavision(src)
    assert "module.levels.0.downsample.reduction.0.weight" in authors
    assert "module.levels.2.blocks.0.mixer.A_log" in authors and "module.levels.2.blocks.2.mixer.qkv.weight" in authors
    assert "module.levels.0.blocks.0.gamma" in authors and "module.levels.3.blocks.1.gamma_2" in authors
    dst = timm.create_model("mambavision_base", **kw).eval()
    dst.load_state_dict(mambavision.checkpoint_filter_fn({"state_dict": authors}, dst), strict=True)
    x = torch.randn(1, 3, 64, 96)
    torch.testing.assert_close(dst(x), src(x))
    with pytest.raises(ValueError, match=r"unexpected keys: \['stages.2.blocks.0.attn.bogus'\]"):
        mambavision.checkpoint_filter_fn({**authors, "module.levels.2.blocks.0.mixer.bogus": torch.ones(1)}, dst)


def test_vig_authors_keys_load():
    torch.manual_seed(0)
    src = timm.create_model("vig_tiny", depth=2, embed_dim=64, num_heads=2, num_classes=5).eval()
    names = {"norm1": "attn_norm", "norm2": "mlp_norm", "mlp.fc1": "mlp.gate_proj", "mlp.fc2": "mlp.down_proj"}
    authors = {}
    for k, v in src.state_dict().items():
        for ours, theirs in names.items():
            k = k.replace(f".{ours}.", f".{theirs}.")
        if k != "pos_embed_grid":
            authors[k] = v.clone()
    assert "blocks.1.mlp.gate_proj.weight" in authors and "blocks.0.attn.gk_proj.1.bias" in authors
    dst = timm.create_model("vig_tiny", depth=2, embed_dim=64, num_heads=2, num_classes=5, img_size=96).eval()
    dst.load_state_dict(vig.checkpoint_filter_fn(authors, dst), strict=True)  # pos_embed 14x14 -> 6x6
    x = torch.randn(1, 3, 96, 96)
    torch.testing.assert_close(dst(x), src(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [(32, 32), (64, 96), (96, 160), (224, 224)])
def test_mambavision_sizes_and_window_padding(size):
    """Sides that are multiples of 32, down to 1x1 last-stage grids; windows pad (14x14 windows on 1x1 / 2x3 grids)."""
    model = timm.create_model("mambavision_tiny", depths=(1, 1, 3, 1), embed_dim=16, in_dim=8, num_classes=3).eval()
    feats = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
    assert [f.shape[-2:] for f in feats] == [(size[0] // s, size[1] // s) for s in (4, 8, 16, 32)]


def test_window_partition_roundtrip():
    x = torch.randn(2, 5 * 7, 3)
    windows = window_partition(x, (5, 7), 3)
    assert windows.shape == (2 * 2 * 3, 9, 3)
    assert windows[0, :3].equal(x[0, :3]) and windows[0, 3:6].equal(x[0, 7:10])  # row-major inside a window
    assert not windows[-1, -1].any()  # zero padding
    torch.testing.assert_close(window_reverse(windows, (5, 7), 3), x)


def test_errors():
    with pytest.raises(ValueError, match=r"stages \[0\] are conv stages .* window_size"):
        HierarchicalBackbone(depths=(1, 1), num_heads=2, block_type=("conv", "transformer"), window_size=(7, None))
    with pytest.raises(ValueError, match=r"block_type\[1\]='mlp' is not one of \('transformer', 'conv'\)"):
        HierarchicalBackbone(depths=(1, 1), num_heads=2, block_type=("conv", "mlp"))
    with pytest.raises(NotImplementedError, match=r"qk_norm"):
        MambaVisionMixer(32, 2, qk_norm=True)
    with pytest.raises(NotImplementedError, match=r"attn_drop=0.1"):
        GatedLinearAttention2D(32, 2, attn_drop=0.1)
    with pytest.raises(ValueError, match=r"value width int\(dim \* expand_v\) = 64 must equal dim=32"):
        GatedLinearAttention2D(32, 2, expand_v=2.0)
    with pytest.raises(ValueError, match=r"d_inner = int\(expand \* dim\) = 33 must be even"):
        MambaVisionMixer(33, 1)


@pytest.mark.parametrize("token_conv", [False, True])
def test_gla_mixer_prefix_tokens(token_conv, monkeypatch):
    """Prefix tokens skip the local convolution and lead the scanned sequence; grid tokens see them."""
    from visionlin.layers import gla as gla_layer

    monkeypatch.setitem(gla_layer.FAST_PATHS, "token_conv", token_conv)
    torch.manual_seed(0)
    layer = GatedLinearAttention2D(32, 2).eval()
    x = torch.randn(2, 1 + 12, 32)
    out = layer(x, (3, 4), num_prefix_tokens=1)
    assert out.shape == x.shape and torch.isfinite(out).all()
    changed = x.clone()
    changed[:, 0] += 1
    assert not torch.allclose(layer(changed, (3, 4), num_prefix_tokens=1)[:, 1:], out[:, 1:])


def test_gla_mixer_gating_is_the_documented_formula():
    """``o = g_norm(o_bi / 2) * s + l_norm(local) * (1 - s)`` with ``g_norm``'s eps ``norm_eps``, as the docstring
    writes it: the layer folds the halving into ``g_norm``'s eps (x 4) and the mix into ``l + (g - l) * s``. Outputs
    small enough that the eps matters (a wrong factor shows), float64."""
    import torch.nn.functional as F

    from visionlin.kernels import bidirectional_gated_linear_attention
    from visionlin.layers._base import map_to_tokens, merge_heads, split_heads, tokens_to_map

    torch.manual_seed(0)
    layer = GatedLinearAttention2D(32, 2, norm_eps=1e-2, use_out_act=False).double().eval()
    torch.nn.init.normal_(layer.g_norm.weight)
    torch.nn.init.normal_(layer.l_norm.weight)
    x = torch.randn(2, 12, 32, dtype=torch.float64) * 1e-2
    with torch.no_grad():
        conv = layer.in_proj[0]
        local = layer.in_proj[1](
            map_to_tokens(F.conv2d(tokens_to_map(x, (3, 4)), conv.weight, conv.bias, padding=1, groups=32))
        )
        q, k, v = layer.qkv_proj(local).split([16, 16, 32], dim=-1)
        g_fwd, g_bwd = (F.logsigmoid(layer.gk_proj(local)) / 16).chunk(2, dim=-1)
        q, k, v, g_fwd, g_bwd = (split_heads(t, 2) for t in (q, k, v, g_fwd, g_bwd))
        o = bidirectional_gated_linear_attention(q, k, v, g_fwd, g_bwd, scale=8**-0.5, backend="reference")
        s = torch.sigmoid(split_heads(layer.g_proj(local), 2))
        g = F.rms_norm(o / 2, (16,), layer.g_norm.weight, eps=1e-2)
        l = F.rms_norm(split_heads(local, 2), (16,), layer.l_norm.weight, eps=1e-2)  # noqa: E741
        want = layer.o_proj(merge_heads(g * s + l * (1 - s)))
        torch.testing.assert_close(layer(x, (3, 4)), want, rtol=1e-12, atol=1e-14)


def test_no_weight_decay_covers_ssm_parameters():
    model = timm.create_model("mambavision_tiny", depths=(1, 1, 1, 1), embed_dim=16, in_dim=8)
    skip = model.no_weight_decay()
    assert {"stages.2.blocks.0.attn.A_log", "stages.2.blocks.0.attn.D"} <= skip


@pytest.mark.parametrize("token_conv", [False, True])
@pytest.mark.parametrize("prefix", [0, 1])
def test_gla_mixer_packed_call_equals_split(prefix, token_conv, monkeypatch):
    """``layers.gla.FAST_PATHS["qkv_packed"]`` (the projections' outputs handed to the op packed) changes nothing but
    the call: output, the input's and every parameter's gradient equal the split call's (on the CPU both run the
    reference, bitwise), with and without a prefix token."""
    from visionlin.layers import gla as gla_layer

    monkeypatch.setitem(gla_layer.FAST_PATHS, "token_conv", token_conv)
    results = []
    for packed in (False, True):
        monkeypatch.setitem(gla_layer.FAST_PATHS, "qkv_packed", packed)
        torch.manual_seed(0)
        layer = GatedLinearAttention2D(32, 2)
        x = torch.randn(2, prefix + 12, 32, requires_grad=True)
        out = layer(x, (3, 4), num_prefix_tokens=prefix)
        out.square().sum().backward()
        results.append([out, x.grad] + [p.grad for p in layer.parameters()])
    assert all(g is not None for g in results[1])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("prefix", [0, 2])
@pytest.mark.parametrize("act", [True, False])
def test_gla_mixer_token_conv_equals_conv2d(prefix, act, monkeypatch):
    """``layers.gla.FAST_PATHS["token_conv"]`` (the locality convolution on the token layout) computes the
    ``Conv2d``'s function: output and every gradient in float64, with prefix tokens (which skip the convolution) and
    with / without the activation."""
    from visionlin.layers import gla as gla_layer

    results = []
    for on in (False, True):
        monkeypatch.setitem(gla_layer.FAST_PATHS, "token_conv", on)
        torch.manual_seed(0)
        layer = GatedLinearAttention2D(32, 2, use_act_in_conv=act, conv_bias=True).double()
        x = torch.randn(2, prefix + 12, 32, dtype=torch.float64, requires_grad=True)
        out = layer(x, (3, 4), num_prefix_tokens=prefix)
        out.square().sum().backward()
        results.append([out, x.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
