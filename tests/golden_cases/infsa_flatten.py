"""Golden cases: InfSA attention (pure, linear) and FLatten's focused linear attention."""

from __future__ import annotations

from visionlin.layers import FocusedLinearAttention, LinearInfSAAttention, PureInfSAAttention


def _infsa(cls):
    def run(spec, state_dict, io):
        kw = spec["official_kwargs"]
        layer = cls(kw["embed_dim"], kw["num_heads"], qkv_bias=kw["bias"], rho_init=kw["rho_init"]).eval()
        layer.load_state_dict(cls.convert_official_state_dict(state_dict), strict=True)
        x = io["input"]
        # Position-free mechanism: any grid with H*W == N validates.
        return {"output": layer(x, (1, x.shape[1]))}

    return run


def _flatten(spec, state_dict, io):
    kw = spec["official_kwargs"]
    window = tuple(kw["window_size"])
    layer = FocusedLinearAttention(
        kw["dim"],
        kw["num_heads"],
        qkv_bias=kw["qkv_bias"],
        focusing_factor=kw["focusing_factor"],
        dwc_kernel=kw["kernel_size"],
        pos_size=window,
    ).eval()
    layer.load_state_dict(FocusedLinearAttention.convert_official_state_dict(state_dict), strict=True)
    return {"output": layer(io["input"], window)}


CASES = {
    "infsa_linear_attention": _infsa(LinearInfSAAttention),
    "infsa_pure_attention": _infsa(PureInfSAAttention),
    "flatten_attention": _flatten,
}
