"""FLatten-PVT, Agent-PVT, FLatten-Swin and Agent-Swin: published configurations, layouts, the authors' key names.

The timm contract runs in tests/test_models.py (at test size) and the authors' numerics in tests/test_golden.py
(fixtures ``flatten_pvt``, ``agent_pvt``, ``flatten_swin``, ``agent_swin``); this module checks the named
configurations without running real tensors (parameters on the meta device, MACs with fake tensors), the layouts, the
authors' checkpoint names on small models, inputs of other sizes and ``torch.compile``.
"""

from __future__ import annotations

import re

import pytest
import timm
import torch
from torch import nn

import visionlin
from visionlin.layers import AgentAttention, FocusedLinearAttention, ShiftedWindowAttention
from visionlin.models import pvt, swin
from visionlin.models.hierarchical import PatchDownsample, PatchMerging

# (params M, GFLOPs at 224 px) as published: ../shared/specs/vision_linear.md sections 2(c) (FLatten paper) and 3(c)
# (Agent-Attention agent_transformer/README.md). FLatten-PVT-M: the paper's figure only (~7 G, no parameter count);
# FLatten-PVT-L: nothing published. The papers count with fvcore (norms, softmax and pooling included); our count is
# matrix products and convolutions (torch.utils.flop_counter, halved), 1.5-4.6 % below.
PUBLISHED = {
    "flatten_pvt_tiny": (12.2, 2.0),
    "flatten_pvt_small": (21.7, 4.0),
    "flatten_pvt_medium": (None, 7.0),
    "agent_pvt_tiny": (11.6, 2.0),
    "agent_pvt_small": (20.6, 4.0),
    "agent_pvt_medium": (35.9, 7.0),
    "agent_pvt_large": (48.7, 10.4),
    "flatten_swin_tiny": (29, 4.5),
    "flatten_swin_small": (51, 8.7),
    "flatten_swin_base": (89, 15.4),
    "agent_swin_tiny": (29, 4.5),
    "agent_swin_small": (50, 8.7),
    "agent_swin_base": (88, 15.4),
}
# Parameter counts of the authors' own code, measured (../shared/specs/official_speed.md).
AUTHORS_CODE_PARAMS = {"flatten_swin_tiny": 29.19, "flatten_pvt_small": 21.67, "agent_swin_tiny": 28.90}
NAMES = sorted([*PUBLISHED, "flatten_pvt_large"])


def _count(name: str) -> tuple[float, float]:
    # the published tables leave the softmax-attention products (fused SDPA on the CPU) out: so does this count
    r = visionlin.model_complexity(name, 224, cpu_sdpa=False)
    return r["params_m"], r["gmacs"]


def test_names_registered_and_free_in_timm():
    ours = {
        n for f in ("flatten_pvt", "agent_pvt", "flatten_swin", "agent_swin") for n in visionlin.list_models(f"{f}_*")
    }
    assert ours == set(NAMES)
    timm_own = {n for n in timm.list_models() if not timm.models.model_entrypoint(n).__module__.startswith("visionlin")}
    assert not ours & timm_own


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_params_and_macs(name):
    params, gmacs = _count(name)
    pub_params, pub_gmacs = PUBLISHED[name]
    if pub_params is not None:
        assert abs(params - pub_params) / pub_params < 0.02, params
    assert abs(gmacs - pub_gmacs) / pub_gmacs < 0.05, gmacs
    if name in AUTHORS_CODE_PARAMS:
        assert abs(params - AUTHORS_CODE_PARAMS[name]) < 0.005, params


# The authors' attn_type per Swin variant, written out block by block: (linear blocks, window blocks) per stage.
SWIN_LAYOUTS = {
    "flatten_swin_tiny": [(2, 0), (2, 0), (0, 6), (0, 2)],
    "flatten_swin_small": [(2, 0), (2, 0), (0, 18), (0, 2)],
    "flatten_swin_base": [(2, 0), (2, 0), (0, 18), (0, 2)],
    "agent_swin_tiny": [(2, 0), (2, 0), (6, 0), (0, 2)],
    "agent_swin_small": [(2, 0), (2, 0), (0, 18), (0, 2)],
    "agent_swin_base": [(2, 0), (2, 0), (2, 16), (0, 2)],
}


@pytest.mark.parametrize("name", NAMES)
def test_published_layout(name):
    model = timm.create_model(name, device="meta")
    linear = AgentAttention if name.startswith("agent") else FocusedLinearAttention
    grids = [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert [info["reduction"] for info in model.feature_info] == [4, 8, 16, 32]
    assert model.stem.proj.kernel_size == (4, 4) and model.stem.norm.eps == 1e-5
    for i, stage in enumerate(model.stages):
        if name in SWIN_LAYOUTS:
            n_linear, n_window = SWIN_LAYOUTS[name][i]
            kinds = [linear] * n_linear + [ShiftedWindowAttention] * n_window
        else:
            kinds = [linear] * len(stage.blocks)
        assert [type(b.attn) for b in stage.blocks] == kinds
        for j, block in enumerate(stage.blocks):
            attn = block.attn
            if isinstance(attn, ShiftedWindowAttention):
                assert attn.window_size == 7 and attn.shift == (j % 2 == 1)
            elif isinstance(attn, AgentAttention):
                assert attn.agent_num == (9, 16, 49, 49)[i] and attn.bias_size == grids[i]
            else:
                assert attn.pos_size == grids[i] and attn.focusing_factor == 3 and attn.dwc.kernel_size == (5, 5)
    if "pvt" in name:
        assert [s.pos_embed_size for s in model.stages] == grids
        assert all(isinstance(s.downsample, PatchDownsample) for s in model.stages[1:])
        assert model.stages[1].downsample.norm.eps == 1e-5 and model.stages[0].blocks[0].norm1.eps == 1e-6
        assert isinstance(model.norm, nn.Identity)  # FLatten-PVT never applies its norm; Agent-PVT has none
        ratios = [s.blocks[0].mlp.fc1.out_features // s.blocks[0].mlp.fc1.in_features for s in model.stages]
        assert ratios == [8, 8, 4, 4]
    else:
        assert all(s.pos_embed is None for s in model.stages)
        assert all(isinstance(s.downsample, PatchMerging) for s in model.stages[1:])
        assert isinstance(model.norm, nn.LayerNorm) and model.norm.eps == 1e-5


def _authors_swin(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our Swin state dict in the authors' names, with their buffers."""
    out = {}
    for k, v in model.state_dict().items():
        k = re.sub(r"^stem\.", "patch_embed.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
        k = re.sub(r"^stages\.", "layers.", k)
        out[k] = v.clone()
        if k.endswith("relative_position_bias_table"):
            out[k.replace("bias_table", "index")] = torch.zeros(4, 4, dtype=torch.long)
            out[k.replace("attn.relative_position_bias_table", "attn_mask")] = torch.zeros(1, 4, 4)
    return out


def _authors_pvt(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our PVT state dict in the authors' names: patch_embed{k}, pos_embed{k}, block{k}, q + kv, an unused norm."""
    out = {"norm.weight": torch.ones(model.embed_dims[-1]), "norm.bias": torch.zeros(model.embed_dims[-1])}
    for k, v in model.state_dict().items():
        k = re.sub(r"^stem\.", "patch_embed1.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.", k)
        k = re.sub(r"^stages\.(\d+)\.pos_embed$", lambda m: f"pos_embed{int(m.group(1)) + 1}", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.", lambda m: f"block{int(m.group(1)) + 1}.", k)
        if m := re.match(r"^(.+\.attn\.)qkv\.(weight|bias)$", k):
            q, kv = v.split([v.shape[0] // 3, 2 * v.shape[0] // 3])
            out[f"{m.group(1)}q.{m.group(2)}"], out[f"{m.group(1)}kv.{m.group(2)}"] = q.clone(), kv.clone()
            continue
        out[k] = v.clone()
    return out


SMALL = {
    "pvt": dict(depths=(1, 1, 1, 1), embed_dim=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), num_classes=5),
    "swin": dict(depths=(1, 1, 3, 1), embed_dim=16, num_heads=(1, 2, 2, 4), num_classes=5),
}


@pytest.mark.parametrize("name", ["flatten_pvt_tiny", "agent_pvt_tiny", "flatten_swin_tiny", "agent_swin_base"])
def test_authors_key_names_load(name):
    family = "pvt" if "pvt" in name else "swin"
    torch.manual_seed(0)
    src = timm.create_model(name, **SMALL[family]).eval()
    theirs = (_authors_pvt if family == "pvt" else _authors_swin)(src)
    dst = timm.create_model(name, **SMALL[family]).eval()
    filter_fn = (pvt if family == "pvt" else swin).checkpoint_filter_fn
    dst.load_state_dict(filter_fn({"model": theirs}, dst), strict=True)
    x = torch.randn(1, 3, 64, 96)
    torch.testing.assert_close(dst(x), src(x))


def test_checkpoint_mismatches_are_named():
    model = timm.create_model("agent_pvt_tiny", **SMALL["pvt"])
    theirs = _authors_pvt(model)
    del theirs["block2.0.attn.kv.weight"]
    with pytest.raises(ValueError, match=r"missing keys: .*stages.1.blocks.0.attn"):
        pvt.checkpoint_filter_fn(theirs, model)
    theirs = _authors_pvt(model)
    theirs["block1.0.attn.sr.weight"] = torch.zeros(16, 16, 8, 8)
    with pytest.raises(NotImplementedError, match=r"spatial reduction"):
        pvt.checkpoint_filter_fn(theirs, model)
    swin_model = timm.create_model("flatten_swin_tiny", **SMALL["swin"])
    theirs = _authors_swin(swin_model)
    theirs["layers.0.blocks.0.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys: \['stages.0.blocks.0.extra'\]"):
        swin.checkpoint_filter_fn(theirs, swin_model)


@pytest.mark.parametrize("size", [(64, 160), (160, 64), (96, 96)])
def test_other_input_sizes_run_and_train(size):
    """The published 7 x 7 softmax windows on grids that are not multiples of them (padded, masked, shifted on the
    long axis only), and the linear blocks' tables resampled."""
    model = timm.create_model("agent_swin_small", **{**SMALL["swin"], "attn_type": "AABB"})
    out = model(torch.randn(2, 3, *size))
    out.square().mean().backward()
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["flatten_pvt_tiny", "agent_swin_small"])
def test_compile_fullgraph(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    family = "pvt" if "pvt" in name else "swin"
    extra = {"softmax_window": 2} if family == "swin" else {}
    model = timm.create_model(name, **SMALL[family], **extra).eval()
    x = torch.randn(2, 3, 64, 96)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "attn_type,match",
    [
        ("LLS", r"attn_type='LLS' must give one of .* per stage \(4 stages\)"),
        ("LLXS", r"attn_type='LLXS' must give one of"),
        ("AAMB", r"an 'M' stage needs the number of its linear blocks"),
        ("AAMB9", r"stage 2 has 3 blocks, fewer than the 9 linear ones asked"),
    ],
)
def test_bad_attn_type(attn_type, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("agent_swin_tiny", **SMALL["swin"], attn_type=attn_type, device="meta")


def test_bad_agent_num():
    with pytest.raises(ValueError, match=r"agent_num=\[9, 16\] needs one entry per stage \(4 stages\)"):
        timm.create_model("agent_swin_tiny", **SMALL["swin"], agent_num=(9, 16), device="meta")


@pytest.mark.parametrize("name", ["agent_pvt_tiny", "flatten_swin_tiny"])
def test_pretrained_from_an_authors_file(name, tmp_path):
    """``pretrained=True`` with a local file in the authors' format (``{'model': ...}``, their key names): the path a
    downloaded TsinghuaCloud checkpoint takes."""
    family = "pvt" if "pvt" in name else "swin"
    torch.manual_seed(0)
    src = timm.create_model(name, **SMALL[family]).eval()
    path = tmp_path / "authors.pth"
    torch.save({"model": (_authors_pvt if family == "pvt" else _authors_swin)(src)}, path)
    assert timm.create_model(name, device="meta").pretrained_cfg["url"].startswith("https://cloud.tsinghua.edu.cn/")
    dst = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL[family]).eval()
    x = torch.randn(1, 3, 64, 64)  # timm re-initialises the classifier of a 5-class model: compare the features
    torch.testing.assert_close(dst.forward_features(x), src.forward_features(x))
