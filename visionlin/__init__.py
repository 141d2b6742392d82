"""visionlin: timm-compatible efficient-attention vision backbones.

Importing this package registers every visionlin model with timm (``timm.create_model("infvit_small")``).
Nothing here touches CUDA.
"""

from . import kernels, layers, models
from ._api import list_models, model_complexity, set_backend
from .layers import ATTN_LAYERS, create_attn

__version__ = "0.1.0.dev0"

# The diffusers converter loads on first use (importing visionlin never imports diffusers).
_CONVERT = (
    "ConversionReport",
    "calibrate",
    "convert",
    "finetune",
    "load_conversion",
    "load_finetuned",
    "revert",
    "save_conversion",
)

__all__ = [
    "ATTN_LAYERS",
    "ConversionReport",
    "__version__",
    "calibrate",
    "convert",
    "create_attn",
    "finetune",
    "kernels",
    "layers",
    "list_models",
    "load_conversion",
    "load_finetuned",
    "model_complexity",
    "models",
    "revert",
    "save_conversion",
    "set_backend",
]


def __getattr__(name: str):
    if name in _CONVERT:
        import importlib

        # ``visionlin.convert`` is the subpackage, made callable: ``visionlin.convert(pipe, ...)`` runs
        # ``visionlin.convert.convert`` and ``import visionlin.convert`` still gives the package.
        package = importlib.import_module(".convert", __name__)
        return package if name == "convert" else getattr(package, name)
    raise AttributeError(f"module 'visionlin' has no attribute {name!r}")
