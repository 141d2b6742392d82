"""``visionlin train`` (also ``python -m visionlin.train``): ImageNet-style training on ``accelerate`` over timm's data,
optimizer, scheduler, loss and EMA utilities, with exact resume.

Configuration: built-in defaults, then a YAML recipe (``--config deit``: a recipe shipped in
``visionlin/train/recipes/``, or a path), then the flags given on the command line. Flag names are timm ``train.py``'s
where the concept is the same. The resolved configuration is written to ``RUN_DIR/config.yaml``.

One step is one optimizer update over ``--grad-accum-steps`` micro-batches of ``--batch-size`` images per process. A
checkpoint records the epoch and the number of micro-batches consumed in it; with the seeded epoch order and
per-sample augmentation seeds of :mod:`visionlin.train.data` and every generator's state, a resumed run computes the
same losses as one that was never stopped.

Several processes (``accelerate launch`` or ``torchrun``; DDP, or FSDP2 with ``--fsdp``): each process reads its shard
of one seeded global order, so N processes with ``-b B`` compute the losses of one process with ``-b N*B`` up to the
order of float sums. The model and ``setup``'s extra module are wrapped as one module whose forward computes the loss
(:class:`_StepModule`), so every trained parameter's gradient is reduced. Only the main process writes; a checkpoint
holds each process's generator states, and resuming needs the same number of processes. Validation is sharded and
padded to equal batch counts per process, the padding left out of the metrics.

Extension points: ``train(cfg, loss_fn=...)`` takes ``loss_fn(model, images, targets) -> loss`` (a teacher-based
distillation loss, for instance) instead of the cross-entropy on the model's logits; ``setup(model, accelerator)``,
called once the model is built and on its device, may change it (initialise it from a teacher) and return a module of
extra trainable parameters (projections, prediction heads) that is optimised, clipped and checkpointed
(``extra.safetensors``) with the model. ``visionlin distill`` uses both.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import difflib
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .._io import folder_problem
from . import checkpoint as ckpt
from ._parse import checked
from .data import (
    DATASETS,
    DataError,
    EpochSampler,
    SeededTransform,
    ShardedEvalSampler,
    collate_skipping,
    create_dataset,
    patch_posterize,
)
from .ema import make_ema
from .validate import (
    UsageError,
    build_model,
    check_crop_pct,
    check_dedicated_kwargs,
    check_takes_images,
    eval_transform,
    evaluate,
    img_size_arg,
    load_model_weights,
    no_image_read,
    parse_kwargs,
    resolve_checkpoint,
    workers_arg,
)

__all__ = ["OPTIONS", "add_arguments", "execute", "list_recipes", "main", "resolve_config", "train"]


@dataclass(frozen=True)
class Option:
    key: str
    default: Any
    type: Callable[[str], Any] | None
    help: str
    short: str | None = None
    choices: tuple[Any, ...] | None = None


def _pos_int(text: str) -> int:
    return checked(int, text, lambda v: v > 0, "a positive integer")


def _nonneg_int(text: str) -> int:
    return checked(int, text, lambda v: v >= 0, "a non-negative integer")


#: The largest seed: the processes seed numpy with ``seed + 1 + rank``, which must stay below 2**32.
MAX_SEED = 2**32 - 2**16


def _seed(text: str) -> int:
    return checked(int, text, lambda v: 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]")


def _nonneg_float(text: str) -> float:
    return checked(float, text, lambda v: v >= 0 and math.isfinite(v), "a non-negative number")


#: The largest learning rate, weight decay, epsilon or momentum taken: beyond float32's range the optimizer's step
#: failed with "value cannot be converted to type float without overflow" (--lr 1e300), after the run folder existed.
MAX_RATE = 1e6


def _rate(text: str) -> float:
    return checked(float, text, lambda v: 0 <= v <= MAX_RATE, f"a non-negative number up to {MAX_RATE:g}")


def _pos_float(text: str) -> float:
    return checked(float, text, lambda v: v > 0 and math.isfinite(v), "a positive number")


def _below_one(text: str) -> float:
    return checked(float, text, lambda v: 0 <= v < 1, "a fraction in [0, 1)")


def _decay(text: str) -> float:
    return checked(float, text, lambda v: 0 <= v < 1, "a decay in [0, 1)")


def _prob(text: str) -> float:
    return checked(float, text, lambda v: 0 <= v <= 1, "a probability in [0, 1]")


def _opt_str(text: str) -> str | None:
    return None if text in ("", "none", "None") else text


#: The schedule names ``timm.scheduler.create_scheduler_v2`` takes (timm 1.0; an unknown one failed inside it).
SCHEDULERS = ("constant", "cosine", "multistep", "plateau", "poly", "rsqrt", "step", "tanh")
INTERPOLATIONS = ("bicubic", "bilinear", "box", "hamming", "lanczos", "nearest", "random")


def _optimizer(text: str) -> str:
    """A name ``timm.optim.create_optimizer_v2`` takes: a registered optimizer, optionally ``lookahead_``-prefixed."""
    from timm.optim import list_optimizers

    known = list_optimizers()
    # (any prefix before "_" passed: "lookahaed_adamw" ran plain AdamW; timm takes only "lookahead_")
    base = text.lower().removeprefix("lookahead_") if isinstance(text, str) else None
    if base not in known:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a timm optimizer (e.g. adamw, sgd, lamb; {len(known)} known)"
        )
    return text


def _scheduler(text: str) -> str:
    if text not in SCHEDULERS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a timm scheduler; choose from {', '.join(SCHEDULERS)}")
    return text


def _interpolation(text: str) -> str | None:
    value = _opt_str(text)
    if value is not None and value not in INTERPOLATIONS:
        raise argparse.ArgumentTypeError(f"{text!r} is not an interpolation; choose from {', '.join(INTERPOLATIONS)}")
    return value


def _folder_name(text: str) -> str | None:
    """One folder name (no separators, not ``.`` / ``..``): the run folder stays under ``--output``."""
    value = _opt_str(text)
    if value is not None and (value in (".", "..") or "/" in value or "\\" in value or not value.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder name (the run folder goes under --output)")
    return value


BOOL = bool  # marks a --flag / --no-flag option
#: torch.compile's modes (--torchcompile-mode)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

OPTIONS: tuple[Option, ...] = (
    # model
    Option("model", None, str, "model name: ours (`visionlin list`) or any timm model"),
    Option("pretrained", False, BOOL, "start from timm's pretrained weights of --model"),
    Option(
        "initial_checkpoint",
        None,
        str,
        "start from these weights: a file (ours or the authors', through "
        "checkpoint_filter_fn), a checkpoint folder or a run folder (its newest checkpoint)",
    ),
    Option("num_classes", None, _pos_int, "classes of the head (default: the dataset's)"),
    Option("img_size", 224, img_size_arg, "input side in pixels"),
    Option("model_kwargs", {}, None, "extra model arguments, KEY=VALUE ... (e.g. depth=2 attn_layer=softmax)"),
    Option("drop", 0.0, _prob, "dropout rate (drop_rate)"),
    Option("drop_path", 0.0, _prob, "stochastic depth rate (drop_path_rate)"),
    Option("grad_checkpointing", False, BOOL, "activation checkpointing (model.set_grad_checkpointing)"),
    Option("torchcompile", False, BOOL, "torch.compile the model for training"),
    Option(
        "torchcompile_mode",
        "default",
        str,
        "torch.compile mode with --torchcompile; reduce-overhead replays the steps as CUDA graphs (no host time per "
        "kernel: the host-bound steps of the small models at 224 px)",
        choices=COMPILE_MODES,
    ),  # fmt: skip
    Option(
        "fsdp",
        False,
        BOOL,
        "shard weights, gradients and optimizer state over the GPUs (FSDP2 through "
        "accelerate's FSDP plugin; each model block is one shard unit); default: DDP",
    ),  # fmt: skip
    # data
    Option(
        "dataset", "imagefolder", str, "imagefolder (--data-dir) or fashion_mnist (Debian's files)", choices=DATASETS
    ),  # fmt: skip
    Option("data_dir", None, str, "ImageNet-layout root: DIR/<train-split>/<class>/<img>, DIR/<val-split>/..."),
    Option("train_split", "train", str, "training sub-folder (fashion_mnist: train)"),
    Option("val_split", "val", _opt_str, "validation sub-folder ('none': no validation; fashion_mnist: test)"),
    Option("workers", 4, workers_arg, "dataloader worker processes", short="-j"),
    Option("pin_mem", True, BOOL, "pinned host memory for batches (CUDA only)"),
    Option("persistent_workers", True, BOOL, "keep dataloader workers alive between epochs"),
    Option(
        "aug_repeats",
        0,
        _nonneg_int,
        "repeated augmentation: each image N times per epoch, the copies on "
        "different processes (timm's RepeatAugSampler; 0: off)",
    ),  # fmt: skip
    Option("interpolation", None, _interpolation, "resize interpolation (default: the model's)"),
    Option("crop_pct", None, _pos_float, "validation center-crop fraction (default: the model's)"),
    # augmentation and regularisation
    Option("no_aug", False, BOOL, "no training augmentation (resize + center crop)"),
    Option("aa", None, _opt_str, "RandAugment / AutoAugment policy, e.g. rand-m9-mstd0.5-inc1"),
    Option("hflip", 0.5, _prob, "horizontal flip probability"),
    Option("color_jitter", 0.4, _nonneg_float, "color jitter factor (ignored with --aa)"),
    Option("reprob", 0.0, _prob, "random erasing probability"),
    Option("remode", "pixel", str, "random erasing mode", choices=("const", "rand", "pixel")),
    Option("mixup", 0.0, _nonneg_float, "mixup alpha (0: off)"),
    Option("cutmix", 0.0, _nonneg_float, "cutmix alpha (0: off)"),
    Option("mixup_prob", 1.0, _prob, "probability of mixup or cutmix per batch"),
    Option("mixup_switch_prob", 0.5, _prob, "probability of cutmix instead of mixup when both are on"),
    Option("mixup_mode", "batch", str, "mixup granularity", choices=("batch", "pair", "elem")),
    Option("mixup_off_epoch", 0, _nonneg_int, "turn mixup / cutmix off from this epoch (0: never)"),
    Option("smoothing", 0.1, _below_one, "label smoothing, in [0, 1)"),
    # optimisation
    Option("opt", "adamw", _optimizer, "timm optimizer name (timm.optim.create_optimizer_v2)"),
    Option("lr", None, _rate, "learning rate (default: --lr-base x global batch / --lr-base-size)"),
    Option("lr_base", 5e-4, _rate, "learning rate at --lr-base-size images per update"),
    Option("lr_base_size", 512, _pos_int, "global batch at which --lr-base applies (DeiT: 512)"),
    Option("opt_eps", None, _rate, "optimizer epsilon (default: the optimizer's)"),
    Option("momentum", 0.9, _rate, "SGD momentum"),
    Option("weight_decay", 0.05, _rate, "weight decay (not on biases, norms, the model's no_weight_decay)"),
    Option("clip_grad", None, _pos_float, "clip gradients at this norm (or value with --clip-mode value)"),
    Option("clip_mode", "norm", str, "gradient clipping mode", choices=("norm", "value")),
    Option("sched", "cosine", _scheduler, "timm scheduler name (timm.scheduler.create_scheduler_v2)"),
    Option("epochs", 300, _pos_int, "epochs to train"),
    Option("warmup_epochs", 5, _nonneg_int, "linear warm-up epochs"),
    Option("warmup_lr", 1e-6, _rate, "learning rate at the start of warm-up"),
    Option("min_lr", 1e-5, _rate, "learning rate at the end of the cosine"),
    Option("batch_size", 128, _pos_int, "images per process per micro-batch", short="-b"),
    Option("validation_batch_size", None, _pos_int, "validation batch (default: --batch-size)"),
    Option("grad_accum_steps", 1, _pos_int, "micro-batches per optimizer update"),
    Option(
        "model_ema",
        False,
        BOOL,
        "keep an exponential moving average of the weights (timm ModelEmaV3; with --fsdp per shard)",
    ),
    Option("model_ema_decay", 0.9998, _decay, "EMA decay, in [0, 1) (1 would keep the initial weights)"),
    Option("model_ema_warmup", False, BOOL, "EMA decay warm-up"),
    Option("amp", False, BOOL, "mixed precision autocast (see --amp-dtype)"),
    Option("amp_dtype", "bfloat16", str, "autocast dtype", choices=("bfloat16", "float16")),
    # run
    Option("seed", 42, _seed, "seed of everything (order, augmentation, init)"),
    Option("output", "output/train", str, "parent folder of runs"),
    Option("experiment", None, _folder_name, "run folder name under --output (default: <model>-<img-size>)"),
    Option(
        "resume",
        None,
        _opt_str,
        "'auto' (newest complete checkpoint of the run folder, else a fresh start), "
        "a checkpoint folder or a run folder",
    ),  # fmt: skip
    Option("recovery_interval", 0, _nonneg_int, "also checkpoint every N optimizer steps within an epoch (0: off)"),
    Option("checkpoint_hist", 3, _nonneg_int, "complete checkpoints kept (0: all)"),
    Option("log_interval", 50, _pos_int, "optimizer steps between progress lines and log records"),
    Option("tensorboard", False, BOOL, "also write TensorBoard scalars to RUN_DIR/tb (needs tensorboard)"),
    Option("plot", True, BOOL, "draw RUN_DIR/curves.png at the end (needs matplotlib)"),
    Option("cpu", False, BOOL, "train on the CPU even when a GPU is present"),
)
OPTION_BY_KEY = {o.key: o for o in OPTIONS}
# Settings that shape the learning-rate schedule: changed at a resumption, the schedule is rebuilt from them (timm's
# train.py does the same) instead of restored from the checkpoint.
SCHEDULE_KEYS = ("lr", "lr_base", "lr_base_size", "sched", "epochs", "warmup_epochs", "warmup_lr", "min_lr")
# Optimizer group settings taken from this run's configuration, not the checkpoint's, at a resumption.
_GROUP_SETTINGS = ("weight_decay", "momentum", "eps")
# Keys whose change between a checkpoint and its resumption would break exactness; other changes are only noted.
NOT_COMPARED = {"resume", "workers", "log_interval", "output", "experiment", "tensorboard", "plot", "pin_mem",
                "persistent_workers", "checkpoint_hist", "recovery_interval", "epochs"}  # fmt: skip


def list_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__package__).joinpath("recipes").iterdir()
                  if p.name.endswith(".yaml"))  # fmt: skip


def _load_recipe(name: str) -> tuple[dict[str, Any], str]:
    import yaml

    path = Path(name)
    if not path.suffix and name in list_recipes():
        text = resources.files(__package__).joinpath("recipes", f"{name}.yaml").read_text()
        where = f"recipe {name!r}"
    elif path.is_file():
        text, where = path.read_text(), f"recipe file {name!r}"
    else:
        raise UsageError(f"unknown recipe {name!r}: not a file and not one of the shipped recipes {list_recipes()}")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{where} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise UsageError(f"{where} must be a mapping of option: value, not {type(data).__name__}")
    return data, where


def _nullable(opt: Option) -> bool:
    """Whether ``opt`` takes None: its default is None, or its flag spells None ("none": --val-split none)."""
    if opt.default is None:
        return True
    try:
        return opt.type is not BOOL and opt.type is not str and opt.type("none") is None
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False


def _coerce(opt: Option, value: Any, where: str) -> Any:
    if value is None:
        if not _nullable(opt):  # (null passed unchecked: tracebacks later, or weight_decay silently 0)
            raise UsageError(f"{where}: {opt.key} cannot be null (its default is {opt.default!r})")
        return None
    if opt.key == "model_kwargs":
        if not isinstance(value, dict):
            raise UsageError(f"{where}: model_kwargs must be a mapping, not {value!r}")
        return dict(value)
    if opt.type is BOOL:
        if not isinstance(value, bool):
            raise UsageError(f"{where}: {opt.key} must be true or false, not {value!r}")
        return value
    try:
        v = opt.type(value) if opt.type is not str else value
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"{where}: {opt.key}: {e}") from None
    if opt.type is str and not isinstance(v, str):
        raise UsageError(f"{where}: {opt.key} must be a string, not {value!r}")
    if opt.choices and v not in opt.choices:
        raise UsageError(f"{where}: {opt.key}={v!r}; valid: {', '.join(map(str, opt.choices))}")
    return v


def resolve_config(given: dict[str, Any], recipe: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Defaults, then ``recipe`` (a shipped name or a YAML path), then ``given`` (flags actually given).

    Returns ``(config, source)`` with the source of each non-default value ("recipe ..." or "flag"). Unknown recipe
    keys, ill-typed values and invalid choices raise :class:`UsageError` naming them.
    """
    cfg = {o.key: (dict(o.default) if isinstance(o.default, dict) else o.default) for o in OPTIONS}
    source: dict[str, str] = {}
    if recipe:
        data, where = _load_recipe(recipe)
        for raw_key, value in data.items():
            key = str(raw_key).replace("-", "_")
            if key not in OPTION_BY_KEY:
                close = difflib.get_close_matches(key, list(OPTION_BY_KEY), n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise UsageError(f"{where}: unknown key {raw_key!r}{hint}; `visionlin train --help` lists the options")
            cfg[key] = _coerce(OPTION_BY_KEY[key], value, where)
            source[key] = where
    for key, value in given.items():
        if key == "model_kwargs":
            cfg[key] = {**cfg[key], **parse_kwargs(value)}
        else:
            cfg[key] = _coerce(OPTION_BY_KEY[key], value, "flag")
        source[key] = "flag"
    check_dedicated_kwargs(cfg["model_kwargs"], DEDICATED)
    check_crop_pct(cfg["crop_pct"], cfg["img_size"])
    if (cfg["mixup"] > 0 or cfg["cutmix"] > 0) and cfg["batch_size"] < 2:  # (every 1-image batch dropped: no training)
        raise UsageError(
            f"--batch-size {cfg['batch_size']} with mixup / cutmix (--mixup {cfg['mixup']:g}, --cutmix "
            f"{cfg['cutmix']:g}): they pair the images of a batch, so it needs at least 2; pass -b 2 or more, or "
            "--mixup 0 --cutmix 0"
        )
    if cfg["dataset"] == "imagefolder" and not cfg["data_dir"]:
        raise UsageError("--data-dir is required with --dataset imagefolder (ImageNet layout: DIR/train/<class>/<img>)")
    if cfg["dataset"] == "fashion_mnist" and cfg["val_split"] == "val":
        cfg["val_split"] = "test"
    if cfg["torchcompile_mode"] != "default" and not cfg["torchcompile"]:
        raise UsageError(f"--torchcompile-mode {cfg['torchcompile_mode']} needs --torchcompile")
    if cfg["torchcompile_mode"] == "reduce-overhead" and cfg["grad_accum_steps"] > 1:
        raise UsageError(f"--torchcompile-mode reduce-overhead with --grad-accum-steps {cfg['grad_accum_steps']}: "
                         "not supported (each micro-step's CUDA-graph replay reuses the gradient buffers the previous "
                         "one left in .grad); use --grad-accum-steps 1 or another mode")  # fmt: skip
    return cfg, source


#: Model arguments that train passes itself (key -> its flag): not to be repeated in --model-kwargs.
DEDICATED = {"img_size": "--img-size", "num_classes": "--num-classes", "pretrained": "--pretrained",
             "drop_rate": "--drop", "drop_path_rate": "--drop-path"}  # fmt: skip


def run_dir_of(cfg: dict[str, Any]) -> Path:
    return Path(cfg["output"]) / (cfg["experiment"] or f"{cfg['model']}-{cfg['img_size']}")


# Training
def set_aside_old_log(run_dir: Path) -> Path | None:
    """Before a fresh run (not a resumed one) writes to a folder that a run without checkpoints left (stopped before
    its first): that run's ``log.jsonl`` renamed to ``log.previous-N.jsonl`` (the first free N), so the new run's
    records are not appended after the old ones; returns the new name, or ``None`` if there was no log."""
    old = run_dir / "log.jsonl"
    if not old.is_file():
        return None
    n = 1
    while (target := run_dir / f"log.previous-{n}.jsonl").exists():
        n += 1
    old.rename(target)
    return target


class _RunLog:
    """JSONL records (``RUN_DIR/log.jsonl``, appended: a resumed run continues the file) and optional TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.file = open(run_dir / "log.jsonl", "a") if enabled else None  # noqa: SIM115
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch", "time"):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _say(accelerator, text: str) -> None:
    if accelerator.is_main_process:
        print(text, flush=True)


def _fmt_time(seconds: float) -> str:
    return str(dt.timedelta(seconds=int(max(seconds, 0))))


def _default_loss(criterion: nn.Module) -> Callable:
    def loss_fn(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return criterion(model(images), targets)

    return loss_fn


class _StepModule(nn.Module):
    """The model and the loss's trainable parts (``extra``) under one module whose forward computes the loss: this is
    what ``accelerate`` wraps (DDP or FSDP), so that every forward goes through the wrapper, every trained parameter's
    gradient is reduced across processes and FSDP gathers each shard unit's weights when it runs. Called with images
    only, it returns the model's logits (evaluation). ``_no_split_modules`` names the block classes FSDP shards as
    units."""

    def __init__(self, model: nn.Module, extra: nn.Module | None, loss_fn: Callable) -> None:
        super().__init__()
        self.model, self.extra, self.loss_fn = model, extra, loss_fn
        self._no_split_modules = _block_classes(model)

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return self.model(images)
        return self.loss_fn(self.model, images, targets)


def _block_classes(model: nn.Module) -> list[str]:
    """Class names of the entries of every ``blocks`` container (timm's name for a stage's or a model's blocks)."""
    names: list[str] = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "blocks" and isinstance(module, (nn.Sequential, nn.ModuleList)):
            for child in module.children():
                if type(child).__name__ not in names:
                    names.append(type(child).__name__)
    return names


def new_accelerator(**kwargs):
    """An ``accelerate.Accelerator`` for one run, after clearing the settings a previous run in this process left.

    accelerate keeps one process-wide ``AcceleratorState``: a second run with another ``mixed_precision`` (a notebook
    that trains, then fine-tunes in bf16) was refused with "AcceleratorState has already been initialized". The
    distributed part (``PartialState``: process group, ranks) is kept, so this is safe under ``torchrun`` too.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(**kwargs)


def _fsdp_plugin():
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",  # the classes of _StepModule._no_split_modules
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=False,
    )


def _train_transform(model: nn.Module, cfg: dict[str, Any]):
    from timm.data import create_transform, resolve_data_config

    size = cfg["img_size"]
    data_cfg = resolve_data_config({"input_size": (3, size, size)}, model=model)
    try:
        transform = create_transform(
            input_size=(3, size, size),
            is_training=True,
            no_aug=cfg["no_aug"],
            hflip=cfg["hflip"],
            color_jitter=cfg["color_jitter"],
            auto_augment=cfg["aa"],
            interpolation=cfg["interpolation"] or data_cfg["interpolation"],
            mean=data_cfg["mean"],
            std=data_cfg["std"],
            re_prob=cfg["reprob"],
            re_mode=cfg["remode"],
        )
    except (AssertionError, ValueError, KeyError, IndexError) as e:  # timm asserts on an unknown --aa policy
        aa = f" --aa {cfg['aa']!r}" if cfg["aa"] else ""
        raise UsageError(
            f"timm's create_transform refused the augmentation settings{aa}: {e}; --aa takes timm's policy strings, "
            "e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, 3a, v0, original"
        ) from e
    return patch_posterize(transform)


def _resolve_resume(cfg: dict[str, Any], run_dir: Path) -> Path | None:
    resume = cfg["resume"]
    if not resume:
        found = ckpt.latest_checkpoint(run_dir)
        if found is not None:
            raise UsageError(
                f"run folder {str(run_dir)!r} already has checkpoints (newest: {found.name}); pass --resume auto to "
                "continue it, or another --output / --experiment"
            )
        return None
    if resume == "auto":
        return ckpt.latest_checkpoint(run_dir)
    p = Path(resume)
    if (p / ckpt.MARKER).is_file():
        found = p
    elif p.is_dir() and ckpt.latest_checkpoint(p) is not None:
        found = ckpt.latest_checkpoint(p)
    else:
        raise UsageError(f"--resume {resume!r}: not 'auto', a complete checkpoint folder, or a run folder with one")
    own = ckpt.latest_checkpoint(run_dir)
    if own is not None and found.resolve().parent != (run_dir / ckpt.CKPT_SUBDIR).resolve():
        raise UsageError(
            f"--resume {resume!r} continues another run ({str(found.parent.parent)!r}) but the run folder "
            f"{str(run_dir)!r} already has checkpoints of its own (newest: {own.name}), which the continuation would "
            "replace; pass another --output / --experiment, or --resume auto to continue this run folder"
        )
    return found


def train(
    cfg: dict[str, Any], *, command: str = "", loss_fn: Callable | None = None, setup: Callable | None = None
) -> dict[str, Any]:
    """Train with the resolved configuration ``cfg`` (see :func:`resolve_config`); returns a summary dict
    (``run_dir``, ``step``, ``epoch``, ``last_eval``, ``skipped``). ``loss_fn`` and ``setup``: see the module
    docstring."""
    import yaml
    from accelerate.utils import DistributedType, set_seed
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    if cfg["tensorboard"]:
        try:
            from torch.utils import tensorboard  # noqa: F401
        except ImportError as e:
            raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
    mixed = {"bfloat16": "bf16", "float16": "fp16"}[cfg["amp_dtype"]] if cfg["amp"] else "no"
    plugin = _fsdp_plugin() if cfg["fsdp"] else None
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun / accelerate launch
    # accelerate forms a multi-process CPU group (gloo) only when told to run on the CPU
    cpu = cfg["cpu"] or (launched > 1 and not torch.cuda.is_available())
    accelerator = new_accelerator(mixed_precision=mixed, cpu=cpu, fsdp_plugin=plugin)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if world != launched:
        raise UsageError(f"launched as {launched} processes (WORLD_SIZE) but accelerate formed a group of {world} "
                         f"({accelerator.distributed_type.value}): the processes would overwrite one run")  # fmt: skip
    if mixed == "fp16" and device.type == "cpu":  # (accelerate turns float16 autocast off on the CPU, silently)
        raise UsageError("--amp --amp-dtype float16 does not run on the CPU (accelerate turns it off): use "
                         "--amp-dtype bfloat16, or train on a GPU")  # fmt: skip
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if cfg["fsdp"] and not fsdp:
        raise UsageError(f"--fsdp needs several GPU processes (accelerate launch --num_processes N or torchrun); this "
                         f"run is {accelerator.distributed_type.value} with {world} process(es)")  # fmt: skip
    if fsdp and not accelerator.is_fsdp2:
        raise UsageError("FSDP1 (accelerate's default FSDP plugin) is not supported: pass --fsdp, which uses FSDP2")
    run_dir = run_dir_of(cfg)
    if (problem := folder_problem(run_dir)) is not None:
        raise UsageError(f"run folder (--output / --experiment): {problem}")
    resume_from = _resolve_resume(cfg, run_dir)
    set_seed(cfg["seed"])  # the same initial weights in every process: FSDP shards them without broadcasting

    # data
    train_ds = create_dataset(cfg["dataset"], cfg["data_dir"], cfg["train_split"])
    val_ds = (
        create_dataset(cfg["dataset"], cfg["data_dir"], cfg["val_split"], evaluation=True) if cfg["val_split"] else None
    )
    num_classes = cfg["num_classes"] or len(train_ds.classes)
    if num_classes < len(train_ds.classes):  # (an index error at the first step, after the run folder was made)
        raise UsageError(f"the data has {len(train_ds.classes)} classes but --num-classes is {num_classes}: pass at "
                         f"least {len(train_ds.classes)}, or leave it out (the data's)")  # fmt: skip
    if val_ds is not None and val_ds.classes != train_ds.classes:
        raise DataError(f"train classes {train_ds.classes[:5]}... differ from validation classes {val_ds.classes[:5]}")

    # model
    model = build_model(
        cfg["model"],
        num_classes=num_classes,
        img_size=cfg["img_size"],
        pretrained=cfg["pretrained"],
        drop_rate=cfg["drop"],
        drop_path_rate=cfg["drop_path"],
        **cfg["model_kwargs"],
    )
    if cfg["initial_checkpoint"]:
        load_model_weights(model, resolve_checkpoint(cfg["initial_checkpoint"]), cfg["model"])
    if cfg["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    model.to(device)
    check_takes_images(model, cfg["img_size"], device, f"model {cfg['model']!r}")
    extra = setup(model, accelerator) if setup is not None else None
    set_seed(cfg["seed"] + 1 + rank)  # from here on each process draws its own (dropout, mixup, masks)

    batch, accum = cfg["batch_size"], cfg["grad_accum_steps"]
    sampler = EpochSampler(len(train_ds), shuffle=True, seed=cfg["seed"], num_replicas=world, rank=rank,
                           repeats=max(cfg["aug_repeats"], 1))  # fmt: skip
    batches_per_epoch = len(sampler) // batch
    if batches_per_epoch == 0:
        raise DataError(f"{len(train_ds)} training images over {world} process(es) is less than one batch ({batch})")
    updates_per_epoch = math.ceil(batches_per_epoch / accum)
    workers = cfg["workers"]
    train_set = SeededTransform(train_ds, _train_transform(model, cfg))
    loader = DataLoader(
        train_set,
        batch_size=batch,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        pin_memory=cfg["pin_mem"] and device.type == "cuda",
        persistent_workers=cfg["persistent_workers"] and workers > 0,
        collate_fn=collate_skipping,
        generator=torch.Generator().manual_seed(cfg["seed"]),  # iter() would draw worker seeds from the global one
    )
    val_loader = None
    if val_ds is not None:
        val_loader = DataLoader(
            SeededTransform(val_ds, eval_transform(model, cfg["img_size"], cfg["crop_pct"], cfg["interpolation"])),
            batch_size=cfg["validation_batch_size"] or batch,
            sampler=ShardedEvalSampler(len(val_ds), num_replicas=world, rank=rank),
            num_workers=workers,
            pin_memory=cfg["pin_mem"] and device.type == "cuda",
            persistent_workers=cfg["persistent_workers"] and workers > 0,
            collate_fn=collate_skipping,
            generator=torch.Generator().manual_seed(cfg["seed"]),
        )

    # optimisation
    global_batch = batch * accum * world
    lr = cfg["lr"] if cfg["lr"] is not None else cfg["lr_base"] * global_batch / cfg["lr_base_size"]
    opt_kwargs = {"eps": cfg["opt_eps"]} if cfg["opt_eps"] is not None else {}
    optimizer = create_optimizer_v2(
        model, opt=cfg["opt"], lr=lr, weight_decay=cfg["weight_decay"], momentum=cfg["momentum"], **opt_kwargs
    )
    if extra is not None:
        extra.to(device)
        params = [p for p in extra.parameters() if p.requires_grad]
        for group, wd in (([p for p in params if p.ndim > 1], cfg["weight_decay"]), ([p for p in params if p.ndim
                          <= 1], 0.0)):  # fmt: skip
            if group:
                optimizer.add_param_group({"params": group, "weight_decay": wd})
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg["sched"],
        num_epochs=cfg["epochs"],
        warmup_epochs=cfg["warmup_epochs"],
        warmup_lr=cfg["warmup_lr"],
        min_lr=cfg["min_lr"],
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    if cfg["min_lr"] > lr or (cfg["warmup_epochs"] and cfg["warmup_lr"] > lr):
        _say(accelerator, f"note: the schedule rises above the peak lr {lr:.3g}: --min-lr {cfg['min_lr']:.3g}, "
             f"--warmup-lr {cfg['warmup_lr']:.3g} (lower them, or raise --lr / --lr-base)")  # fmt: skip
    if cfg["warmup_epochs"] >= cfg["epochs"]:
        _say(accelerator, f"note: the warm-up ({cfg['warmup_epochs']} epochs) covers the whole run "
             f"({cfg['epochs']} epochs): the lr never reaches {lr:.3g}")  # fmt: skip
    mixup_fn = None
    if cfg["mixup"] > 0 or cfg["cutmix"] > 0:
        mixup_fn = Mixup(
            mixup_alpha=cfg["mixup"],
            cutmix_alpha=cfg["cutmix"],
            prob=cfg["mixup_prob"],
            switch_prob=cfg["mixup_switch_prob"],
            mode=cfg["mixup_mode"],
            label_smoothing=cfg["smoothing"],
            num_classes=num_classes,
        )
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif cfg["smoothing"] > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=cfg["smoothing"])
    else:
        criterion = nn.CrossEntropyLoss()
    loss_fn = loss_fn or _default_loss(criterion)

    # state; the weights are loaded before accelerate wraps (and, with FSDP, shards) the model
    epoch, position, step, skipped_total = 0, 0, 0, 0
    weights_meta = {
        "format": "visionlin",
        "model": cfg["model"],
        "num_classes": str(num_classes),
        "class_names": json.dumps(list(train_ds.classes)),
    }  # (validate maps a folder's labels by name)
    optimizer_format = "fsdp_full" if fsdp else "torch"
    rng_state = ts = state = None
    if resume_from is not None:
        state = ckpt.read_checkpoint(resume_from, rank)
        saved_model = state["metadata"].get("model")
        if saved_model != cfg["model"] or state["metadata"].get("num_classes") != str(num_classes):
            raise ckpt.CheckpointError(
                f"checkpoint {str(resume_from)!r} is of model {saved_model!r} with "
                f"{state['metadata'].get('num_classes')} classes; this run builds {cfg['model']!r} with {num_classes}"
            )
        ts = state["train_state"]
        if ts.get("processes", 1) != world:
            raise ckpt.CheckpointError(
                f"checkpoint {str(resume_from)!r} was written by {ts.get('processes', 1)} process(es); this run has "
                f"{world}: resume with the same number of processes (the data order, each process's generators and "
                "the position in the epoch are per process)"
            )
        if ts.get("optimizer_format", "torch") != optimizer_format:
            raise ckpt.CheckpointError(
                f"checkpoint {str(resume_from)!r} was written {'with' if not fsdp else 'without'} --fsdp; resume it "
                f"{'with' if not fsdp else 'without'} --fsdp"
            )
        load_model_weights(model, resume_from / "model.safetensors", cfg["model"])
        if extra is not None:
            if not (resume_from / "extra.safetensors").is_file():
                raise ckpt.CheckpointError(f"{str(resume_from)!r} has no extra.safetensors (the distillation parts)")
            extra.load_state_dict(ckpt.read_part(resume_from, "extra.safetensors", ckpt.load_weights))
        if state["rng"] is None:
            raise ckpt.CheckpointError(f"{str(resume_from)!r} has no generator state for process {rank}")
        if cfg["model_ema"] and state["ema"] is None:
            raise ckpt.CheckpointError(f"--model-ema given but {str(resume_from)!r} has no EMA weights")

    prepared, optimizer = accelerator.prepare(_StepModule(model, extra, loss_fn), optimizer)
    raw_model = accelerator.unwrap_model(prepared).model
    ema = None
    if cfg["model_ema"]:  # FSDP: each process averages its own shards (visionlin.train.ema)
        ema = make_ema(raw_model, sharded=fsdp, decay=cfg["model_ema_decay"], use_warmup=cfg["model_ema_warmup"])
    step_model = torch.compile(prepared, mode=cfg["torchcompile_mode"]) if cfg["torchcompile"] else prepared
    # CUDA graphs (reduce-overhead): each micro-step starts a new graph iteration, and what is kept past it is copied
    # out of the graph's memory, which the next replay overwrites
    graphs = cfg["torchcompile"] and cfg["torchcompile_mode"] == "reduce-overhead"
    eval_model = prepared if fsdp else raw_model  # a sharded model is only whole inside the wrapper's forward

    if state is not None:
        # this run's settings, which the checkpoint's optimizer state would overwrite (a changed --weight-decay was
        # reported as used and not applied)
        fresh = [{k: g[k] for k in _GROUP_SETTINGS if k in g} for g in optimizer.param_groups]
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(prepared, optimizer.optimizer, ts["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))  # fmt: skip
        else:
            optimizer.load_state_dict(ts["optimizer"])
        for group, settings in zip(optimizer.param_groups, fresh, strict=True):
            group.update(settings)
        moved = {k: (ts["config"].get(k), cfg[k]) for k in SCHEDULE_KEYS if ts["config"].get(k) != cfg[k]}
        old_sched = ts["scheduler"]
        for field in ("base_values", "t_initial"):  # the resolved lr (batch-scaled) and the steps of the schedule
            if field in old_sched and old_sched[field] != getattr(scheduler, field, old_sched[field]):
                moved[field] = (old_sched[field], getattr(scheduler, field))
        if not moved:
            scheduler.load_state_dict(old_sched)
        else:  # (the checkpoint's schedule was restored over the new one: a longer run spent its new epochs at lr 0)
            scheduler.step_update(num_updates=ts["step"])
            _say(accelerator, f"note: the learning-rate schedule follows this run's settings from step {ts['step']} "
                 "on: " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in moved.items()))  # fmt: skip
        if ema is not None:
            ema.load_full_state_dict(raw_model, state["ema"])
        if accelerator.scaler is not None and ts.get("scaler") is not None:
            accelerator.scaler.load_state_dict(ts["scaler"])
        epoch, position, step, skipped_total = ts["epoch"], ts["position"], ts["step"], ts["skipped"]
        rng_state = state["rng"]
        skipped_total = int(rng_state.get("skipped", skipped_total))
        changed = {k: (ts["config"].get(k), cfg[k]) for k in cfg if k not in NOT_COMPARED and ts["config"].get(k) !=
                   cfg[k]}  # fmt: skip
        if changed:
            _say(accelerator, "note: configuration differs from the checkpoint's (the losses will not be those of the "
                 "original run): " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))  # fmt: skip
        del state
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        stale = ckpt.remove_stale_temporaries(run_dir)
        if stale:
            print(f"removed {len(stale)} partial checkpoint(s) a stopped run left: {[p.name for p in stale]}")
        if resume_from is None and (moved := set_aside_old_log(run_dir)) is not None:
            print(f"note: {run_dir} had a log.jsonl of an earlier run without checkpoints: moved to {moved.name}")
        saved = {**cfg, "command": command, "lr_resolved": lr, "global_batch": global_batch, "processes": world}
        (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    accelerator.wait_for_everyone()
    log = _RunLog(run_dir, accelerator.is_main_process, cfg["tensorboard"])
    nparams = sum(p.numel() for p in raw_model.parameters())
    total_steps = updates_per_epoch * cfg["epochs"]
    where = f"resumed from {resume_from} at epoch {epoch} batch {position} step {step}" if resume_from else "fresh"
    _say(accelerator, f"train {cfg['model']} ({nparams / 1e6:.2f} M params, {num_classes} classes) on "
         f"{len(train_ds)} images: {cfg['epochs']} epochs x {updates_per_epoch} steps, global batch {global_batch}, "
         f"lr {lr:.3g}, {device}, {where}; run folder {run_dir}")  # fmt: skip
    log.write({"kind": "start", "step": step, "epoch": epoch, "resumed_from": str(resume_from or ""),
               "command": command, "params": nparams})  # fmt: skip

    # Any non-finite training loss since the last check, kept on the device (no host sync per step) and read where the
    # loss is read anyway (the log lines) and before every checkpoint, which also checks the weights: a diverged run
    # stops there, its earlier checkpoints kept, instead of saving NaN weights and exiting 0. (A float16 grad scaler
    # skips the steps of non-finite losses itself: only the weights are checked then.)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    checked_step = step

    def stop(error: Exception) -> None:
        log.write({"kind": "stopped", "step": step, "epoch": epoch, "error": str(error)})
        log.close()
        raise error

    def check_finite(weights: bool = False) -> None:
        nonlocal checked_step
        bad = nonfinite.clone()
        if weights:
            params = [getattr(q, "to_local", lambda q=q: q)().detach() for q in prepared.parameters()]  # FSDP shards
            bad |= ~torch.stack([torch.isfinite(q).all() for q in params]).all()
        if world > 1:
            bad = accelerator.reduce(bad.float(), "sum") > 0
        if bool(bad):
            what = "a non-finite training loss" if bool(nonfinite) or not weights else "non-finite weights"
            newest = ckpt.latest_checkpoint(run_dir)
            stop(TrainingDiverged(
                f"training diverged: {what} at epoch {epoch}, steps {checked_step + 1}..{step} (lr {lr:.3g}, weight "
                f"decay {cfg['weight_decay']:g}); stopped before saving it, the newest checkpoint is "
                f"{newest.name if newest else 'none'} in {str(run_dir)!r}. Lower --lr / --weight-decay, or pass "
                "--clip-grad"))  # fmt: skip
        checked_step = step

    def save(epoch_: int, position_: int, reason: str) -> None:
        check_finite(weights=True)
        rngs = [{**ckpt.capture_rng(), "skipped": skipped_total}]  # each process counts its own unreadable images
        if world > 1:
            from accelerate.utils import gather_object

            rngs = gather_object(rngs)
        if fsdp:  # every process takes part in gathering the full state; the main process receives it
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(prepared, options=opts)
            optimizer_state = get_optimizer_state_dict(prepared, optimizer.optimizer, options=opts)
            model_state = {k[len("model.") :]: v for k, v in full.items() if k.startswith("model.")}
            extra_state = {k[len("extra.") :]: v for k, v in full.items() if k.startswith("extra.")}
        elif accelerator.is_main_process:
            model_state, optimizer_state = raw_model.state_dict(), optimizer.state_dict()
            extra_state = extra.state_dict() if extra is not None else {}
        # every process: under FSDP the average is gathered (a collective); otherwise it is the copy's state dict
        ema_state = ema.full_state_dict(raw_model) if ema is not None else None
        if accelerator.is_main_process:
            train_state = {
                "optimizer": optimizer_state,
                "optimizer_format": optimizer_format,
                "processes": world,
                "scheduler": scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "epoch": epoch_,
                "position": position_,
                "step": step,
                "skipped": skipped_total,
                "config": cfg,
            }
            weights = {"model": model_state}
            if ema is not None:
                weights["ema"] = ema_state
            if extra is not None:
                weights["extra"] = extra_state
            path = ckpt.write_checkpoint(
                run_dir,
                step,
                weights=weights,
                weights_metadata=weights_meta,
                train_state=train_state,
                rng_states=dict(enumerate(rngs)),
                summary={"epoch": epoch_, "position": position_, "step": step, "reason": reason},
            )
            pruned = ckpt.prune_checkpoints(run_dir, cfg["checkpoint_hist"])
            print(f"checkpoint {path.name} ({reason}: epoch {epoch_} batch {position_})"
                  + (f", removed {', '.join(p.name for p in pruned)}" if pruned else ""), flush=True)  # fmt: skip
        accelerator.wait_for_everyone()

    use_bar = accelerator.is_main_process and sys.stderr.isatty()
    try:
        from tqdm import tqdm
    except ImportError:
        use_bar = False
    last_eval: dict[str, Any] = {}
    run_start, steps_this_run = time.perf_counter(), 0
    if rng_state is not None:
        ckpt.restore_rng(rng_state)
    prepared.train()
    where_ = f"[process {rank}] " if world > 1 else ""
    stand_in: list[tuple[torch.Tensor, torch.Tensor]] = []

    def stand_in_batch() -> tuple[torch.Tensor, torch.Tensor]:
        """The first readable training image as a batch of one (soft target with mixup): what a process whose
        micro-batch had nothing readable computes, at weight 0, so that the other processes' gradient reduction does
        not wait for it."""
        if not stand_in:
            for i in range(len(train_set)):
                img, target = train_set[i]
                if img is not None:
                    stand_in.append((img[None].to(device), torch.tensor([target], device=device)))
                    break
            else:
                raise DataError(f"none of the {len(train_set)} training images can be read")
        img, target = stand_in[0]
        if mixup_fn is not None:
            target = nn.functional.one_hot(target, num_classes).float()
        return img, target

    while epoch < cfg["epochs"]:
        if mixup_fn is not None and cfg["mixup_off_epoch"] and epoch >= cfg["mixup_off_epoch"]:
            mixup_fn.mixup_enabled = False
        sampler.set_epoch(epoch)
        sampler.set_start(position * batch)
        it = iter(loader)
        bar = tqdm(total=updates_per_epoch, initial=position // accum, desc=f"epoch {epoch}", leave=False,
                   dynamic_ncols=True) if use_bar else None  # fmt: skip
        wait_time = busy_time = 0.0
        epoch_start, epoch_images, first_bad = position, 0, ""
        while position < batches_per_epoch:
            group = min(accum, batches_per_epoch - position)
            t0 = time.perf_counter()
            micro_losses, n_images, wait = [], 0, 0.0
            for micro in range(group):
                tw = time.perf_counter()
                images, targets, bad = next(it)
                wait += time.perf_counter() - tw
                position += 1
                if bad:
                    skipped_total += len(bad)
                    first_bad = first_bad or bad[0]
                    for reason in bad:
                        print(f"{where_}skipped unreadable image {reason}", flush=True)
                if images is not None:
                    images = images.to(device, non_blocking=True)
                    targets = targets.to(device, non_blocking=True)
                    if mixup_fn is not None:
                        if len(images) % 2:  # timm's Mixup pairs images: drop one of an odd (partly skipped) batch
                            images, targets = images[:-1], targets[:-1]
                        if len(images):
                            images, targets = mixup_fn(images, targets)
                weight = 1.0
                if images is None or len(images) == 0:
                    if world == 1:
                        continue
                    (images, targets), weight = stand_in_batch(), 0.0
                sync = micro == group - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(prepared):
                    if graphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    loss = step_model(images, targets)
                    accelerator.backward(loss / group if weight else loss * 0.0)
                if weight:
                    micro_losses.append(loss.detach().float().clone() if graphs else loss.detach().float())
                    n_images += len(images)
                    if accelerator.scaler is None:
                        nonfinite |= ~torch.isfinite(micro_losses[-1])
            if cfg["clip_grad"] is not None:
                if cfg["clip_mode"] == "norm":
                    accelerator.clip_grad_norm_(prepared.parameters(), cfg["clip_grad"])
                else:
                    accelerator.clip_grad_value_(prepared.parameters(), cfg["clip_grad"])
            step_lr = optimizer.param_groups[0]["lr"]  # the lr this step used (the log gave the next step's)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_this_run += 1
            scheduler.step_update(num_updates=step)
            if ema is not None:
                ema.update(raw_model, step=step)
            elapsed = time.perf_counter() - t0
            wait_time, busy_time = wait_time + wait, busy_time + elapsed
            epoch_images += n_images
            if bar is not None:
                bar.update(1)
            if step % cfg["log_interval"] == 0 or position >= batches_per_epoch:
                loss_value = float(torch.stack(micro_losses).mean()) if micro_losses else float("nan")
                if world > 1:
                    loss_value = float(accelerator.reduce(torch.tensor(loss_value, device=device), "mean"))
                lr_now = step_lr
                img_s = n_images * world / elapsed
                rate = (time.perf_counter() - run_start) / steps_this_run
                eta = rate * (total_steps - step)
                data_pct = 100 * wait_time / max(busy_time, 1e-9)
                rec = {"kind": "train", "epoch": epoch, "step": step, "batch": position, "loss": loss_value,
                       "lr": lr_now, "img_s": img_s, "data_wait_pct": data_pct}  # fmt: skip
                log.write(rec)
                line = (f"loss {loss_value:.6f} lr {lr_now:.3e} {img_s:.1f} img/s data {data_pct:.0f}% "
                        f"eta {_fmt_time(eta)}")  # fmt: skip
                if bar is not None:
                    bar.set_postfix_str(line)
                else:
                    _say(accelerator, f"epoch {epoch} step {step} ({position}/{batches_per_epoch}) {line}")
                check_finite()
            if cfg["recovery_interval"] and step % cfg["recovery_interval"] == 0 and position < batches_per_epoch:
                save(epoch, position, "recovery")
        if bar is not None:
            bar.close()
        if world > 1:
            epoch_images = int(accelerator.reduce(torch.tensor(epoch_images, device=device), "sum"))
        if epoch_images == 0 and epoch_start == 0:  # (ran "on 0 images" and saved the untrained weights)
            stop(DataError(no_image_read(train_ds, cfg["train_split"], [first_bad] if first_bad else [], "trained")))
        epoch, position = epoch + 1, 0
        scheduler.step(epoch)
        summary = {"kind": "epoch", "epoch": epoch - 1, "step": step,
                   "data_wait_pct": 100 * wait_time / max(busy_time, 1e-9)}  # fmt: skip
        if val_loader is not None:
            autocast = accelerator.autocast if cfg["amp"] else None
            m = evaluate(eval_model, val_loader, device, autocast=autocast, reduce=accelerator.reduce)
            if m["n"] == 0:  # (logged as val_loss 0.0000, val_n 0)
                stop(DataError(no_image_read(val_ds, cfg["val_split"], m["skipped"])))
            summary.update({"val_loss": m["loss"], "val_top1": m["top1"], "val_top5": m["top5"], "val_n": m["n"]})
            skipped_total += len(m["skipped"])
            if ema is not None:  # FSDP: the average in the model's own shards for the evaluation
                with ema.evaluated(raw_model, eval_model) as averaged:
                    e = evaluate(averaged, val_loader, device, autocast=autocast, reduce=accelerator.reduce)
                summary.update({"ema_val_loss": e["loss"], "ema_val_top1": e["top1"], "ema_val_top5": e["top5"]})
            last_eval = {k: v for k, v in summary.items() if k.startswith(("val", "ema"))}
        log.write(summary)
        _say(accelerator, f"epoch {epoch - 1} done: " + "  ".join(
            f"{k} {v:.4f}" for k, v in summary.items() if k not in ("kind", "epoch", "step")))  # fmt: skip
        save(epoch, 0, "epoch end")
    if world > 1:
        skipped_total = int(accelerator.reduce(torch.tensor(skipped_total, device=device), "sum"))
    log.write({"kind": "end", "step": step, "epoch": epoch, "skipped_images": skipped_total, **last_eval})
    log.close()
    if skipped_total:
        _say(accelerator, f"skipped {skipped_total} unreadable image(s) in total, all processes (listed above)")
    if accelerator.is_main_process and cfg["plot"]:
        from .plot import plot_run

        try:
            _say(accelerator, f"wrote {plot_run(run_dir)}")
        except ImportError as e:
            _say(accelerator, f"no curves: {e}")
    # Every process reaches the end (the main one writes the curves) before the group is torn down.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"run_dir": run_dir, "step": step, "epoch": epoch, "last_eval": last_eval, "skipped": skipped_total}


class TrainingDiverged(RuntimeError):
    """The training loss or the weights became non-finite: the run stopped before checkpointing them (exit status 1)."""


# Command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option as a flag (``--weight-decay``; booleans also as ``--no-...``), with no argparse default: only the
    flags actually given override the recipe."""
    p.add_argument("-c", "--config", default=None, help=f"recipe: a shipped name ({', '.join(list_recipes())}) or a "
                   "YAML file of option: value; flags override it")  # fmt: skip
    for o in OPTIONS:
        names = [f"--{o.key.replace('_', '-')}"] + ([o.short] if o.short else [])
        default = f" (default: {o.default})" if o.default not in (None, {}) else ""
        kw: dict[str, Any] = {"dest": o.key, "default": argparse.SUPPRESS, "help": o.help + default}
        if o.type is BOOL:
            kw["action"] = argparse.BooleanOptionalAction
        elif o.key == "model_kwargs":
            kw.update(nargs="*", metavar="KEY=VALUE")
        else:
            kw["type"] = o.type
            if o.choices:
                kw["choices"] = o.choices
        p.add_argument(*names, **kw)


def execute(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    given = {o.key: getattr(args, o.key) for o in OPTIONS if hasattr(args, o.key)}
    try:
        cfg, _ = resolve_config(given, args.config)
        from .validate import check_model_name

        check_model_name(cfg["model"])
        train(cfg, command=shlex.join(["visionlin", *argv]))
    except (UsageError, DataError, ckpt.CheckpointError) as e:
        parser.error(str(e))
    except TrainingDiverged as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m visionlin.train``: the same as ``visionlin train``."""
    from ..cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])
