"""Peak memory of one eager training step (bf16 autocast forward + backward, no optimizer) of the FLatten models with
``focus.TUNING["keep_features"]`` off and on, next to ``swin_tiny``: what keeping the focused features and the state
from the forward costs. Peak is ``torch.cuda.max_memory_allocated`` above what was allocated before the step (the
weights), on the second of two steps.

Usage (on a GPU machine): python benchmarks/focus_keep_memory.py --out DIR [--models ...] [--batch 128]
Writes ``focus_keep_memory.json`` (meta: command, commit, date, GPU, versions).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import visionlin  # noqa: E402, F401  (registers the models)
from benchmarks._meta import gpu_meta  # noqa: E402
from benchmarks._timing import tuned  # noqa: E402


def peak_mib(name: str, batch: int, size: int) -> float:
    model = timm.create_model(name).cuda().train()
    x = torch.randn(batch, 3, size, size, device="cuda")
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x).float().sum().backward()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    del model, x
    torch.cuda.empty_cache()
    return peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/focus_keep_memory.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--commit", default=None)
    p.add_argument("--models", default="flatten_pvt_small,flatten_swin_tiny,flatten_deit_small")
    p.add_argument("--twin", default="swin_tiny_patch4_window7_224")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if (unknown := [m for m in [*models, args.twin] if not timm.is_model(m)]) or not models:
        p.error(f"--models / --twin: unknown {unknown or args.models!r} (timm or visionlin model names)")
    if min(args.batch, args.size) < 1:
        p.error(f"--batch and --size must be >= 1, got {args.batch} and {args.size}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    from visionlin.kernels.triton import focus

    rows = [{"model": args.twin, "keep_features": None, "peak_mib": peak_mib(args.twin, args.batch, args.size)}]
    for name in models:
        for keep in (False, True):
            with tuned(focus.TUNING, keep_features=keep):
                rows.append({"model": name, "keep_features": keep, "peak_mib": peak_mib(name, args.batch, args.size)})
    for r in rows:
        print(f"{r['model']:32s} keep_features={r['keep_features']!s:5s} peak {r['peak_mib']:8.0f} MiB", flush=True)
    meta = gpu_meta(argv, args.commit)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "focus_keep_memory", "meta": meta, "batch": args.batch, "size": args.size, "rows": rows}
    (args.out / "focus_keep_memory.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
