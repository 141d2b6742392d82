"""Host time of a forward (``--train``: a forward and backward with gradients), measured where the GPU cannot hide it:
batch 1 at 224 px (bf16 autocast, inference mode unless ``--train``), where every kernel is shorter than its launch.
Per model: host microseconds per call of the whole forward and of its first block, and (``--stacks``) the block's
Python functions by cumulative time (cProfile), so a change to a layer's host path can be weighed without the noise of
a host-bound batch-256 run.

``--tree DIR`` imports ``visionlin`` from ``DIR`` (e.g. an older commit's ``git archive`` of ``visionlin/``) instead of
this checkout: run it for two trees in alternation in one session to compare them (``--tag`` names the rows).

Usage (on a GPU machine):
    python benchmarks/host_block.py --models infvit_small,flatten_deit_small --stacks --out OUT
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _host_us(fn, calls: int, rounds: int = 15) -> float:
    """The least over ``rounds`` of the wall time of ``calls`` back-to-back calls (no sync between them), us per call:
    host noise only adds time, so the minimum is the steadiest estimate of the host cost itself."""
    import torch

    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()  # before the sync: the host's time to issue the calls
        torch.cuda.synchronize()
        times.append((t1 - t0) / calls * 1e6)
    return min(times)


def _cum_top(fn, calls: int, n: int) -> tuple[list[dict], float]:
    """The ``n`` Python functions with the most cumulative time per call of ``fn`` (cProfile), and the number of
    Python-level calls (functions and builtins) per call: a count that host noise does not move."""
    from benchmarks._timing import python_profile

    rows = sorted(python_profile(fn, calls), key=lambda r: -r["cum_us"])
    return rows[:n], sum(r["calls"] for r in rows)


def measure(name: str, args: argparse.Namespace, ours: bool) -> dict:
    """Host time of ``name``'s forward and of its first block at batch 1 (``ours``: a visionlin model, whose blocks
    take ``(x, feat_size, num_prefix_tokens)``; timm's take ``x``)."""
    import timm
    import torch

    torch.manual_seed(0)
    kw = {"dynamic_img_size": True, "img_size": args.size} if name.startswith("deit") else {}
    model = timm.create_model(name, **kw).cuda().train(args.train)
    x = torch.randn(1, 3, args.size, args.size, device="cuda")
    # --train: forward and backward with gradients (the grads set to None first, as optimizer.zero_grad does)
    mode = contextlib.nullcontext() if args.train else torch.inference_mode()
    with mode, torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.no_grad():
            tokens = model.forward_features(x)  # the shape of a block's input (prefix tokens included)
        patch = model.patch_embed.patch_size
        block, grid = model.blocks[0], (args.size // patch[0], args.size // patch[1])  # (the input's, not the build's)
        prefix = getattr(model, "num_prefix_tokens", 0)
        blk_in = torch.randn_like(tokens)

        def step(module, fn):
            if not args.train:
                return fn()
            module.zero_grad(set_to_none=True)
            out = fn()
            out.float().sum().backward()
            return out

        def run_block():
            return step(block, lambda: block(blk_in, grid, prefix) if ours else block(blk_in))

        def run_model():
            return step(model, lambda: model(x))

        for _ in range(5):
            run_model()
            run_block()
        forward_us = _host_us(run_model, max(1, args.calls // 6))
        r = {"model": name, "tag": args.tag, "size": args.size, "batch": 1, "forward_us": forward_us,
             "block_us": _host_us(run_block, args.calls)}  # fmt: skip
        if args.stacks:
            r["block_cum"], r["block_python_calls"] = _cum_top(run_block, max(1, args.calls // 2), 45)
    return r


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--models", default="deit_small_patch16_224,infvit_small,agent_deit_small,flatten_deit_small")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--stacks", action="store_true", help="the first block's Python functions by cumulative time")
    parser.add_argument("--train", action="store_true", help="forward + backward with gradients (train mode)")
    parser.add_argument("--tree", default=None, help="import visionlin from this folder instead of the checkout")
    parser.add_argument("--tag", default="", help="a name for this run's rows (e.g. old / new)")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(args.tree).resolve()) if args.tree else str(ROOT))
    if args.tree:
        sys.path.insert(1, str(ROOT))  # benchmarks/ from this checkout

    import torch

    import visionlin

    rows = []
    for name in args.models.split(","):
        r = measure(name, args, name in visionlin.list_models())
        rows.append(r)
        calls = f", {r['block_python_calls']:.0f} Python calls per block" if "block_python_calls" in r else ""
        print(f"== {name} [{args.tag}] host per forward {r['forward_us']:.0f} us, per block {r['block_us']:.1f} us"
              f"{calls}", flush=True)  # fmt: skip
        for op in r.get("block_cum", []):
            print(f"   {op['cum_us']:8.1f} us cum {op['self_cpu_us']:7.1f} own x{op['calls']:5.1f} {op['name'][-90:]}")
        torch.cuda.empty_cache()
    sys.path.insert(0, str(ROOT))
    from benchmarks._meta import gpu_meta

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = gpu_meta(argv, args.commit)
    meta["visionlin_file"] = visionlin.__file__
    stem = f"host_block{'_train' if args.train else ''}{'_' + args.tag if args.tag else ''}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
