"""Forward latency per image and peak memory as the input grows, for visionlin models and a dense timm twin.

This is the ``visionlin demo`` command; ``python -m visionlin.train.scaling`` takes the same flags. Every flag is
checked before any model is built: a bad value is a usage error (exit status 2) naming it and what is allowed.

Each model runs in its own worker process, sizes in increasing order, so that the process's peak resident memory
(``ru_maxrss``) after each size, minus the level after building the model and a warm-up on a small input (64 px for
16 px patches), is the peak extra memory of that size's forward pass (on CUDA, ``torch.cuda.max_memory_allocated`` is
used instead). A worker that fails (an exception, a crash, a kill by the out-of-memory killer) is reported with its
model and size, the other models still run, and the command exits with status 1.

Results go to ``scaling.json`` (with the command, commit, date, device and versions) and ``scaling.png`` in ``--out``
(default: the current directory). The PNG needs matplotlib (``pip install 'visionlin[bench]'``); without it only the
JSON is written.

Usage:
    visionlin demo [--models infvit_small,deit_small_patch16_224] [--sizes 224,448,896] [--device cpu] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import math
import multiprocessing as mp
import os
import platform
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .._io import atomic_write, draw_or_remove, remove_stale

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_SIZES",
    "MAX_REPEATS",
    "MAX_SIZE",
    "add_arguments",
    "execute",
    "format_table",
    "main",
    "measure",
    "run",
    "validate",
    "write_results",
]

DEFAULT_MODELS = [
    "deit_small_patch16_224",
    "infvit_small",
    "infvit_pure_small",
    "flatten_deit_small",
    "agent_deit_small",
    "inline_deit_small",
]
DEFAULT_SIZES = [224, 448, 896]
DEFAULT_PATCH = 16  # every visionlin model, and timm models whose names state no patch size
MAX_SIZE = 16384  # 1M tokens at 16 px patches: beyond any single device for a batch-1 forward of these models
MAX_REPEATS = 1000
JSON_NAME = "scaling.json"
PNG_NAME = "scaling.png"
INSTALL_PLOT = "pip install 'visionlin[bench]'"
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the checkout root when visionlin runs from a source tree


# Flags ----------------------------------------------------------------------------------------------------------------
def _items(text: str, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",")]
    if items == [""]:
        raise argparse.ArgumentTypeError(f"no {what} given in {text!r}; give a comma-separated list")
    if "" in items:
        raise argparse.ArgumentTypeError(f"empty item in {text!r}; give a comma-separated list without empty entries")
    dup = sorted({s for s in items if items.count(s) > 1})
    if dup:
        raise argparse.ArgumentTypeError(f"{', '.join(dup)} given more than once in {text!r}")
    return items


def _sizes(text: str) -> list[int]:
    sizes = []
    for item in _items(text, "size"):
        if not re.fullmatch(r"\d+", item) or int(item) == 0:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not a positive integer; sizes are comma-separated input sides in pixels, e.g. 224,448"
            )
        if int(item) > MAX_SIZE:
            raise argparse.ArgumentTypeError(f"{item} px is too large; sizes are at most {MAX_SIZE} px")
        sizes.append(int(item))
    if len(set(sizes)) < len(sizes):  # '224,0224'
        raise argparse.ArgumentTypeError(f"a size is given more than once in {text!r}")
    return sorted(sizes)


def _models(text: str) -> list[str]:
    return _items(text, "model")


def _int_in(lo: int, hi: int, meaning: str):
    def parse(text: str) -> int:
        if not re.fullmatch(r"\s*\d+\s*", text) or not lo <= int(text) <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer from {lo} to {hi} ({meaning})")
        return int(text)

    return parse


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the demo's flags to ``parser`` (shared by ``visionlin demo`` and ``python -m visionlin.train.scaling``)."""
    cores = _cpu_cores()
    parser.add_argument(
        "--models",
        type=_models,
        default=list(DEFAULT_MODELS),
        metavar="A,B,...",
        help="comma-separated timm model names: visionlin's (`visionlin list`) or any of timm.list_models() "
        f"(default: {','.join(DEFAULT_MODELS)})",
    )
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=list(DEFAULT_SIZES),
        metavar="S,S,...",
        help=f"comma-separated input sides in pixels, multiples of the models' strides (16 for visionlin's ViTs, 32 "
        f"for its four-stage models), at most {MAX_SIZE} (default: {','.join(map(str, DEFAULT_SIZES))})",
    )
    parser.add_argument(
        "--device", default="cpu", help="'cpu', or 'cuda' / 'cuda:N' for a GPU of this machine (default: cpu)"
    )
    parser.add_argument(
        "--repeats",
        type=_int_in(1, MAX_REPEATS, "timed forwards per size after a warm-up"),
        default=2,
        help="timed forwards per size after one warm-up; the median is reported (default: 2)",
    )
    parser.add_argument(
        "--threads",
        type=_int_in(0, cores, f"torch threads per worker, 0 = torch's default, at most the {cores} usable cores"),
        default=0,
        help=f"torch threads per worker, 0 = torch's default, at most {cores} (default: 0)",
    )
    parser.add_argument(
        "--out",
        default=".",
        metavar="DIR",
        help=f"folder for {JSON_NAME} and {PNG_NAME}, created if missing (default: the current directory)",
    )
    return parser


def _patch_size(name: str) -> int:
    """The patch size a model's name states (``patchN``), else 16 (``bench``'s twin check)."""
    match = re.search(r"patch(\d+)", name)
    return int(match.group(1)) if match else DEFAULT_PATCH


@functools.cache
def _stride(name: str) -> int:
    """The model's total stride: the side every input must be a multiple of (a ViT's patch size; 32 for the
    four-stage models, whose last stage sees 1 / 32 of the side), from its ``feature_info`` on the meta device; the
    name's ``patchN`` (else 16) when the model cannot be built there. Cached: the flag check and the measurement
    both ask."""
    import timm

    try:
        info = timm.create_model(name, device="meta").feature_info
        return max(int(f["reduction"]) for f in info)
    except Exception:  # noqa: BLE001 - any model timm cannot build on meta: the name's patch size
        return _patch_size(name)


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the flags that need timm, torch or the file system; a bad value exits via ``parser.error`` (status 2).

    Sets ``args.device`` to the canonical device string and ``args.out`` to a ``Path`` of a writable folder.
    """
    import timm
    import torch

    import visionlin  # noqa: F401  (registers the models with timm)

    known = set(timm.list_models())
    tagged = set(timm.list_pretrained())
    for name in args.models:
        if name not in known and name not in tagged:
            import difflib

            close = difflib.get_close_matches(name.lower(), sorted(known | tagged), n=3, cutoff=0.7)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            parser.error(
                f"argument --models: unknown model {name!r}{hint}; choose visionlin models (`visionlin list`) "
                "or any name in timm.list_models()"
            )

    text = args.device
    allowed = "use 'cpu', or 'cuda' / 'cuda:N' for a GPU of this machine"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        parser.error(f"argument --device: {text!r} is not a torch device; {allowed}")
    if device.type == "cpu":
        args.device = "cpu"
    elif device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "torch was built without CUDA" if torch.version.cuda is None else "torch sees no CUDA GPU"
            parser.error(f"argument --device: {text!r} is not available on this machine ({why}); use --device cpu")
        if device.index is not None and device.index >= count:
            parser.error(
                f"argument --device: {text!r} does not exist; this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
        args.device = str(device)
    else:
        parser.error(f"argument --device: {text!r} is a torch device the demo does not measure; {allowed}")

    strides = {name: _stride(name.split(".")[0]) for name in args.models}
    multiple = math.lcm(*strides.values())
    bad = [s for s in args.sizes if s % multiple]
    if bad:
        by_stride = {p: [n for n in args.models if strides[n] == p] for p in sorted(set(strides.values()))}
        needs = "; ".join(f"stride {p}: {', '.join(names)}" for p, names in by_stride.items())
        parser.error(
            f"argument --sizes: {', '.join(map(str, bad))} not a multiple of {multiple}; every size must be a "
            f"multiple of {multiple} px for these models ({needs})"
        )

    if not args.out.strip():
        parser.error(f"argument --out: {args.out!r} is not a folder name (leave --out out for the current directory)")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        parser.error(f"argument --out: {str(out)!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".visionlin-write-check-"):
            pass
    except OSError as e:
        parser.error(f"argument --out: cannot write to folder {str(out)!r} ({e.strerror or e})")
    for name in (JSON_NAME, PNG_NAME):
        if (out / name).is_dir():
            parser.error(f"argument --out: {str(out / name)!r} is a folder; the demo writes a file there")
    args.out = out


# Worker ---------------------------------------------------------------------------------------------------------------
def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _create(name: str) -> Any:
    """Build ``name`` accepting any input size where the model allows it (timm ViTs need ``dynamic_img_size``)."""
    import timm

    try:
        return timm.create_model(name, num_classes=1000, dynamic_img_size=True)
    except TypeError as e:  # a model without the keyword (CNNs take any size as they are)
        if "dynamic_img_size" not in str(e):
            raise
        return timm.create_model(name, num_classes=1000)


def _worker(
    name: str, sizes: list[int], multiple: int, device: str, repeats: int, threads: int, conn: Connection
) -> None:
    """Measure ``name`` at every size, sending one message per size, then ``done``; any exception is sent back."""
    size = None
    try:
        import torch

        import visionlin  # noqa: F401  (registers the models)

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = _create(name).eval().to(device)
        cuda = device.startswith("cuda")
        with torch.inference_mode():
            # Warm-up below the first size where the patch size allows: its memory then counts in that size's peak.
            size = multiple * max(1, min(64, sizes[0]) // multiple)
            conn.send({"kind": "at", "size": size})
            model(torch.randn(1, 3, size, size, device=device))
            if cuda:
                torch.cuda.synchronize()
            base = torch.cuda.memory_allocated() if cuda else None
            base_rss = _maxrss_mib()
            for size in sizes:
                conn.send({"kind": "at", "size": size})  # the parent names the size if this process dies
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
                row = {"model": name, "size": size, "latency_ms": 1e3 * statistics.median(times), "peak_mib": peak}
                conn.send({"kind": "row", "row": row})
        conn.send({"kind": "done"})
    except KeyboardInterrupt:
        sys.exit(130)
    except BaseException as e:  # everything goes back to the parent, which reports it; no traceback on stderr here
        message = {
            "kind": "error",
            "size": size,
            "error": f"{type(e).__name__}: {e}"[:2000],
            "traceback": traceback.format_exc()[-8000:],
        }
        with contextlib.suppress(OSError):  # the parent is gone: nobody to tell
            conn.send(message)
        sys.exit(1)


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            sig = signal.Signals(-exitcode).name
        except ValueError:
            sig = f"signal {-exitcode}"
        hint = " (out of memory, or killed by another process)" if -exitcode == signal.SIGKILL else ""
        return f"was killed by {sig}{hint}"
    return f"exited with status {exitcode} without reporting an error"


def _measure(
    ctx: Any, name: str, sizes: list[int], multiple: int, device: str, repeats: int, threads: int, on_row: Any
) -> dict | None:
    """Run one worker; return ``None`` when it measured every size, else an error row. Never waits on a dead worker."""
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_worker, args=(name, sizes, multiple, device, repeats, threads, writer), name=f"visionlin-demo-{name}"
    )
    proc.start()
    writer.close()  # the worker holds the only write end now
    failure = None
    done = False
    at = None  # the size being measured

    def handle(msg: dict) -> None:
        nonlocal failure, done, at
        if msg["kind"] == "at":
            at = msg["size"]
        elif msg["kind"] == "row":
            on_row(msg["row"])
        elif msg["kind"] == "error":
            failure = {"model": name, **{k: msg[k] for k in ("size", "error", "traceback")}}
        done = msg["kind"] in ("done", "error")

    try:
        while not done:
            if reader.poll(1.0):  # waits at most a second, then checks that the worker is still alive
                try:
                    handle(reader.recv())
                except EOFError:
                    break
            elif not proc.is_alive():
                while not done and reader.poll(0.1):  # what it sent before it ended
                    try:
                        handle(reader.recv())
                    except EOFError:
                        break
                break
        proc.join(timeout=60)
    finally:
        if proc.is_alive():  # interrupted, or stuck after reporting
            proc.kill()
            proc.join()
        reader.close()
    if failure is None and not done:
        failure = {"model": name, "size": at, "error": f"worker process {_exit_reason(proc.exitcode)}"}
    return failure


# Results --------------------------------------------------------------------------------------------------------------
def _source_commit(root: Path = _PACKAGE_ROOT) -> str:
    """The git commit of the checkout visionlin runs from, else ``visionlin <version>`` (an installed package)."""

    def git(*cmd: str) -> str:
        res = subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True, timeout=30)
        return res.stdout.strip() if res.returncode == 0 else ""

    try:
        # Only a checkout whose top level is visionlin's own root: site-packages inside some other repository is not.
        top = git("rev-parse", "--show-toplevel")
        if top and Path(top).resolve() == root.resolve() and (root / "visionlin").is_dir():
            commit = git("rev-parse", "HEAD")
            if commit:
                return commit
    except (OSError, subprocess.SubprocessError):
        pass
    import visionlin

    return f"visionlin {visionlin.__version__}"


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def _meta(command: str, device: str, threads: int) -> dict:
    import timm
    import torch

    import visionlin

    return {
        "command": command,
        "commit": _source_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(device),
        "torch_device": device,
        "threads": threads,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "visionlin": visionlin.__version__,
        },
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


def write_results(result: dict, out_dir: Path) -> list[str]:
    """Write ``scaling.json`` and, with matplotlib, ``scaling.png`` to ``out_dir``; return one line per outcome. A
    ``scaling.png`` there that is not drawn anew (no measurement, no matplotlib, the drawing failed) is removed: it
    shows an earlier run, and the folder never pairs the JSON with another run's PNG."""
    notes = []
    json_path = out_dir / JSON_NAME
    png_path = out_dir / PNG_NAME
    atomic_write(json_path, lambda p: p.write_text(json.dumps(result, indent=1) + "\n"))
    notes.append(f"wrote {json_path}")
    rows = [r for r in result["rows"] if "error" not in r]
    if not rows:
        notes.append(f"{PNG_NAME} skipped: no model produced a measurement")
        return notes + remove_stale(png_path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        notes.append(f"{PNG_NAME} skipped: matplotlib is not installed; install it with {INSTALL_PLOT}")
        return notes + remove_stale(png_path)
    commit = result["commit"]
    commit = commit[:8] if re.fullmatch(r"[0-9a-f]{40}", commit) else commit
    title = f"{result['device']} | torch {result['versions']['torch']} | {commit} | {result['date']}"
    draw_or_remove(png_path, lambda p: _plot(rows, p, title))
    notes.append(f"wrote {png_path}")
    return notes


def measure(models: list[str], sizes: list[int], device: str, repeats: int, threads: int, command: str = "") -> dict:
    """Measure every model at every size, one worker process per model; the result ``scaling.json`` holds.

    The arguments are expected valid (see ``validate``). A model whose worker fails gets an ``error`` row (with the
    size it failed at and the worker's traceback) and the next model runs.
    """
    from tqdm import tqdm

    sizes = sorted(sizes)
    ctx = mp.get_context("spawn")
    rows: list[dict] = []
    with tqdm(total=len(models) * len(sizes), desc="scaling", unit="run") as bar:
        for name in models:
            measured = 0

            def on_row(row: dict, name: str = name) -> None:
                nonlocal measured
                rows.append(row)
                measured += 1
                bar.set_postfix_str(f"{name} {row['size']}px")
                bar.update(1)

            multiple = _stride(name.split(".")[0])
            failure = _measure(ctx, name, sizes, multiple, device, repeats, threads, on_row)
            if failure is not None:
                rows.append(failure)
                bar.update(len(sizes) - measured)
                at = f" at {failure['size']} px" if failure["size"] else ""
                tqdm.write(f"error: {name} failed{at}: {failure['error']}", file=sys.stderr)
    meta = _meta(command, device, threads)
    return {**meta, "models": models, "sizes": sizes, "repeats": repeats, "batch": 1, "rows": rows}


def run(
    models: list[str],
    sizes: list[int],
    device: str,
    repeats: int,
    threads: int,
    out_dir: Path,
    command: str = "",
) -> tuple[dict, list[str]]:
    """``measure``, then ``write_results`` to ``out_dir``: the result and one line per file written or skipped."""
    result = measure(models, sizes, device, repeats, threads, command)
    return result, write_results(result, out_dir)


def format_table(result: dict) -> str:
    """A plain-text table: one row per model, latency (ms) and peak memory (MiB) per size."""
    rows = result["rows"]
    sizes = sorted({r["size"] for r in rows if "error" not in r})
    head = f"{'model':28s}" + "".join(f"{f'{s}px ms':>12s}{f'{s}px MiB':>12s}" for s in sizes)
    lines = [head, "-" * len(head)]
    for name in dict.fromkeys(r["model"] for r in rows):
        errs = [r["error"] for r in rows if r["model"] == name and "error" in r]
        cells = {r["size"]: r for r in rows if r["model"] == name and "error" not in r}
        line = f"{name:28s}"
        for s in sizes:
            c = cells.get(s)
            line += f"{c['latency_ms']:12.1f}{c['peak_mib']:12.1f}" if c else f"{'-':>12s}{'-':>12s}"
        lines.append(line + (f"  ERROR {errs[0].splitlines()[0]}" if errs else ""))
    return "\n".join(lines)


def execute(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> int:
    """Validate ``args`` (parsed by a parser given ``add_arguments``), run the demo, print the table; exit status."""
    try:
        validate(parser, args)
        threads = args.threads
        if not threads:
            import torch

            threads = torch.get_num_threads()
        result = measure(args.models, args.sizes, args.device, args.repeats, threads, command)
    except KeyboardInterrupt:
        print("interrupted; nothing written", file=sys.stderr)
        return 130
    try:
        notes = write_results(result, args.out)
    except OSError as e:  # disk full, folder removed meanwhile
        print(f"error: could not write the results to {str(args.out)!r}: {e}", file=sys.stderr)
        return 1
    print(format_table(result))
    print()
    print("\n".join(notes))
    failed = [r for r in result["rows"] if "error" in r]
    if failed:
        names = ", ".join(r["model"] for r in failed)
        print(
            f"error: {len(failed)} of {len(result['models'])} models failed ({names}); "
            f"their error rows and tracebacks are in {args.out / JSON_NAME}",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m visionlin.train.scaling") -> int:
    """Entry point with the ``visionlin demo`` flags; ``prog`` names the command in usage and in the results."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = add_arguments(argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    return execute(parser, args, shlex.join([*shlex.split(prog), *argv]))


if __name__ == "__main__":
    sys.exit(main())
