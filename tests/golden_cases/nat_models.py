"""Golden cases: NAT / DiNAT neighborhood attention (NATTEN v0.17.5 module) and reduced NAT / DiNAT models."""

from __future__ import annotations

import timm

from visionlin.layers import NeighborhoodAttention
from visionlin.models.nat import checkpoint_filter_fn


def _attention(spec, state_dict, io):
    kw = spec["official_kwargs"]
    layer = NeighborhoodAttention(
        kw["dim"],
        kw["num_heads"],
        qkv_bias=kw["qkv_bias"],
        kernel_size=kw["kernel_size"],
        dilation=kw["dilation"],
        rel_pos_bias=kw["rel_pos_bias"],
    ).eval()
    layer.load_state_dict(layer.adapt_state_dict(NeighborhoodAttention.convert_official_state_dict(state_dict)))
    x = io["input"]  # [B, H, W, C]
    b, h, w, c = x.shape
    return {"output": layer(x.flatten(1, 2), (h, w)).reshape(b, h, w, c)}


def _model(name: str):
    def run(spec, state_dict, io):
        kw = spec["official_kwargs"]
        assert kw["layer_scale"] is None and kw["qk_scale"] is None
        model = timm.create_model(
            name,
            embed_dim=kw["embed_dim"],
            depths=kw["depths"],
            num_heads=kw["num_heads"],
            mlp_ratio=kw["mlp_ratio"],
            kernel_size=kw["kernel_size"],
            dilations=kw["dilations"],
            in_chans=kw["in_chans"],
            num_classes=kw["num_classes"],
            qkv_bias=kw["qkv_bias"],
            drop_path_rate=0.0,
        ).eval()
        model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)
        # The authors' features.i (i < 3) are taken after level i's downsampler: our stage i+1's downsample output.
        captured = {}
        hooks = [
            model.stages[i + 1].downsample.register_forward_hook(
                lambda _m, _i, out, i=i: captured.__setitem__(f"features.{i}", out)
            )
            for i in range(len(model.stages) - 1)
        ]
        x = io["input"]
        out = {"output": model(x), "features.stem": model.stem(x)}
        for h in hooks:
            h.remove()
        out.update(captured)
        feats = model.forward_features(x)
        out["pre_logits"] = model.forward_head(feats, pre_logits=True)
        last = model.forward_intermediates(x, indices=1, output_fmt="NHWC", intermediates_only=True)[0]
        out[f"features.{len(model.stages) - 1}"] = last
        return {k: v for k, v in out.items() if k in io}

    return run


CASES = {
    "nat_attention": _attention,
    "dinat_attention": _attention,
    "nat": _model("nat_mini"),
    "dinat": _model("dinat_mini"),
}
