"""Why do our models' 224 px ratios move by 2x between runs while the twin's img/s moves by 0.2%? Per forward, in one
process, sweeps alternating between the models:

* ``wall_ms``: synchronise, one forward, synchronise (what an eager user waits for one batch);
* ``host_ms``: the host's time to issue one forward while the GPU is held busy by ``torch.cuda._sleep`` (so no launch
  waits on the GPU): the pure host cost of the forward. A forward that synchronises inside shows here as ``host_ms``
  at least the sleep (``syncs``);
* ``gpu_ms``: CUDA events around the same queued forward: its kernels back to back, with no host gaps.

``wall_ms`` near ``gpu_ms`` means GPU-bound; near ``host_ms`` host-bound. The spread of each over the iterations and
sweeps says which of them moves. GPU clocks (``nvidia-smi``) are sampled before and after each sweep.

Usage (on a GPU machine):
    python benchmarks/forward_jitter.py --out benchmarks/results/h200 [--models infvit_small,deit_small_patch16_224]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._meta import gpu_meta  # noqa: E402
from benchmarks._plot import finish  # noqa: E402
from visionlin.train.bench import write_result  # noqa: E402

STEM = "forward_jitter"
MODELS = "infvit_small,inline_deit_small,agent_deit_small,flatten_deit_small,deit_small_patch16_224"
SLEEP_MS = 200.0  # longer than any forward's host time measured so far (~15 ms)


def _clocks() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable: {e}"


def _cycles_per_ms() -> float:
    """``torch.cuda._sleep`` cycles per millisecond on this GPU, measured."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    torch.cuda.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def measure_once(forward, cycles: int) -> dict:
    """One forward synchronised (wall) and one queued behind a sleep (host issue time, GPU time)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    forward()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles)
    start.record()
    t0 = time.perf_counter()
    forward()
    host = (time.perf_counter() - t0) * 1e3
    end.record()
    torch.cuda.synchronize()
    return {"wall_ms": wall, "host_ms": host, "gpu_ms": start.elapsed_time(end)}


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/forward_jitter.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for forward_jitter.json / .png")
    p.add_argument("--commit", default=None, help="commit of the code measured (default: the checkout's HEAD)")
    p.add_argument("--models", default=MODELS, help="comma-separated model names (visionlin's or timm's)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--sweeps", type=int, default=4)
    p.add_argument("--iters", type=int, default=8, help="forwards measured per model and sweep")
    args = p.parse_args(argv)
    for flag in ("size", "batch", "sweeps", "iters"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    import timm

    import visionlin  # noqa: F401  (registers the models)

    names = args.models.split(",")
    cycles = int(_cycles_per_ms() * SLEEP_MS)
    x = torch.randn(args.batch, 3, args.size, args.size, device="cuda")
    forwards = {}
    for name in names:
        torch.manual_seed(0)
        model = timm.create_model(name, img_size=args.size).cuda().eval()

        def forward(model=model) -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(x)

        for _ in range(3):  # compile / autotune the kernels, warm the allocator
            forward()
        forwards[name] = forward
    samples: dict[str, list[dict]] = {n: [] for n in names}
    clocks = []
    for sweep in range(args.sweeps):
        order = names if sweep % 2 == 0 else names[::-1]
        clocks.append({"sweep": sweep, "before": _clocks()})
        for name in order:
            for _ in range(args.iters):
                samples[name].append({"sweep": sweep, **measure_once(forwards[name], cycles)})
        clocks[-1]["after"] = _clocks()
    rows = []
    for name in names:
        row = {"model": name, "size": args.size, "batch": args.batch, "samples": samples[name]}
        for key in ("wall_ms", "host_ms", "gpu_ms"):
            row[key] = _summary([s[key] for s in samples[name]])
        row["syncs"] = row["host_ms"]["max"] >= SLEEP_MS * 0.9
        per_sweep = [[s for s in samples[name] if s["sweep"] == k] for k in range(args.sweeps)]
        row["wall_ms_per_sweep"] = [statistics.median(s["wall_ms"] for s in ss) for ss in per_sweep]
        rows.append(row)
        print(
            f"{name:26s} wall {row['wall_ms']['median']:7.2f} ms [{row['wall_ms']['min']:6.2f}, "
            f"{row['wall_ms']['max']:6.2f}]  host {row['host_ms']['median']:7.2f} [{row['host_ms']['min']:6.2f}, "
            f"{row['host_ms']['max']:6.2f}]  gpu {row['gpu_ms']['median']:7.2f} [{row['gpu_ms']['min']:6.2f}, "
            f"{row['gpu_ms']['max']:6.2f}]{'  SYNCS' if row['syncs'] else ''}"
        )
    result = {"benchmark": STEM, "meta": gpu_meta(argv, args.commit, sleep_ms=SLEEP_MS), "rows": rows,
              "clocks": clocks}  # fmt: skip
    for note in write_result(result, args.out, STEM, plot=_plot):
        print(note)
    return 0


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, key in zip(axes, ("wall_ms", "host_ms", "gpu_ms"), strict=True):
        ax.boxplot([[s[key] for s in r["samples"]] for r in rows], tick_labels=[r["model"] for r in rows])
        ax.set_title(key)
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    axes[0].set_ylabel("ms per forward")
    finish(fig, result, path, note=f" | {rows[0]['size']} px, batch {rows[0]['batch']}, bf16 autocast, inference")


if __name__ == "__main__":
    sys.exit(main())
