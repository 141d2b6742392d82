"""``visionlin finetune-conversion PATH --data FILE``: convert a local diffusers model or pipeline (or load a saved
conversion) and fine-tune it by distillation from itself with the conversion off (:func:`visionlin.finetune`).

``PATH`` is a ``save_pretrained`` folder (a model or a pipeline; nothing is downloaded). ``--data`` is a safetensors
file of the converted model's forward keywords, each tensor with the same leading number of samples (latents,
timesteps, ``encoder_hidden_states`` ...); ``--shared`` another of keywords passed unchanged to every call (Flux's
``img_ids`` / ``txt_ids``; none may be a ``--data`` keyword). ``--conversion DIR`` takes the saved conversion's method
and options (method flags beside it are refused). The run folder gets checkpoints, ``log.jsonl`` and at the end
``conversion/`` (for ``visionlin.load_conversion``) plus ``lora.safetensors`` / ``model.safetensors`` for those
modes; ``--resume auto`` continues a stopped run exactly (with the same conversion: other method settings are
refused).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .cli import _load, add_method_arguments, method_options

__all__ = ["add_arguments", "execute"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .finetune import TRAINABLE

    p.add_argument("path", help="a local diffusers model or pipeline folder (save_pretrained output)")
    p.add_argument("--data", required=True, help="safetensors file of forward keywords, N samples each")
    p.add_argument("--shared", default=None, help="safetensors file of forward keywords passed unchanged to every call")
    p.add_argument("--conversion", default=None, help="load this saved conversion instead of converting (--method ...)")
    add_method_arguments(p)
    p.set_defaults(method=None)  # (sla unless --conversion: a --method given with it is refused, not ignored)
    p.add_argument("--output", required=True, help="run folder (checkpoints, log.jsonl, final weights)")
    p.add_argument("--resume", default=None, help="'auto', a checkpoint folder or a run folder")
    p.add_argument("--trainable", default="converter", choices=TRAINABLE, help="what trains (default: converter)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps in total (default: 100)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (default: all)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: 1e-4)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay, not on 1-d parameters")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps")
    p.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm at this value")
    p.add_argument("--feature-weight", type=float, default=0.0, help="weight of attention-output matching (0: off)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (--trainable lora / lora+converter)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch draws and global generators")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0: at the end only)")
    p.add_argument("--checkpoint-hist", type=int, default=3, help="complete checkpoints kept (0: all)")
    p.add_argument("--log-interval", type=int, default=10, help="steps between log records")
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"), help="autocast dtype")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument("--component", default=None, help="the pipeline component to train when several are converted")


def execute(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .._io import folder_problem
    from . import convert, finetune, load_conversion

    path = Path(args.path)
    if not path.is_dir():
        parser.error(f"argument path: {args.path!r} is not a folder")
    if not args.output.strip():  # (Path("") is the current directory: the run went there)
        parser.error(f"argument --output: {args.output!r} is not a folder name")
    if problem := folder_problem(args.output):  # (found after the conversion before)
        parser.error(f"argument --output: {problem}")
    if args.lora_alpha is not None and not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        parser.error(f"argument --lora-alpha: {args.lora_alpha!r} must be a finite number > 0")  # (nan: NaN losses)
    if args.conversion is not None:  # the saved conversion fixes the method and its options (they were ignored)
        given = [f"--{k}" for k, v in (("method", args.method), ("layers", args.layers)) if v is not None]
        given += [f"--{k.replace('_', '-')}" for k in method_options(args)] + (["--strict"] if args.strict else [])
        if given:
            parser.error(
                f"argument --conversion: {', '.join(given)} cannot be given with it (the saved conversion "
                f"{args.conversion!r} fixes the method and its options); drop them, or convert without --conversion"
            )
    tensors = {}
    for flag, value in (("--data", args.data), ("--shared", args.shared)):
        if value is None:
            continue
        if not Path(value).is_file():
            parser.error(f"argument {flag}: {value!r} is not a file")
        try:  # read before the model is loaded and converted
            tensors[flag] = load_file(value)
        except (SafetensorError, OSError) as e:
            parser.error(f"argument {flag}: {value!r} is not a safetensors file ({type(e).__name__}: {e})")
    if both := sorted(set(tensors["--data"]) & set(tensors.get("--shared", ()))):  # (--shared's won silently)
        parser.error(f"argument --shared: keys {both} are in --data {args.data!r} too; give each keyword in one file")
    try:
        obj = _load(path)
        if args.conversion is not None:
            report = load_conversion(obj, args.conversion)
        else:
            report = convert(obj, args.method or "sla", layers=args.layers, strict=args.strict, **method_options(args))
        print(report)
        result = finetune(
            obj, tensors["--data"], shared=tensors.get("--shared"), steps=args.steps,
            batch_size=args.batch_size, trainable=args.trainable, lr=args.lr, weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps, clip_grad=args.clip_grad, feature_weight=args.feature_weight,
            lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, seed=args.seed, output_dir=args.output,
            resume=args.resume, checkpoint_every=args.checkpoint_every, checkpoint_hist=args.checkpoint_hist,
            log_interval=args.log_interval, mixed_precision=args.mixed_precision, cpu=args.cpu,
            component=args.component,
        )  # fmt: skip
    except ValueError as e:
        parser.error(str(e))
    first = f"{result.losses[0]:.6g}" if result.losses else "-"
    last = f"{result.losses[-1]:.6g}" if result.losses else "-"
    print(f"finetuned steps {result.start_step} -> {result.step}: loss {first} -> {last}; outputs in {result.run_dir}")
    return 0
