"""Checks and shape helpers shared by every model family: constructor arguments, input images, head inputs.

The forward-time helpers branch on tensor shapes, so they are registered with timm as FX leaves
(``register_notrace_function``; FX skips names that start with ``_``, so they have public names). timm's FX
feature extraction (``features_only=True, feature_cls="fx"``) and ``timm.layers.create_feature_extractor`` record
them as single calls instead of tracing into their control flow. They read only shapes and dtypes (no host sync), so
``torch.compile(fullgraph=True)`` and ``torch.export`` trace through them.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from timm.layers import register_notrace_function, resample_abs_pos_embed
from torch import nn

__all__ = [
    "AllOrNothingLoad",
    "assign_tensors",
    "grid_layer_paths",
    "relayout_grid_layers",
    "record_input_size",
    "check_bool",
    "check_depths",
    "check_head_input",
    "check_image",
    "check_int",
    "check_pair",
    "check_positive",
    "check_rate",
    "grid_pos_embed",
    "take_indices",
    "token_grid",
]


def assign_tensors(root: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Put ``tensors`` (keyed as ``root.state_dict()``) into ``root`` as new parameters / buffers (same device, dtype,
    ``requires_grad`` and buffer persistence): an optimizer built before, or a state dict taken before, keeps the old
    tensors, as after timm's ``set_input_size``. Every target is checked before any is replaced.

    Raises:
        NotImplementedError: a target is not a plain parameter or buffer of its module (a ``parametrize``d one, say);
            nothing is changed then.
    """
    from torch.nn.utils import parametrize

    plan = []
    for key, value in tensors.items():
        path, _, name = key.rpartition(".")
        module = root.get_submodule(path) if path else root
        plain = name in module._parameters or name in module._buffers
        if not plain or parametrize.is_parametrized(module, name) or getattr(module, name, None) is None:
            raise NotImplementedError(f"cannot replace {key!r}: not a plain parameter or buffer of its module")
        old = getattr(module, name)
        plan.append((module, name, old, value.detach().to(device=old.device, dtype=old.dtype).clone()))
    for module, name, old, value in plan:
        if name in module._parameters:
            setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
        else:
            module.register_buffer(name, value, persistent=name not in module._non_persistent_buffers_set)


def relayout_grid_layers(
    model: nn.Module, layers: Sequence[tuple[str, tuple[int, int]]], tensors: dict[str, torch.Tensor]
) -> Callable[[], None]:
    """For ``set_input_size``: add to ``tensors`` the grid-sized tables of each mixer ``model.<path>`` laid out for
    its new ``grid`` (``TokenMixer.grid_tables_for``), and return the step that then sets the mixers' grids (run it
    once the tensors are assigned: nothing changes before).

    Raises:
        RuntimeError: a path no longer names a mixer with a grid (replaced after the model was built).
    """
    for path, grid in layers:
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            layer = None
        if getattr(layer, "grid_kwarg", None) is None or not callable(getattr(layer, "grid_tables_for", None)):
            raise RuntimeError(
                f"set_input_size: {path} was built as a mixer on the model's grid and is now "
                f"{type(layer).__name__} (replaced after the model was built?); build the model with the mixers you "
                "want and load its weights through checkpoint_filter_fn"
            )
        layer_tables = layer.grid_tables_for(grid)
        tensors.update({f"{path}.{k}": v for k, v in layer_tables.items()})

    def set_grids() -> None:
        for path, grid in layers:
            layer = model.get_submodule(path)
            setattr(layer, layer.grid_kwarg, tuple(grid))

    return set_grids


def grid_layer_paths(model: nn.Module) -> list[str]:
    """``model._grid_layers`` (the mixers that took the model's grid when it was built).

    Raises:
        RuntimeError: the model object has no such record (made before ``set_input_size`` existed, e.g. unpickled).
    """
    paths = getattr(model, "_grid_layers", None)
    if paths is None:
        raise RuntimeError(
            f"set_input_size: this {type(model).__name__} object has no record of which mixers follow its grid (made "
            "by an older visionlin); build the model anew and load its state dict"
        )
    return list(paths)


def record_input_size(model: nn.Module, img_size: tuple[int, int]) -> None:
    """Record a ``set_input_size`` where timm keeps a model's current input size (``update_model_input_size``, read
    by ``timm.models.get_model_traits`` and saved with timm's checkpoints); a no-op on a timm without it."""
    try:
        from timm.models._input import update_model_input_size
    except ImportError:  # (older timm: nothing records the size besides the model's own attributes)
        return
    update_model_input_size(model, img_size)


class AllOrNothingLoad:
    """Mixin for the models' top-level classes: ``load_state_dict`` changes nothing unless it can load everything.

    ``nn.Module.load_state_dict`` copies every tensor that fits before it raises for the keys or shapes that do not,
    leaving a model half-loaded. Here the same load first runs on a shadow of the model whose parameters and buffers
    are meta tensors (``assign=True``: nothing is copied), through every module's ``_load_from_state_dict``; it raises
    there what the real load would raise (missing / unexpected keys, shape mismatches, a grid check), before the model
    is touched. The shadow shares everything else with the model and costs no tensor memory. Models with load hooks
    of their own (registered by the user or a wrapper: they would see the real modules) or lazy parameters load
    directly, as plain ``nn.Module`` does."""

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        shadow = _meta_shadow(self) if isinstance(state_dict, Mapping) else None  # (else: the real load's error)
        if shadow is not None:
            # Parameters detached: the assigning load would set their requires_grad to the shadow's.
            trial = OrderedDict((k, v.detach() if isinstance(v, nn.Parameter) else v) for k, v in state_dict.items())
            if (metadata := getattr(state_dict, "_metadata", None)) is not None:
                # per-module versions (BatchNorm's, ...), as the real load reads them; a copy, because the load writes
                # its assign flag into them, which the real load would then read
                trial._metadata = copy.deepcopy(metadata)
            nn.Module.load_state_dict(shadow, trial, strict=strict, assign=True)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _meta_shadow(model: nn.Module) -> nn.Module | None:
    """``model`` with its own parameter, buffer and child dicts in every module, tensors on the meta device (not
    requiring gradients: the assigning load wraps inference and integer tensors too, as the copying load takes them),
    everything else shared; ``None`` where a dry run could differ from the load (hooks, lazy parameters) or the
    modules cannot be shallow-copied."""
    modules = list(model.modules())
    for m in modules:
        if m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks:
            return None
        if any(nn.parameter.is_lazy(t) for t in (*m._parameters.values(), *m._buffers.values()) if t is not None):
            return None
    memo: dict[int, nn.Module] = {}

    def meta(t):
        if t is None:
            return None
        m = torch.empty_like(t, device="meta")
        return nn.Parameter(m, requires_grad=False) if isinstance(t, nn.Parameter) else m

    def shadow_of(module: nn.Module) -> nn.Module:
        if id(module) in memo:  # a module used twice stays one module
            return memo[id(module)]
        # (not copy.copy: FSDP2's sharded classes re-run __init__ in __new__, parametrized modules refuse to pickle)
        shadow = memo[id(module)] = object.__new__(type(module))
        shadow.__dict__.update(module.__dict__)
        shadow.__dict__["_parameters"] = {name: meta(p) for name, p in module._parameters.items()}
        shadow.__dict__["_buffers"] = {name: meta(b) for name, b in module._buffers.items()}
        shadow.__dict__["_modules"] = {n: None if c is None else shadow_of(c) for n, c in module._modules.items()}
        return shadow

    try:
        return shadow_of(model)
    except Exception:  # noqa: BLE001 - a module this cannot shadow: the plain load, as nn.Module's
        return None


def check_int(name: str, value: Any, minimum: int = 0) -> int:
    """``value`` as an ``int`` >= ``minimum``; ``ValueError`` naming it otherwise (bools and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum} (got {type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name}={value!r} must be >= {minimum}")
    return value


def check_depths(depths: Any) -> list[int]:
    """A hierarchical model's ``depths`` as a list of block counts; ``ValueError`` naming it unless it is a non-empty
    sequence of integers >= 1 (one per stage)."""
    if isinstance(depths, str) or not isinstance(depths, Sequence) or len(depths) < 1:
        raise ValueError(f"{depths=} must be a non-empty sequence of block counts (integers >= 1), one per stage")
    return [check_int(f"depths[{i}]", d, minimum=1) for i, d in enumerate(depths)]


def check_positive(name: str, value: Any) -> float:
    """``value`` as a finite ``float`` > 0; ``ValueError`` naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a finite number > 0")
    return float(value)


def check_rate(name: str, value: Any) -> float:
    """A dropout / drop-path probability: a number in ``[0, 1)``; ``ValueError`` naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r} must be a probability in [0, 1)")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool``; ``ValueError`` naming it otherwise."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False")
    return value


def check_pair(name: str, value: Any, minimum: int = 1) -> tuple[int, int]:
    """An int or a pair of ints (``img_size``, ``patch_size``, ...) as ``(H, W)``, each >= ``minimum``."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, Sequence)
        or isinstance(pair, str)
        or len(pair) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in pair)
    ):
        raise ValueError(f"{name}={value!r} must be an integer or a pair of integers (H, W), each >= {minimum}")
    return int(pair[0]), int(pair[1])


@register_notrace_function
def check_image(
    x: torch.Tensor,
    in_chans: int,
    patch_size: tuple[int, int],
    img_size: tuple[int, int],
    param_dtype: torch.dtype,
    dynamic_img_size: bool,
    dynamic_img_pad: bool,
    unit: str = "patch_size",
) -> torch.Tensor:
    """``x`` itself if it is an image batch ``[B, in_chans, H, W]`` the model can embed, else ``ValueError``.

    Returning ``x`` (callers use the result) keeps the check in FX graphs: a leaf call whose result is unused is
    dead code to FX's extractors.

    ``H`` and ``W`` must be at least one patch and multiples of the patch (unless ``dynamic_img_pad``), equal to
    ``img_size`` unless ``dynamic_img_size``; a floating dtype equal to the parameters' unless autocast is on for the
    input's device. The batch may be empty. ``unit`` names ``patch_size`` in the messages (hierarchical models pass
    their total stride as ``patch_size`` and ``unit="stride"``).
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected an image batch tensor [B, C, H, W], got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"expected an image batch [B, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"input has {x.shape[1]} channels, the model expects in_chans={in_chans}")
    h, w = x.shape[-2:]
    ph, pw = patch_size
    p = ph if ph == pw else (ph, pw)
    one, unit_words = ("one patch", "the patch size") if unit == "patch_size" else (f"the {unit}", f"the {unit}")
    if h < ph or w < pw:
        raise ValueError(f"input size {(h, w)} is smaller than {one} ({unit}={p})")
    if not dynamic_img_pad and (h % ph or w % pw):
        raise ValueError(
            f"input size {(h, w)} is not divisible by {unit}={p}; use sides that are multiples of {unit_words} "
            "or create the model with dynamic_img_pad=True"
        )
    if not dynamic_img_size and (h, w) != tuple(img_size):
        raise ValueError(
            f"input size {(h, w)} differs from img_size={tuple(img_size)}; create the model with "
            "dynamic_img_size=True for other sizes"
        )
    if not x.is_floating_point():
        raise ValueError(f"input dtype {x.dtype} is not floating point; convert the images with x.float()")
    if x.dtype != param_dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(
            f"input dtype {x.dtype} differs from the model's parameter dtype {param_dtype}; cast the input "
            f"(x.to({param_dtype})) or the model (model.to({x.dtype})), or run under torch.autocast"
        )
    return x


@register_notrace_function
def check_head_input(
    x: torch.Tensor, num_features: int, min_tokens: int = 1, name: str = "forward_head"
) -> torch.Tensor:
    """``x`` itself if it is ``forward_features`` output ``[B, N, num_features]`` with ``N >= min_tokens`` (the
    pooling needs a class token or at least one grid token), else ``ValueError``."""
    if x.ndim != 3 or x.shape[-1] != num_features:
        raise ValueError(
            f"{name} expects the tokens forward_features returns, [B, N, {num_features}]; got shape "
            f"{tuple(x.shape)} (pooled features [B, C] are already past the pooling step: apply model.head to them)"
        )
    if x.shape[1] < min_tokens:
        raise ValueError(f"{name}: {x.shape[1]} tokens, the pooling needs at least {min_tokens} (prefix + grid)")
    return x


def take_indices(num_blocks: int, indices: Any) -> tuple[list[int], int]:
    """timm's ``feature_take_indices`` with a ``ValueError`` for indices out of range (timm asserts).

    ``indices``: ``None`` (all blocks), an int ``n`` in ``[1, num_blocks]`` (the last ``n``), or a sequence of block
    indices in ``[-num_blocks, num_blocks)``.
    """
    from timm.models._features import feature_take_indices

    if indices is None:
        return feature_take_indices(num_blocks, indices)
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 1 <= indices <= num_blocks:
            raise ValueError(f"indices={indices} (take the last n blocks) must lie in [1, {num_blocks}]")
    elif isinstance(indices, Sequence) and not isinstance(indices, str) and len(indices) > 0:
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not -num_blocks <= i < num_blocks]
        if bad:
            raise ValueError(
                f"block indices {bad} are out of range for {num_blocks} blocks ([-{num_blocks}, {num_blocks}))"
            )
        absolute = [i % num_blocks for i in indices]
        if any(b <= a for a, b in zip(absolute, absolute[1:], strict=False)):
            # (the outputs come in block order, once each: features_only's feature_info listed [3, 0] as given and
            # (1, 1) twice, for outputs that were [0, 3] and one map)
            raise ValueError(
                f"block indices {list(indices)} must name each block once, in increasing block order ({absolute}): "
                "the outputs come in block order"
            )
    else:
        raise ValueError(f"indices={indices!r} must be None, an int or a non-empty sequence of block indices")
    return feature_take_indices(num_blocks, indices)


@register_notrace_function
def token_grid(x: torch.Tensor) -> tuple[int, int]:
    """The token grid ``(H, W)`` of patches ``[B, H, W, C]``."""
    return x.shape[1], x.shape[2]


@register_notrace_function
def grid_pos_embed(pos_embed: torch.Tensor, x: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
    """``pos_embed`` ``[1, num_prefix + H0*W0, C]`` laid out on ``grid = (H0, W0)``, resampled (bicubic, prefix rows
    kept) to the grid of patches ``x`` ``[B, H, W, C]`` where that differs."""
    h, w = x.shape[1], x.shape[2]
    if (h, w) == tuple(grid):
        return pos_embed
    return resample_abs_pos_embed(pos_embed, new_size=[h, w], old_size=list(grid), num_prefix_tokens=num_prefix)


def pretrained_cfg(url: str = "", *, first_conv: str, **kwargs: Any) -> dict[str, Any]:
    """A timm pretrained config with what every visionlin family shares (ImageNet-1k classes, 224 px, any input size,
    bicubic, crop 0.875, ImageNet mean / std, classifier ``head``); ``kwargs`` override or add keys."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": first_conv,
        "classifier": "head",
        **kwargs,
    }
