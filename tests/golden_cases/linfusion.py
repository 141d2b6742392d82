"""Golden case: LinFusion's ``GeneralizedLinearAttention`` (Huage001/LinFusion) through the converter's ``linear``
method: a stock diffusers ``Attention`` (the fixture's ``to_q`` / ``to_k`` / ``to_v`` / ``to_out``) with the
``linear`` core (the fixture's ``to_q_`` / ``to_k_`` MLPs mapped by ``linfusion_filter_fn``) and the converter's
self-attention processor, default options (elu + 1, ``eps`` 1e-4)."""

from __future__ import annotations

from visionlin.convert._methods import CORE_ATTR, build_core, linfusion_filter_fn, validate_options
from visionlin.convert._processors import SelfAttnProcessor


def _linfusion(spec, state_dict, io):
    from diffusers.models.attention_processor import Attention

    arch = spec["architecture"]
    dim, heads, dim_head = arch["query_dim"], arch["heads"], arch["dim_head"]
    attn = Attention(query_dim=dim, heads=heads, dim_head=dim_head, out_dim=dim, bias=False, out_bias=True).eval()
    stock = {k: v for k, v in state_dict.items() if not k.startswith(("to_q_.", "to_k_."))}
    attn.load_state_dict(stock)
    core = build_core("linear", validate_options("linear", {}), dim_head, None, attn).eval()
    core.load_state_dict(linfusion_filter_fn(state_dict))
    core.grid = tuple(arch["token_grid"])
    attn.add_module(CORE_ATTR, core)
    attn.set_processor(SelfAttnProcessor("linfusion_attention"))
    return {"output": attn(io["input"])}


CASES = {"linfusion_attention": _linfusion}
