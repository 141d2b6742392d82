"""Backbone families; importing this package registers every entrypoint with timm."""

from . import hierarchical, nat, vit
from .hierarchical import HierarchicalBackbone
from .vit import EfficientVisionTransformer

__all__ = ["EfficientVisionTransformer", "HierarchicalBackbone", "hierarchical", "nat", "vit"]
