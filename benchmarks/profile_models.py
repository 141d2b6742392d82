"""Where a model's GPU time goes: ``torch.profiler`` kernel table of one inference forward (or, with ``--train``, one
training step: forward, backward, AdamW) in bf16 autocast, eager, for visionlin models and their dense timm twin,
grouped into categories (GEMM, attention, normalisation, elementwise, convolution, copies, ...).

Usage (on a GPU machine):
    python benchmarks/profile_models.py --out benchmarks/results/h200 --models infvit_small,inline_deit_small
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from visionlin.train.bench import train_step  # noqa: E402

# Ordered: the first pattern found in a kernel's (lower-cased) name decides its category.
CATEGORIES = (
    ("attention (ours, triton)", ("_state", "_readout", "_infsa", "_pooled", "_fused_linear")),
    ("attention (sdpa/flash)", ("flash", "fmha", "attention", "cudnn_generated")),
    ("gemm", ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul", "splitk")),
    ("convolution", ("conv", "depthwise", "implicit")),
    ("normalisation", ("layer_norm", "layernorm", "norm_kernel", "batch_norm")),
    ("reduction", ("reduce", "sum_kernel", "softmax", "cumsum")),
    ("copy / layout", ("copy", "cat", "transpose", "permute", "index", "gather", "fill", "memset", "memcpy")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "pointwise", "triton_")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile(model: torch.nn.Module, size: int, batch: int, train: bool = False, graphs: bool = False) -> dict:
    """Kernel time, wall time and kernel launches of one step; ``graphs``: the model compiled with
    ``mode="reduce-overhead"`` (each training step marks a new CUDA-graph iteration)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    x = torch.randn(batch, 3, size, size, device="cuda")
    if train:
        model.train()
        target = torch.randint(0, model.num_classes, (batch,), device="cuda")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        step = functools.partial(train_step(model, opt, target, new_step=graphs), x)

    else:
        model.eval()

        def step():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(x)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) / 5 * 1e3
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[evt.name]
            k[0] += evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
            k[1] += 1
    total = sum(v[0] for v in kernels.values())
    cats: dict[str, float] = defaultdict(float)
    for name, (us, _) in kernels.items():
        cats[category(name)] += us
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
    return {
        "gpu_us": total,
        "wall_ms": wall_ms,
        # launches a step (what a replayed CUDA graph still pays a gap between) and distinct kernels
        "kernels_per_step": sum(int(c) for _, c in kernels.values()),
        "distinct_kernels": len(kernels),
        "categories_us": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "top_kernels": [{"name": n[:160], "us": us, "calls": c, "category": category(n)} for n, (us, c) in top],
    }


def main(argv: list[str] | None = None) -> int:
    import timm

    import visionlin

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--models", default="infvit_small,inline_deit_small,agent_deit_small,flatten_deit_small")
    parser.add_argument("--sizes", default="224:256,1024:16", help="size:batch pairs")
    parser.add_argument("--backend", default=None, help="kernel backend for visionlin models (default: auto)")
    parser.add_argument("--train", action="store_true", help="profile a training step instead of a forward")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model first (warm-up compiles)")
    parser.add_argument(
        "--compile-mode", choices=("default", "reduce-overhead"), default="default",
        help="with --compile: reduce-overhead replays CUDA graphs (the wall time then shows what replay adds to the "
        "kernel time); the row also counts dynamo's graphs and graph breaks",
    )  # fmt: skip
    parser.add_argument("--twin", default="deit_small_patch16_224", help="dense timm model profiled first")
    parser.add_argument("--name", default=None, help="JSON file stem (default profile_models / profile_train)")
    parser.add_argument("--commit", default=None)
    from benchmarks.toggle_speed import add_configs_argument, parse_configs, switches

    add_configs_argument(parser)
    args = parser.parse_args(argv)

    configs = parse_configs(parser, args.configs)
    sizes = [tuple(int(v) for v in p.split(":")) for p in args.sizes.split(",")]
    results = []
    for name, config in [(args.twin, "default"), *((m, c) for m in args.models.split(",") for c in configs)]:
        for size, batch in sizes:
            torch.manual_seed(0)
            if name == args.twin and name.startswith(("deit", "vit")):
                model = timm.create_model(name, dynamic_img_size=True, img_size=size)
            elif name == args.twin:
                model = timm.create_model(name, img_size=size)
            else:
                model = timm.create_model(name)
                visionlin.set_backend(model, args.backend)
            model = model.cuda()
            if args.compile:
                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
                model = torch.compile(model, mode=args.compile_mode)
            r = {
                "model": name,
                "size": size,
                "batch": batch,
                "train": args.train,
                "config": config,
                "compiled": args.compile,
                "compile_mode": args.compile_mode if args.compile else None,
            }
            with switches(config):
                r.update(profile(model, size, batch, args.train, graphs=args.compile_mode == "reduce-overhead"))
            if args.compile:  # graphs dynamo made of the model, and the breaks that split them
                stats = torch._dynamo.utils.counters
                r["dynamo_graphs"] = int(stats["stats"]["unique_graphs"])
                r["graph_breaks"] = int(sum(stats["graph_break"].values()))
            results.append(r)
            what = "training step" if args.train else "forward"
            print(
                f"\n== {name} [{config}] {size}px bs{batch}: {r['gpu_us'] / 1e3:.2f} ms GPU, "
                f"{r['wall_ms']:.2f} ms wall per {what}, {r['kernels_per_step']} kernels"
                + (f", {r['dynamo_graphs']} graphs, {r['graph_breaks']} breaks" if args.compile else ""),
                flush=True,
            )
            for cat, us in r["categories_us"].items():
                print(f"   {cat:28s} {us / 1e3:8.2f} ms  {100 * us / r['gpu_us']:5.1f}%")
            for k in r["top_kernels"][:12]:
                print(f"     {k['us'] / 1e3:7.2f} ms x{k['calls']:3d} [{k['category'][:12]}] {k['name'][:100]}")
            del model
            torch.cuda.empty_cache()
    from benchmarks._meta import gpu_meta

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = gpu_meta(argv, args.commit, timm=timm.__version__)
    stem = args.name or ("profile_train" if args.train else "profile_models")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
