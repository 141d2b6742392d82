"""``visionlin convert PATH``: convert a locally saved diffusers model or pipeline and print the report table.

``PATH`` is a folder written by diffusers' ``save_pretrained``: a model (``config.json`` naming its class) or a
pipeline (``model_index.json``). Nothing is downloaded. With ``--out`` the conversion (plan + converter weights) is
saved for :func:`visionlin.load_conversion`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_arguments", "add_method_arguments", "execute", "method_options"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a local diffusers model or pipeline folder (save_pretrained output)")
    add_method_arguments(p)
    p.add_argument("--out", default=None, help="save the conversion (plan JSON + converter safetensors) here")


def add_method_arguments(p: argparse.ArgumentParser) -> None:
    """``--method``, its options, ``--layers`` and ``--strict`` (shared with ``visionlin finetune-conversion``)."""
    p.add_argument("--method", default="sla", help="sla | sparse | hybrid | linear | agent | dense (default: sla)")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of key blocks not computed exactly, [0, 1)")
    p.add_argument("--block-size", type=int, nargs="+", default=None, metavar="N", help="block size, or BQ BK")
    p.add_argument("--k-low", type=float, default=None, help="sla: fraction of key blocks skipped (paper variant)")
    p.add_argument("--variant", default=None, help="sla: paper | code")
    p.add_argument(
        "--feature-map", default=None, help="sla: softmax | elu | relu; hybrid / linear: elu | relu | sigmoid"
    )
    p.add_argument(
        "--kernel-size", type=int, nargs="+", default=None, metavar="K", help="hybrid: window, or one per axis"
    )
    p.add_argument("--dilation", type=int, nargs="+", default=None, metavar="D", help="hybrid: window dilation")
    p.add_argument("--eps", type=float, default=None, help="linear: added to the mean-normalised denominator")
    p.add_argument("--mid-dim-scale", type=int, default=None, help="linear: MLP width = channels // this")
    p.add_argument("--pool", type=int, nargs="+", default=None, metavar="P", help="agent: agent cell, or one per axis")
    p.add_argument("--k-scale2", type=float, default=None, help="agent: broadcast logits scaled by scale ** k_scale2")
    p.add_argument("--k-shortcut", type=float, default=None, help="agent: weight of the + k_shortcut * v term")
    p.add_argument("--layers", nargs="+", default=None, metavar="NAME", help="only these attention modules")
    p.add_argument("--strict", action="store_true", help="fail instead of skipping unconvertible attention")


def _one_or_list(values: list[int] | None) -> int | list[int] | None:
    return values if values is None or len(values) > 1 else values[0]


def _class_of(spec_file: Path, base: type, kind: str):
    """The diffusers class ``spec_file`` (a ``model_index.json`` or ``config.json``) names in ``_class_name``: a
    subclass of ``base``; ``ValueError`` naming the file for one that is not JSON, not an object, or names no such
    class (diffusers raised AttributeErrors for those, deep inside ``from_pretrained``)."""
    import diffusers

    try:
        spec = json.loads(spec_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{spec_file} is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{spec_file} holds a JSON {type(spec).__name__}, not an object with a _class_name")
    name = spec.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if type(cls).__name__ == "DummyObject":  # diffusers' stand-in for a class whose libraries are not installed
        raise ValueError(f"{spec_file}: {name} needs {list(getattr(cls, '_backends', []))} installed (pip install ...)")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{spec_file}: _class_name={name!r} is not a diffusers {kind} class")
    return cls


def _load(path: Path):
    """The pipeline or model saved in ``path``; ``ValueError`` naming the folder and the cause when it cannot be
    loaded (diffusers raised OSErrors for missing or garbled weights, AttributeErrors for a config that is not a JSON
    object or names no class, TypeErrors for config values of the wrong type)."""
    import diffusers

    if (path / "model_index.json").is_file():
        _class_of(path / "model_index.json", diffusers.DiffusionPipeline, "pipeline")
        what, load = "pipeline", diffusers.DiffusionPipeline.from_pretrained
    else:
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has neither model_index.json (a pipeline) nor config.json (a model)")
        cls = _class_of(path / "config.json", diffusers.ModelMixin, "model")
        what, load = cls.__name__, cls.from_pretrained
    try:
        return load(str(path))
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, AttributeError) as e:  # the folder's files
        raise ValueError(f"{path}: cannot load the {what} ({type(e).__name__}: {e})") from e


def execute(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .._io import folder_problem
    from . import convert, save_conversion

    path = Path(args.path)
    if not path.is_dir():
        parser.error(f"argument path: {args.path!r} is not a folder")
    if args.out is not None and not args.out.strip():  # ("" skipped the save without a word)
        parser.error(f"argument --out: {args.out!r} is not a folder name")
    if args.out and (problem := folder_problem(args.out)):  # (found after the whole conversion before)
        parser.error(f"argument --out: {problem}")
    options = method_options(args)
    try:
        obj = _load(path)
        report = convert(obj, args.method, layers=args.layers, strict=args.strict, **options)
    except ValueError as e:
        parser.error(str(e))
    print(report)
    if args.out:
        print(f"saved to {save_conversion(obj, args.out)}")
    return 0


def method_options(args: argparse.Namespace) -> dict:
    """The method options given on the command line (those not given are left to the method's defaults)."""
    return {
        k: v
        for k, v in {
            "sparsity": args.sparsity, "k_low": args.k_low, "variant": args.variant, "feature_map": args.feature_map,
            "block_size": None if args.block_size is None else (
                args.block_size[0] if len(args.block_size) == 1 else tuple(args.block_size)),
            "kernel_size": _one_or_list(args.kernel_size), "dilation": _one_or_list(args.dilation),
            "pool": _one_or_list(args.pool), "eps": args.eps, "mid_dim_scale": args.mid_dim_scale,
            "k_scale2": args.k_scale2, "k_shortcut": args.k_shortcut,
        }.items()
        if v is not None
    }  # fmt: skip
