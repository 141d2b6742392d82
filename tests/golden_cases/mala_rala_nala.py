"""Golden cases: MALA, RALA and NaLa token mixers (with their 2-D RoPE tables) and Efficient Attention."""

from __future__ import annotations

from visionlin.layers import EfficientAttention, MagnitudeAwareAttention, NormAwareAttention, RankAugmentedAttention
from visionlin.layers._base import map_to_tokens, tokens_to_map


def _rope_mixer(cls):
    def run(spec, state_dict, io):
        kw = spec["official_kwargs"]
        arch = spec["architecture"]
        layer = cls(kw["dim"], kw["num_heads"], qkv_bias=True, lepe_kernel=arch["lepe_kernel"]).eval()
        layer.load_state_dict(cls.convert_official_state_dict(state_dict), strict=True)
        x = io["input"]  # [B, C, H, W]
        feat_size = tuple(x.shape[-2:])
        out = tokens_to_map(layer(map_to_tokens(x), feat_size), feat_size)
        # The tables the layer rotates with, compared with the authors' saved ones.
        sin, cos = layer.rope_tables(feat_size, 0, x.device, x.dtype)
        return {"output": out, "sin": sin, "cos": cos}

    return run


def _efficient(spec, state_dict, io):
    kw = spec["official_kwargs"]
    layer = EfficientAttention(
        kw["in_channels"],
        kw["head_count"],
        qkv_bias=True,
        key_dim=kw["key_channels"],
        value_dim=kw["value_channels"],
        residual=True,  # the authors' module adds its input
    ).eval()
    layer.load_state_dict(EfficientAttention.convert_official_state_dict(state_dict), strict=True)
    x = io["input"]
    feat_size = tuple(x.shape[-2:])
    return {"output": tokens_to_map(layer(map_to_tokens(x), feat_size), feat_size)}


CASES = {
    "mala_attention": _rope_mixer(MagnitudeAwareAttention),
    "rala_attention": _rope_mixer(RankAugmentedAttention),
    "nala_attention": _rope_mixer(NormAwareAttention),
    "efficient_attention": _efficient,
}
