"""Token mixers (one module per mechanism) and shared blocks."""

from ._base import TokenMixer
from ._registry import ATTN_LAYERS, create_attn, register_attn
from .focused import FocusedLinearAttention
from .infsa import LinearInfSAAttention, PureInfSAAttention
from .softmax import SoftmaxAttention

__all__ = [
    "ATTN_LAYERS",
    "FocusedLinearAttention",
    "LinearInfSAAttention",
    "PureInfSAAttention",
    "SoftmaxAttention",
    "TokenMixer",
    "create_attn",
    "register_attn",
]
