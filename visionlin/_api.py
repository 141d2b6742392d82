"""Package-level helpers: the model list, per-model backend selection and model complexity (params, MACs)."""

from __future__ import annotations

import fnmatch
import numbers
from collections.abc import Sequence

import timm
import torch
from torch import nn

from .kernels import list_ops
from .layers import TokenMixer

__all__ = ["list_models", "model_complexity", "set_backend"]


def list_models(filter: str = "") -> list[str]:
    """Names of the models visionlin registers with timm (optionally matching a wildcard ``filter``).

    Raises:
        ValueError: ``filter`` is not a string.
    """
    if not isinstance(filter, str):
        raise ValueError(f"filter={filter!r} must be a wildcard string such as 'infvit*' (got {type(filter).__name__})")
    names = [
        n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("visionlin.models.")
    ]
    return sorted(n for n in names if not filter or fnmatch.fnmatch(n, filter))


def set_backend(model: nn.Module, backend: str | None) -> int:
    """Set the kernel backend of every visionlin token mixer in ``model`` (``None`` = automatic choice).

    The choice is per module instance: other models are unaffected. Every mixer's ops must have a backend of that
    name, checked before anything changes (the model is left as it was on error). A backend that exists but cannot
    run a particular call (a dtype, device or option it does not handle) raises ``NotImplementedError`` listing the
    reasons at that forward, never silently falls back.

    Returns:
        The number of token mixers changed.

    Raises:
        ValueError: ``model`` is not an ``nn.Module`` or has no visionlin token mixer, ``backend`` is not a string or
            ``None``, it names no registered backend, or some of the model's mixers call an op without that backend
            (the message lists them and the backends they have).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model must be an nn.Module (e.g. timm.create_model(...)), got {type(model).__name__}: {model!r:.80}"
        )
    if backend is not None and not isinstance(backend, str):
        raise ValueError(f"backend={backend!r} must be a backend name (str) or None")
    mixers = [m for m in model.modules() if isinstance(m, TokenMixer)]
    if not mixers:  # (returned 0 silently: a timm model, or a visionlin model's part without attention)
        raise ValueError(
            f"{type(model).__name__} has no visionlin token mixers, so there is no backend to set: set_backend applies "
            "to visionlin models and their parts (`visionlin list`)"
        )
    if backend is not None:
        ops = list_ops()
        known = sorted({b for backends in ops.values() for b in backends})
        if backend not in known:
            raise ValueError(f"unknown backend {backend!r}; registered backends: {known}")
        lacking = sorted(
            {(type(m).__name__, op) for m in mixers for op in m.kernel_ops if backend not in ops.get(op, [])}
        )
        if lacking:
            detail = "; ".join(f"{cls} uses {op} (backends {ops.get(op, [])})" for cls, op in lacking)
            raise ValueError(f"backend {backend!r} is not available for every mixer of this model: {detail}")
    for module in mixers:
        module.backend = backend
    return len(mixers)


def _sdpa_macs(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _in_chans(model: nn.Module, cfg: dict) -> int:
    """Input channels: ``in_channels`` of the first conv ``pretrained_cfg`` names, else of the first conv, else 3."""
    first = cfg.get("first_conv")
    names = [first] if isinstance(first, str) else list(first or [])
    convs = [m for n in names for m in [_submodule(model, n)] if isinstance(m, nn.Conv2d)]
    convs = convs or [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[0].in_channels if convs else 3


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def model_complexity(
    model: str | nn.Module, img_size: int | Sequence[int] | None = None, *, cpu_sdpa: bool = True, **create_kwargs
) -> dict[str, float]:
    """Parameters (millions) and multiply-accumulates (GMACs) of one forward on a ``1 x C x H x W`` image (``C`` the
    model's input channels, the input in its parameters' dtype).

    MACs are ``torch.utils.flop_counter.FlopCounterMode``'s FLOPs over two: matrix products, attention (SDPA, the
    CPU's fused kernel included) and convolutions; normalisation, activations and elementwise ops are not counted, as
    in the papers' tables (fvcore, ptflops). The forward runs on fake tensors: nothing is computed, so a 4096 px count
    takes seconds on a CPU. A model name is built by ``timm.create_model(model, device="meta", **create_kwargs)``; a
    module is used as it is (its own backend choice: a fused path the counter cannot see inside counts only what it
    can see; ``visionlin.set_backend(model, "reference")`` first counts the reference's products).

    Args:
        model: A registered model name (ours or timm's) or an ``nn.Module`` taking ``[B, C, H, W]`` images (not on
            the meta device: a name is built there and given empty storage).
        img_size: ``H`` (square) or ``(H, W)``; ``None`` means the size the model was built for (its ``img_size`` or
            ``patch_embed.img_size``), else its ``pretrained_cfg["input_size"]``.
        cpu_sdpa: Count the products of the CPU's fused SDPA kernel (torch's counter has no formula for it). The
            published tables of MAViT, RAVLT, NaLaFormer and MambaVision match the count without them (their counters
            leave the softmax-attention products out): ``False`` reproduces those tables.
        **create_kwargs: Passed to ``timm.create_model`` when ``model`` is a name (e.g. ``num_classes=10``).

    Returns:
        ``{"params_m": ..., "gmacs": ...}``.

    Raises:
        ValueError: ``model`` is neither a string nor a module, keyword arguments come with a module, ``img_size`` is
            not one or two positive ints, no size is given and the model has no size of its own, ``cpu_sdpa`` is not
            a bool, or the module is on the meta device.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    if isinstance(model, str):
        model = timm.create_model(model, device="meta", **create_kwargs)
        model.to_empty(device="cpu")  # uninitialised storage: the fake forward reads only shapes
    elif not isinstance(model, nn.Module):
        raise ValueError(f"model must be a model name or an nn.Module, got {type(model).__name__}: {model!r:.80}")
    elif create_kwargs:
        raise ValueError(f"keyword arguments {sorted(create_kwargs)} only apply to a model name, not to a module")
    if not isinstance(cpu_sdpa, bool):
        raise ValueError(f"cpu_sdpa={cpu_sdpa!r} must be True or False")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if img_size is None:
        # the size the model was built for: our hierarchical families' img_size, the ViTs' patch_embed.img_size
        built = getattr(model, "img_size", None) or getattr(getattr(model, "patch_embed", None), "img_size", None)
        if isinstance(built, Sequence) and len(built) == 2 and all(isinstance(v, int) for v in built):
            img_size = tuple(built)
        elif "input_size" in cfg:
            img_size = cfg["input_size"][-2:]
        else:
            raise ValueError(f"img_size is needed: {type(model).__name__} has no pretrained_cfg['input_size']")
    integral = isinstance(img_size, numbers.Integral) and not isinstance(img_size, bool)
    size = (int(img_size),) * 2 if integral else img_size
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in size)
    ):
        raise ValueError(f"img_size={img_size!r} must be a positive int or a pair of them (H, W)")
    size = tuple(int(v) for v in size)
    floating = [p for p in model.parameters() if p.is_floating_point()]
    if any(p.is_meta for p in floating):
        raise ValueError("the module is on the meta device: pass the model name, or model.to_empty(device='cpu')")
    dtype = floating[0].dtype if floating else torch.float32  # (a half-precision model gets a half input)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    was_training = model.training
    model.eval()
    # The CPU's fused SDPA kernel has no formula in torch's counter (the CUDA ones do): count it as they are.
    extra = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_macs} if cpu_sdpa else {}
    counter = FlopCounterMode(display=False, custom_mapping=extra)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad(), counter:
            model(torch.empty(1, _in_chans(model, cfg), *size, dtype=dtype))
    finally:
        model.train(was_training)
    return {"params_m": params, "gmacs": counter.get_total_flops() / 2e9}
