"""Token mixers (one module per mechanism) and shared blocks."""

from ._base import TokenMixer
from ._cache import clear_derived_cache
from ._registry import ATTN_LAYERS, create_attn, register_attn
from .agent import AgentAttention, resample_agent_biases
from .efficient import EfficientAttention
from .focused import FocusedLinearAttention
from .gla import GatedLinearAttention2D
from .infsa import LinearInfSAAttention, PureInfSAAttention
from .inline import InLineAttention
from .magnitude import MagnitudeAwareAttention
from .mamba import MambaVisionMixer
from .neighborhood import NeighborhoodAttention
from .norm import PreNorm, as_pre_norm
from .norm_aware import NormAwareAttention
from .patch import PatchConv2d, as_patch_conv
from .rank_augmented import RankAugmentedAttention
from .softmax import SoftmaxAttention
from .window import ShiftedWindowAttention

__all__ = [
    "ATTN_LAYERS",
    "AgentAttention",
    "EfficientAttention",
    "FocusedLinearAttention",
    "GatedLinearAttention2D",
    "InLineAttention",
    "LinearInfSAAttention",
    "MagnitudeAwareAttention",
    "MambaVisionMixer",
    "NeighborhoodAttention",
    "NormAwareAttention",
    "PatchConv2d",
    "PreNorm",
    "PureInfSAAttention",
    "RankAugmentedAttention",
    "ShiftedWindowAttention",
    "SoftmaxAttention",
    "TokenMixer",
    "as_patch_conv",
    "as_pre_norm",
    "clear_derived_cache",
    "create_attn",
    "register_attn",
    "resample_agent_biases",
]
