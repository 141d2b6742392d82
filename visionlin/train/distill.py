"""``visionlin distill``: distil a softmax-attention teacher (any timm ViT + ``--teacher-checkpoint``, or one of ours)
into one of our students, on the data pipeline, checkpoints, exact resume and logging of ``visionlin train``.

The loss is a weighted sum, each term with its own weight flag (0 turns it off):

- ``--ce-weight``: the training command's classification loss on the labels (label smoothing, mixup / cutmix).
- ``--distill-logits``: KL divergence between the temperature-softened teacher and student distributions, times
  ``T**2`` (Hinton et al.); ``--distill-hard``: DeiT's hard distillation, cross-entropy against the teacher's argmax.
- ``--match-weight`` with ``--match-layers``: token-wise activation matching. The outputs of the chosen blocks
  (``forward_intermediates`` on both models, feature maps) are compared per token: the student's map, through a learned
  linear projection when the widths differ and resampled to the teacher's grid when the grids differ, regresses the
  teacher's map normalised per token (layer norm without parameters), mean squared error.
- ``--mask-weight`` with ``--mask-ratio``: masked prediction of teacher features (ViT-Linearizer's second objective).
  A random ``--mask-ratio`` of the teacher's patches is blanked in the student's input image (set to 0 after
  normalisation, the dataset mean colour, so every student architecture can be masked the same way); the teacher
  sees the unmasked image. The student's last-block tokens at the masked positions go through a small head (layer
  norm + linear to the teacher's width) and regress the teacher's last-block tokens there, normalised per token; mean
  squared error over the masked tokens only. This costs a second student forward on the masked image.

The teacher is frozen (``requires_grad`` off, eval mode, ``no_grad``), runs under the same autocast as the student
and is never in the optimizer or the checkpoint. The projections and the head are trained with the student and saved
in each checkpoint as ``extra.safetensors``; ``model.safetensors`` holds the student alone (``visionlin validate``
reads it).

With ``--init-from-teacher`` (the default) the student starts from the teacher's weights where the shapes allow
(patch embedding, class token, position embedding resampled to the student's grid, per-block fused ``qkv`` / ``proj``,
MLP, norms, head), through the student family's ``checkpoint_filter_fn``; ``RUN_DIR/init_from_teacher.json`` lists
what was copied and what was skipped and why.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from ._parse import checked
from .data import DataError
from .trainer import (
    BOOL,
    OPTIONS,
    Option,
    TrainingDiverged,
    _nonneg_float,
    _prob,
    add_arguments,
    resolve_config,
    run_dir_of,
)
from .validate import (
    UsageError,
    build_model,
    check_dedicated_kwargs,
    check_model_name,
    check_takes_images,
    load_model_weights,
    parse_kwargs,
    resolve_checkpoint,
)

__all__ = [
    "DISTILL_OPTIONS",
    "DistillLoss",
    "add_distill_arguments",
    "execute",
    "init_from_teacher",
    "parse_match_layers",
]


def _pos_float(text: str) -> float:
    return checked(float, text, lambda v: v > 0 and v < float("inf"), "a positive number")


def _layers(text: str) -> str | None:
    return None if text in ("", "none", "None") else text


DISTILL_OPTIONS: tuple[Option, ...] = (
    Option("teacher", None, str, "teacher model: any timm ViT name or one of ours"),
    Option("teacher_checkpoint", None, str, "teacher weights: timm/authors' .pth or .safetensors, or a visionlin run"),
    Option("teacher_kwargs", {}, None, "extra teacher model arguments, KEY=VALUE ..."),
    Option("ce_weight", 1.0, _nonneg_float, "weight of the classification loss on the labels"),
    Option("distill_logits", 1.0, _nonneg_float, "weight of the KL divergence to the teacher's softened logits"),
    Option("distill_temperature", 1.0, _pos_float, "temperature of the logit distillation"),
    Option("distill_hard", 0.0, _nonneg_float, "weight of DeiT's hard distillation (CE against the teacher's argmax)"),
    Option(
        "match_layers",
        None,
        _layers,
        "blocks whose outputs are matched, counted from 1 (e.g. 4,8,12; "
        "STUDENT:TEACHER pairs such as 2:4,4:8 when the depths differ)",
    ),  # fmt: skip
    Option("match_weight", 1.0, _nonneg_float, "weight of the token-wise activation matching"),
    Option("mask_ratio", 0.5, _prob, "fraction of the student's input patches masked for the masked prediction"),
    Option("mask_weight", 0.0, _nonneg_float, "weight of the masked prediction of the teacher's last-block tokens"),
    Option("init_from_teacher", True, BOOL, "initialise the student from the teacher where shapes allow"),
)
_DISTILL_KEYS = {o.key for o in DISTILL_OPTIONS}


# Student initialisation -----------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> dict[str, Any]:
    """Copy the teacher's tensors into ``student`` wherever the (mapped) name and the shape agree.

    The teacher's state dict goes through the student family's ``checkpoint_filter_fn`` (key names, fused ``qkv``,
    position embedding resampled to the student's grid) without its final all-keys-match check; where the filter
    cannot map the teacher at all, the names are taken as they are.

    Returns:
        A report: ``via``, ``copied`` (keys), ``skipped`` (key -> reason), ``teacher_unused`` (teacher keys not in the
        student), ``copied_params`` / ``student_params`` (element counts).
    """
    student, teacher = _unwrap(student), _unwrap(teacher)
    own = student.state_dict()
    tstate = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
    module = sys.modules.get(type(student).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    via, note = "names as they are", ""
    mapped = dict(tstate)
    if filter_fn is not None:
        try:
            with torch.no_grad():
                mapped = dict(filter_fn(dict(tstate), student, strict=False))
            via = f"{module.__name__}.checkpoint_filter_fn"
        except (ValueError, KeyError, RuntimeError, IndexError) as e:
            note = f"checkpoint_filter_fn could not map the teacher ({e}); names taken as they are"
    buffers = {name for name, _ in student.named_buffers()}
    copied, skipped = [], {}
    new = {}
    for k, v in own.items():
        if k in buffers:
            skipped[k] = "buffer: the student's own kept"
        elif k not in mapped:
            skipped[k] = "missing in the teacher"
        elif tuple(mapped[k].shape) != tuple(v.shape):
            skipped[k] = f"shape mismatch: teacher {tuple(mapped[k].shape)} vs student {tuple(v.shape)}"
        else:
            new[k] = mapped[k].to(dtype=v.dtype)
            copied.append(k)
    with torch.no_grad():
        for k, v in new.items():
            own[k].copy_(v)
    numel = {k: v.numel() for k, v in own.items() if k not in buffers}
    return {
        "via": via,
        "note": note,
        "copied": copied,
        "skipped": skipped,
        "teacher_unused": sorted(k for k in mapped if k not in own),
        "copied_params": sum(numel[k] for k in copied),
        "student_params": sum(numel.values()),
    }


def _report_text(report: dict[str, Any], teacher: str, student: str) -> str:
    params = [k for k in report["skipped"] if not report["skipped"][k].startswith("buffer")]
    share = report["copied_params"] / max(report["student_params"], 1)
    lines = [f"init from teacher {teacher} -> {student} ({report['via']}): copied {len(report['copied'])} of "
             f"{len(report['copied']) + len(params)} parameter tensors, {report['copied_params'] / 1e6:.2f} M of "
             f"{report['student_params'] / 1e6:.2f} M values ({100 * share:.1f}%)"]  # fmt: skip
    if report["note"]:
        lines.append(f"  note: {report['note']}")
    for k in params[:12]:
        lines.append(f"  skipped {k}: {report['skipped'][k]}")
    if len(params) > 12:
        lines.append(f"  ... and {len(params) - 12} more skipped (see init_from_teacher.json)")
    return "\n".join(lines)


# Losses ---------------------------------------------------------------------------------------------------------------
def parse_match_layers(text: str | None, student_depth: int, teacher_depth: int) -> list[tuple[int, int]]:
    """``"4,8,12"`` or ``"2:4,4:8"`` (student:teacher) -> 0-based ``(student, teacher)`` block indices.

    Raises:
        UsageError: malformed, or a block number outside ``1..depth`` of either model.
    """
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        s, sep, t = item.strip().partition(":")
        try:
            s_i, t_i = int(s), int(t if sep else s)
        except ValueError:
            raise UsageError(f"--match-layers {text!r}: {item!r} is not N or STUDENT:TEACHER (block numbers)") from None
        if not 1 <= s_i <= student_depth:
            raise UsageError(f"--match-layers {text!r}: student block {s_i} is out of range 1..{student_depth}")
        if not 1 <= t_i <= teacher_depth:
            raise UsageError(f"--match-layers {text!r}: teacher block {t_i} is out of range 1..{teacher_depth}")
        pairs.append((s_i - 1, t_i - 1))
    return pairs


def _depth(model: nn.Module) -> int:
    info = getattr(model, "feature_info", None)
    if isinstance(info, (list, tuple)) and info:
        return len(info)
    return len(model.blocks)


def _width(model: nn.Module, index: int) -> int:
    info = getattr(model, "feature_info", None)
    if isinstance(info, (list, tuple)) and info:
        return int(info[index]["num_chs"])
    return int(model.embed_dim)


def _to_grid(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, C, H, W]`` resampled to ``size`` (area average when shrinking, bilinear when growing)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H*W, C]``."""
    return x.flatten(2).transpose(1, 2)


class DistillLoss(nn.Module):
    """The distillation loss and its trainable parts (``proj.<i>``: one projection per matched layer pair;
    ``mask_head``); the teacher is held outside the module tree (never saved, never optimised).

    Call as ``loss_fn(model, images, targets) -> loss`` (the trainer's hook). ``last_terms`` keeps the last call's
    unweighted terms (floats) for inspection.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        cfg: dict[str, Any],
        *,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        student = _unwrap(student)
        self._teacher = [teacher]  # a list: not a registered submodule
        self.cfg = {k: cfg[k] for k in _DISTILL_KEYS}
        self.smoothing = cfg.get("smoothing", 0.0)
        self.amp_dtype = amp_dtype
        self.s_depth, self.t_depth = _depth(student), _depth(teacher)
        self.pairs = parse_match_layers(cfg["match_layers"], self.s_depth, self.t_depth) if cfg["match_weight"] else []
        widths = [(_width(student, s), _width(teacher, t)) for s, t in self.pairs]
        self.proj = nn.ModuleList(nn.Identity() if cs == ct else nn.Linear(cs, ct) for cs, ct in widths)
        self.mask_head = None
        if cfg["mask_weight"]:
            cs, ct = _width(student, self.s_depth - 1), _width(teacher, self.t_depth - 1)
            self.mask_head = nn.Sequential(nn.LayerNorm(cs), nn.Linear(cs, ct))
        self.last_terms: dict[str, float] = {}

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def _autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.amp_dtype)

    def _label_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == 2:  # mixup / cutmix soft targets
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=self.smoothing)

    def forward(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        student, teacher = _unwrap(model), self.teacher
        t_idx = sorted({t for _, t in self.pairs} | ({self.t_depth - 1} if self.mask_head is not None else set()))
        s_idx = sorted({s for s, _ in self.pairs})
        with self._autocast(images.device):
            with torch.no_grad():
                teacher.eval()
                if t_idx:
                    t_final, t_maps = teacher.forward_intermediates(images, indices=t_idx, output_fmt="NCHW")
                    t_maps = dict(zip(t_idx, t_maps, strict=True))
                else:
                    t_final, t_maps = teacher.forward_features(images), {}
                t_logits = teacher.forward_head(t_final).float()
            if s_idx:
                s_final, s_maps = student.forward_intermediates(images, indices=s_idx, output_fmt="NCHW")
                s_maps = dict(zip(s_idx, s_maps, strict=True))
                logits = student.forward_head(s_final)
            else:
                logits, s_maps = model(images), {}
            logits = logits.float()
            terms: dict[str, torch.Tensor] = {}
            weights: dict[str, float] = {}
            if c["ce_weight"]:
                terms["ce"], weights["ce"] = self._label_loss(logits, targets), c["ce_weight"]
            if c["distill_logits"]:
                if t_logits.shape != logits.shape:
                    raise UsageError(
                        f"teacher logits {tuple(t_logits.shape)} vs student {tuple(logits.shape)}: logit "
                        "distillation needs the same classes (--distill-logits 0 turns it off)"
                    )
                temp = c["distill_temperature"]
                s_log, t_log = F.log_softmax(logits / temp, -1), F.log_softmax(t_logits / temp, -1)
                kl = F.kl_div(s_log, t_log, reduction="batchmean", log_target=True)
                terms["kl"], weights["kl"] = kl * temp * temp, c["distill_logits"]
            if c["distill_hard"]:
                terms["hard"], weights["hard"] = F.cross_entropy(logits, t_logits.argmax(-1)), c["distill_hard"]
            if self.pairs:
                match = []
                for proj, (s, t) in zip(self.proj, self.pairs, strict=True):
                    target = t_maps[t].float()
                    pred = _to_grid(s_maps[s].float(), tuple(target.shape[-2:]))
                    pred = proj(_tokens(pred))
                    target = _tokens(target)
                    match.append(F.mse_loss(pred, F.layer_norm(target, target.shape[-1:])))
                terms["match"], weights["match"] = torch.stack(match).mean(), c["match_weight"]
            if self.mask_head is not None:
                terms["mask"], weights["mask"] = self._masked_prediction(student, images, t_maps[self.t_depth - 1])
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        return sum(weights[k] * v for k, v in terms.items())

    def _masked_prediction(self, student: nn.Module, images: torch.Tensor, t_last: torch.Tensor):
        b, _, gh, gw = t_last.shape
        n = gh * gw
        n_mask = min(max(1, round(self.cfg["mask_ratio"] * n)), n)
        ranks = torch.rand(b, n, device=images.device).argsort(-1).argsort(-1)
        mask = ranks < n_mask  # [B, N], exactly n_mask per image
        pixel_mask = F.interpolate(mask.view(b, 1, gh, gw).to(images.dtype), size=images.shape[-2:], mode="nearest")
        masked = images * (1 - pixel_mask)
        s_last = student.forward_intermediates(masked, indices=[self.s_depth - 1], output_fmt="NCHW",
                                               intermediates_only=True)[0]  # fmt: skip
        pred = self.mask_head(_tokens(_to_grid(s_last.float(), (gh, gw))))
        target = _tokens(t_last.float())
        target = F.layer_norm(target, target.shape[-1:])
        return F.mse_loss(pred[mask], target[mask]), self.cfg["mask_weight"]


# Command line ---------------------------------------------------------------------------------------------------------
def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    """The training command's flags plus the distillation ones (no argparse defaults: only given flags override)."""
    add_arguments(p)
    g = p.add_argument_group("distillation")
    for o in DISTILL_OPTIONS:
        kw: dict[str, Any] = {"dest": o.key, "default": argparse.SUPPRESS}
        default = f" (default: {o.default})" if o.default not in (None, {}) else ""
        kw["help"] = o.help + default
        if o.type is BOOL:
            kw["action"] = argparse.BooleanOptionalAction
        elif o.key == "teacher_kwargs":
            kw.update(nargs="*", metavar="KEY=VALUE")
        else:
            kw["type"] = o.type
            if o.key.endswith(("logits", "hard")) or o.key.endswith("weight"):
                kw["metavar"] = "WEIGHT"
        g.add_argument(f"--{o.key.replace('_', '-')}", **kw)


def resolve_distill_config(given: dict[str, Any], recipe: str | None) -> dict[str, Any]:
    """The training configuration (defaults, recipe, flags) plus the distillation options; checks that need no model."""
    train_given = {k: v for k, v in given.items() if k not in _DISTILL_KEYS}
    cfg, source = resolve_config(train_given, recipe)
    if "output" not in source:
        cfg["output"] = "output/distill"
    for o in DISTILL_OPTIONS:
        cfg[o.key] = dict(o.default) if isinstance(o.default, dict) else o.default
    for k, v in given.items():
        if k in _DISTILL_KEYS:
            cfg[k] = parse_kwargs(v) if k == "teacher_kwargs" else v
    if not cfg["teacher"]:
        raise UsageError("--teacher is required (e.g. --teacher deit_small_patch16_224 --teacher-checkpoint W.pth)")
    check_model_name(cfg["teacher"])
    check_model_name(cfg["model"])
    # the teacher is built at the student's size and classes
    check_dedicated_kwargs(cfg["teacher_kwargs"], {"img_size": "--img-size", "num_classes": "--num-classes"},
                           "--teacher-kwargs")  # fmt: skip
    own = [f"--{k.replace('_', '-')}" for k in ("initial_checkpoint", "pretrained") if cfg.get(k)]
    if own and cfg["init_from_teacher"]:
        # (the teacher's weights were copied over the student's initial weights after they were loaded)
        if "init_from_teacher" in given:
            raise UsageError(f"{' and '.join(own)} and --init-from-teacher both initialise the student; give one")
        cfg["init_from_teacher"] = False
        print(f"note: {' and '.join(own)} initialise(s) the student: --init-from-teacher is off", flush=True)
    if cfg["mask_weight"] and not 0 < cfg["mask_ratio"] < 1:
        raise UsageError(f"--mask-weight {cfg['mask_weight']} needs 0 < --mask-ratio < 1, not {cfg['mask_ratio']}")
    if cfg["match_layers"]:
        parse_match_layers(cfg["match_layers"], 10**9, 10**9)  # syntax now; ranges once the models are built
    weights = {k: cfg[k] for k in ("ce_weight", "distill_logits", "distill_hard", "mask_weight")}
    weights["match_weight"] = cfg["match_weight"] if cfg["match_layers"] else 0.0
    if not any(weights.values()):
        raise UsageError(f"every loss weight is 0 ({weights}): nothing to train")
    return cfg


def make_setup(cfg: dict[str, Any]) -> tuple[Callable, Callable]:
    """``(setup, loss_fn)`` for :func:`visionlin.train.trainer.train`: ``setup`` builds the frozen teacher, initialises
    the student from it and returns the :class:`DistillLoss` (the trainable extra parts); ``loss_fn`` calls it."""
    holder: dict[str, DistillLoss] = {}

    def setup(model: nn.Module, accelerator) -> nn.Module:
        num_classes = getattr(_unwrap(model), "num_classes", None)
        # the same initial teacher in every process (it is never synchronised: no gradients) and in one-process runs,
        # without --teacher-checkpoint too; the other generators' streams are left as they were
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg["seed"])
            teacher = build_model(
                cfg["teacher"], num_classes=num_classes, img_size=cfg["img_size"], **cfg["teacher_kwargs"]
            )
        say = print if accelerator.is_main_process else (lambda *a, **k: None)
        if cfg["teacher_checkpoint"]:
            try:
                path = resolve_checkpoint(cfg["teacher_checkpoint"])
                how = load_model_weights(teacher, path, cfg["teacher"])
            except (ckpt.CheckpointError, UsageError, OSError, RuntimeError) as e:
                raise UsageError(f"--teacher-checkpoint {cfg['teacher_checkpoint']!r} does not fit teacher "
                                 f"{cfg['teacher']!r} with {num_classes} classes: {e}") from e  # fmt: skip
            say(f"teacher {cfg['teacher']} loaded from {path} ({how})", flush=True)
        else:
            say(f"warning: no --teacher-checkpoint: the teacher {cfg['teacher']} is randomly initialised", flush=True)
        teacher.to(accelerator.device).eval().requires_grad_(False)
        check_takes_images(teacher, cfg["img_size"], accelerator.device, f"teacher {cfg['teacher']!r}")
        amp = {"bfloat16": torch.bfloat16, "float16": torch.float16}[cfg["amp_dtype"]] if cfg["amp"] else None
        loss = DistillLoss(model, teacher, cfg, amp_dtype=amp)
        if cfg["init_from_teacher"]:
            report = init_from_teacher(model, teacher)
            say(_report_text(report, cfg["teacher"], cfg["model"]), flush=True)
            if accelerator.is_main_process:
                run_dir = run_dir_of(cfg)
                run_dir.mkdir(parents=True, exist_ok=True)
                out = {"teacher": cfg["teacher"], "student": cfg["model"], **report}
                (run_dir / "init_from_teacher.json").write_text(json.dumps(out, indent=1))
        holder["loss"] = loss
        return loss

    def loss_fn(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return holder["loss"](model, images, targets)

    return setup, loss_fn


def execute(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    from .trainer import train

    keys = [o.key for o in (*OPTIONS, *DISTILL_OPTIONS)]
    given = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    try:
        cfg = resolve_distill_config(given, args.config)
        setup, loss_fn = make_setup(cfg)
        train(cfg, command=shlex.join(["visionlin", *argv]), loss_fn=loss_fn, setup=setup)
    except (UsageError, DataError, ckpt.CheckpointError) as e:
        parser.error(str(e))
    except TrainingDiverged as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0
