"""``visionlin.calibrate``: choose each layer's setting of a converter method under an output-error budget.

The model runs its dense (stock) computation over the calibration inputs, routed through the converter's ``dense``
core so that every converted layer sees the exact inputs of its attention core (queries, keys, values after the
model's norms and RoPE, the token grid, joint attention's text keys). At every call, each candidate setting of the
calibrated option is computed on those same inputs and compared with the dense output. A layer's error for a candidate
is the largest relative error over its calls (every denoising step and batch of the inputs). Each layer gets the first
candidate (candidates are ordered cheapest first) whose error is within the budget; a layer with none stays dense
(it is left out of the conversion). Later layers always receive dense inputs, so each error is that of converting one
layer alone.

The calibrated option is a method option named by ``option=``: ``sparsity`` for ``sparse`` and ``sla`` (candidates
from sparse to dense by default); any other method option (a window size, say) with explicit ``candidates``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._convert import (
    _STATE_ATTR,
    ConversionReport,
    _components,
    _timestep_hook,
    convert,
    revert,
)
from ._methods import CORE_ATTR, METHODS, _Core, build_core, validate_options

__all__ = ["DEFAULT_CANDIDATES", "METRICS", "CalibrationReport", "LayerCalibration", "calibrate", "relative_error"]

# Option -> default candidates, cheapest first.
DEFAULT_CANDIDATES: dict[str, tuple[Any, ...]] = {"sparsity": (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)}
METRICS = ("rel_l2", "rel_l1")


def relative_error(output: torch.Tensor, reference: torch.Tensor, metric: str = "rel_l2") -> float:
    """``||output - reference|| / ||reference||`` in float32: the Frobenius norm (``"rel_l2"``) or the sum of
    absolute values (``"rel_l1"``). A zero reference gives 0 for an equal output and ``inf`` otherwise."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric={metric!r}; choose one of {METRICS}")
    d, r = (output.float() - reference.float()), reference.float()
    p = 2 if metric == "rel_l2" else 1
    num, den = float(torch.linalg.vector_norm(d, p)), float(torch.linalg.vector_norm(r, p))
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


@dataclass
class LayerCalibration:
    """One attention layer: the chosen value of the calibrated option (``None``: no candidate met the budget, the
    layer stays dense), its measured error, every candidate's error and the number of attention calls measured."""

    component: str
    name: str
    value: Any
    error: float
    errors: list[tuple[Any, float]]
    calls: int


@dataclass
class CalibrationReport:
    """What :func:`calibrate` measured and chose; ``print(report)`` renders a table. ``plan`` is the per-layer
    conversion it implies, :meth:`apply` performs it (``conversion`` holds the result when applied)."""

    method: str
    option: str
    budget: float
    metric: str
    options: dict[str, Any]
    candidates: list[Any]
    layers: list[LayerCalibration] = field(default_factory=list)
    conversion: ConversionReport | None = None

    @property
    def plan(self) -> dict[str, dict[str, Any]]:
        """``{component: {"layers": [names], "layer_options": {name: {option: value}}}}`` for the layers that met
        the budget (the arguments :func:`visionlin.convert` takes)."""
        out: dict[str, dict[str, Any]] = {}
        for rec in self.layers:
            entry = out.setdefault(rec.component, {"layers": [], "layer_options": {}})
            if rec.value is not None:
                entry["layers"].append(rec.name)
                entry["layer_options"][rec.name] = {self.option: rec.value}
        return out

    def apply(self, pipe_or_model: Any) -> ConversionReport:
        """Convert ``pipe_or_model`` (the calibrated one, or one with the same components and layer names) with the
        chosen per-layer settings; components where no layer met the budget are left unconverted.

        Raises:
            ValueError: no layer met the budget, or the target does not match (see :func:`visionlin.convert`).
        """
        plan = {c: e for c, e in self.plan.items() if e["layers"]}
        if not plan:
            raise ValueError(
                f"no layer meets budget={self.budget} ({self.metric}) with any {self.option} in {self.candidates}; "
                "raise the budget or add candidates closer to dense"
            )
        comps = _components(pipe_or_model)
        missing = sorted(set(plan) - set(comps))
        if missing:
            raise ValueError(f"the calibration plan has components {missing}; the target has {sorted(comps)}")
        report = ConversionReport(self.method, dict(self.options))
        done: list[nn.Module] = []
        try:
            for comp, entry in plan.items():
                r = convert(comps[comp], self.method, layers=entry["layers"], layer_options=entry["layer_options"],
                            **self.options)  # fmt: skip
                done.append(comps[comp])
                for rec in r.layers:
                    rec.component = comp
                report.options = r.options
                report.layers.extend(r.layers)
        except BaseException:
            for model in done:
                revert(model)
            raise
        self.conversion = report
        return report

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items()) or "-"
        rows = [("component", "layer", self.option, f"error ({self.metric})", "calls")]
        for r in self.layers:
            chosen = "dense" if r.value is None else str(r.value)
            rows.append((r.component, r.name, chosen, f"{r.error:.4g}", str(r.calls)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [f"visionlin calibration: method={self.method} ({opts}), {self.option} from {self.candidates}, "
                 f"budget {self.budget} ({self.metric}, largest over calls)"]  # fmt: skip
        for i, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        kept = [r for r in self.layers if r.value is not None]
        lines.append(f"{len(kept)} of {len(self.layers)} layers within the budget"
                     + ("" if self.conversion is None else "; applied"))  # fmt: skip
        return "\n".join(lines)


def _check_inputs(inputs: Any) -> list[dict[str, Any]]:
    if isinstance(inputs, dict):
        inputs = [inputs]
    if not isinstance(inputs, list | tuple) or not inputs or not all(isinstance(x, dict) for x in inputs):
        raise ValueError(
            f"inputs must be a dict of call arguments or a non-empty list of them (a pipeline's __call__ keywords, "
            f"e.g. prompt_embeds / num_inference_steps, or a model's forward keywords), got {inputs!r:.120}"
        )
    return list(inputs)


def calibrate(
    pipe_or_model: Any,
    inputs: dict[str, Any] | list[dict[str, Any]],
    *,
    budget: float = 0.05,
    method: str = "sparse",
    option: str | None = None,
    candidates: list[Any] | tuple[Any, ...] | None = None,
    metric: str = "rel_l2",
    layers: list[str] | None = None,
    apply: bool = True,
    **options: Any,
) -> CalibrationReport:
    """Choose per-layer settings of ``method`` under an output-error budget, from dense runs on ``inputs``.

    Args:
        pipe_or_model: An unconverted diffusers pipeline or model (the families :func:`visionlin.convert` takes).
        inputs: One dict or a list of dicts: a pipeline's call keywords (``prompt_embeds``, ``num_inference_steps``,
            ``output_type="latent"``, ...; every denoising step is measured) or a model's forward keywords.
        budget: The largest relative error of a layer's attention output (before the output projection) against
            dense attention, over all its calls, that a chosen setting may have. ``>= 0``.
        method: A converter method (``"sparse"``, ``"sla"``, or any in :data:`visionlin.convert.METHODS`). For
            ``"sla"`` the error is that of the zero-initialised projection (the sparse part): fine-tuning then
            trains the linear branch.
        option: The method option chosen per layer (default ``"sparsity"`` where the method has it).
        candidates: That option's values, cheapest first (default for ``sparsity``: 0.95 down to 0.1).
        metric: ``"rel_l2"`` (Frobenius norms) or ``"rel_l1"`` (sums of absolute values).
        layers: Attention module names to calibrate (default: every convertible one).
        apply: Convert ``pipe_or_model`` with the chosen settings before returning (``report.conversion``).
        **options: Fixed options of ``method`` for every layer and candidate (``block_size``, ``variant``,
            ``dense_above_timestep``: calls at those timesteps are dense after conversion and are not measured).

    Returns:
        The per-layer choices and errors; ``report.plan`` as :func:`visionlin.convert` arguments.

    Raises:
        ValueError: a bad budget, metric, method, option, candidate or input; an already converted model; a layer
            that never ran during the inputs. The model is left as it was (converted only with ``apply=True`` and
            a successful calibration).
    """
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not math.isfinite(budget) or budget < 0:
        raise ValueError(f"budget={budget!r} must be a finite number >= 0 (a relative error, e.g. 0.05)")
    if metric not in METRICS:
        raise ValueError(f"unknown metric={metric!r}; choose one of {METRICS}")
    if not isinstance(apply, bool):
        raise ValueError(f"apply={apply!r} must be True or False")
    fixed = validate_options(method, options)
    if option is None:
        option = next((o for o in DEFAULT_CANDIDATES if o in METHODS[method]), None)
        if option is None:
            raise ValueError(
                f"method={method!r} has no default option to calibrate; pass option= (one of "
                f"{sorted(METHODS[method])}) and candidates="
            )
    if not isinstance(option, str) or option not in METHODS[method]:
        raise ValueError(f"option={option!r} is not an option of method={method!r} ({sorted(METHODS[method])})")
    if option in options:
        raise ValueError(f"{option}={options[option]!r} is fixed in **options but option={option!r} is calibrated")
    if candidates is None:
        if option not in DEFAULT_CANDIDATES:
            raise ValueError(f"option={option!r} has no default candidates; pass candidates=[...] (cheapest first)")
        candidates = DEFAULT_CANDIDATES[option]
    if not isinstance(candidates, list | tuple) or not candidates:
        raise ValueError(f"candidates={candidates!r} must be a non-empty list of {option} values, cheapest first")
    cand_options = []
    for c in candidates:
        try:
            cand_options.append(validate_options(method, {**options, option: c}))
        except ValueError as e:
            raise ValueError(f"candidate {option}={c!r}: {e}") from None
    inputs = _check_inputs(inputs)
    comps = _components(pipe_or_model)
    converted = sorted(n for n, m in comps.items() if getattr(m, _STATE_ATTR, None) is not None)
    if converted:
        raise ValueError(f"{converted} already converted; calibrate an unconverted model (visionlin.revert(...) first)")

    report = CalibrationReport(method, option, float(budget), metric, dict(options), list(candidates))
    convert(pipe_or_model, "dense", layers=layers)
    stats: dict[tuple[str, str], dict[str, Any]] = {}
    handles = []
    try:
        for comp, model in comps.items():
            state = getattr(model, _STATE_ATTR)
            named = dict(model.named_modules())
            if fixed.get("dense_above_timestep") is not None:
                handles.append(_timestep_hook(model, list(state.originals), fixed["dense_above_timestep"]))
            for name in state.originals:
                attn = named[name]
                head_dim = attn.head_dim if hasattr(attn, "head_dim") else attn.inner_dim // attn.heads
                if type(build_core(method, cand_options[0], head_dim, None, attn)).qk_delta is not _Core.qk_delta:
                    raise ValueError(
                        f"method={method!r} changes the attention's query / key projections; calibrate measures "
                        "methods on the stock attention inputs (sparse, sla, hybrid, agent)"
                    )
                entry = {"errors": [0.0] * len(candidates), "calls": 0, "cores": None, "name": f"{comp}.{name}"}
                stats[(comp, name)] = entry
                core = getattr(named[name], CORE_ATTR)
                handles.append(
                    core.register_forward_hook(
                        _probe(entry, method, cand_options, metric, named[name]), with_kwargs=True
                    )
                )
        with torch.no_grad():
            for i, kwargs in enumerate(inputs):
                try:
                    pipe_or_model(**kwargs)
                except (KeyError, TypeError) as e:  # a keyword the model lacks or misses: named (was a bare KeyError)
                    raise ValueError(
                        f"calibrate: inputs[{i}] (keys {sorted(kwargs)}) do not fit the call of "
                        f"{type(pipe_or_model).__name__} ({type(e).__name__}: {e})"
                    ) from e
    finally:
        for h in handles:
            h.remove()
        revert(pipe_or_model)

    never = [f"{c}.{n}" for (c, n), e in stats.items() if e["calls"] == 0]
    if never:
        raise ValueError(f"layers {never} never ran (or ran only dense warm-up steps) on the calibration inputs")
    for (comp, name), e in stats.items():
        errors = list(zip(candidates, e["errors"], strict=True))
        pick = next(((v, err) for v, err in errors if err <= budget), (None, 0.0))
        report.layers.append(LayerCalibration(comp, name, pick[0], pick[1], errors, e["calls"]))
    if apply:
        report.apply(pipe_or_model)
    return report


def _probe(entry: dict[str, Any], method: str, cand_options: list[dict[str, Any]], metric: str, attn: nn.Module):
    """A forward hook on a layer's dense core: every candidate on the same inputs, errors against the dense output."""

    def hook(core, args, kwargs, output):
        if core.dense_now:  # a dense warm-up step after conversion: nothing to measure
            return
        a = inspect.signature(core.forward).bind(*args, **kwargs).arguments
        q, k, v, scale = a["q"], a["k"], a["v"], a["scale"]
        ak, av = a.get("additional_keys"), a.get("additional_values")
        if entry["cores"] is None:
            entry["cores"] = [build_core(method, o, q.shape[-1], q.device, attn) for o in cand_options]
        if not bool(torch.isfinite(output).all()):  # (every candidate's error read NaN, and max(0, NaN) is 0)
            raise ValueError(
                f"calibrate: the dense attention output of {entry.get('name', 'a layer')} is not finite on these "
                "inputs (NaN or inf in the calibration data?); calibrate on finite inputs"
            )
        for i, cand in enumerate(entry["cores"]):
            cand.grid, cand.text_len = core.grid, core.text_len
            err = float(relative_error(cand(q, k, v, scale, ak, av), output, metric))
            entry["errors"][i] = max(entry["errors"][i], err if math.isfinite(err) else math.inf)  # NaN: no match
        entry["calls"] += 1

    return hook
