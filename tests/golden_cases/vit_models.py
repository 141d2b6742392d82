"""Golden cases: whole reduced isotropic models (InfSA example classifier, Agent-DeiT, InLine-DeiT)."""

from __future__ import annotations

import torch

from visionlin.models.vit import EfficientVisionTransformer, checkpoint_filter_fn


def _run_model(model: EfficientVisionTransformer, state_dict, io) -> dict[str, torch.Tensor]:
    model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)
    model.eval()
    x = io["input"]
    out = {"output": model(x)}
    feats = model.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True)
    for i, (grid_tokens, prefix) in enumerate(feats):
        key = f"features.{i}"
        if key in io:
            out[key] = torch.cat([prefix, grid_tokens], dim=1)
    return out


def _infvit(attn_layer: str):
    def run(spec, state_dict, io):
        kw, arch = spec["official_kwargs"], spec["architecture"]
        model = EfficientVisionTransformer(
            img_size=kw["img_size"],
            patch_size=kw["patch_size"],
            in_chans=kw["in_channels"],
            num_classes=kw["num_classes"],
            embed_dim=kw["embed_dim"],
            depth=kw["num_layers"],
            num_heads=kw["num_heads"],
            mlp_ratio=arch["mlp_ratio"],
            norm_eps=1e-5,
            attn_layer=attn_layer,
            attn_kwargs=dict(rho_init=arch["rho_init"]),
        )
        return _run_model(model, state_dict, io)

    return run


def _deit(attn_layer, attn_kwargs=None):
    def run(spec, state_dict, io):
        kw = spec["official_kwargs"]
        model = EfficientVisionTransformer(
            img_size=kw["img_size"],
            patch_size=kw["patch_size"],
            in_chans=kw["in_chans"],
            num_classes=kw["num_classes"],
            embed_dim=kw["embed_dim"],
            depth=kw["depth"],
            num_heads=kw["num_heads"],
            mlp_ratio=kw["mlp_ratio"],
            qkv_bias=kw["qkv_bias"],
            norm_eps=1e-6,
            attn_layer=attn_layer,
            attn_kwargs=attn_kwargs,
        )
        return _run_model(model, state_dict, io)

    return run


CASES = {
    # The fixture's official per-block agent counts: agent_num[stage_num[i // 2]] with agent_num = [9, 16, 49, 49].
    "agent_deit": _deit(["agent"] * 3 + ["softmax"], [dict(agent_num=9), dict(agent_num=9), dict(agent_num=16), {}]),
    "inline_deit": _deit("inline"),
    "infvit_example": _infvit("infsa_pure"),
    "infvit_example_linear": _infvit("infsa"),
}
