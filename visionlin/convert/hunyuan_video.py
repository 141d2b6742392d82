"""``HunyuanVideoTransformer3DModel``: joint attention of the double blocks (``transformer_blocks.*.attn``) and of
the single blocks (``single_transformer_blocks.*.attn``).

The joint sequence is ``[video, text]`` with a text-padding mask. The video grid is ``(F / patch_size_t, H /
patch_size, W / patch_size)`` of the forward's ``hidden_states`` ``[B, C, F, H, W]``, row-major ``(f, h, w)`` (the
patch embedding's ``flatten(2)``). Text stays dense (each sample's valid text keys merged exactly by log-sum-exp with
the converted video part). The context embedder's token refiner (self-attention over the text tokens) is not
converted.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ._adapter import Adapter, Candidate

__all__ = ["HunyuanVideoAdapter"]

HUNYUAN_PROCESSORS = ("HunyuanVideoAttnProcessor2_0",)


class HunyuanVideoAdapter(Adapter):
    grid_dims = 3
    family = "hunyuan_video"
    classes = ("HunyuanVideoTransformer3DModel",)
    processor = "hunyuan_video"

    def candidates(self, model: nn.Module) -> Iterator[Candidate]:
        for name, module in model.named_modules():
            if type(module).__name__ != "Attention":
                continue
            proc = type(module.processor).__name__
            if name.startswith("context_embedder."):
                reason = "text token refiner (self-attention over text tokens stays dense)"
            elif proc not in HUNYUAN_PROCESSORS:
                reason = f"processor {proc} is not one the converter reproduces ({', '.join(HUNYUAN_PROCESSORS)})"
            else:
                reason = ""
            yield Candidate(name, module, reason)

    def install_hooks(self, model, converted, set_grid):
        p, pt = int(model.config.patch_size), int(model.config.patch_size_t)
        names = list(converted)

        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            f, h, w = (int(s) for s in x.shape[-3:])
            set_grid(mod, names, (f // pt, h // p, w // p))

        return [model.register_forward_pre_hook(hook, with_kwargs=True)]
