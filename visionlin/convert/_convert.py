"""``convert`` / ``revert`` / ``save_conversion`` / ``load_conversion`` and the conversion report."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_write
from ._adapter import Adapter
from ._methods import CORE_ATTR, build_core, validate_options
from ._processors import (
    CogVideoXJointAttnProcessor,
    FluxJointAttnProcessor,
    HunyuanVideoJointAttnProcessor,
    JointAttnProcessor,
    SelfAttnProcessor,
    WanSelfAttnProcessor,
)
from .cogvideox import CogVideoXAdapter
from .dit import DiTAdapter
from .flux import FluxAdapter
from .hunyuan_video import HunyuanVideoAdapter
from .sd3 import SD3Adapter
from .unet import UNetAdapter
from .wan import WanAdapter

__all__ = [
    "ADAPTERS",
    "ConversionReport",
    "LayerRecord",
    "convert",
    "disabled",
    "load_conversion",
    "revert",
    "save_conversion",
]

ADAPTERS: tuple[Adapter, ...] = (
    DiTAdapter(),
    UNetAdapter(),
    SD3Adapter(),
    FluxAdapter(),
    WanAdapter(),
    CogVideoXAdapter(),
    HunyuanVideoAdapter(),
)
_PROCESSORS = {
    "self": SelfAttnProcessor,
    "joint": JointAttnProcessor,
    "flux": FluxJointAttnProcessor,
    "wan": WanSelfAttnProcessor,
    "cogvideox": CogVideoXJointAttnProcessor,
    "hunyuan_video": HunyuanVideoJointAttnProcessor,
}
_STATE_ATTR = "_visionlin_conversion"
PLAN_FILE = "conversion.json"
WEIGHTS_FILE = "converter.safetensors"
_FORMAT = "visionlin.convert"
_VERSION = 1


@dataclass
class LayerRecord:
    """One attention module of a converted model."""

    component: str
    name: str
    converted: bool
    reason: str
    method: str
    options: dict[str, Any]
    new_parameters: int = 0


@dataclass
class ConversionReport:
    """What :func:`convert` did, per layer. ``print(report)`` renders a table."""

    method: str
    options: dict[str, Any]
    layers: list[LayerRecord] = field(default_factory=list)

    @property
    def converted(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.converted]

    @property
    def skipped(self) -> list[LayerRecord]:
        return [r for r in self.layers if not r.converted]

    @property
    def new_parameters(self) -> int:
        return sum(r.new_parameters for r in self.layers)

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items()) or "-"
        rows = [("component", "layer", "status", "method", "new params", "reason")]
        per_layer = any(r.converted and r.options != self.options for r in self.layers)
        if per_layer:  # per-layer settings: each converted layer's options that differ from the common ones
            rows[0] = (*rows[0][:4], "layer options", *rows[0][4:])
        for r in self.layers:
            status = "converted" if r.converted else "skipped"
            method = r.method if r.converted else "-"
            row = (r.component, r.name, status, method, str(r.new_parameters), r.reason or "-")
            if per_layer:
                diff = {k: v for k, v in r.options.items() if self.options.get(k) != v} if r.converted else {}
                row = (*row[:4], ", ".join(f"{k}={v}" for k, v in diff.items()) or "-", *row[4:])
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [f"visionlin conversion: method={self.method} ({opts})"]
        for i, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append(
            f"{len(self.converted)} converted, {len(self.skipped)} skipped, {self.new_parameters} new parameters"
        )
        return "\n".join(lines)


@dataclass
class _State:
    """Kept on a converted model so :func:`revert` is exact."""

    family: str
    method: str
    options: dict[str, Any]
    records: list[LayerRecord]
    layer_options: dict[str, dict[str, Any]]  # layer name -> its options where they differ from ``options``
    originals: dict[str, Any]  # layer name -> its processor before conversion
    hooks: list


def _components(obj: Any) -> dict[str, nn.Module]:
    """``{component name: model}``: a bare model is ``{"model": model}``; a pipeline gives its ``nn.Module``
    components that some adapter handles."""
    if isinstance(obj, nn.Module):
        return {"model": obj}
    comps = getattr(obj, "components", None)
    if not isinstance(comps, dict):
        raise ValueError(f"expected a diffusers pipeline or a model (nn.Module), got {type(obj).__name__}: {obj!r:.80}")
    found = {n: m for n, m in comps.items() if isinstance(m, nn.Module) and _adapter_for(m) is not None}
    seen: dict[int, str] = {}
    for name, model in found.items():  # (converted twice, its second "originals" were the converter's processors)
        if id(model) in seen:
            raise ValueError(
                f"pipeline components {seen[id(model)]!r} and {name!r} are the same model object; convert it once "
                "(pass the model itself, or a pipeline whose components are distinct)"
            )
        seen[id(model)] = name
    if not found:
        kinds = {n: type(m).__name__ for n, m in comps.items() if isinstance(m, nn.Module)}
        raise ValueError(
            f"pipeline {type(obj).__name__} has no component the converter handles: {kinds}; {_families()}"
        )
    return found


def _families() -> str:
    return "supported model classes: " + ", ".join(c for a in ADAPTERS for c in a.classes)


def _adapter_for(model: nn.Module) -> Adapter | None:
    return next((a for a in ADAPTERS if a.matches(model)), None)


def _timestep_hook(model: nn.Module, names: list[str], threshold: float):
    """Dense warm-up: the converted layers ``names`` (relative to ``model``) compute dense attention while the forward's
    ``timestep`` (largest in the batch, in the units the model receives) is ``>= threshold``; samplers run from high to
    low timesteps. The hook finds the layers through the module it runs on, so a ``copy.deepcopy`` of the model drives
    its own layers (a closure over the module objects drove the original's)."""
    signature = inspect.signature(model.forward)

    def hook(mod, args, kwargs):
        t = signature.bind_partial(*args, **kwargs).arguments.get("timestep")
        if t is None:
            raise ValueError(f"dense_above_timestep is set but {type(mod).__name__}.forward got no timestep")
        dense = float(torch.as_tensor(t).max()) >= threshold
        for n in names:
            getattr(mod.get_submodule(n), CORE_ATTR).dense_now = dense

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def _set_grid(root: nn.Module, names: list[str], grid: tuple[int, ...], text_len: int = 0) -> None:
    """Publish the token grid to the converted layers ``names`` under ``root`` (the module whose pre-forward hook
    calls this: looked up at each call, so a deep copy of the model publishes to its own layers)."""
    for n in names:
        core = getattr(root.get_submodule(n), CORE_ATTR)
        core.grid, core.text_len = grid, text_len


def _plan(name: str, model: nn.Module, method: str, options: dict[str, Any], layers, strict: bool, layer_options):
    adapter = _adapter_for(model)
    if adapter is None:
        raise ValueError(f"{name}: unsupported model family {type(model).__name__}; {_families()}")
    if getattr(model, _STATE_ATTR, None) is not None:
        state = getattr(model, _STATE_ATTR)
        raise ValueError(
            f"{name}: already converted (method={state.method!r}); call visionlin.revert(...) before converting again"
        )
    for opts in (options, *layer_options.values()) if layer_options else (options,):
        for key in ("kernel_size", "dilation", "pool"):  # per-axis lists: one entry per grid axis of this family
            value = opts.get(key)
            if isinstance(value, list | tuple) and len(value) != adapter.grid_dims:
                raise ValueError(  # (converted, then failed at the first forward)
                    f"{name}: {key}={list(value)} gives {len(value)} axes but {type(model).__name__}'s token grid has "
                    f"{adapter.grid_dims}; give one int or {adapter.grid_dims} values"
                )
    cands = list(adapter.candidates(model))
    if layers is not None:
        known = {c.name for c in cands}
        missing = sorted(set(layers) - known)
        if missing:
            raise ValueError(f"{name}: layers {missing} are not attention modules of {type(model).__name__}")
        for c in cands:
            if c.name not in layers and not c.reason:
                c.reason = "not selected (layers=...)"
    if layer_options:
        usable = {c.name for c in cands if not c.reason}
        bad = sorted(set(layer_options) - usable)
        if bad:
            raise ValueError(
                f"{name}: layer_options names {bad}, which are not converted attention modules of "
                f"{type(model).__name__} (convertible and selected: {sorted(usable)})"
            )
    if strict:
        bad = [f"{c.name}: {c.reason}" for c in cands if c.reason and (layers is None or c.name in layers)]
        if bad:
            raise ValueError(f"{name}: strict=True and some attention cannot be converted: {bad}")
    if not any(not c.reason for c in cands):
        why = sorted({c.reason for c in cands}) or ["it has no attention modules"]
        raise ValueError(f"{name}: no convertible self-attention in {type(model).__name__} ({'; '.join(why)})")
    return adapter, cands


def convert(
    pipe_or_model: Any,
    method: str = "sla",
    *,
    layers: list[str] | None = None,
    strict: bool = False,
    layer_options: dict[str, dict[str, Any]] | None = None,
    **options: Any,
) -> ConversionReport:
    """Swap the image self-attention of a diffusers pipeline or model for a visionlin method, in place.

    Args:
        pipe_or_model: A diffusers pipeline (its supported components are converted) or a bare model
            (``DiTTransformer2DModel``, ``PixArtTransformer2DModel``, ``UNet2DConditionModel``,
            ``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ``WanTransformer3DModel``,
            ``CogVideoXTransformer3DModel``, ``HunyuanVideoTransformer3DModel``).
        method: ``"sla"`` (sparse-linear attention, a zero-initialised projection per layer: needs fine-tuning to
            gain from its linear branch), ``"sparse"`` (training-free block top-k), ``"hybrid"`` (local window
            softmax + gated global linear attention; the zero-initialised gate starts it as local attention),
            ``"linear"`` (LinFusion's generalised linear attention on the stock projections; needs fine-tuning),
            ``"agent"`` (AgentSD's training-free agent attention) or ``"dense"`` (the stock computation through the
            converter). Options per method: ``docs/convert_methods.md``.
        layers: Attention module names (as in ``model.named_modules()``) to convert; ``None`` converts every
            convertible one. With a pipeline, the names apply to each component.
        strict: Raise instead of skipping attention modules that cannot be converted.
        layer_options: Per-layer settings: ``{layer name: {option: value}}`` overriding ``**options`` for that layer
            (e.g. the per-layer sparsity :func:`visionlin.calibrate` chose). Each layer's options are validated as
            a whole, so a default that depends on another option (``k_low`` on ``sparsity``) follows the override.
        **options: Method options (see ``docs/convert.md``): ``sparsity`` in ``[0, 1)`` (fraction of key blocks
            not computed exactly), ``block_size`` (int or ``(block_q, block_k)``), and for ``"sla"`` ``k_low``
            (skipped fraction), ``variant`` (``"paper"`` / ``"code"``), ``feature_map``; for ``"sparse"`` and
            ``"sla"`` ``dense_above_timestep`` (dense warm-up: stock attention while the forward's ``timestep`` is
            at least this, in the model's own units).

    Returns:
        The per-layer report.

    Raises:
        ValueError: unknown method / option / family, values out of range, no convertible attention, an already
            converted model. The models are left unchanged: validation precedes any change, and a failure half-way
            restores every component converted so far.
    """
    raw = dict(options)
    options = validate_options(method, options)
    if layer_options is not None and (
        not isinstance(layer_options, dict)
        or not all(isinstance(k, str) and isinstance(v, dict) for k, v in layer_options.items())
    ):
        raise ValueError(f"layer_options={layer_options!r:.200} must map attention module names to option dicts")
    per_layer = {}
    for name, override in (layer_options or {}).items():
        try:
            per_layer[name] = validate_options(method, {**raw, **override})
        except ValueError as e:
            raise ValueError(f"layer_options[{name!r}]: {e}") from None
    if layers is not None and (not isinstance(layers, list | tuple) or not all(isinstance(x, str) for x in layers)):
        raise ValueError(f"layers={layers!r} must be a list of attention module names or None")
    if not isinstance(strict, bool):
        raise ValueError(f"strict={strict!r} must be True or False")
    comps = _components(pipe_or_model)
    plans = {n: _plan(n, m, method, options, layers, strict, per_layer) for n, m in comps.items()}
    report = ConversionReport(method, options)
    done: list[nn.Module] = []
    try:
        for comp, model in comps.items():
            adapter, cands = plans[comp]
            report.layers.extend(_install(comp, model, adapter, cands, method, options, per_layer))
            done.append(model)
    except BaseException:
        for model in done:
            _revert_model(model)
        raise
    return report


def _install(comp, model, adapter, cands, method, options, per_layer) -> list[LayerRecord]:
    state = _State(adapter.family, method, options, [], {k: v for k, v in per_layer.items() if v != options}, {}, [])
    converted: dict[str, nn.Module] = {}
    try:
        for c in cands:
            if c.reason:
                state.records.append(LayerRecord(comp, c.name, False, c.reason, method, options))
                continue
            attn = c.module
            head_dim = attn.head_dim if hasattr(attn, "head_dim") else attn.inner_dim // attn.heads
            device = next(attn.parameters()).device
            opts = per_layer.get(c.name, options)
            core = build_core(method, opts, head_dim, device, attn)
            state.originals[c.name] = attn.processor
            attn.add_module(CORE_ATTR, core)
            attn.set_processor(_PROCESSORS[adapter.processor](f"{comp}.{c.name}"))
            converted[c.name] = attn
            n_new = sum(p.numel() for p in core.parameters())
            state.records.append(LayerRecord(comp, c.name, True, "", method, opts, n_new))
        state.hooks = adapter.install_hooks(model, converted, _set_grid)
        by_threshold: dict[float, list[str]] = {}
        for name in converted:
            t = per_layer.get(name, options).get("dense_above_timestep")
            if t is not None:
                by_threshold.setdefault(t, []).append(name)
        for t, names in by_threshold.items():
            state.hooks.append(_timestep_hook(model, names, t))
        setattr(model, _STATE_ATTR, state)
    except BaseException:
        _undo(model, state)
        raise
    return state.records


def _undo(model: nn.Module, state: _State) -> None:
    for h in state.hooks:
        h.remove()
    named = dict(model.named_modules())
    for name, proc in state.originals.items():
        attn = named[name]
        attn.set_processor(proc)
        if CORE_ATTR in attn._modules:
            del attn._modules[CORE_ATTR]


def _revert_model(model: nn.Module) -> bool:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return False
    _undo(model, state)
    delattr(model, _STATE_ATTR)
    return True


def revert(pipe_or_model: Any) -> int:
    """Undo :func:`convert`: the original processor objects are restored, the converter modules and hooks removed,
    so outputs are bitwise those before conversion. Returns the number of components reverted (0 if none was
    converted).

    Raises:
        ValueError: not a pipeline or model.
    """
    if isinstance(pipe_or_model, nn.Module):
        comps = {"model": pipe_or_model}
    else:
        comps = getattr(pipe_or_model, "components", None)
        if not isinstance(comps, dict):
            raise ValueError(f"expected a diffusers pipeline or a model, got {type(pipe_or_model).__name__}")
    return sum(_revert_model(m) for m in comps.values() if isinstance(m, nn.Module))


@contextlib.contextmanager
def disabled(pipe_or_model: Any):
    """Context manager: inside it, every converted attention module runs its original (stock) processor, so the
    model computes exactly what it computed before :func:`convert` with the same weights (the teacher of
    :func:`visionlin.finetune`). The converter's modules and hooks stay in place; on exit the converter's processors
    are restored (on the components still under the same conversion: one reverted inside the block stays reverted).

    Raises:
        ValueError: nothing in ``pipe_or_model`` is converted.
    """
    comps = _converted_components(pipe_or_model)
    if not comps:
        raise ValueError(f"{type(pipe_or_model).__name__} has no converted component; call visionlin.convert first")
    swapped: list[tuple[nn.Module, Any, nn.Module, Any]] = []  # (model, its conversion state, module, processor)
    try:
        for model in comps.values():
            named = dict(model.named_modules())
            state = getattr(model, _STATE_ATTR)
            for name, original in state.originals.items():
                attn = named[name]
                swapped.append((model, state, attn, attn.processor))
                attn.set_processor(original)
        yield
    finally:
        for model, state, attn, proc in reversed(swapped):
            # a model reverted inside the block (and maybe converted again) keeps what it has now: the converter's
            # processors of the conversion that was undone would find no core
            if getattr(model, _STATE_ATTR, None) is state:
                attn.set_processor(proc)


def _converted_components(obj: Any) -> dict[str, nn.Module]:
    comps = {"model": obj} if isinstance(obj, nn.Module) else (getattr(obj, "components", None) or {})
    return {n: m for n, m in comps.items() if isinstance(m, nn.Module) and getattr(m, _STATE_ATTR, None) is not None}


def conversion_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The converter's parameters of one converted model, keyed by their names in ``model.state_dict()``."""
    state = getattr(model, _STATE_ATTR)
    named = dict(model.named_modules())
    out = {}
    for name in state.originals:
        for pname, p in getattr(named[name], CORE_ATTR).state_dict().items():
            out[f"{name}.{CORE_ATTR}.{pname}"] = p
    return out


def save_conversion(pipe_or_model: Any, directory: str | os.PathLike) -> Path:
    """Write the plan (``conversion.json``) and the converter weights (``converter.safetensors``) to ``directory``.

    Both files are written atomically (temp file + rename). Returns the directory.

    Raises:
        ValueError: nothing in ``pipe_or_model`` is converted.
    """
    from safetensors.torch import save_file

    comps = _converted_components(pipe_or_model)
    if not comps:
        raise ValueError(f"{type(pipe_or_model).__name__} has no converted component; call visionlin.convert first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plan: dict[str, Any] = {"format": _FORMAT, "version": _VERSION, "components": {}}
    tensors: dict[str, torch.Tensor] = {}
    for comp, model in comps.items():
        state = getattr(model, _STATE_ATTR)
        sd = conversion_state_dict(model)
        plan["components"][comp] = {
            "class": type(model).__name__,
            "method": state.method,
            "options": state.options,
            "layers": list(state.originals),
            "layer_options": state.layer_options,
            "parameters": {k: list(v.shape) for k, v in sd.items()},
        }
        tensors.update({f"{comp}/{k}": v.detach().cpu().contiguous() for k, v in sd.items()})
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p)))
    atomic_write(directory / PLAN_FILE, lambda p: p.write_text(json.dumps(plan, indent=2)))
    return directory


def load_conversion(pipe_or_model: Any, directory: str | os.PathLike) -> ConversionReport:
    """Re-apply a saved conversion (plan and converter weights) to a matching pipeline or model.

    Raises:
        ValueError: missing files, a plan of another format, components / classes / layer names / parameter shapes
            that do not match the target (named in the message). The target is left unchanged on error.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    plan_path, weights_path = directory / PLAN_FILE, directory / WEIGHTS_FILE
    if not plan_path.is_file() or not weights_path.is_file():
        raise ValueError(f"{directory} lacks {PLAN_FILE} and/or {WEIGHTS_FILE} (written by visionlin.save_conversion)")
    if not isinstance(pipe_or_model, nn.Module) and not isinstance(getattr(pipe_or_model, "components", None), dict):
        raise ValueError(
            f"expected a diffusers pipeline or a model (nn.Module), got {type(pipe_or_model).__name__}: "
            f"{pipe_or_model!r:.80}"
        )
    try:
        plan = json.loads(plan_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{plan_path} is not valid JSON: {e}") from None
    if not isinstance(plan, dict) or plan.get("format") != _FORMAT or plan.get("version") != _VERSION:
        plan = plan if isinstance(plan, dict) else {}
        raise ValueError(f"{plan_path}: format={plan.get('format')!r} version={plan.get('version')!r} is not a "
                         f"{_FORMAT!r} plan of version {_VERSION}")  # fmt: skip
    comps = (
        {"model": pipe_or_model} if isinstance(pipe_or_model, nn.Module) else getattr(pipe_or_model, "components", {})
    )
    entries = plan.get("components")
    fields = {"class", "method", "options", "layers"}
    if (
        not isinstance(entries, dict)
        or not entries
        or not all(isinstance(e, dict) and fields <= set(e) for e in entries.values())
    ):
        raise ValueError(f"{plan_path}: 'components' must map each component to {sorted(fields)}")
    for comp, e in entries.items():  # (wrong types failed as TypeErrors inside convert, naming neither file nor field)
        layers_ok = isinstance(e["layers"], list) and all(isinstance(n, str) for n in e["layers"])
        options_ok = isinstance(e["options"], dict) and not {"layers", "layer_options"} & set(e["options"])
        if not (isinstance(e["class"], str) and isinstance(e["method"], str) and layers_ok and options_ok):
            raise ValueError(
                f"{plan_path}: component {comp!r} needs 'class' and 'method' strings, 'layers' a list of layer names "
                f"and 'options' a dict of method options; got { ({k: e[k] for k in sorted(fields)})!r:.300}"
            )
    for comp, entry in plan["components"].items():
        model = comps.get(comp)
        if model is None or type(model).__name__ != entry["class"]:
            got = None if model is None else type(model).__name__
            raise ValueError(f"plan component {comp!r} is a {entry['class']}, the target has {got}")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:  # (a bare SafetensorError)
        raise ValueError(f"{weights_path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    if bad := [k for k in weights if "/" not in k][:4]:  # (an IndexError)
        raise ValueError(f"{weights_path}: keys {bad} are not COMPONENT/PARAMETER names written by save_conversion")
    report: ConversionReport | None = None
    done = []
    try:
        for comp, entry in plan["components"].items():
            model = comps[comp]
            layer_options = entry.get("layer_options") or None
            r = convert(model, entry["method"], layers=entry["layers"], layer_options=layer_options, **entry["options"])
            done.append(model)
            got = {r.name for r in r.converted}
            if got != set(entry["layers"]):
                raise ValueError(f"{comp}: layers {sorted(set(entry['layers']) - got)} could not be converted")
            sd = conversion_state_dict(model)
            mine = {k.split("/", 1)[1]: v for k, v in weights.items() if k.split("/", 1)[0] == comp}
            if set(mine) != set(sd):
                raise ValueError(
                    f"{comp}: saved converter weights {sorted(set(mine) ^ set(sd))[:6]} do not match the model's"
                )
            for k, v in mine.items():
                if v.shape != sd[k].shape:
                    raise ValueError(f"{comp}: {k} has shape {tuple(v.shape)} in the file, {tuple(sd[k].shape)} here")
                if v.is_floating_point() != sd[k].is_floating_point() or (
                    v.is_floating_point() and not bool(torch.isfinite(v).all())
                ):  # (int64 or NaN weights were copied in)
                    raise ValueError(f"{comp}: {k} in the file is {v.dtype} with non-finite or non-float values")
            with torch.no_grad():
                for k, v in mine.items():
                    sd[k].copy_(v)
            for rec in r.layers:
                rec.component = comp
            if report is None:
                report = ConversionReport(r.method, r.options, r.layers)
            else:
                report.layers.extend(r.layers)
    except BaseException:
        for model in done:
            _revert_model(model)
        raise
    assert report is not None
    return report
