"""Golden cases: MambaVision (mixer and reduced model, NVlabs/MambaVision) and ViG (BiGLA mixer and reduced isotropic
model, hustvl/ViG)."""

from __future__ import annotations

import timm

from visionlin.layers import GatedLinearAttention2D, MambaVisionMixer
from visionlin.models import mambavision, vig


def _mambavision_mixer(spec, state_dict, io):
    kw = spec["official_kwargs"]
    layer = MambaVisionMixer(kw["d_model"], 1, d_state=kw["d_state"], d_conv=kw["d_conv"], expand=kw["expand"]).eval()
    layer.load_state_dict(MambaVisionMixer.convert_official_state_dict(state_dict))
    x = io["input"]  # [B, L, C], one 8 x 8 window
    return {"output": layer(x, (8, x.shape[1] // 8))}


def _mambavision(spec, state_dict, io):
    kw = spec["official_kwargs"]
    assert kw["layer_scale"] is None and kw["layer_scale_conv"] is None and kw["qk_scale"] is None
    model = timm.create_model(
        "mambavision_tiny",
        embed_dim=kw["dim"],
        in_dim=kw["in_dim"],
        depths=kw["depths"],
        window_size=kw["window_size"],
        num_heads=kw["num_heads"],
        mlp_ratio=kw["mlp_ratio"],
        num_classes=kw["num_classes"],
        qkv_bias=kw["qkv_bias"],
        drop_path_rate=0.0,
    ).eval()
    model.load_state_dict(mambavision.checkpoint_filter_fn(state_dict, model), strict=True)
    # The authors' features.i (i < 3) are taken after level i's downsampler: our stage i+1's downsample output.
    captured = {}
    hooks = [
        model.stages[i + 1].downsample.register_forward_hook(
            lambda _m, _i, out, i=i: captured.__setitem__(f"features.{i}", out.permute(0, 3, 1, 2))
        )
        for i in range(len(model.stages) - 1)
    ]
    x = io["input"]
    out = {"output": model(x), "features.stem": model.stem(x).permute(0, 3, 1, 2)}
    for h in hooks:
        h.remove()
    out.update(captured)
    out["pre_logits"] = model.forward_head(model.forward_features(x), pre_logits=True)
    out[f"features.{len(model.stages) - 1}"] = model.forward_intermediates(x, indices=1, intermediates_only=True)[0]
    return {k: v for k, v in out.items() if k in io}


def _vig_mixer(spec, state_dict, io):
    kw = spec["official_kwargs"]
    assert kw["rope_mode"] == "none" and not kw["use_dirpe"] and not kw["use_out_gate"]
    layer = GatedLinearAttention2D(
        kw["d_model"],
        kw["num_heads"],
        expand_k=kw["expand_k"],
        expand_v=kw["expand_v"],
        norm_eps=kw["layernorm_eps"],
        use_act_in_conv=kw["use_act_in_conv"],
        use_out_act=kw["use_out_act"],
        conv_bias=kw["use_bias_in_dwconv"],
    ).eval()
    layer.load_state_dict(GatedLinearAttention2D.convert_official_state_dict(state_dict))
    grid = tuple(spec["input"]["extra"]["forward_kwargs"]["patch_resolution"])
    return {"output": layer(io["input"], grid)}


def _vig(spec, state_dict, io):
    kw = spec["official_kwargs"]
    assert kw["patch_embed_version"] == "v2" and not kw["if_cls_token"] and kw["use_swiglu"]
    assert kw["use_out_act"] == kw["use_act_in_conv"]  # vig_small's flags (both off)
    model = timm.create_model(
        "vig_small",
        img_size=kw["img_size"],
        patch_size=kw["patch_size"],
        embed_dim=kw["embed_dim"],
        depth=kw["depth"],
        num_heads=kw["num_heads"],
        num_classes=kw["num_classes"],
        drop_path_rate=0.0,
    ).eval()
    model.load_state_dict(vig.checkpoint_filter_fn(state_dict, model), strict=True)
    x = io["input"]
    final, inter = model.forward_intermediates(x, output_fmt="NLC")
    out = {"output": model(x), "features.patch_embed": model.patch_embed(x).flatten(1, 2)}
    out.update({f"features.{i}": f for i, f in enumerate(inter)})
    out["pre_logits"] = model.forward_head(final, pre_logits=True)
    return {k: v for k, v in out.items() if k in io}


CASES = {
    "mambavision_mixer": _mambavision_mixer,
    "mambavision": _mambavision,
    "vig_mixer": _vig_mixer,
    "vig": _vig,
}
