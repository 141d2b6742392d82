"""``visionlin validate``: top-1 / top-5, loss and img/s of a model on a folder (or Fashion-MNIST) at a chosen size.

The checkpoint can be ours (a ``.safetensors`` written by ``visionlin train``, a checkpoint folder or a run folder,
whose newest checkpoint is used) or the authors' (any other file, loaded through timm's pretrained path, i.e. the
model's ``checkpoint_filter_fn``, which maps their key names and resamples position tables to the model's size).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .._io import atomic_write
from ._parse import checked
from .checkpoint import (
    READ_ERRORS,
    SELF_FILLED,
    CheckpointError,
    latest_checkpoint,
    load_weights,
    read_error,
    read_weights_metadata,
    torch_load,
)
from .data import DATASETS, DataError, SeededTransform, collate_skipping, create_dataset
from .scaling import MAX_SIZE

__all__ = [
    "UsageError",
    "add_arguments",
    "build_model",
    "eval_transform",
    "evaluate",
    "execute",
    "load_model_weights",
    "parse_kwargs",
    "resolve_checkpoint",
    "validate",
]


class UsageError(ValueError):
    """A bad flag, recipe key, model name, data folder or checkpoint: reported as a usage error (exit status 2)."""


def parse_kwargs(items: list[str] | dict | None) -> dict[str, Any]:
    """``["depth=2", "img_size=32", "attn_layer=softmax"]`` -> ``{"depth": 2, "img_size": 32, "attn_layer":
    "softmax"}`` (values read as Python literals where they are, else as strings); a dict passes through."""
    if items is None:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"model kwarg {item!r} is not KEY=VALUE (e.g. depth=2)")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def check_dedicated_kwargs(kwargs: dict[str, Any], dedicated: dict[str, str], option: str = "--model-kwargs") -> None:
    """Refuse a ``KEY=VALUE`` of ``option`` whose key has its own flag (``dedicated``: key -> flag): the command passes
    that key itself, so a second value failed deep inside as ``got multiple values for keyword argument``."""
    for key, flag in dedicated.items():
        if key in kwargs:
            raise UsageError(f"{option} {key}={kwargs[key]!r}: {key} has its own flag here, pass {flag} instead")


def check_model_name(name: str | None) -> str:
    import timm

    import visionlin  # noqa: F401  (registers the models)

    if not name:
        raise UsageError("--model is required (e.g. --model infvit_small; `visionlin list` shows ours)")
    base = name.split(".")[0]
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"unknown model {name!r}{hint}; any timm or visionlin model name (`visionlin list`)")
    return name


def build_model(name: str, *, num_classes: int | None, img_size: int | None, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with ``img_size`` passed where the model takes it (ViTs, ours) and left out where it
    does not (convnets); a bad keyword is a :class:`UsageError` naming it."""
    import timm

    check_model_name(name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    attempts = [{**kwargs, "img_size": img_size}, kwargs] if img_size and "img_size" not in kwargs else [kwargs]
    for i, kw in enumerate(attempts):
        try:
            model = timm.create_model(name, **kw)
        except TypeError as e:
            if i + 1 == len(attempts):
                raise UsageError(f"cannot build {name!r} with {kwargs}: {e}") from e
        except ValueError as e:
            raise UsageError(f"cannot build {name!r} with {kw}: {e}") from e
        else:
            if img_size:
                _check_img_size(name, kw, img_size)
            return model
    raise AssertionError("unreachable")


def _check_img_size(name: str, kw: dict[str, Any], img_size: int) -> None:
    """Refuse an ``img_size`` the model cannot take before anything is written (a training run's folder, a
    validation's data pass): one forward of a copy built on the meta device. Our models' input check raises
    ``ValueError`` naming the size and what is allowed, timm's ViTs assert; any other failure there belongs to the meta
    device (it has no autocast and no kernels), not to the size, and is left to the real run."""
    import timm

    probe_kw = {k: v for k, v in kw.items() if k != "pretrained"}  # (no download for a probe)
    try:
        probe = timm.create_model(name, device="meta", **probe_kw).eval()  # (a throwaway; BatchNorm takes batch 1)
        with torch.no_grad():
            probe(torch.empty(1, kw.get("in_chans", 3), img_size, img_size, device="meta"))
    except (ValueError, AssertionError) as e:
        raise UsageError(f"--img-size {img_size} does not fit {name!r}: {e}") from e
    except Exception:  # noqa: BLE001, S110 - the meta device's limits, not the size's: the real run decides
        pass


def check_takes_images(model: torch.nn.Module, img_size: int, device: torch.device, what: str) -> None:
    """One forward of two blank ``[3, img_size, img_size]`` images (what the data pipelines give) on ``device``, in
    eval mode without gradients, before anything is written: a model that cannot take them failed at the first
    training step, with a traceback, after the run folder and its config were written. ``UsageError`` with the cause.
    """
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, 3, img_size, img_size, device=device))
    except torch.OutOfMemoryError:
        raise  # (not the images' fault)
    except Exception as e:  # noqa: BLE001 - whatever the model raises on such images, named
        raise UsageError(
            f"{what} cannot take the data's images ([B, 3, {img_size}, {img_size}]): {type(e).__name__}: {e}"
        ) from e
    finally:
        model.train(was_training)


#: The largest --img-size / eval resize: the demo's limit (larger failed as an allocation error).
MAX_IMG_SIZE = MAX_SIZE


def img_size_arg(text: str) -> int:
    return checked(int, text, lambda v: 0 < v <= MAX_IMG_SIZE, f"a positive integer up to {MAX_IMG_SIZE}")


def check_img_size(img_size: int) -> None:
    if img_size > MAX_IMG_SIZE:
        raise UsageError(f"--img-size {img_size} is too large: at most {MAX_IMG_SIZE} pixels")


def check_crop_pct(crop_pct: float | None, img_size: int) -> None:
    """The evaluation resize goes to ``floor(img_size / crop_pct)`` pixels before the center crop (timm's
    ``transforms_imagenet_eval``): refuse a ``crop_pct`` for which that is below 1 px or above :data:`MAX_IMG_SIZE`
    (it failed inside PIL after a whole training epoch)."""
    if crop_pct is None:
        return
    scale = math.floor(img_size / crop_pct) if 0 < crop_pct < math.inf else 0
    if not 1 <= scale <= MAX_IMG_SIZE:
        raise UsageError(
            f"--crop-pct {crop_pct} with --img-size {img_size} resizes the images to {scale} px before the center crop "
            f"(floor(img_size / crop_pct)); allowed: {img_size / (MAX_IMG_SIZE + 1):.3g} < crop_pct <= {img_size} "
            "(typically 0.875 to 1)"
        )


#: Worker processes allowed for --workers: more only exhausted the machine (each one holds a copy of the dataset).
MAX_WORKERS = max(32, 8 * (os.cpu_count() or 1))


def workers_arg(text: str) -> int:
    return checked(int, text, lambda v: 0 <= v <= MAX_WORKERS, f"a number of worker processes in 0..{MAX_WORKERS}")


def resolve_checkpoint(path: str | Path, *, ema: bool = False) -> Path:
    """A weights file from a ``.safetensors`` path, a checkpoint folder or a run folder (its newest checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"checkpoint {str(p)!r} does not exist")
    if p.is_dir():
        ckpt = p if (p / "complete.json").is_file() else latest_checkpoint(p)
        if ckpt is None:
            raise UsageError(f"{str(p)!r} is neither a checkpoint folder nor a run folder with complete checkpoints")
        name = "ema.safetensors" if ema else "model.safetensors"
        if not (ckpt / name).is_file():
            raise UsageError(
                f"checkpoint {str(ckpt)!r} has no {name}" + (" (trained without --model-ema)" if ema else "")
            )
        return ckpt / name
    return p


def _read(path: Path, read: Callable[[Path], Any]) -> Any:
    """``read(path)`` with a missing, unreadable or malformed file as :class:`CheckpointError` naming the path."""
    if not path.is_file():
        what = "is a folder, not a weights file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {str(path)!r} {what}")
    try:
        return read(path)
    except READ_ERRORS as e:
        kind = "safetensors file" if path.suffix == ".safetensors" else "torch.save'd state dict"
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} as a {kind} ({read_error(e)}); weights files are "
            ".safetensors or a torch.save'd state dict (.pth / .pt / .bin)"
        ) from e


def check_weights_model(path: str | Path, model_name: str) -> dict[str, str]:
    """Refuse our safetensors written for another model (before anything is built); returns its metadata."""
    meta = _read(Path(path), read_weights_metadata) if Path(path).suffix == ".safetensors" else {}
    saved = meta.get("model")
    if meta.get("format") == "visionlin" and saved and saved.split(".")[0] != model_name.split(".")[0]:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was trained as model {saved!r} (num_classes={meta.get('num_classes')}); "
            f"this run builds {model_name!r}. Pass --model {saved} or another checkpoint"
        )
    return meta


def load_model_weights(model: nn.Module, path: str | Path, model_name: str) -> str:
    """Load our safetensors (checked to be of ``model_name``, strict) or the authors' file through the model's
    ``checkpoint_filter_fn``; returns how it was loaded. Mismatches raise :class:`CheckpointError`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        meta = check_weights_model(path, model_name)
        state = _read(path, load_weights)
        if meta.get("format") == "visionlin":
            _load_strict(model, state, path, model_name)
            return "visionlin safetensors"
    else:
        state = _read(path, torch_load)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if isinstance(state, dict) and "state_dict" in state and "model" not in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a state dict")
    try:
        if filter_fn is not None:
            state = filter_fn(state, model)
        elif isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit {model_name!r}: {e}") from e
    _load_strict(model, state, path, model_name)
    return "checkpoint_filter_fn" if filter_fn is not None else "state dict"


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, model_name: str) -> None:
    own = model.state_dict()
    if odd := [k for k in own if k in state and not isinstance(state[k], torch.Tensor)][:6]:
        raise CheckpointError(f"checkpoint {str(path)!r}: entries {odd} are not tensors")
    # (a grid record the model fills in itself for checkpoints saved before it had one: its _load_from_state_dict
    # decides; counted missing here, every hierarchical checkpoint from before stop 55 was refused)
    missing = sorted(k for k in set(own) - set(state) if not k.endswith(SELF_FILLED))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and
              tuple(state[k].shape) != tuple(v.shape)]  # fmt: skip
    if missing or unexpected or shapes:
        parts = [f"{label} {vals[:6]}{' ...' if len(vals) > 6 else ''}" for label, vals in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped (file vs model)", shapes))
                 if vals]  # fmt: skip
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit {model_name!r}: " + "; ".join(parts))
    try:
        model.load_state_dict(state, strict=True)
    except ValueError as e:  # the model's own checks (a grid record that differs or cannot be inferred)
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit {model_name!r}: {e}") from e


def eval_transform(model: nn.Module, img_size: int, crop_pct: float | None = None, interpolation: str | None = None):
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({"input_size": (3, img_size, img_size)}, model=model)
    if interpolation == "random":  # a training augmentation; evaluation is deterministic (bicubic, as timm does)
        interpolation = "bicubic"
    return create_transform(
        input_size=(3, img_size, img_size),
        is_training=False,
        interpolation=interpolation or cfg["interpolation"],
        mean=cfg["mean"],
        std=cfg["std"],
        crop_pct=cfg["crop_pct"] if crop_pct is None else crop_pct,  # (0 is refused, not swapped for the default)
    )


def accuracy_counts(logits: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> list[int]:
    k = min(max(topk), logits.shape[-1])
    pred = logits.topk(k, dim=-1).indices
    hit = pred.eq(target[:, None])
    return [int(hit[:, : min(t, k)].any(dim=-1).sum()) for t in topk]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    *,
    autocast: Any = None,
    reduce: Any = None,
) -> dict[str, Any]:
    """Top-1 / top-5 (percent), mean cross-entropy and img/s over ``loader`` (batches from :func:`collate_skipping`).

    ``reduce(tensor) -> tensor`` sums counts over processes (``accelerator.reduce``) when the loader is sharded.
    Samples with target ``-1`` (the padding of :class:`~visionlin.train.data.ShardedEvalSampler`) go through the model
    and are left out of every metric, so each sample counts once over all processes.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top1, top5, n
    skipped: list[str] = []
    start = time.perf_counter()
    for images, targets, bad in loader:
        skipped += bad
        if images is None:
            continue
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast() if autocast else nullcontext():
            logits = model(images)
        logits, real = logits.float(), targets >= 0
        if not bool(real.all()):  # padding of ShardedEvalSampler (target -1): computed, not counted
            logits, targets = logits[real], targets[real]
            if len(targets) == 0:
                continue
        if int(targets.max()) >= logits.shape[-1]:
            raise UsageError(f"label {int(targets.max())} but the model has {logits.shape[-1]} classes")
        loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
        top1, top5 = accuracy_counts(logits, targets)
        totals += torch.tensor([float(loss), top1, top5, len(targets)], dtype=torch.float64)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    if reduce is not None:
        totals = reduce(totals.to(device)).cpu()
    model.train(was_training)
    n = int(totals[3])
    return {
        "loss": float(totals[0] / max(n, 1)),
        "top1": float(100 * totals[1] / max(n, 1)),
        "top5": float(100 * totals[2] / max(n, 1)),
        "n": n,
        "img_s": n / elapsed if elapsed > 0 else float("nan"),
        "skipped": skipped,
    }


def _map_labels_by_name(ds: Any, names_json: str | None, weights: Path | None) -> None:
    """Give the folder's samples the labels the checkpoint's training run gave their class names (recorded in its
    weights' metadata since stop 55): a validation folder without some of the training classes numbered the rest from
    0 and scored them against the wrong outputs, exit 0. ``UsageError`` for a class the run did not train on."""
    if names_json is None or not hasattr(ds, "samples"):
        return
    try:
        trained = json.loads(names_json)
    except ValueError:
        return  # (not ours to judge: an unreadable record leaves the labels as they are)
    if not isinstance(trained, list) or list(ds.classes) == trained:
        return
    unknown = [c for c in ds.classes if c not in trained]
    if unknown:
        raise UsageError(
            f"the data's classes {unknown[:5]} are not among the {len(trained)} classes {str(weights)!r} was trained "
            f"on ({trained[:5]}{' ...' if len(trained) > 5 else ''})"
        )
    index = {c: trained.index(c) for c in ds.classes}
    ds.samples = [(path, index[ds.classes[t]]) for path, t in ds.samples]
    ds.targets = [t for _, t in ds.samples]
    ds.classes, ds.class_to_idx = list(trained), {c: i for i, c in enumerate(trained)}  # (the labels' names now)


def validate(
    model_name: str,
    *,
    checkpoint: str | None,
    data_dir: str | None,
    dataset: str = "imagefolder",
    split: str = "val",
    img_size: int = 224,
    batch_size: int = 64,
    workers: int = 2,
    num_classes: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    use_ema: bool = False,
    crop_pct: float | None = None,
    amp: bool = False,
    device: str | None = None,
    pretrained: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model_name`` (with ``checkpoint`` loaded) on ``split`` of the data; returns the metrics dict of
    :func:`evaluate` plus ``model``, ``checkpoint``, ``loaded_via``, ``img_size``, ``num_classes``."""
    check_model_name(model_name)
    ds = create_dataset(dataset, data_dir, split, evaluation=True)
    if use_ema and not checkpoint:  # (else ignored: the run would report the plain weights as the EMA's)
        raise UsageError("use_ema (--use-ema) needs a checkpoint (--checkpoint) holding EMA weights")
    if crop_pct is not None and not (isinstance(crop_pct, int | float) and 0 < crop_pct < math.inf):
        raise UsageError(f"crop_pct={crop_pct!r} (--crop-pct) must be a positive finite number")
    check_img_size(img_size)
    check_crop_pct(crop_pct, img_size)
    kwargs = parse_kwargs(model_kwargs)
    check_dedicated_kwargs(kwargs, {"img_size": "--img-size", "num_classes": "--num-classes",
                                    "pretrained": "--pretrained"})  # fmt: skip
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise UsageError(f"device={device!r} (--device) is not a torch device; use cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda") or (dev.type == "cuda" and not torch.cuda.is_available()):
        raise UsageError(f"device={device!r} (--device): use cpu, or cuda[:N] on a machine with a CUDA GPU")
    if use_ema and checkpoint and Path(checkpoint).is_file():
        # (a weights file is what it is: the flag was ignored and a run's plain weights reported as evaluated)
        raise UsageError(
            f"use_ema (--use-ema) picks ema.safetensors in a checkpoint or run folder; {str(checkpoint)!r} is a file: "
            "pass the EMA weights file itself without --use-ema, or the folder with it"
        )
    weights = resolve_checkpoint(checkpoint, ema=use_ema) if checkpoint else None
    meta = check_weights_model(weights, model_name) if weights is not None and weights.suffix == ".safetensors" else {}
    if num_classes is None:
        num_classes = int(meta["num_classes"]) if "num_classes" in meta else None
        if num_classes is None and weights is None and not pretrained:
            num_classes = len(ds.classes)
    _map_labels_by_name(ds, meta.get("class_names"), weights)
    model = build_model(model_name, num_classes=num_classes, img_size=img_size, pretrained=pretrained, **kwargs)
    loaded_via = "timm pretrained" if pretrained else "random init"
    if weights is not None:
        loaded_via = load_model_weights(model, weights, model_name)
    n_model = model.num_classes if hasattr(model, "num_classes") else None
    if n_model is not None and len(ds.classes) > n_model:
        raise UsageError(f"the data has {len(ds.classes)} classes but the model has {n_model} (pass --num-classes?)")
    model.to(dev)
    loader = DataLoader(
        SeededTransform(ds, eval_transform(model, img_size, crop_pct)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=dev.type == "cuda",
        collate_fn=collate_skipping,
    )

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16)

    metrics = evaluate(model, loader, dev, autocast=autocast if amp else None)
    if metrics["n"] == 0:  # (reported as top-1 0.00, loss 0.0000 on 0 images)
        raise DataError(no_image_read(ds, split, metrics["skipped"]))
    return {
        "model": model_name,
        "checkpoint": str(weights) if weights else None,
        "loaded_via": loaded_via,
        "img_size": img_size,
        "num_classes": n_model,
        "split": split,
        **metrics,
    }


def no_image_read(ds: Any, split: str, skipped: list[str], done: str = "evaluated") -> str:
    """The message for a split none of whose images could be read (no metric means anything then)."""
    example = f", e.g. {skipped[0]}" if skipped else ""
    return (f"none of the {len(ds)} images of split {split!r} ({str(ds.root)!r}) could be read{example}: "
            f"nothing was {done}")  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name (ours or any timm model)")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="our .safetensors, a checkpoint or run folder (newest checkpoint), or the authors' file (mapped by "
        "the model's checkpoint_filter_fn)",
    )
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained weights of the model (downloads)")
    p.add_argument("--use-ema", action="store_true", help="the EMA weights of a checkpoint or run folder")
    p.add_argument("--dataset", default="imagefolder", choices=DATASETS, help="default: imagefolder")
    p.add_argument("--data-dir", default=None, help="ImageNet-layout root (DIR/<split>/<class>/<img>)")
    p.add_argument("--split", default="val", help="sub-folder of --data-dir ('' for the folder itself; default val)")
    p.add_argument("--img-size", type=img_size_arg, default=224, help="input side in pixels (default 224)")
    p.add_argument("--crop-pct", type=_positive_float, default=None, help="center-crop fraction (default: the model's)")
    p.add_argument("-b", "--batch-size", type=_positive, default=64)
    p.add_argument("-j", "--workers", type=workers_arg, default=2)
    p.add_argument("--num-classes", type=_positive, default=None)
    p.add_argument("--model-kwargs", nargs="*", default=None, metavar="KEY=VALUE")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--results-file", default=None, help="also write the metrics as JSON here")


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return v


def _positive_float(text: str) -> float:
    return checked(float, text, lambda v: 0 < v < math.inf, "a positive finite number")


def execute(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    results = Path(args.results_file) if args.results_file else None
    if results is not None and (results.is_dir() or not results.parent.is_dir()):  # (before the evaluation runs)
        parser.error(f"argument --results-file: {args.results_file!r} must be a file path in an existing folder")
    if results is not None:  # written at the end through a file beside it: that folder must take one now
        try:
            with tempfile.NamedTemporaryFile(dir=results.parent, prefix=f".{results.name}."):
                pass
        except OSError as e:
            parser.error(f"argument --results-file: {args.results_file!r} cannot be written in its folder: {e}")
    try:
        r = validate(
            args.model,
            checkpoint=args.checkpoint,
            data_dir=args.data_dir,
            dataset=args.dataset,
            split=args.split,
            img_size=args.img_size,
            batch_size=args.batch_size,
            workers=args.workers,
            num_classes=args.num_classes,
            model_kwargs=args.model_kwargs,
            use_ema=args.use_ema,
            crop_pct=args.crop_pct,
            amp=args.amp,
            device=args.device,
            pretrained=args.pretrained,
        )
    except (UsageError, DataError, CheckpointError) as e:
        parser.error(str(e))
    print(
        f"{r['model']} @ {r['img_size']} px on {r['n']} images ({r['split']}): top-1 {r['top1']:.2f}  "
        f"top-5 {r['top5']:.2f}  loss {r['loss']:.4f}  {r['img_s']:.1f} img/s  [weights: {r['loaded_via']}]"
    )
    if r["skipped"]:
        print(f"skipped {len(r['skipped'])} unreadable images, e.g. {r['skipped'][0]}")
    if args.results_file:
        out = {**r, "skipped": len(r["skipped"]), "command": shlex.join(["visionlin", *argv])}
        atomic_write(results, lambda q: q.write_text(json.dumps(out, indent=1)))
    return 0
