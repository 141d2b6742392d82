"""GPU sanity: every registered visionlin model runs forward and backward in bf16 at 224 px and 1024 px (batch 1).

Softmax blocks must run on a fused SDPA kernel: the whole check runs under ``sdpa_kernel([FLASH, EFFICIENT, CUDNN])``
so a fallback to SDPA's unfused math path raises instead of passing silently, and the op's automatic choice for a
bf16 CUDA call must be ``"sdpa"``. Also measured, side by side in the same process: inference throughput (img/s,
bf16 autocast) of each model and its dense timm DeiT twin at 224 px and 1024 px, with peak memory.

Usage (on the GPU machine, from the repository root):
    PYTHONPATH=. python scripts/gpu_sanity.py --out "$OUT"
Writes ``gpu_sanity.json`` (+ ``gpu_throughput.png``) with command, commit, date, GPU and versions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import visionlin
from visionlin.kernels import get_op

FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
TWINS = {"tiny": "deit_tiny_patch16_224", "small": "deit_small_patch16_224", "base": "deit_base_patch16_224"}


def _twin(name: str) -> str:
    for size, twin in TWINS.items():
        if name.endswith(size):
            return twin
    return TWINS["small"]


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return out if len(out) == 40 else "unknown"


def train_step(name: str, size: int) -> dict:
    """One bf16 forward + backward at ``size`` px, batch 1; returns time and peak memory."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000).cuda().train()
    x = torch.randn(1, 3, size, size, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    loss = out.float().square().mean()
    loss.backward()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    finite = bool(torch.isfinite(out).all()) and all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    return {
        "ok": finite and not missing,
        "finite": finite,
        "params_without_grad": missing[:5],
        "seconds_incl_first_call": round(elapsed, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
    }


@torch.inference_mode()
def throughput(name: str, size: int, batch: int, iters: int = 10, compile: bool = False) -> dict:
    """Inference img/s (bf16 autocast) with CUDA events; median of ``iters`` timed calls after warm-up.

    With ``compile``, the model is wrapped in ``torch.compile`` (Inductor, default mode); compilation happens in the
    warm-up and is not timed.
    """
    kwargs = {"dynamic_img_size": True} if name.startswith("deit") else {}
    model = timm.create_model(name, num_classes=1000, **kwargs).cuda().eval()
    if compile:
        torch._dynamo.reset()
        model = torch.compile(model)
    x = torch.randn(batch, 3, size, size, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model(x)
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    times.sort()
    ms = times[len(times) // 2]
    return {
        "img_per_s": round(batch * 1e3 / ms, 1),
        "ms": round(ms, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--models", default="")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-sanity", action="store_true")
    parser.add_argument(
        "--bench", default="224:256,1024:16", help="size:batch pairs (default: the protocol of specs/official_speed.md)"
    )
    parser.add_argument("--sweeps", type=int, default=2, help="repeat the whole throughput sweep (spread = noise)")
    parser.add_argument("--compile", action="store_true", help="time torch.compile'd models (compile not timed)")
    parser.add_argument("--commit", default=None, help="commit of the tree (the device copy may have no git data)")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",") if args.models else visionlin.list_models()
    q = torch.randn(1, 197, 6, 64, device="cuda", dtype=torch.bfloat16)
    auto = get_op("softmax_attention").select(q, q, q).name
    result = {
        "command": " ".join(sys.argv),
        "commit": args.commit or _commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__},
        "softmax_auto_backend_bf16_cuda": auto,
        "compiled": args.compile,
        "sanity": {},
        "throughput": {},
    }
    failures = 0 if auto == "sdpa" else 1
    bench = [tuple(int(v) for v in pair.split(":")) for pair in args.bench.split(",")]
    result["protocol"] = {"bench": bench, "sweeps": args.sweeps, "precision": "bf16 autocast, eager, inference_mode"}
    with sdpa_kernel(FUSED):
        for name in models if not args.skip_sanity else []:
            for size in (224, 1024):
                key = f"{name}@{size}"
                try:
                    row = train_step(name, size)
                except Exception as e:
                    row = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
                failures += not row["ok"]
                result["sanity"][key] = row
                print(
                    f"sanity {key:32s} {'ok' if row['ok'] else 'FAIL'} {row.get('peak_gib', '')} GiB "
                    f"{row.get('error', '')}",
                    flush=True,
                )
                torch.cuda.empty_cache()
        if not args.skip_throughput:
            names = list(dict.fromkeys([*(_twin(m) for m in models), *models]))  # only the twins needed
            for sweep in range(args.sweeps):
                order = names if sweep % 2 == 0 else names[::-1]  # alternate the order: drift shows as spread
                for name in order:
                    for size, batch in bench:
                        key = f"{name}@{size}"
                        try:
                            row = throughput(name, size, batch, compile=args.compile)
                        except Exception as e:
                            row = {"error": f"{type(e).__name__}: {e}"}
                        prev = result["throughput"].setdefault(key, {"batch": batch, "sweeps": []})
                        prev["sweeps"].append(row)
                        torch.cuda.empty_cache()
                        print(f"  {key} sweep {sweep}: {row.get('img_per_s', row.get('error'))}", flush=True)
                        (out_dir / "gpu_sanity.partial.json").write_text(json.dumps(result, indent=1))
            for key, row in result["throughput"].items():
                ok = [r for r in row["sweeps"] if "img_per_s" in r]
                if ok:
                    vals = sorted(r["img_per_s"] for r in ok)
                    row["img_per_s"] = round(statistics.median(vals), 1)
                    row["spread"] = round((vals[-1] - vals[0]) / row["img_per_s"], 3)
                    row["peak_gib"] = max(r["peak_gib"] for r in ok)
                else:
                    row["error"] = row["sweeps"][0]["error"]
                name = key.split("@")[0]
                row["twin"] = None if name.startswith("deit") else _twin(name)
            for key, row in result["throughput"].items():
                twin = row.get("twin")
                if twin and "img_per_s" in row:
                    ref = result["throughput"].get(f"{twin}@{key.split('@')[1]}", {})
                    if "img_per_s" in ref:
                        row["ratio_vs_twin"] = round(row["img_per_s"] / ref["img_per_s"], 3)
            print(f"{'model@size':36s}{'img/s':>10s}{'spread':>8s}{'vs twin':>9s}{'GiB':>8s}")
            for key, row in result["throughput"].items():
                print(
                    f"{key:36s}{row.get('img_per_s', 'ERR'):>10}{row.get('spread', ''):>8}"
                    f"{row.get('ratio_vs_twin', ''):>9}{row.get('peak_gib', ''):>8}  {row.get('error', '')}"
                )
    (out_dir / "gpu_sanity.json").write_text(json.dumps(result, indent=1))
    print(f"sanity failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
