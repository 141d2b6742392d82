"""``CogVideoXTransformer3DModel``: the joint text-video attention ``transformer_blocks.*.attn1``.

The forward's ``hidden_states`` is ``[B, F, C, H, W]``; the video grid is ``(F, H / p, W / p)``, or
``(ceil(F / p_t), H / p, W / p)`` with ``patch_size_t`` (CogVideoX 1.5), row-major. The joint sequence is
``[text, video]``: text stays dense (exact log-sum-exp merge with the converted video part).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ._adapter import Adapter, Candidate

__all__ = ["CogVideoXAdapter"]

COGVIDEOX_PROCESSORS = ("CogVideoXAttnProcessor2_0",)


class CogVideoXAdapter(Adapter):
    grid_dims = 3
    family = "cogvideox"
    classes = ("CogVideoXTransformer3DModel",)
    processor = "cogvideox"

    def candidates(self, model: nn.Module) -> Iterator[Candidate]:
        for name, module in model.named_modules():
            if type(module).__name__ == "Attention":
                proc = type(module.processor).__name__
                reason = "" if proc in COGVIDEOX_PROCESSORS else f"processor {proc} is not one the converter reproduces"
                yield Candidate(name, module, reason)

    def install_hooks(self, model, converted, set_grid):
        p, pt = int(model.config.patch_size), model.config.patch_size_t
        names = list(converted)

        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            f, h, w = int(x.shape[1]), int(x.shape[-2]), int(x.shape[-1])
            set_grid(mod, names, (f if pt is None else -(-f // int(pt)), h // p, w // p))

        return [model.register_forward_pre_hook(hook, with_kwargs=True)]
