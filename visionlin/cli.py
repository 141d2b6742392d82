"""The ``visionlin`` console command."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]

DEMO_MODELS = [
    "deit_small_patch16_224",
    "infvit_small",
    "infvit_pure_small",
    "flatten_deit_small",
    "agent_deit_small",
    "inline_deit_small",
]


def _cmd_list(args: argparse.Namespace) -> int:
    import visionlin

    for name in visionlin.list_models(args.filter):
        print(name)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        from benchmarks import scaling
    except ImportError as e:  # the demo lives in the source tree, not in the installed wheel
        raise SystemExit(f"the demo needs a source checkout (benchmarks/ beside visionlin/): {e}") from e
    argv = ["--models", args.models, "--sizes", args.sizes, "--device", args.device]
    if args.out:
        argv += ["--out", args.out]
    return scaling.main(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``visionlin list`` and ``visionlin demo``."""
    args = _parser().parse_args(argv)
    return args.fn(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionlin", description="timm-compatible efficient-attention backbones")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list the models visionlin registers with timm")
    p.add_argument("filter", nargs="?", default="", help="wildcard, e.g. 'infvit*'")
    p.set_defaults(fn=_cmd_list)
    p = sub.add_parser("demo", help="latency and peak memory vs input size, new models vs deit_small_patch16_224")
    p.add_argument("--models", default=",".join(DEMO_MODELS))
    p.add_argument("--sizes", default="224,448,896")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    p.set_defaults(fn=_cmd_demo)
    return parser


if __name__ == "__main__":
    sys.exit(main())
