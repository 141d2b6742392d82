"""Does every model run at a high resolution? One inference call per model at SIZE x SIZE, batch 1, bf16 autocast,
eager, on one GPU; records the peak memory, the time of that call (after one untimed call) and any error.

    python benchmarks/hires_every_model.py --out DIR [--size 4096] [--models A,B | --families nat,pvt,...]

A feasibility check (the hierarchical-backbone issue: every model runs inference on a 4096 x 4096 image at batch 1),
not a benchmark: the time is one call, so use ``visionlin bench models`` for speed. Each model's row is printed and
the JSON rewritten as soon as it is measured, so a run stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._meta import gpu_meta  # noqa: E402
from visionlin.train.bench import write_json  # noqa: E402

HIERARCHICAL = ("nat", "mambavision", "mavit", "nalaformer", "pvt", "ravlt", "swin", "vig")


def models_of(families: list[str]) -> list[str]:
    """visionlin's entrypoints whose timm module is one of ``families`` (timm's registry names the module)."""
    from timm.models import _registry

    import visionlin

    return [n for n in visionlin.list_models() if _registry._model_to_module.get(n) in families]


def measure(name: str, size: int, device: torch.device) -> dict:
    import timm

    import visionlin  # noqa: F401

    row: dict = {"model": name, "size": size}
    model = None
    try:
        model = timm.create_model(name, device=device).eval()
        x = torch.randn(1, 3, size, size, device=device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            model(x)  # untimed: autotuning, allocator
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            out = model(x)
            torch.cuda.synchronize(device)
        row.update(
            status="ok",
            seconds=round(time.perf_counter() - t0, 4),
            peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            finite=bool(torch.isfinite(out).all()),
            params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        )
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="oom", error=str(e).splitlines()[0][:300])
    except Exception as e:  # noqa: BLE001  (recorded per model: one failure must not hide the others)
        row.update(status="error", error=f"{type(e).__name__}: {str(e)[:300]}")
    finally:
        del model
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--models", default=None, help="comma-separated names (default: --families' entrypoints)")
    p.add_argument("--families", default=",".join(HIERARCHICAL), help="timm modules of visionlin's families")
    p.add_argument("--skip", default="", help="comma-separated names to leave out")
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    if args.size < 32 or args.size % 32:
        p.error(f"--size must be a positive multiple of 32 (the hierarchical models' stride), got {args.size}")
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    names = args.models.split(",") if args.models else models_of(args.families.split(","))
    skip = set(filter(None, args.skip.split(",")))
    names = [n for n in names if n not in skip]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"meta": gpu_meta(argv, args.commit, size=args.size), "rows": []}
    device = torch.device("cuda")
    for name in names:
        row = measure(name, args.size, device)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)  # the rows so far, marked partial until the last write below
        write_json(out / f"hires_every_model_{args.size}.json", result, partial=True)
    write_json(out / f"hires_every_model_{args.size}.json", result)
    bad = [r["model"] for r in result["rows"] if r["status"] != "ok" or not r.get("finite")]
    print(f"{len(result['rows']) - len(bad)} of {len(result['rows'])} ran at {args.size} px; not: {bad}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
