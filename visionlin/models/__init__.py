"""Backbone families; importing this package registers every entrypoint with timm."""

from . import hierarchical, mambavision, nat, vig, vit
from .hierarchical import HierarchicalBackbone
from .vit import EfficientVisionTransformer

__all__ = ["EfficientVisionTransformer", "HierarchicalBackbone", "hierarchical", "mambavision", "nat", "vig", "vit"]
