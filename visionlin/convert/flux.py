"""``FluxTransformer2DModel``: joint attention of the double blocks (``transformer_blocks.*.attn``) and of the
single blocks (``single_transformer_blocks.*.attn``).

The joint sequence is ``[text, image]`` in both. The image grid comes from the forward's ``img_ids`` (``h = max
row id + 1``, ``w = max column id + 1``, the pipeline's packed 2 x 2 latent patches in raster order) and the text
length from ``encoder_hidden_states``; the single blocks cannot see it otherwise. Text stays dense (exact
log-sum-exp merge with the converted image part).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ._adapter import Adapter, Candidate

__all__ = ["FluxAdapter"]

FLUX_PROCESSORS = ("FluxAttnProcessor",)


class FluxAdapter(Adapter):
    family = "flux"
    classes = ("FluxTransformer2DModel",)
    processor = "flux"

    def candidates(self, model: nn.Module) -> Iterator[Candidate]:
        for name, module in model.named_modules():
            if type(module).__name__ == "FluxAttention":
                proc = type(module.processor).__name__
                reason = "" if proc in FLUX_PROCESSORS else f"processor {proc} is not one the converter reproduces"
                yield Candidate(name, module, reason)

    def install_hooks(self, model, converted, set_grid):
        names = list(converted)

        def hook(mod, args, kwargs):
            ehs = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
            ids = args[4] if len(args) > 4 else kwargs.get("img_ids")
            if ids is None or ehs is None:
                raise ValueError(
                    "the converted Flux transformer needs img_ids and encoder_hidden_states to lay out tokens"
                )
            ids = ids[0] if ids.ndim == 3 else ids  # batched ids are deprecated in diffusers
            grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
            set_grid(mod, names, grid, int(ehs.shape[1]))

        return [model.register_forward_pre_hook(hook, with_kwargs=True)]
