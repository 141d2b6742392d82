"""Forward latency per image and peak memory as the input grows, for visionlin models and a dense timm twin.

Each model runs in its own worker process, sizes in increasing order, so that the process's peak resident memory
(``ru_maxrss``) after each size, minus the level after building the model and a warm-up at the smallest size, is the
peak extra memory of that size's forward pass (on CUDA, ``torch.cuda.max_memory_allocated`` is used instead).
Results go to ``benchmarks/results/<device>/scaling.json`` and ``scaling.png`` with the command, commit, date,
device and versions.

Usage:
    python -m benchmarks.scaling [--models infvit_small,deit_small_patch16_224] [--sizes 224,448,896] [--device cpu]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_MODELS = [
    "deit_small_patch16_224",
    "infvit_small",
    "infvit_pure_small",
    "flatten_deit_small",
    "agent_deit_small",
    "inline_deit_small",
]
DEFAULT_SIZES = [224, 448, 896]
ROOT = Path(__file__).resolve().parents[1]


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _worker(name: str, sizes: list[int], device: str, repeats: int, threads: int, queue: mp.Queue) -> None:
    import timm
    import torch

    import visionlin  # noqa: F401  (registers the models)

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    kwargs = {"dynamic_img_size": True} if name.startswith(("deit", "vit")) else {}
    model = timm.create_model(name, num_classes=1000, **kwargs).eval().to(device)
    cuda = device.startswith("cuda")
    try:
        with torch.inference_mode():
            model(torch.randn(1, 3, 64, 64, device=device))
            base = torch.cuda.memory_allocated() if cuda else None
            base_rss = _maxrss_mib()
            for size in sizes:
                x = torch.randn(1, 3, size, size, device=device)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                times = []
                for i in range(repeats + 1):
                    t0 = time.perf_counter()
                    model(x)
                    if cuda:
                        torch.cuda.synchronize()
                    if i:  # the first run is a warm-up
                        times.append(time.perf_counter() - t0)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _maxrss_mib() - base_rss
                queue.put({"model": name, "size": size, "latency_ms": 1e3 * statistics.median(times), "peak_mib": peak})
    except Exception as e:  # reported, not hidden: the row says what failed
        queue.put({"model": name, "error": f"{type(e).__name__}: {e}"})
    queue.put(None)


def _meta(argv: list[str], device: str) -> dict:
    import timm
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    if device.startswith("cuda"):
        device_name = torch.cuda.get_device_name()
    else:
        device_name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    device_name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {
        "command": " ".join(argv),
        "commit": commit,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__},
    }


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["model"] for r in rows if "error" not in r):
        pts = [r for r in rows if r.get("model") == name and "error" not in r]
        style = "--" if name.startswith("deit") else "-"
        axes[0].plot([p["size"] for p in pts], [p["latency_ms"] for p in pts], style, marker="o", label=name)
        axes[1].plot([p["size"] for p in pts], [max(p["peak_mib"], 1e-3) for p in pts], style, marker="o", label=name)
    for ax, ylabel in zip(axes, ["forward latency per image (ms)", "peak extra memory (MiB)"], strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("input side (px)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(models: list[str], sizes: list[int], device: str, repeats: int, threads: int, out_dir: Path) -> dict:
    """Measure every model at every size (one worker process per model) and write JSON + PNG to ``out_dir``."""
    from tqdm import tqdm

    sizes = sorted(sizes)
    ctx = mp.get_context("spawn")
    rows: list[dict] = []
    with tqdm(total=len(models) * len(sizes), desc="scaling", unit="run") as bar:
        for name in models:
            queue = ctx.Queue()
            proc = ctx.Process(target=_worker, args=(name, sizes, device, repeats, threads, queue))
            proc.start()
            while (item := queue.get()) is not None:
                rows.append(item)
                bar.set_postfix_str(f"{name} {item.get('size', '')}")
                bar.update(1 if "error" not in item else len(sizes))
            proc.join()
    result = {**_meta(sys.argv, device), "repeats": repeats, "batch": 1, "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scaling.json").write_text(json.dumps(result, indent=1))
    title = (
        f"{result['device']} | torch {result['versions']['torch']} | commit {result['commit'][:8]} | {result['date']}"
    )
    _plot(rows, out_dir / "scaling.png", title)
    return result


def format_table(result: dict) -> str:
    """A plain-text table: one row per model, latency (ms) and peak memory (MiB) per size."""
    rows = result["rows"]
    sizes = sorted({r["size"] for r in rows if "size" in r})
    head = f"{'model':28s}" + "".join(f"{f'{s}px ms':>12s}{f'{s}px MiB':>12s}" for s in sizes)
    lines = [head, "-" * len(head)]
    for name in dict.fromkeys(r["model"] for r in rows):
        errs = [r["error"] for r in rows if r["model"] == name and "error" in r]
        cells = {r["size"]: r for r in rows if r["model"] == name and "size" in r}
        line = f"{name:28s}"
        for s in sizes:
            c = cells.get(s)
            line += f"{c['latency_ms']:12.1f}{c['peak_mib']:12.1f}" if c else f"{'-':>12s}{'-':>12s}"
        lines.append(line + (f"  ERROR {errs[0]}" if errs else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0 = torch default)")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    args = parser.parse_args(argv)
    import torch

    threads = args.threads or torch.get_num_threads()
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / ("cpu" if args.device == "cpu" else "cuda")
    result = run(
        args.models.split(","), [int(s) for s in args.sizes.split(",")], args.device, args.repeats, threads, out
    )
    print(format_table(result))
    print(f"\nwrote {out / 'scaling.json'} and {out / 'scaling.png'}")
    return 0 if not any("error" in r for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
