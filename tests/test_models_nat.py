"""NAT / DiNAT and the hierarchical skeleton: published configurations, the authors' key names, small inputs, errors.

The timm contract itself runs in tests/test_models.py (at test depth); this module checks what is specific to the
named configurations without running them (built on the meta device: no memory, no init cost).
"""

from __future__ import annotations

import re

import pytest
import timm
import torch

import visionlin  # noqa: F401  (registers the models)
from visionlin.models.hierarchical import HierarchicalBackbone
from visionlin.models.nat import checkpoint_filter_fn, dinat_dilations

# Parameter counts (millions) published by the authors: NAT.md and DiNAT.md of
# SHI-Labs/Neighborhood-Attention-Transformer (see ../shared/specs/na_mamba.md section 1.7).
PUBLISHED_PARAMS = {
    "nat_mini": 20,
    "nat_tiny": 28,
    "nat_small": 51,
    "nat_base": 90,
    "dinat_mini": 20,
    "dinat_tiny": 28,
    "dinat_small": 51,
    "dinat_base": 90,
    "dinat_large": 200,
}
# The authors' dilation tables (classification/dinat.py at d334f5b).
AUTHORS_DILATIONS = {
    "dinat_mini": [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 3, [1] * 5],
    "dinat_tiny": [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5],
}


def test_no_name_collides_with_timm_or_is_missing():
    ours = set(visionlin.list_models("*nat*"))
    assert ours == set(PUBLISHED_PARAMS)
    timm_own = {n for n in timm.list_models() if not timm.models.model_entrypoint(n).__module__.startswith("visionlin")}
    assert not ours & timm_own


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_published_configuration(name):
    model = timm.create_model(name, device="meta")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.02, params
    assert [len(s.blocks) for s in model.stages] == ([3, 4, 6, 5] if "mini" in name else [3, 4, 18, 5])
    assert [info["reduction"] for info in model.feature_info] == [4, 8, 16, 32]
    dilations = [[b.attn.dilation[0] for b in s.blocks] for s in model.stages]
    if name.startswith("dinat"):
        assert dilations == dinat_dilations([len(s.blocks) for s in model.stages])
        if name in AUTHORS_DILATIONS:
            assert dilations == AUTHORS_DILATIONS[name]
    else:
        assert {d for stage in dilations for d in stage} == {1}
    assert all(b.attn.kernel_size == (7, 7) and b.attn.rpb is not None for s in model.stages for b in s.blocks)
    has_ls = name in ("nat_small", "nat_base", "dinat_base")
    assert ("stages.0.blocks.0.ls1.gamma" in model.state_dict()) == has_ls


def _authors_state_dict(model: HierarchicalBackbone) -> dict[str, torch.Tensor]:
    """Our state dict renamed to the authors' keys (classification/nat.py): patch_embed, levels.i, gamma1/2, and each
    downsampler at the end of the previous level."""
    out = {}
    for k, v in model.state_dict().items():
        k = re.sub(r"^stem\.", "patch_embed.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", lambda m: f"levels.{int(m.group(1)) - 1}.downsample.", k)
        k = re.sub(r"\.ls(\d)\.gamma$", r".gamma\1", k)
        k = re.sub(r"^stages\.", "levels.", k)
        out[k] = v.clone()
    return out


def test_authors_key_names_load():
    torch.manual_seed(0)
    src = timm.create_model("nat_small", depths=(1, 1, 2, 1), num_classes=10).eval()
    theirs = _authors_state_dict(src)
    assert "levels.0.blocks.0.gamma1" in theirs and "levels.0.downsample.reduction.weight" in theirs
    assert "levels.2.blocks.1.attn.rpb" in theirs and "patch_embed.proj.1.weight" in theirs
    dst = timm.create_model("nat_small", depths=(1, 1, 2, 1), num_classes=10).eval()
    dst.load_state_dict(checkpoint_filter_fn({"model": theirs}, dst), strict=True)
    x = torch.randn(1, 3, 64, 96)
    torch.testing.assert_close(dst(x), src(x))


def test_checkpoint_for_another_kernel_size_resizes_rpb():
    src = timm.create_model("dinat_mini", depths=(1, 1, 1, 1), device="meta")
    dst = timm.create_model("dinat_mini", depths=(1, 1, 1, 1), kernel_size=11)
    theirs = {k: torch.randn(v.shape) for k, v in _authors_state_dict(src).items()}
    mapped = checkpoint_filter_fn(theirs, dst)
    assert mapped["stages.0.blocks.0.attn.rpb"].shape == (2, 21, 21)
    dst.load_state_dict(mapped, strict=True)


def test_checkpoint_mismatch_names_keys():
    model = timm.create_model("nat_mini", depths=(1, 1, 1, 1), num_classes=10)
    theirs = _authors_state_dict(model)
    del theirs["levels.1.blocks.0.attn.qkv.weight"]
    theirs["levels.0.blocks.0.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys: \['stages.0.blocks.0.extra'\].*missing keys: "):
        checkpoint_filter_fn(theirs, model)


@pytest.mark.parametrize("size", [(32, 32), (64, 96), (160, 32)])
def test_small_inputs_clamp_the_windows(size):
    """Stage grids down to 1 x 1, far below kernel x dilation (DiNAT's 8 at stage 1), run and train."""
    model = timm.create_model("dinat_mini", depths=(2, 2, 2, 1), num_classes=3)
    out = model(torch.randn(2, 3, *size))
    out.square().mean().backward()
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_input_checks_and_padding():
    model = timm.create_model("nat_mini", depths=(1, 1, 1, 1), num_classes=3).eval()
    with pytest.raises(ValueError, match=r"input size \(64, 80\) is not divisible by stride=32"):
        model(torch.randn(1, 3, 64, 80))
    with pytest.raises(ValueError, match=r"input size \(16, 64\) is smaller than the stride \(stride=32\)"):
        model(torch.randn(1, 3, 16, 64))
    padded = timm.create_model("nat_mini", depths=(1, 1, 1, 1), num_classes=3, dynamic_img_pad=True).eval()
    padded.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 80)
    torch.testing.assert_close(padded(x), model(torch.nn.functional.pad(x, (0, 16))))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(attn_layer="nope"), r"unknown attention layer\(s\) \['nope'\]"),
        (dict(num_heads=(2, 4, 8)), r"num_heads=\(2, 4, 8\) needs one entry per stage \(4 stages"),
        (dict(embed_dim=60, num_heads=(8, 8, 8, 8)), r"stage 0: width 60 is not divisible by num_heads 8"),
        (dict(depths=(1, 0, 1, 1)), r"depths\[1\]=0 must be >= 1"),
        (dict(attn_kwargs=[{}, {}, [{}, {}], {}]), r"attn_kwargs\[2\]=\[\{\}, \{\}\] must be one entry or a list of 6"),
        (dict(stem_type="hex"), r"stem_type='hex' is not one of \['conv', 'conv_bn', 'patch'\]"),
        (dict(global_pool="token"), r"global_pool='token' is not one of"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HierarchicalBackbone(**kwargs, device="meta")


def test_dinat_depths_and_dilations_must_agree():
    with pytest.raises(ValueError, match=r"dilations=.* must hold one list per stage with one dilation per block"):
        timm.create_model("dinat_mini", depths=(1, 1, 1, 1), dilations=[[1], [1], [1, 2], [1]], device="meta")


def test_skeleton_takes_other_mixers_per_stage():
    """The same skeleton with Swin/PVT-style stems and downsampling and different mixers per stage (the layout later
    families use): NA early, dense softmax late."""
    torch.manual_seed(0)
    model = HierarchicalBackbone(
        embed_dim=16,
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 2, 4),
        stem_type="patch",
        downsample_type="patch",
        attn_layer=["neighborhood", "neighborhood", ["neighborhood", "softmax"], "softmax"],
        attn_kwargs=[{"kernel_size": 3}, {"kernel_size": 3, "dilation": 2}, [{"kernel_size": 5}, {}], {}],
        num_classes=4,
    )
    kinds = [[type(b.attn).__name__ for b in s.blocks] for s in model.stages]
    assert kinds[2] == ["NeighborhoodAttention", "SoftmaxAttention"] and kinds[3] == ["SoftmaxAttention"]
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 4)
    assert "stages.0.blocks.0.attn.rpb" in model.no_weight_decay()


def test_construction_dtype_and_device():
    model = timm.create_model("dinat_mini", depths=(1, 1, 1, 1), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = model(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
