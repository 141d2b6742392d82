"""Golden cases: Agent attention (DeiT form with a class token, window form without) and InLine attention."""

from __future__ import annotations

from visionlin.layers import AgentAttention, InLineAttention


def _grid(spec) -> tuple[tuple[int, int], int]:
    extra = spec["input"]["extra"]
    return (extra["H"], extra["W"]), extra.get("num_prefix_tokens", 0)


def _agent(spec, state_dict, io):
    kw, arch = spec["official_kwargs"], spec["architecture"]
    feat_size, prefix = _grid(spec)
    window = arch["window"]
    bias_size = tuple(window) if isinstance(window, list) else (window, window)
    layer = AgentAttention(
        kw["dim"],
        kw["num_heads"],
        qkv_bias=kw["qkv_bias"],
        agent_num=kw["agent_num"],
        bias_size=bias_size,
        num_prefix_tokens=arch.get("num_prefix_tokens", 0),
    ).eval()
    layer.load_state_dict(AgentAttention.convert_official_state_dict(state_dict), strict=True)
    return {"output": layer(io["input"], feat_size, prefix)}


def _inline(spec, state_dict, io):
    kw = spec["official_kwargs"]
    feat_size, prefix = _grid(spec)
    layer = InLineAttention(kw["dim"], kw["num_heads"], qkv_bias=kw["qkv_bias"]).eval()
    layer.load_state_dict(InLineAttention.convert_official_state_dict(state_dict), strict=True)
    return {"output": layer(io["input"], feat_size, prefix)}


CASES = {
    "agent_attention": _agent,
    "agent_attention_window": _agent,
    "inline_attention": _inline,
}
