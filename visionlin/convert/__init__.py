"""Post-training converter for diffusers pipelines: swap image self-attention for visionlin methods.

``convert(pipe_or_model, method="sla", **options) -> ConversionReport``, ``revert``, ``save_conversion``,
``load_conversion``. One adapter file per diffusers family (``dit.py``, ``unet.py``); the attention math is in
:mod:`visionlin.kernels` (``sparse_linear_attention``, ``block_sparse_attention``, ``softmax_attention``).
Importing this package does not import diffusers: the adapters read class names and the models' own modules.
"""

import sys
import types

from ._convert import (
    ADAPTERS,
    ConversionReport,
    LayerRecord,
    convert,
    disabled,
    load_conversion,
    revert,
    save_conversion,
)
from ._methods import METHODS
from .calibrate import CalibrationReport, calibrate
from .finetune import FinetuneResult, distillation_loss, finetune, load_finetuned

__all__ = [
    "ADAPTERS",
    "METHODS",
    "CalibrationReport",
    "FinetuneResult",
    "ConversionReport",
    "LayerRecord",
    "calibrate",
    "convert",
    "disabled",
    "distillation_loss",
    "finetune",
    "load_conversion",
    "load_finetuned",
    "revert",
    "save_conversion",
]


class _CallableModule(types.ModuleType):
    """Lets ``visionlin.convert(pipe, ...)`` call :func:`convert` while ``visionlin.convert`` stays the package."""

    def __call__(self, *args, **kwargs) -> ConversionReport:
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
