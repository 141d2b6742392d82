"""``SD3Transformer2DModel`` (SD3 / SD3.5): joint attention ``transformer_blocks.*.attn`` and SD3.5's image-only
``attn2``.

Image tokens (grid ``(H / patch_size, W / patch_size)`` of the forward's ``hidden_states`` ``[B, C, H, W]``, raster
order) go through the method; the text tokens (the joint sequence is ``[image, text]``) stay dense: image queries
attend to them densely, merged exactly with the converted image part by log-sum-exp, and text queries attend densely
to everything.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ._adapter import Adapter, Candidate

__all__ = ["SD3Adapter"]

JOINT_PROCESSORS = ("JointAttnProcessor2_0",)


class SD3Adapter(Adapter):
    family = "sd3"
    classes = ("SD3Transformer2DModel",)
    processor = "joint"

    def candidates(self, model: nn.Module) -> Iterator[Candidate]:
        for name, module in model.named_modules():
            if type(module).__name__ == "Attention":
                proc = type(module.processor).__name__
                reason = "" if proc in JOINT_PROCESSORS else f"processor {proc} is not one the converter reproduces"
                yield Candidate(name, module, reason)

    def install_hooks(self, model, converted, set_grid):
        patch = int(model.config.patch_size)
        names = list(converted)

        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            set_grid(mod, names, (int(x.shape[-2]) // patch, int(x.shape[-1]) // patch))

        return [model.register_forward_pre_hook(hook, with_kwargs=True)]
