"""Functional attention ops: tensors in, tensors out, heads-last ``[B, N, H, D]``; a ``*_reference`` next to each."""

from ._dispatch import get_op, list_ops
from .agent import agent_attention, agent_attention_reference
from .focused import focused_linear_attention, focused_linear_attention_reference
from .gated_norm import gated_layer_norm, gated_layer_norm_reference, layer_norm, layer_norm_reference
from .hybrid import (
    hybrid_attention,
    hybrid_attention_reference,
    pooled_agent_attention,
    pooled_agent_attention_reference,
)
from .infsa import (
    linear_infsa_attention,
    linear_infsa_attention_reference,
    pure_infsa_attention,
    pure_infsa_attention_reference,
)
from .linear import (
    FEATURE_MAPS,
    efficient_attention,
    efficient_attention_reference,
    linear_attention,
    linear_attention_reference,
)
from .magnitude import magnitude_aware_linear_attention, magnitude_aware_linear_attention_reference
from .neighborhood import (
    effective_window,
    neighborhood_attention,
    neighborhood_attention_qkv,
    neighborhood_attention_reference,
    neighborhood_indices,
)
from .norm_aware import norm_aware_linear_attention, norm_aware_linear_attention_reference
from .rank_augmented import rank_augmented_linear_attention, rank_augmented_linear_attention_reference
from .rms_mix import rms_gate_mix, rms_gate_mix_reference
from .rope import apply_rope_2d, apply_rope_2d_pair, rope_2d_tables
from .scan import (
    bidirectional_gated_linear_attention,
    bidirectional_gated_linear_attention_qkv,
    bidirectional_gated_linear_attention_reference,
    gated_linear_attention,
    gated_linear_attention_reference,
    linear_scan_reference,
    selective_scan,
    selective_scan_reference,
)
from .softmax import softmax_attention, softmax_attention_reference
from .sparse_linear import (
    block_sparse_attention,
    block_sparse_attention_reference,
    sla_block_map,
    sparse_linear_attention,
    sparse_linear_attention_reference,
)

__all__ = [
    "FEATURE_MAPS",
    "agent_attention",
    "agent_attention_reference",
    "apply_rope_2d",
    "apply_rope_2d_pair",
    "bidirectional_gated_linear_attention",
    "bidirectional_gated_linear_attention_qkv",
    "bidirectional_gated_linear_attention_reference",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "effective_window",
    "efficient_attention",
    "efficient_attention_reference",
    "focused_linear_attention",
    "focused_linear_attention_reference",
    "gated_layer_norm",
    "gated_layer_norm_reference",
    "layer_norm",
    "layer_norm_reference",
    "gated_linear_attention",
    "gated_linear_attention_reference",
    "hybrid_attention",
    "hybrid_attention_reference",
    "linear_infsa_attention",
    "linear_infsa_attention_reference",
    "pure_infsa_attention",
    "pure_infsa_attention_reference",
    "get_op",
    "linear_attention",
    "linear_attention_reference",
    "linear_scan_reference",
    "list_ops",
    "magnitude_aware_linear_attention",
    "magnitude_aware_linear_attention_reference",
    "neighborhood_attention",
    "neighborhood_attention_qkv",
    "neighborhood_attention_reference",
    "neighborhood_indices",
    "norm_aware_linear_attention",
    "pooled_agent_attention",
    "pooled_agent_attention_reference",
    "norm_aware_linear_attention_reference",
    "rank_augmented_linear_attention",
    "rank_augmented_linear_attention_reference",
    "rms_gate_mix",
    "rms_gate_mix_reference",
    "rope_2d_tables",
    "selective_scan",
    "selective_scan_reference",
    "softmax_attention",
    "sla_block_map",
    "softmax_attention_reference",
    "sparse_linear_attention",
    "sparse_linear_attention_reference",
]
