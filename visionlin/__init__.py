"""visionlin: timm-compatible efficient-attention vision backbones.

Importing this package registers every visionlin model with timm (``timm.create_model("infvit_small")``).
Nothing here touches CUDA.
"""

from . import kernels, layers, models
from ._api import list_models, set_backend
from .layers import ATTN_LAYERS, create_attn

__version__ = "0.1.0.dev0"

__all__ = ["ATTN_LAYERS", "__version__", "create_attn", "kernels", "layers", "list_models", "models", "set_backend"]
