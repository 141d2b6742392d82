"""``UNet2DConditionModel`` (SD 1.x / 2.x / XL): self-attention ``attn1`` of every ``Transformer2DModel``.

Cross-attention (``attn2``) is untouched. The resolution changes per UNet level, so the grid is published by a
pre-forward hook on each ``Transformer2DModel`` that holds a converted layer: its input is ``[B, C, H, W]`` and its
``attn1`` sees the ``H x W`` tokens in raster order.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ._adapter import Adapter, Candidate, legacy_self_attention_reason

__all__ = ["UNetAdapter"]


class UNetAdapter(Adapter):
    family = "unet"
    classes = ("UNet2DConditionModel",)

    def candidates(self, model: nn.Module) -> Iterator[Candidate]:
        for name, module in model.named_modules():
            if type(module).__name__ == "Attention":
                yield Candidate(name, module, legacy_self_attention_reason(module))

    def install_hooks(self, model, converted, set_grid):
        owners: dict[str, list[str]] = {}  # owner -> converted layers, by name relative to the owner
        named = dict(model.named_modules())
        for name in converted:
            parts = name.split(".")
            owner = next(
                (
                    ".".join(parts[:i])
                    for i in range(len(parts) - 1, 0, -1)
                    if type(named[".".join(parts[:i])]).__name__ == "Transformer2DModel"
                ),
                None,
            )
            if owner is None:
                raise ValueError(f"{name}: no enclosing Transformer2DModel to read the token grid from")
            owners.setdefault(owner, []).append(name[len(owner) + 1 :])
        handles = []
        for owner, names in owners.items():

            def hook(mod, args, kwargs, names=names):
                x = args[0] if args else kwargs["hidden_states"]
                set_grid(mod, names, (int(x.shape[-2]), int(x.shape[-1])))

            handles.append(named[owner].register_forward_pre_hook(hook, with_kwargs=True))
        return handles
