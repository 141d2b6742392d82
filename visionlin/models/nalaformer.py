"""NaLaFormer (NaLa, "Norm x Direction: Restoring the Missing Query Norm in Vision Linear Attention"): the MAViT
backbone (:class:`~visionlin.models.mavit.RoPEHybridBackbone`) with norm-aware linear attention in stages 1-2, two
CPEs per block (before the attention and before the FFN), LayerNorm + SiLU-gated mixers in every stage and a 1024-wide
projection head (ZacharyMeng/NaLaFormer ``NaLaformer/NALA.py``)."""

from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model

from .mavit import BASE, LARGE, SMALL, TINY, RoPEHybridBackbone, _cfg, checkpoint_filter_fn, create_rope_hybrid

__all__ = ["checkpoint_filter_fn", "nalaformer_base", "nalaformer_large", "nalaformer_small", "nalaformer_tiny"]

_NALA = {
    "paper_ids": "arXiv:2506.21137",
    "origin_url": "https://github.com/ZacharyMeng/NaLaFormer",
    "notes": (
        "no released weights: the authors' README and MODEL_ZOO.md list every variant's weights as 'coming soon' "
        "(ZacharyMeng/NaLaFormer @ 0e1a521)",
    ),
}

default_cfgs = generate_default_cfgs(
    {f"nalaformer_{s}.in1k": _cfg(**_NALA) for s in ("tiny", "small", "base", "large")}
)


def _nala(
    variant: str, pretrained: bool, config: dict[str, Any], mlp_ratio: float, kwargs: dict[str, Any]
) -> RoPEHybridBackbone:
    args = {**config, "mixer": "nala", "two_cpe": True, "projection": 1024, "mlp_ratio": mlp_ratio, **kwargs}
    return create_rope_hybrid(variant, pretrained, **args)


@register_model
def nalaformer_tiny(pretrained: bool = False, **kwargs: Any) -> RoPEHybridBackbone:
    """NaLaFormer-T: 64-512 wide, depths 2-2-6-2, MLP ratio 4 (15M params, 2.7 GFLOPs)."""
    return _nala("nalaformer_tiny", pretrained, TINY, 4.0, kwargs)


@register_model
def nalaformer_small(pretrained: bool = False, **kwargs: Any) -> RoPEHybridBackbone:
    """NaLaFormer-S: 64-512 wide, depths 3-5-9-3, MLP ratio 3.5 (26M params, 5.1 GFLOPs)."""
    return _nala("nalaformer_small", pretrained, SMALL, 3.5, kwargs)


@register_model
def nalaformer_base(pretrained: bool = False, **kwargs: Any) -> RoPEHybridBackbone:
    """NaLaFormer-B: 96-512 wide, depths 4-6-12-6, MLP ratio 4 (52M params, 12 GFLOPs)."""
    return _nala("nalaformer_base", pretrained, BASE, 4.0, kwargs)


@register_model
def nalaformer_large(pretrained: bool = False, **kwargs: Any) -> RoPEHybridBackbone:
    """NaLaFormer-L: 96-640 wide, depths 4-7-19-8, MLP ratio 3.5 (95M params, 18 GFLOPs)."""
    return _nala("nalaformer_large", pretrained, LARGE, 3.5, kwargs)
