"""``visionlin.finetune``: distil a converted model into itself with the conversion switched off as the teacher.

The teacher is the same model under :func:`visionlin.convert.disabled` (the original processors; LoRA adapters off;
with ``trainable="all"`` the weights as they were before fine-tuning, through ``torch.func.functional_call``), so no
second copy of the model is kept. The loss is the mean squared error between the student's and the teacher's noise
(or velocity) prediction on the same inputs ("white-box" distillation as in TurboDiffusion), plus optionally
``feature_weight`` times the mean squared error of every converted attention module's output (LinFusion).

What trains (``trainable``): ``"converter"`` (the converter's own parameters, e.g. SLA's projection; default),
``"lora"`` (LoRA adapters injected by ``peft`` into the converted attention modules' projections, as diffusers' LoRA
training does), ``"lora+converter"``, or ``"all"`` (every weight of the model).

The run is on ``accelerate`` and uses the training package's machinery (:mod:`visionlin.train.checkpoint`: atomic
safetensors checkpoint folders with optimizer, scheduler and generator states; the run folder's ``log.jsonl``;
the trainer's resume rule and progress bar), so a resumed run computes the same losses as one never stopped. The
model runs in eval mode throughout (no dropout or class-label dropout), so teacher and student compute the same way.

Data: each optimizer step ``s`` takes one batch of model forward keywords, a function of ``s`` alone:

- a dict of tensors with a common leading size ``N`` (latents, timesteps, ``encoder_hidden_states`` /
  ``prompt_embeds``, ...): ``batch_size`` rows drawn with a generator seeded by ``(seed, s)``, each process of a
  multi-process run taking the next ``batch_size`` rows of the same draw;
- a list of forward-keyword dicts (each a batch): batch ``s mod len`` (``s * processes + rank`` with several);
- a callable ``data(step, generator) -> dict`` (random latents and timesteps drawn from ``generator``, seeded by
  ``(seed, s, rank)``);

plus ``shared`` keywords passed to every call unchanged (Flux's ``img_ids`` / ``txt_ids``, for instance).
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._convert import (
    _STATE_ATTR,
    PLAN_FILE,
    ConversionReport,
    _converted_components,
    disabled,
    load_conversion,
    revert,
    save_conversion,
)
from ._methods import CORE_ATTR

__all__ = ["LORA_ADAPTER", "TRAINABLE", "FinetuneResult", "distillation_loss", "finetune", "load_finetuned"]

TRAINABLE = ("converter", "lora", "lora+converter", "all")
LORA_ADAPTER = "visionlin"  # peft adapter name of the LoRA layers finetune injects
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_FILE, MODEL_FILE = "lora.safetensors", "model.safetensors"
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class FinetuneResult:
    """``losses[i]`` is the training loss of step ``start_step + i + 1``; ``run_dir`` is ``None`` without
    ``output_dir``."""

    step: int
    start_step: int
    losses: list[float] = field(default_factory=list)
    trainable_parameters: int = 0
    run_dir: Path | None = None


def _target(pipe_or_model: Any, component: str | None) -> tuple[str, nn.Module]:
    if not isinstance(pipe_or_model, nn.Module) and not isinstance(getattr(pipe_or_model, "components", None), dict):
        raise ValueError(f"expected a diffusers pipeline or a model (nn.Module), got {type(pipe_or_model).__name__}")
    comps = _converted_components(pipe_or_model)
    if not comps:
        raise ValueError(
            f"{type(pipe_or_model).__name__} has no converted component; call visionlin.convert (or calibrate / "
            "load_conversion) first"
        )
    if component is None:
        if len(comps) > 1:
            raise ValueError(f"several converted components {sorted(comps)}; pass component= one of them")
        component = next(iter(comps))
    if component not in comps:
        raise ValueError(f"component={component!r} is not a converted component (converted: {sorted(comps)})")
    return component, comps[component]


def _converted_modules(model: nn.Module) -> dict[str, nn.Module]:
    named = dict(model.named_modules())
    return {n: named[n] for n in getattr(model, _STATE_ATTR).originals}


def _prediction(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(f"the model returned {type(out).__name__}; expected a tensor, an output with .sample or a tuple")


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, tuple | list):
        return [t for t in out if isinstance(t, torch.Tensor)]
    return []


class _Features:
    """Forward hooks on the converted attention modules collecting their outputs (feature matching)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.outputs: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in modules.values()]

    def _hook(self, module, args, output) -> None:
        self.outputs.extend(_tensors(output))

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def _teacher_mode(model: nn.Module):
    """Conversion off, LoRA adapters off, eval mode (restored on exit)."""
    tuners = []
    with contextlib.suppress(ImportError):
        from peft.tuners.tuners_utils import BaseTunerLayer

        tuners = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    was_training = model.training
    try:
        for m in tuners:
            m.enable_adapters(False)
        model.eval()
        with disabled(model):
            yield
    finally:
        for m in tuners:
            m.enable_adapters(True)
        model.train(was_training)


def _loss(student, raw, batch, feature_weight, frozen, features, autocast) -> torch.Tensor:
    with torch.no_grad(), _teacher_mode(raw), autocast():
        if frozen is None:
            target = _prediction(raw(**batch))
        else:
            target = _prediction(torch.func.functional_call(raw, frozen, args=(), kwargs=batch, strict=False))
    teacher_feats = features.take() if features is not None else []
    with autocast():
        pred = _prediction(student(**batch))
    loss = F.mse_loss(pred.float(), target.float())
    if features is not None:
        student_feats = features.take()
        if len(student_feats) != len(teacher_feats):
            raise ValueError(f"feature matching: {len(student_feats)} student vs {len(teacher_feats)} teacher outputs")
        if student_feats:
            feat = sum(F.mse_loss(s.float(), t.float()) for s, t in zip(student_feats, teacher_feats, strict=True))
            loss = loss + feature_weight * feat / len(student_feats)
    return loss


def _check_weight(feature_weight: Any) -> float:
    ok = isinstance(feature_weight, int | float) and not isinstance(feature_weight, bool)
    if not ok or not math.isfinite(feature_weight) or feature_weight < 0:
        raise ValueError(f"feature_weight={feature_weight!r} must be a finite number >= 0")
    return float(feature_weight)


def distillation_loss(
    pipe_or_model: Any, batch: dict[str, Any], *, feature_weight: float = 0.0, component: str | None = None
) -> torch.Tensor:
    """The fine-tuning loss of one batch of forward keywords: MSE of the converted model's prediction against the
    same model with the conversion (and LoRA adapters) off, plus ``feature_weight`` x the mean MSE of the converted
    attention modules' outputs. Gradients flow into the student pass (wrap in ``torch.no_grad()`` to evaluate).

    Raises:
        ValueError: nothing converted, a bad ``feature_weight`` or ``batch``.
    """
    _, model = _target(pipe_or_model, component)
    weight = _check_weight(feature_weight)
    if not isinstance(batch, dict):
        raise ValueError(f"batch must be a dict of the model's forward keywords, got {type(batch).__name__}")
    features = _Features(_converted_modules(model)) if weight > 0 else None
    try:
        return _loss(model, model, batch, weight, None, features, contextlib.nullcontext)
    except (KeyError, TypeError) as e:  # a keyword the model lacks or misses: named (was a bare KeyError)
        raise ValueError(
            f"batch keywords {sorted(batch)} do not fit {type(model).__name__}'s call ({type(e).__name__}: {e})"
        ) from e
    finally:
        if features is not None:
            features.remove()


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _check_finite(where: str, batch: dict[str, Any]) -> None:
    """``ValueError`` naming the keys of ``batch`` whose floating tensors hold NaN or inf: the loss would be NaN and
    every step would write NaN into the trained weights (with ``trainable="all"`` the whole model's)."""
    bad = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]  # fmt: skip
    if bad:
        raise ValueError(f"{where}: {bad} hold NaN or inf values; fine-tuning needs finite inputs")


def _check_overlap(where: str, batch: dict[str, Any], shared: dict[str, Any]) -> None:
    """``ValueError`` naming the keywords that both ``batch`` and ``shared`` give (``shared``'s value won silently)."""
    if both := sorted(set(batch) & set(shared)):
        raise ValueError(f"{where} and shared both give the keywords {both}; give each keyword in one of them")


def _conversion_record(model: nn.Module) -> dict[str, Any]:
    """The converted model's method, options and layers, as ``save_conversion`` writes them (JSON types)."""
    state = getattr(model, _STATE_ATTR)
    record = {"method": state.method, "options": state.options, "layers": list(state.originals),
              "layer_options": state.layer_options}  # fmt: skip
    return json.loads(json.dumps(record, default=str))


def _conversion_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"name: saved -> now"`` for each conversion setting (method, option, layers) that differs."""
    diff = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in ("method", "layers", "layer_options")
            if (saved.get(k) or None) != (now.get(k) or None)]  # fmt: skip
    so, no = saved.get("options") or {}, now.get("options") or {}
    return diff + [f"{k}: {so.get(k)!r} -> {no.get(k)!r}" for k in sorted({*so, *no}) if so.get(k) != no.get(k)]


def _batches(
    data: Any, batch_size: int | None, seed: int, rank: int = 0, world: int = 1
) -> tuple[Callable[[int], dict[str, Any]], str]:
    """``(batch_of_step, description)`` for process ``rank`` of ``world``; each batch is a function of the step and
    the rank alone (the processes take disjoint rows of one draw, or differently seeded generators)."""
    if isinstance(data, dict):
        bad = sorted(k for k, v in data.items() if not isinstance(v, torch.Tensor) or v.ndim == 0)
        if bad or not data:
            raise ValueError(
                f"a dict of data must hold tensors with a leading sample dimension; {bad or 'it is empty'} are not "
                "(pass per-call constants as shared=...)"
            )
        _check_finite("data", data)
        sizes = {k: v.shape[0] for k, v in data.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"the data tensors have different leading sizes {sizes}; each must hold N samples")
        n = next(iter(sizes.values()))
        if n == 0:  # (was reported as "batch_size=0 ... exceeds the 0 samples")
            raise ValueError(f"the data holds no samples: every tensor's leading dimension is 0 ({sorted(sizes)})")
        bs = n // world if batch_size is None else batch_size
        if bs * world > n or bs == 0:
            raise ValueError(f"batch_size={bs} x {world} process(es) exceeds the {n} samples of the data")

        def batch_of(step: int) -> dict[str, Any]:
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            idx = torch.randperm(n, generator=g)[rank * bs : (rank + 1) * bs]
            return {k: v[idx] for k, v in data.items()}

        return batch_of, f"{n} samples, batch {bs}"
    if batch_size is not None:
        raise ValueError("batch_size applies to a dict of tensors only (a list or callable gives whole batches)")
    if callable(data):

        def call(step: int) -> dict[str, Any]:
            out = data(step, torch.Generator().manual_seed(seed * 1_000_003 + step * world + rank))
            if not isinstance(out, dict):
                raise ValueError(f"data({step}, generator) returned {type(out).__name__}, not a dict of keywords")
            _check_finite(f"data({step}, generator)", out)
            return out

        return call, "generated batches"
    if isinstance(data, list | tuple) and data and all(isinstance(b, dict) for b in data):
        for i, b in enumerate(data):
            _check_finite(f"data[{i}]", b)
        return (lambda step: data[(step * world + rank) % len(data)]), f"{len(data)} batches"
    raise ValueError(
        "data must be a dict of tensors (N samples each), a non-empty list of forward-keyword dicts, or a callable "
        f"(step, generator) -> dict; got {type(data).__name__}"
    )


def _inject_lora(
    model: nn.Module, rank: int, alpha: float | None, targets: tuple[str, ...], names: list[str] | None = None
) -> dict[str, Any]:
    """Inject (or find) the ``visionlin`` LoRA adapters on ``targets`` of the converted attention modules (or on the
    modules ``names``); returns the config to store with the weights."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as e:
        raise ImportError("trainable='lora' needs peft: pip install peft") from e
    named = dict(model.named_modules())
    if names is None:
        names = [f"{layer}.{t}" for layer in _converted_modules(model) for t in targets if f"{layer}.{t}" in named]
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"the LoRA target modules {missing[:4]} are not in {type(model).__name__}")
    if not names:
        raise ValueError(f"no module {list(targets)} in the converted attention modules to put LoRA on")
    alpha = rank if alpha is None else alpha
    config_out = {"r": rank, "lora_alpha": alpha, "target_modules": names}
    present = [n for n in names if isinstance(named[n], BaseTunerLayer)]
    if present and all(LORA_ADAPTER in named[n].lora_A for n in names if n in present) and len(present) == len(names):
        return config_out  # injected by an earlier finetune call: train those adapters further
    if present:
        raise ValueError(f"modules {present[:4]} already carry other peft adapters; finetune injects its own")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, init_lora_weights=True)
    inject_adapter_in_model(config, model, adapter_name=LORA_ADAPTER)
    return config_out


def _peft_layers(model: nn.Module) -> set[str]:
    """Names of the modules of ``model`` that are peft adapter layers (an empty set without peft)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return set()
    return {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def _remove_lora(model: nn.Module, before: set[str], had_config: bool) -> None:
    """Undo an injection: every peft layer not in ``before`` is replaced by the layer it wraps (whose weights it never
    changed), and the ``peft_config`` attribute peft set goes unless the model had one."""
    for name in sorted(_peft_layers(model) - before, key=len, reverse=True):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, model.get_submodule(name).get_base_layer())
    if not had_config and "peft_config" in vars(model):
        delattr(model, "peft_config")


def finetune(
    pipe_or_model: Any,
    data: Any,
    *,
    steps: int = 100,
    batch_size: int | None = None,
    shared: dict[str, Any] | None = None,
    trainable: str = "converter",
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    clip_grad: float | None = None,
    feature_weight: float = 0.0,
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    lora_targets: tuple[str, ...] | list[str] = DEFAULT_LORA_TARGETS,
    seed: int = 0,
    output_dir: str | Path | None = None,
    resume: str | Path | None = None,
    checkpoint_every: int = 0,
    checkpoint_hist: int = 3,
    log_interval: int = 10,
    mixed_precision: str = "no",
    cpu: bool = False,
    progress: bool | None = None,
    component: str | None = None,
) -> FinetuneResult:
    """Fine-tune a converted pipeline or model by distillation from itself with the conversion off (see the module
    docstring for the loss, ``trainable`` and ``data``).

    Args:
        pipe_or_model: A converted pipeline or model (:func:`visionlin.convert`, ``calibrate`` or
            ``load_conversion``). With several converted components, ``component`` names the one to train.
        data: The batches (module docstring). Tensors, and the model, are moved to accelerate's device (a GPU when
            there is one, unless ``cpu=True``).
        steps: Total optimizer steps; a resumed run continues up to it.
        batch_size: Rows per step and process for a dict of tensors (default: all, split over the processes).
        shared: Forward keywords added unchanged to every batch (a keyword the data also gives is refused).
        trainable: ``"converter"``, ``"lora"``, ``"lora+converter"`` or ``"all"``.
        lr, weight_decay, warmup_steps, clip_grad: AdamW (no decay on 1-d parameters), linear warm-up, gradient
            norm clipping.
        feature_weight: Weight of the attention-output matching term (0: prediction matching only).
        lora_rank, lora_alpha, lora_targets: The LoRA adapters (``lora_alpha`` > 0, default the rank), put on these
            child modules of every converted attention module; B is zero-initialised, so training starts from the
            converted model.
        seed: Seeds the global generators (with the process rank) and the batch draws.
        output_dir: The run folder: ``checkpoints/step-*/`` (every ``checkpoint_every`` steps and at the end,
            ``checkpoint_hist`` kept), ``log.jsonl``, and at the end ``conversion/`` (:func:`save_conversion`) and
            ``lora.safetensors`` or ``model.safetensors`` for those modes. ``None``: nothing is written.
        resume: ``"auto"`` (newest complete checkpoint of ``output_dir``, else a fresh start), a checkpoint folder or
            a run folder. Without it an ``output_dir`` that has checkpoints is refused.
        log_interval: Steps between log records / progress lines.
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (accelerate's autocast).
        cpu: Train on the CPU even when a GPU is present.
        progress: A tqdm bar (default: when stderr is a terminal).

    Returns:
        The steps done and the loss of each.

    Raises:
        ValueError: nothing converted, a bad option or data, a converter with no parameters for
            ``trainable="converter"``, a checkpoint of another model, mode or conversion (method, options, layers).
    """
    from accelerate.utils import set_seed

    from ..train import checkpoint as ckpt
    from ..train.trainer import _fmt_time, _resolve_resume, _RunLog, _say, new_accelerator, set_aside_old_log

    comp, model = _target(pipe_or_model, component)
    if trainable not in TRAINABLE:
        raise ValueError(f"unknown trainable={trainable!r}; choose one of {TRAINABLE}")
    for name, value, low in (("steps", steps, 1), ("warmup_steps", warmup_steps, 0), ("lora_rank", lora_rank, 1),
                             ("checkpoint_every", checkpoint_every, 0), ("checkpoint_hist", checkpoint_hist, 0),
                             ("log_interval", log_interval, 1), ("seed", seed, 0)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer or None")
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("clip_grad", clip_grad)):
        if value is None and name == "clip_grad":
            continue
        # (comparisons, not math.isfinite, which raised OverflowError for an int past float64; NaN fails both)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
            raise ValueError(f"{name}={value!r} must be a finite number >= 0")
        if value > FLOAT32_MAX:  # (the optimizer's float32 arithmetic failed on it: "cannot be converted ... overflow")
            raise ValueError(f"{name}={value!r} must be at most {FLOAT32_MAX:.4g} (float32's largest value)")
    lr, weight_decay = float(lr), float(weight_decay)
    clip_grad = None if clip_grad is None else float(clip_grad)
    if lr == 0:  # as clip_grad=0: a run that trains nothing
        raise ValueError("lr=0 would train nothing; pass a positive learning rate")
    if clip_grad == 0:  # clip_grad_norm_(params, 0) zeroes every gradient: a run that trains nothing
        raise ValueError("clip_grad=0 would zero every gradient; pass a positive norm, or None for no clipping")
    weight = _check_weight(feature_weight)
    alpha_ok = isinstance(lora_alpha, int | float) and not isinstance(lora_alpha, bool)
    if lora_alpha is not None and (not alpha_ok or not math.isfinite(lora_alpha) or lora_alpha <= 0):
        # (nan gave NaN losses and a NaN-filled checkpoint; 0, adapters that never act)
        raise ValueError(f"lora_alpha={lora_alpha!r} must be a finite number > 0, or None for the rank")
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision={mixed_precision!r}; choose 'no', 'bf16' or 'fp16'")
    if shared is not None and not isinstance(shared, dict):
        raise ValueError(f"shared must be a dict of forward keywords, got {type(shared).__name__}")
    if shared is not None:
        _check_finite("shared", shared)
    if shared and isinstance(data, dict | list | tuple):  # (a callable's keywords are checked batch by batch)
        batches = {"data": data} if isinstance(data, dict) else {f"data[{i}]": b for i, b in enumerate(data)}
        for where, b in batches.items():
            if isinstance(b, dict):
                _check_overlap(where, b, shared)
    if isinstance(lora_targets, str) or not all(isinstance(t, str) for t in lora_targets) or not lora_targets:
        raise ValueError(f"lora_targets={lora_targets!r} must be a non-empty list of child module names ('to_q')")
    if output_dir is not None and (not isinstance(output_dir, str | Path) or not str(output_dir).strip()):
        raise ValueError(  # ("" was the current directory: checkpoints/, conversion/ and log.jsonl written there)
            f"output_dir={output_dir!r} must be a folder path (a non-empty str or Path), or None for no run folder"
        )
    if resume is not None and output_dir is None:
        raise ValueError("resume needs output_dir (the run folder whose checkpoints it continues)")
    run_dir = Path(output_dir) if output_dir is not None else None
    resume_from = None
    if run_dir is not None:
        resume_from = _resolve_resume({"resume": None if resume is None else str(resume)}, run_dir)
    meta = {"format": "visionlin.finetune", "model": type(model).__name__, "trainable": trainable}
    conversion = _conversion_record(model)
    if resume_from is not None:  # checked before anything changes (LoRA injection)
        saved_meta = ckpt.read_weights_metadata(resume_from / "model.safetensors")
        got = {k: saved_meta.get(k) for k in meta}
        if got != meta:
            raise ckpt.CheckpointError(f"checkpoint {str(resume_from)!r} is {got}; this run is {meta}")
        # the conversion it trained (recorded since; else its run's saved conversion): the converter weights fit
        # another sparsity, block size ... as well, and the run went on with the settings silently changed
        saved_conv = None
        if "conversion" in saved_meta:
            try:
                saved_conv = json.loads(saved_meta["conversion"])
            except ValueError as e:
                where = f"checkpoint {str(resume_from)!r}"
                raise ckpt.CheckpointError(f"{where}: its conversion record is not JSON ({e})") from e
        else:  # (best effort: these checkpoints were resumed unchecked)
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
                plan = resume_from.parent.parent / "conversion" / PLAN_FILE
                saved_conv = json.loads(plan.read_text())["components"][comp]
        if isinstance(saved_conv, dict) and (diff := _conversion_diff(saved_conv, conversion)):
            raise ckpt.CheckpointError(
                f"checkpoint {str(resume_from)!r} trained another conversion ({', '.join(diff)}: checkpoint -> this "
                "run); resume with the checkpoint's conversion settings, or start a new run folder"
            )

    if trainable == "converter" and not any(f".{CORE_ATTR}." in f".{n}" for n, _ in model.named_parameters()):
        raise ValueError(
            f"trainable='converter' but the {getattr(model, _STATE_ATTR).method!r} conversion has no parameters of "
            "its own; use trainable='lora' or 'all', or a method with parameters (sla, hybrid, linear)"
        )

    accelerator = new_accelerator(mixed_precision=mixed_precision, cpu=cpu)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    batch_of, data_desc = _batches(data, batch_size, seed, rank, world)

    def merged(step: int) -> dict[str, Any]:  # the step's batch and the shared keywords
        batch = batch_of(step)
        _check_overlap(f"the data of step {step}", batch, shared or {})
        return {**batch, **(shared or {})}

    set_seed(seed + rank)
    model.to(device)
    first_batch = _to(merged(0), device)
    was_training = model.training
    try:  # the data must run before adapters go in and the run folder is written: a failed call leaves neither
        with torch.no_grad(), accelerator.autocast():
            model.eval()(**first_batch)  # (as the training steps run it: no dropout, no random draws)
    except Exception as e:  # noqa: BLE001 - whatever the model raises on this data, named
        raise ValueError(
            f"the data does not run through {type(model).__name__} ({type(e).__name__}: {e}); nothing was "
            "changed (no LoRA adapter injected, no run folder written)"
        ) from e
    finally:
        model.train(was_training)
    del first_batch
    lora_config = None
    if "lora" in trainable:
        lora_config = _inject_lora(model, lora_rank, lora_alpha, tuple(lora_targets))
        model.to(device)
    named = dict(model.named_parameters())
    core_names = [n for n in named if f".{CORE_ATTR}." in f".{n}"]
    lora_names = [n for n in named if "lora_" in n and f".{LORA_ADAPTER}." in f".{n}."]
    if trainable == "all":
        train_names = list(named)
    else:
        train_names = (core_names if "converter" in trainable else []) + (lora_names if "lora" in trainable else [])
    assert train_names, "checked above"
    flags = {n: p.requires_grad for n, p in named.items()}
    was_training = model.training
    frozen = None
    if trainable == "all":  # the teacher: the weights before fine-tuning (the converter's own are unused by it)
        frozen = {n: p.detach().clone() for n, p in named.items() if n not in core_names}
    features = _Features(_converted_modules(model)) if weight > 0 else None
    config = {"component": comp, "model_class": type(model).__name__, "method": getattr(model, _STATE_ATTR).method,
              "trainable": trainable, "steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
              "warmup_steps": warmup_steps, "clip_grad": clip_grad, "feature_weight": weight, "lora_rank": lora_rank,
              "lora_alpha": lora_alpha, "lora_targets": list(lora_targets), "seed": seed,
              "mixed_precision": mixed_precision}  # fmt: skip
    log = None
    try:
        for n, p in named.items():
            p.requires_grad_(n in train_names)
        params = [named[n] for n in train_names]
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]  # fmt: skip
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0
        )
        student, optimizer = accelerator.prepare(model, optimizer)
        raw = accelerator.unwrap_model(student)
        step, rng_state = 0, None
        if resume_from is not None:
            state = ckpt.read_checkpoint(resume_from, rank)
            saved = state["model"]
            if set(saved) != set(train_names):
                diff = sorted(set(saved) ^ set(train_names))[:6]
                raise ckpt.CheckpointError(f"checkpoint {str(resume_from)!r}: trained parameters differ ({diff})")
            with torch.no_grad():
                for n in train_names:
                    named[n].copy_(saved[n])
            ts = state["train_state"]
            optimizer.load_state_dict(ts["optimizer"])
            scheduler.load_state_dict(ts["scheduler"])
            step = ts["step"]
            if accelerator.scaler is not None and ts.get("scaler") is not None:
                accelerator.scaler.load_state_dict(ts["scaler"])
            if state["rng"] is None:
                raise ckpt.CheckpointError(f"{str(resume_from)!r} has no generator state for process {rank}")
            rng_state = state["rng"]
            changed = {k: (ts["config"].get(k), v) for k, v in config.items() if k != "steps" and
                       ts["config"].get(k) != v}  # fmt: skip
            if changed:
                diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                _say(accelerator, f"note: settings differ from the checkpoint's (the losses will differ): {diff}")
        if run_dir is not None and accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(run_dir)
            if resume_from is None and (moved := set_aside_old_log(run_dir)) is not None:
                print(f"note: {run_dir} had a log.jsonl of an earlier run without checkpoints: moved to {moved.name}")
        accelerator.wait_for_everyone()
        log = _RunLog(run_dir or Path("."), run_dir is not None and accelerator.is_main_process, False)
        n_train = sum(named[n].numel() for n in train_names)
        where = f"resumed from {resume_from} at step {step}" if resume_from is not None else "fresh"
        _say(accelerator, f"finetune {type(raw).__name__} ({comp}) trainable={trainable}: {n_train} parameters, "
             f"{data_desc}, {steps} steps, lr {lr:.3g}, {device}, {where}"
             + (f"; run folder {run_dir}" if run_dir is not None else ""))  # fmt: skip
        log.write({"kind": "start", "step": step, "resumed_from": str(resume_from or ""), "config": config,
                   "trainable_parameters": n_train})  # fmt: skip

        def save(reason: str) -> None:
            rngs = [ckpt.capture_rng()]
            if world > 1:
                from accelerate.utils import gather_object

                rngs = gather_object(rngs)
            if accelerator.is_main_process:
                scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
                train_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                               "scaler": scaler, "step": step, "config": config}  # fmt: skip
                path = ckpt.write_checkpoint(
                    run_dir, step, weights={"model": {n: named[n] for n in train_names}},
                    weights_metadata={**meta, "conversion": json.dumps(conversion)},
                    train_state=train_state, rng_states=dict(enumerate(rngs)),
                    summary={"step": step, "reason": reason},
                )  # fmt: skip
                pruned = ckpt.prune_checkpoints(run_dir, checkpoint_hist)
                _say(accelerator, f"checkpoint {path.name} ({reason})"
                     + (f", removed {', '.join(p.name for p in pruned)}" if pruned else ""))  # fmt: skip
            accelerator.wait_for_everyone()

        use_bar = accelerator.is_main_process and (sys.stderr.isatty() if progress is None else progress)
        bar = None
        if use_bar:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=step, desc="finetune", leave=False, dynamic_ncols=True)
        result = FinetuneResult(step, step, [], n_train, run_dir)
        if rng_state is not None:
            ckpt.restore_rng(rng_state)
        raw.eval()  # teacher and student alike: no dropout, no class-label dropout (DiT), the same computation
        start = time.perf_counter()
        first = step
        while step < steps:
            batch = _to(merged(step), device)
            try:
                loss = _loss(student, raw, batch, weight, frozen, features, accelerator.autocast)
            except (KeyError, TypeError) as e:  # the first batch's keywords do not fit the model: named
                if step != first:
                    raise
                raise ValueError(
                    f"the data's keywords {sorted(batch)} do not fit {type(raw).__name__}'s call "
                    f"({type(e).__name__}: {e})"
                ) from e
            accelerator.backward(loss)
            if clip_grad is not None:
                accelerator.clip_grad_norm_(params, clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            value = float(loss.detach())
            if world > 1:
                value = float(accelerator.reduce(loss.detach().float(), "mean"))
            result.losses.append(value)
            result.step = step
            if bar is not None:
                bar.update(1)
            if step % log_interval == 0 or step == steps:
                lr_now = optimizer.param_groups[0]["lr"]
                rate = (time.perf_counter() - start) / (step - result.start_step)
                log.write({"kind": "train", "step": step, "loss": value, "lr": lr_now, "s_per_step": rate})
                line = f"loss {value:.6g} lr {lr_now:.3e} eta {_fmt_time(rate * (steps - step))}"
                if bar is not None:
                    bar.set_postfix_str(line)
                else:
                    _say(accelerator, f"step {step}/{steps} {line}")
            if run_dir is not None and (step == steps or (checkpoint_every and step % checkpoint_every == 0)):
                save("end" if step == steps else "interval")
        if bar is not None:
            bar.close()
        if run_dir is not None and accelerator.is_main_process:
            _save_outputs(pipe_or_model, comp, raw, run_dir, trainable, lora_names, lora_config)
        log.write({"kind": "end", "step": step, "loss": result.losses[-1] if result.losses else None})
        accelerator.end_training()
        return result
    finally:
        if log is not None:
            log.close()
        if features is not None:
            features.remove()
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
        model.train(was_training)


def _save_outputs(pipe_or_model, comp, model, run_dir, trainable, lora_names, lora_config) -> None:
    from ..train.checkpoint import save_weights

    save_conversion(pipe_or_model, run_dir / "conversion")
    named = dict(model.named_parameters())
    meta = {"format": "visionlin.finetune", "model": type(model).__name__, "trainable": trainable, "component": comp}
    if "lora" in trainable:
        lora_meta = {**meta, "adapter": LORA_ADAPTER, "lora_config": json.dumps(lora_config)}
        save_weights(run_dir / LORA_FILE, {n: named[n] for n in lora_names}, lora_meta)
    if trainable == "all":
        save_weights(run_dir / MODEL_FILE, model.state_dict(), meta)


def load_finetuned(pipe_or_model: Any, run_dir: str | Path) -> ConversionReport:
    """Re-create a :func:`finetune` result on a fresh pipeline or model: the conversion and converter weights
    (``RUN_DIR/conversion``), then the LoRA adapters (``lora.safetensors``, injected with the saved configuration) or
    every weight (``model.safetensors``) where the run wrote them.

    Raises:
        ValueError: not a finished run folder, or one for another model (the conversion is undone on error).
    """
    from ..train.checkpoint import load_weights, read_weights_metadata

    run_dir = Path(run_dir)
    if not (run_dir / "conversion" / "conversion.json").is_file():
        raise ValueError(f"{str(run_dir)!r} has no conversion/ (written when visionlin.finetune finishes)")
    report = load_conversion(pipe_or_model, run_dir / "conversion")
    injected: list[tuple[nn.Module, set[str], bool]] = []  # (model, its peft layers before, had peft_config)
    try:
        for name in (LORA_FILE, MODEL_FILE):
            path = run_dir / name
            if not path.is_file():
                continue
            meta = read_weights_metadata(path)
            comps = _converted_components(pipe_or_model)
            model = comps.get(meta.get("component", ""))
            if model is None or type(model).__name__ != meta.get("model"):
                raise ValueError(f"{path} is for component {meta.get('component')!r} ({meta.get('model')}); the "
                                 f"target's converted components are {sorted(comps)}")  # fmt: skip
            weights = load_weights(path)
            if name == LORA_FILE:
                cfg = json.loads(meta["lora_config"])
                injected.append((model, _peft_layers(model), hasattr(model, "peft_config")))
                _inject_lora(model, cfg["r"], cfg["lora_alpha"], (), names=cfg["target_modules"])
                params = dict(model.state_dict())
                expected = {k for k in params if "lora_" in k and f".{LORA_ADAPTER}." in f".{k}."}
            else:
                params = dict(model.state_dict())
                expected = set(params)
            bad = sorted(k for k in weights if k not in params or params[k].shape != weights[k].shape)
            if bad or set(weights) != expected:
                raise ValueError(f"{path}: tensors {(bad or sorted(expected ^ set(weights)))[:6]} do not match "
                                 "(missing, extra or of another shape)")  # fmt: skip
            trained = expected if name == LORA_FILE else {n for n, _ in model.named_parameters()}
            if nonfinite := sorted(k for k in trained if k in weights and not bool(torch.isfinite(weights[k]).all())):
                raise ValueError(f"{path}: tensors {nonfinite[:6]} hold NaN or inf values")
            with torch.no_grad():
                for k, v in weights.items():
                    params[k].copy_(v)
    except BaseException:
        for model, before, had_config in injected:
            _remove_lora(model, before, had_config)
        revert(pipe_or_model)
        raise
    return report
