"""Golden cases: whole MAViT (MALA), RAVLT (RALA) and NaLaFormer models, reduced, through their checkpoint_filter_fn."""

from __future__ import annotations

import timm

from visionlin.models.mavit import checkpoint_filter_fn


def _model(arch: str):
    def run(spec, state_dict, io):
        kw = spec["official_kwargs"]
        assert all(len(set(f[:d])) == 1 for f, d in zip(kw["flagss"], kw["depths"], strict=True))
        stage_types = ["linear" if f[0] == "l" else "softmax" for f in kw["flagss"]]
        model = timm.create_model(
            arch,
            num_classes=kw["num_classes"],
            embed_dim=kw["embed_dims"],
            depths=kw["depths"],
            num_heads=kw["num_heads"],
            mlp_ratio=kw["mlp_ratios"],
            stage_types=stage_types,
            init_values=kw["layer_init_values"],
            projection=kw["projection"],
            drop_path_rate=kw["drop_path_rate"],
        ).eval()
        model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)
        x = io["input"]
        final, feats = model.forward_intermediates(x)
        out = {"output": model.forward_head(final), "stem": model.stem(x).permute(0, 3, 1, 2)}
        out.update({f"features.{i}": f for i, f in enumerate(feats)})
        return out

    return run


CASES = {
    "mavit": _model("mavit_tiny"),
    "ravlt": _model("ravlt_tiny"),
    "nalaformer": _model("nalaformer_tiny"),
}
