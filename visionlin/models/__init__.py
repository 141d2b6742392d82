"""Backbone families; importing this package registers every entrypoint with timm."""

from . import vit
from .vit import EfficientVisionTransformer

__all__ = ["EfficientVisionTransformer", "vit"]
