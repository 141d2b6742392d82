"""``WanTransformer3DModel`` (Wan 2.1 / 2.2 text-to-video): self-attention ``blocks.*.attn1`` over the video tokens.

The token grid is ``(F / p_t, H / p_h, W / p_w)`` of the forward's ``hidden_states`` ``[B, C, F, H, W]`` with
``config.patch_size``, row-major ``(f, h, w)`` (the patch embedding's ``flatten(2)``). Cross-attention ``attn2``
(text, and the image context of I2V) stays as it is.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ._adapter import Adapter, Candidate

__all__ = ["WanAdapter"]

WAN_PROCESSORS = ("WanAttnProcessor",)


class WanAdapter(Adapter):
    grid_dims = 3
    family = "wan"
    classes = ("WanTransformer3DModel",)
    processor = "wan"

    def candidates(self, model: nn.Module) -> Iterator[Candidate]:
        for name, module in model.named_modules():
            if type(module).__name__ != "WanAttention":
                continue
            proc = type(module.processor).__name__
            if module.is_cross_attention:
                reason = "cross-attention (text keys stay dense)"
            elif proc not in WAN_PROCESSORS:
                reason = f"processor {proc} is not one the converter reproduces"
            else:
                reason = ""
            yield Candidate(name, module, reason)

    def install_hooks(self, model, converted, set_grid):
        pt, ph, pw = (int(p) for p in model.config.patch_size)
        names = list(converted)

        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            f, h, w = (int(s) for s in x.shape[-3:])
            set_grid(mod, names, (f // pt, h // ph, w // pw))

        return [model.register_forward_pre_hook(hook, with_kwargs=True)]
