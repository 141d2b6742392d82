"""``DiTTransformer2DModel`` and ``PixArtTransformer2DModel``: self-attention ``attn1`` over the patch tokens.

The token grid is ``(H / patch_size, W / patch_size)`` of the latent the transformer's forward receives
(``hidden_states`` ``[B, C, H, W]``), raster order. PixArt's ``attn2`` is cross-attention and stays as it is.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ._adapter import Adapter, Candidate, legacy_self_attention_reason

__all__ = ["DiTAdapter"]


class DiTAdapter(Adapter):
    family = "dit"
    classes = ("DiTTransformer2DModel", "PixArtTransformer2DModel")

    def candidates(self, model: nn.Module) -> Iterator[Candidate]:
        for name, module in model.named_modules():
            if type(module).__name__ == "Attention":
                yield Candidate(name, module, legacy_self_attention_reason(module))

    def install_hooks(self, model, converted, set_grid):
        patch = int(model.config.patch_size)
        names = list(converted)

        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            set_grid(mod, names, (int(x.shape[-2]) // patch, int(x.shape[-1]) // patch))

        return [model.register_forward_pre_hook(hook, with_kwargs=True)]
