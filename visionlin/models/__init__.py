"""Backbone families; importing this package registers every entrypoint with timm."""

from . import hierarchical, mambavision, mavit, nalaformer, nat, pvt, ravlt, swin, vig, vit
from .hierarchical import HierarchicalBackbone
from .vit import EfficientVisionTransformer

__all__ = [
    "EfficientVisionTransformer",
    "HierarchicalBackbone",
    "hierarchical",
    "mambavision",
    "mavit",
    "nalaformer",
    "nat",
    "pvt",
    "ravlt",
    "swin",
    "vig",
    "vit",
]
