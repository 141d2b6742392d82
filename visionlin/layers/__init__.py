"""Token mixers (one module per mechanism) and shared blocks."""

from ._base import TokenMixer
from ._registry import ATTN_LAYERS, create_attn, register_attn
from .agent import AgentAttention, resample_agent_biases
from .focused import FocusedLinearAttention
from .infsa import LinearInfSAAttention, PureInfSAAttention
from .inline import InLineAttention
from .softmax import SoftmaxAttention

__all__ = [
    "ATTN_LAYERS",
    "AgentAttention",
    "FocusedLinearAttention",
    "InLineAttention",
    "LinearInfSAAttention",
    "PureInfSAAttention",
    "SoftmaxAttention",
    "TokenMixer",
    "create_attn",
    "register_attn",
    "resample_agent_biases",
]
