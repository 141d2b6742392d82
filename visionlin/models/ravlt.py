"""RAVLT (RALA, "Breaking the Low-Rank Dilemma of Linear Attention", CVPR 2025): the MAViT backbone
(:class:`~visionlin.models.mavit.RoPEHybridBackbone`) with rank-augmented linear attention in stages 1-2 and a
1024-wide projection head (qhfan/RALA ``classfication/RALA.py``)."""

from __future__ import annotations

from typing import Any

from timm.models import register_model

from .mavit import BASE, LARGE, SMALL, TINY, RoPEHybridBackbone, checkpoint_filter_fn, create_rope_hybrid, hub_cfgs

__all__ = ["checkpoint_filter_fn", "ravlt_base", "ravlt_large", "ravlt_small", "ravlt_tiny"]

_RAVLT = {
    "paper_ids": "arXiv:2411.07635",
    "origin_url": "https://github.com/qhfan/RALA",
    "hf_hub_id": "aldjalkdf/RAVLT",
}

# The authors' ImageNet-1k checkpoints (qhfan/RALA README "ckpt" column: huggingface.co/aldjalkdf/RAVLT, RAVLT_{T,S,B,L}
# .pth; full training checkpoints, the weights under "model"); checkpoint_filter_fn maps the key names.
default_cfgs = hub_cfgs("ravlt", "RAVLT", _RAVLT)


def _ravlt(variant: str, pretrained: bool, config: dict[str, Any], kwargs: dict[str, Any]) -> RoPEHybridBackbone:
    return create_rope_hybrid(variant, pretrained, **{**config, "mixer": "rala", "projection": 1024, **kwargs})


@register_model
def ravlt_tiny(pretrained: bool = False, **kwargs: Any) -> RoPEHybridBackbone:
    """RAVLT-T: 64-512 wide, depths 2-2-6-2, RALA in stages 1-2 (15M params, 2.4 GMACs)."""
    return _ravlt("ravlt_tiny", pretrained, TINY, kwargs)


@register_model
def ravlt_small(pretrained: bool = False, **kwargs: Any) -> RoPEHybridBackbone:
    """RAVLT-S: 64-512 wide, depths 3-5-9-3 (26M params, 4.6 GMACs)."""
    return _ravlt("ravlt_small", pretrained, SMALL, kwargs)


@register_model
def ravlt_base(pretrained: bool = False, **kwargs: Any) -> RoPEHybridBackbone:
    """RAVLT-B: 96-512 wide, depths 4-6-12-6 (48M params, 9.9 GMACs)."""
    return _ravlt("ravlt_base", pretrained, BASE, kwargs)


@register_model
def ravlt_large(pretrained: bool = False, **kwargs: Any) -> RoPEHybridBackbone:
    """RAVLT-L: 96-640 wide, depths 4-7-19-8 (95M params, 16.0 GMACs)."""
    return _ravlt("ravlt_large", pretrained, LARGE, kwargs)
