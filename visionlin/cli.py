"""The ``visionlin`` console command: ``visionlin list``, ``convert``, ``finetune-conversion``, ``demo``, ``bench``,
``train``, ``distill``, ``validate`` and ``plot``.

Bad flags are usage errors (exit status 2) naming the value and what is allowed; ``visionlin demo --help`` lists them.
"""

from __future__ import annotations

import argparse
import fnmatch
import shlex
import sys

from .train import bench, distill, scaling, trainer, validate
from .train import plot as plot_cmd

__all__ = ["main"]


def _cmd_list(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    import visionlin

    try:
        names = visionlin.list_models(args.filter)
    except ValueError as e:
        parser.error(f"argument filter: {e}")
    if not names:
        everything = visionlin.list_models()
        hint = ""
        if not any(c in args.filter for c in "*?["):
            wider = f"*{args.filter}*"
            if fnmatch.filter(everything, wider):
                hint = f" (did you mean {wider!r}?)"
        print(
            f"visionlin list: no visionlin model matches {args.filter!r}{hint}. The filter is a wildcard over model "
            f"names, e.g. 'infvit*'; `visionlin list` shows all {len(everything)}.",
            file=sys.stderr,
        )
        return 1
    for name in names:
        print(name)
    return 0


def _cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    return scaling.execute(parser, args, shlex.join(["visionlin", *argv]))


def _cmd_convert(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    from .convert import cli as convert_cli

    return convert_cli.execute(parser, args)


def _cmd_finetune_conversion(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    from .convert import cli_finetune

    return cli_finetune.execute(parser, args)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``visionlin list [FILTER]``, ``visionlin demo [flags]``, ``visionlin bench WHAT [flags]``; returns
    the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = _parser().parse_known_args(argv)
    if extra:  # reported by the subcommand, whose usage line is the one that helps
        args.parser.error(f"unrecognized arguments: {shlex.join(extra)}")
    return args.fn(args, args.parser, argv)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionlin", description="timm-compatible efficient-attention backbones")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{list,convert,finetune-conversion,demo,bench,train,distill,validate,plot}",
    )
    p = sub.add_parser("list", help="list the models visionlin registers with timm")
    p.add_argument("filter", nargs="?", default="", help="wildcard over model names, e.g. 'infvit*' (default: all)")
    p.set_defaults(fn=_cmd_list, parser=p)
    from .convert import cli as convert_cli  # argparse only: diffusers loads when the command runs

    p = sub.add_parser(
        "convert",
        help="convert a local diffusers model / pipeline's attention (sla, sparse, dense) and print the report",
        description=convert_cli.__doc__.split("\n\n")[0],
    )
    convert_cli.add_arguments(p)
    p.set_defaults(fn=_cmd_convert, parser=p)
    from .convert import cli_finetune

    p = sub.add_parser(
        "finetune-conversion",
        help="fine-tune a converted diffusers model by distillation from itself with the conversion off",
        description=cli_finetune.__doc__.split("\n\n")[0],
    )
    cli_finetune.add_arguments(p)
    p.set_defaults(fn=_cmd_finetune_conversion, parser=p)
    p = sub.add_parser(
        "demo",
        help="latency and peak memory vs input size, new models vs deit_small_patch16_224",
        description=scaling.__doc__.split("\n\n")[0] + " Writes scaling.json and scaling.png to --out.",
    )
    scaling.add_arguments(p)
    p.set_defaults(fn=_cmd_demo, parser=p)
    p = sub.add_parser(
        "bench",
        help="GPU benchmarks next to the dense twin: models, train, largest, op (JSON + PNG per benchmark)",
        description=bench.__doc__.split("\n\n")[0],
    )
    bench.add_subcommands(p)
    p = sub.add_parser(
        "train",
        help="train a model on an ImageNet-layout folder or Fashion-MNIST (timm recipes on accelerate, exact resume)",
        description=trainer.__doc__.split("\n\n")[0],
    )
    trainer.add_arguments(p)
    p.set_defaults(fn=trainer.execute, parser=p)
    p = sub.add_parser(
        "distill",
        help="distil a softmax ViT teacher into one of our students (logits, matched layers, masked prediction)",
        description=distill.__doc__.split("\n\n")[0],
    )
    distill.add_distill_arguments(p)
    p.set_defaults(fn=distill.execute, parser=p)
    p = sub.add_parser(
        "validate",
        help="top-1 / top-5, loss and img/s of a model + checkpoint on a folder",
        description=validate.__doc__,
    )
    validate.add_arguments(p)
    p.set_defaults(fn=validate.execute, parser=p)
    p = sub.add_parser("plot", help="draw a training run's curves (RUN_DIR/curves.png)", description=plot_cmd.__doc__)
    plot_cmd.add_arguments(p)
    p.set_defaults(fn=plot_cmd.execute, parser=p)
    return parser


if __name__ == "__main__":
    sys.exit(main())
