"""Golden cases: whole FLatten-PVT, FLatten-Swin, Agent-PVT and Agent-Swin models, reduced, through their
checkpoint_filter_fn (the authors' key names, q + kv projections, downsamplers at the end of the previous level,
Swin's attn_mask / relative_position_index buffers)."""

from __future__ import annotations

import timm

from visionlin.models import pvt, swin


def _run(model, filter_fn, state_dict, io):
    model.load_state_dict(filter_fn(state_dict, model), strict=True)
    x = io["input"]
    final, feats = model.forward_intermediates(x, output_fmt="NLC")
    out = {"output": model.forward_head(final)}
    out.update({f"features.{i}": f for i, f in enumerate(feats)})
    return out


def _pvt(arch: str):
    def run(spec, state_dict, io):
        kw = spec["official_kwargs"]
        assert kw["la_sr_ratios" if "la_sr_ratios" in kw else "agent_sr_ratios"] == "1111"
        assert set(kw["attn_type"]) <= {"L", "A"}
        extra = {"agent_num": kw["agent_num"]} if "agent_num" in kw else {}
        model = timm.create_model(
            arch,
            img_size=kw["img_size"],
            patch_size=kw["patch_size"],
            num_classes=kw["num_classes"],
            embed_dim=kw["embed_dims"],
            depths=kw["depths"],
            num_heads=kw["num_heads"],
            mlp_ratio=kw["mlp_ratios"],
            qkv_bias=kw["qkv_bias"],
            drop_path_rate=0.0,
            **extra,
        ).eval()
        return _run(model, pvt.checkpoint_filter_fn, state_dict, io)

    return run


def _swin(arch: str):
    def run(spec, state_dict, io):
        kw = spec["official_kwargs"]
        assert kw["window_size"] == 56 and not kw["ape"] and kw["patch_norm"]
        extra = {"agent_num": kw["agent_num"]} if "agent_num" in kw else {}
        model = timm.create_model(
            arch,
            img_size=kw["img_size"],
            patch_size=kw["patch_size"],
            num_classes=kw["num_classes"],
            embed_dim=kw["embed_dim"],
            depths=kw["depths"],
            num_heads=kw["num_heads"],
            mlp_ratio=kw["mlp_ratio"],
            qkv_bias=kw["qkv_bias"],
            attn_type=kw["attn_type"],
            drop_path_rate=0.0,
            **extra,
        ).eval()
        return _run(model, swin.checkpoint_filter_fn, state_dict, io)

    return run


CASES = {
    "flatten_pvt": _pvt("flatten_pvt_tiny"),
    "agent_pvt": _pvt("agent_pvt_tiny"),
    "flatten_swin": _swin("flatten_swin_tiny"),
    "agent_swin": _swin("agent_swin_tiny"),
}
