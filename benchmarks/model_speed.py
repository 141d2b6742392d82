"""Model-level inference throughput on a GPU: visionlin models with each kernel backend next to their dense timm
twin (fused SDPA), side by side in one process, bf16 autocast, eager.

The protocol of the authors' measurements: 224 px at batch 256 and 1024 px at batch 16; img/s is the median over
``--repeats`` timed passes after warm-up, each pass ``--iters`` forwards. Peak memory is ``max_memory_allocated``.

Usage (on a GPU machine):
    python benchmarks/model_speed.py --out benchmarks/results/h200 --models inline_deit_small,infvit_small
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {224: 256, 1024: 16}
TWINS = {"tiny": "deit_tiny_patch16_224", "small": "deit_small_patch16_224", "base": "deit_base_patch16_224"}


def _twin(name: str) -> str:
    return next((t for size, t in TWINS.items() if name.endswith(size)), TWINS["small"])


def measure(model: torch.nn.Module, size: int, batch: int, iters: int, repeats: int) -> dict:
    x = torch.randn(batch, 3, size, size, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        rates = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                model(x)
            end.record()
            torch.cuda.synchronize()
            rates.append(batch * iters / (start.elapsed_time(end) / 1e3))
    return {"img_s": statistics.median(rates), "spread": (max(rates) - min(rates)) / statistics.median(rates),
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    import timm

    import visionlin

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--models", default="inline_deit_small,infvit_small")
    parser.add_argument("--backends", default="torch,triton")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--commit", default=None, help="commit of the tree (a copied tree's git may be stale)")
    args = parser.parse_args(argv)
    rows = []
    names = [n for n in args.models.split(",") if n]
    for name in names:
        for size, batch in SIZES.items():
            torch.manual_seed(0)
            twin = timm.create_model(_twin(name), dynamic_img_size=True, img_size=size).cuda().eval()
            base = measure(twin, size, batch, args.iters, args.repeats)
            del twin
            model = timm.create_model(name).cuda().eval()
            for backend in args.backends.split(","):
                try:
                    visionlin.set_backend(model, None if backend == "auto" else backend)
                    r = measure(model, size, batch, args.iters, args.repeats)
                except (ValueError, NotImplementedError) as e:
                    print(f"{name} {backend}: {e}")
                    continue
                row = {"model": name, "twin": _twin(name), "size": size, "batch": batch, "backend": backend,
                       **r, "twin_img_s": base["img_s"], "twin_peak_mib": base["peak_mib"],
                       "ratio_vs_twin": r["img_s"] / base["img_s"]}  # fmt: skip
                rows.append(row)
                print(f"{name:20s} {backend:8s} {size:5d}px bs{batch:3d}: {r['img_s']:9.1f} img/s "
                      f"({row['ratio_vs_twin']:.2f}x twin {base['img_s']:.1f}), peak {r['peak_mib']:.0f} MiB "
                      f"(twin {base['peak_mib']:.0f})", flush=True)  # fmt: skip
            del model
            torch.cuda.empty_cache()
    from benchmarks._meta import gpu_meta

    meta = gpu_meta(argv, args.commit, timm=timm.__version__)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("model_speed.png skipped: matplotlib is not installed")
        return 0
    fig, axes = plt.subplots(1, len(SIZES), figsize=(6 * len(SIZES), 4))
    for ax, size in zip(axes, SIZES, strict=True):
        sub = [r for r in rows if r["size"] == size]
        labels = [f"{r['model']}\n{r['backend']}" for r in sub]
        ax.bar(range(len(sub)), [r["ratio_vs_twin"] for r in sub])
        ax.axhline(1.0, color="k", ls="--", lw=1)
        ax.set_xticks(range(len(sub)), labels, fontsize=7)
        ax.set_ylabel("img/s relative to the dense DeiT twin")
        ax.set_title(f"{size} px, batch {SIZES[size]}, bf16, {meta['gpu']}")
    fig.tight_layout()
    fig.savefig(out / "model_speed.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
