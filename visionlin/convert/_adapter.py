"""The adapter interface: what one diffusers model family tells the converter."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn

__all__ = ["Adapter", "Candidate", "STOCK_SELF_PROCESSORS"]

# Processors whose math :class:`~visionlin.convert._processors.SelfAttnProcessor` reproduces.
STOCK_SELF_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")


@dataclass
class Candidate:
    """One attention module of a model: convertible (``reason`` empty) or not (``reason`` says why)."""

    name: str
    module: nn.Module
    reason: str = ""


class Adapter:
    """One diffusers family. Subclasses set ``classes`` and implement :meth:`candidates` and :meth:`install_hooks`."""

    family = ""
    classes: tuple[str, ...] = ()
    processor = "self"  # which converter processor the layers get: "self", "joint" (SD3), "flux", "wan", "cogvideox"
    grid_dims = 2  # axes of the token grid its hooks publish: 2 (H, W) for images, 3 (T, H, W) for video

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in self.classes

    def candidates(self, model: nn.Module) -> Iterator[Candidate]:
        """Every attention module, with the reason it cannot be converted (empty if it can)."""
        raise NotImplementedError

    def install_hooks(
        self,
        model: nn.Module,
        converted: dict[str, nn.Module],
        set_grid: Callable[[nn.Module, list[str], tuple], None],
    ) -> list:
        """Register pre-forward hooks that publish the token grid to the converted modules; return the handles.

        A hook calls ``set_grid(mod, names, grid[, text_len])`` with the module it runs on and the converted layers'
        names relative to it, never with module objects it closed over: a ``copy.deepcopy`` of the model copies the
        hook functions as they are, and those must then drive the copy's layers."""
        raise NotImplementedError


def legacy_self_attention_reason(module: nn.Module) -> str:
    """Why a legacy ``Attention`` module is not convertible as image self-attention (empty if it is)."""
    if getattr(module, "is_cross_attention", False):
        return "cross-attention (text keys stay dense)"
    proc = type(getattr(module, "processor", None)).__name__
    if proc not in STOCK_SELF_PROCESSORS:
        return f"processor {proc} is not one the converter reproduces ({', '.join(STOCK_SELF_PROCESSORS)})"
    return ""
