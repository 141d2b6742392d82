"""The Fashion-MNIST results table: every family's small model and two softmax baselines trained with one recipe and
one budget, plus a distillation row, all through ``visionlin train`` / ``visionlin distill``.

    python benchmarks/fashion_mnist_table.py --out DIR [--epochs 6] [--parallel 4] [--time-budget 480]

Each training is its own ``visionlin train -c fashion_mnist`` process (the shipped recipe: 64 px, AdamW, cosine, bf16);
``--parallel`` of them share the GPU at once, so their logged img/s are not comparable. The table's throughput is
measured afterwards, alone, one model at a time (synthetic batch at the recipe's size and batch: forward, backward and
AdamW under bf16 autocast, median of alternating sweeps). Params and GMACs are counted at the recipe's input size with
10 classes (``FlopCounterMode``: matrix products and convolutions). The distillation row trains ``infvit_small`` from
the table's own ``deit_small`` run (``--teacher-checkpoint`` the teacher's run folder), next to the same student trained
from scratch with the same budget.

Writes ``fashion_mnist_table.json`` (metadata, per-model curves and results), ``fashion_mnist_table.md`` (the table
and the exact commands), ``fashion_mnist_table.png`` (test top-1 per epoch, final top-1 vs train img/s) and
``fashion_mnist_runs.tar.gz`` (each run's ``log.jsonl``, resolved ``config.yaml`` and ``curves.png``). A run that did
not finish inside ``--time-budget`` is recorded as such, never dropped.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._meta import gpu_meta  # noqa: E402
from visionlin.train.bench import run_meta  # noqa: E402

TEACHER = "deit_small_patch16_224"
STUDENT = "infvit_small"
BASELINES = [TEACHER, "swin_tiny_patch4_window7_224"]
#: The small configuration of every family (the one nearest DeiT-S / Swin-T in size), isotropic then hierarchical.
FAMILIES = [
    "infvit_small",
    "infvit_pure_small",
    "flatten_deit_small",
    "agent_deit_small",
    "inline_deit_small",
    "flatten_pvt_small",
    "agent_pvt_small",
    "flatten_swin_tiny",
    "agent_swin_tiny",
    "nat_tiny",
    "dinat_tiny",
    "mambavision_tiny",
    "vig_small",
    "mavit_small",
    "ravlt_small",
    "nalaformer_small",
]
DISTILL_ROW = f"{STUDENT} (distilled from {TEACHER})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the table, plot, JSON and the runs' logs")
    p.add_argument("--runs", default=None, help="folder of the training runs (default: OUT/runs)")
    p.add_argument("--models", default=",".join(BASELINES + FAMILIES), help="models to train (comma-separated)")
    p.add_argument("--no-distill", action="store_true", help="skip the distillation row")
    p.add_argument(
        "--reuse", action="store_true", help="keep runs already complete in --runs (all epochs and an end record)"
    )
    p.add_argument("--recipe", default="fashion_mnist", help="training recipe (default: the shipped fashion_mnist)")
    p.add_argument("--epochs", type=int, default=6, help="epochs per run (the one budget of every row)")
    p.add_argument("--img-size", type=int, default=64, help="input side (default 64, the recipe's)")
    p.add_argument("--batch-size", type=int, default=256, help="batch per step (default 256, the recipe's)")
    p.add_argument("--workers", type=int, default=3, help="dataloader workers per run")
    p.add_argument("--parallel", type=int, default=4, help="runs sharing the GPU at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=None, help="seconds after which no run starts (default: none)")
    p.add_argument("--hard-limit", type=float, default=None, help="seconds after which running runs are stopped")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="extra arguments of every model")
    p.add_argument("--train-args", default="", help="extra flags for every run (e.g. a data folder for smoke tests)")
    p.add_argument("--speed-steps", type=int, default=20, help="timed training steps per model and sweep")
    p.add_argument("--speed-sweeps", type=int, default=3, help="sweeps in alternating order (median reported)")
    p.add_argument("--speed-budget", type=float, default=None, help="seconds for the throughput pass (default: none)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for smoke tests")
    p.add_argument("--commit", default=None, help="commit to record (default: the checkout's HEAD)")
    args = p.parse_args(argv)
    for name in ("epochs", "img_size", "batch_size", "parallel", "speed_steps", "speed_sweeps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    try:
        args.kwargs = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.model_kwargs)}
    except ValueError:
        p.error(f"--model-kwargs takes KEY=VALUE items, got {args.model_kwargs}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models:
        p.error("--models is empty")
    return args


def _common_flags(args: argparse.Namespace, name: str) -> list[str]:
    flags = ["-c", args.recipe, "--epochs", str(args.epochs), "--img-size", str(args.img_size)]
    flags += ["--batch-size", str(args.batch_size), "--workers", str(args.workers), "--seed", str(args.seed)]
    flags += ["--output", str(args.runs), "--experiment", name, "--checkpoint-hist", "1", "--log-interval", "50"]
    if args.device == "cpu":
        flags.append("--cpu")
    if args.model_kwargs:
        flags += ["--model-kwargs", *args.model_kwargs]
    return flags + shlex.split(args.train_args)


def jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The runs: one ``visionlin train`` per model, then the distillation (it waits for the teacher's run)."""
    cli = [sys.executable, "-m", "visionlin.cli"]
    out = [
        {"row": m, "name": m, "cmd": [*cli, "train", "--model", m, *_common_flags(args, m)], "after": None}
        for m in args.models
    ]
    if not args.no_distill and TEACHER in args.models:
        name = f"{STUDENT}-distilled"
        teacher_run = str(Path(args.runs) / TEACHER)
        flags = ["--teacher", TEACHER, "--teacher-checkpoint", teacher_run, "--distill-logits", "1.0"]
        flags += ["--distill-temperature", "1.0"]
        if args.model_kwargs:
            flags += ["--teacher-kwargs", *args.model_kwargs]
        out.append(
            {
                "row": DISTILL_ROW,
                "name": name,
                "cmd": [*cli, "distill", "--model", STUDENT, *flags, *_common_flags(args, name)],
                "after": TEACHER,
            }
        )
    # The teacher first and the distillation next (it starts as soon as the teacher is done), then the longest runs
    # (the hierarchical models, in FAMILIES' reverse order: the slowest per image last in FAMILIES) so that the
    # budget's end is not spent waiting for one long run.
    rank = {m: i for i, m in enumerate(reversed(FAMILIES))}
    out.sort(key=lambda j: (j["name"] != TEACHER, j["after"] is None, rank.get(j["name"], len(rank))))
    return out


def run_jobs(
    args: argparse.Namespace, todo: list[dict[str, Any]], on_done: Callable[[dict], None] | None = None
) -> dict[str, dict[str, Any]]:
    """Run ``todo`` with at most ``--parallel`` at once; returns name -> {status, seconds, returncode}. ``on_done``
    gets the statuses so far after each run ends (the caller writes the table as it fills)."""
    start = time.monotonic()
    pending, running, done = list(todo), {}, {}
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    while pending or running:
        now = time.monotonic() - start
        for name, (proc, t0, fh) in list(running.items()):
            if proc.poll() is None and args.hard_limit is not None and now > args.hard_limit:
                proc.kill()
                proc.wait()
                fh.close()
                done[name] = {"status": "stopped at the hard limit", "seconds": now - t0, "returncode": None}
                del running[name]
            elif proc.poll() is not None:
                fh.close()
                ok = proc.returncode == 0
                status = "finished" if ok else f"failed (exit {proc.returncode})"
                done[name] = {"status": status, "seconds": time.monotonic() - start - t0, "returncode": proc.returncode}
                run = read_run(Path(args.runs) / name)
                last = run["epochs"][-1] if run["epochs"] else {}
                print(f"[{now:7.1f}s] {name}: {status} in {done[name]['seconds']:.0f}s, test top-1 "
                      f"{last.get('val_top1')}, data wait {last.get('data_wait_pct')}%", flush=True)  # fmt: skip
                del running[name]
                if on_done is not None:
                    on_done(done)
        for job in list(pending):
            if len(running) >= args.parallel:
                break
            if job["after"] is not None and job["after"] not in done:
                continue
            pending.remove(job)
            if args.reuse and _complete(Path(args.runs) / job["name"], args.epochs):
                done[job["name"]] = {"status": "finished", "seconds": 0.0, "returncode": 0, "reused": True}
                print(f"[{now:7.1f}s] {job['name']}: complete in {args.runs}, reused", flush=True)
                continue
            if job["after"] is not None and done[job["after"]]["returncode"] != 0:
                done[job["name"]] = {"status": f"not run: {job['after']} did not finish", "seconds": 0.0}
                continue
            if args.time_budget is not None and now > args.time_budget:
                done[job["name"]] = {"status": "not run: time budget spent", "seconds": 0.0}
                continue
            stale = Path(args.runs) / job["name"]
            if args.reuse and stale.exists():  # an incomplete run of an earlier call: kept aside, not appended to
                stale.rename(stale.with_name(f"{job['name']}.incomplete-{int(time.time())}"))
            log = Path(args.runs) / f"{job['name']}.stdout.log"
            fh = open(log, "w")  # noqa: SIM115  (closed when the process ends)
            proc = subprocess.Popen(job["cmd"], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
            running[job["name"]] = (proc, now, fh)
            print(f"[{now:7.1f}s] start {job['name']}: {shlex.join(job['cmd'][1:])}", flush=True)
        time.sleep(0.5)
    return done


def _complete(run_dir: Path, epochs: int) -> bool:
    run = read_run(run_dir)
    return run["end"] is not None and sum(e.get("val_top1") is not None for e in run["epochs"]) == epochs


def read_run(run_dir: Path) -> dict[str, Any]:
    """Per-epoch test metrics, the train-loss curve and the end record of a run's ``log.jsonl``."""
    epochs, train, end = [], [], None
    path = run_dir / "log.jsonl"
    if not path.exists():
        return {"epochs": [], "train": [], "end": None}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "epoch":
            keys = ("epoch", "val_top1", "val_top5", "val_loss", "val_n", "data_wait_pct")
            epochs.append({k: rec.get(k) for k in keys})
        elif rec.get("kind") == "train":
            train.append({k: rec.get(k) for k in ("step", "epoch", "loss", "lr", "img_s")})
        elif rec.get("kind") == "end":
            end = rec
    return {"epochs": epochs, "train": train, "end": end}


def _create(name: str, args: argparse.Namespace) -> torch.nn.Module:
    import timm

    import visionlin  # noqa: F401  (registers the models)

    return timm.create_model(name, num_classes=10, img_size=args.img_size, **args.kwargs)


def count(name: str, args: argparse.Namespace) -> dict[str, float]:
    """Params (M) and GMACs at the recipe's input size with the table's 10-class head."""
    import visionlin

    return visionlin.model_complexity(_create(name, args), args.img_size)


def train_speed(names: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Training img/s of each model alone: synthetic batches, forward + backward + AdamW under bf16 autocast. With
    ``--speed-budget`` the models are taken in order while the budget lasts (the rest get no number)."""
    device = torch.device(args.device)
    t_start = time.monotonic()
    setups = {}
    for name in names:
        if args.speed_budget is not None and time.monotonic() - t_start > 0.4 * args.speed_budget:
            break  # building and warming up took 40% of the budget: the sweeps get the rest
        torch.manual_seed(0)
        model = _create(name, args).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
        y = torch.randint(0, 10, (args.batch_size,), device=device)
        setups[name] = (model, opt, x, y)

    def steps(name: str, n: int) -> float:
        model, opt, x, y = setups[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    names = list(setups)
    for name in names:
        steps(name, 3)  # warm-up: kernels' autotuning, allocator
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rates: dict[str, list[float]] = {n: [] for n in names}
    for sweep in range(args.speed_sweeps):
        for name in names if sweep % 2 == 0 else reversed(names):
            rates[name].append(args.batch_size * args.speed_steps / steps(name, args.speed_steps))
    return {n: statistics.median(r) for n, r in rates.items()}


def _plot(result: dict[str, Any], path: Path) -> None:
    """Test top-1 per epoch and the training loss per step of every row; final top-1 vs training img/s when the
    throughput pass measured them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [r for r in result["rows"] if r.get("top1") is not None and r.get("train_img_s")]
    fig, axes = plt.subplots(1, 3 if speed else 2, figsize=(21 if speed else 15, 6))
    colors = plt.get_cmap("tab20").colors
    for ax in axes:
        ax.set_prop_cycle(color=colors)
    for row in result["rows"]:
        style = "--" if row["model"] in BASELINES else "-"
        ep = [e for e in row["curve"] if e.get("val_top1") is not None]
        if ep:
            axes[0].plot([e["epoch"] + 1 for e in ep], [e["val_top1"] for e in ep], style, marker=".", label=row["row"])
        tr = [t for t in row.get("train_curve", []) if t.get("loss") is not None]
        if tr:
            axes[1].plot([t["step"] for t in tr], [t["loss"] for t in tr], style, lw=1, label=row["row"])
    axes[0].set(xlabel="epoch", ylabel="Fashion-MNIST test top-1 (%)")
    axes[0].set_title(f"test top-1 per epoch ({result['setup']['img_size']} px)")
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].set(xlabel="optimizer step", ylabel="training loss (label smoothing 0.1)", title="training loss")
    for ax in axes:
        ax.grid(alpha=0.3)
    if speed:
        for row in speed:
            axes[2].scatter(row["train_img_s"], row["top1"], marker="s" if row["model"] in BASELINES else "o")
            axes[2].annotate(row["row"], (row["train_img_s"], row["top1"]), fontsize=7)
        axes[2].set_xscale("log")
        axes[2].set(xlabel="train img/s (alone, bf16)", ylabel="final test top-1 (%)")
        axes[2].set_title("final top-1 vs training throughput")
    fig.suptitle(f"{result['meta'].get('gpu', '')}  commit {result['meta'].get('commit', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reused_note(rows: list[dict[str, Any]]) -> str:
    """Which rows' training runs came from an earlier invocation (``--reuse``): their accuracy is that run's, at the
    commit that trained it (its ``config.yaml`` and log are in ``runs/``)."""
    reused = [r["model"] for r in rows if r.get("reused")]
    if not reused:
        return ""
    fresh = [r["model"] for r in rows if not r.get("reused")]
    return (
        f" {len(reused)} of {len(rows)} training runs were reused from an earlier invocation (`--reuse`; logs and "
        f"configs are in `runs/`); trained in this one: {', '.join(fresh) if fresh else 'none'}."
    )


def _markdown(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [
        f"# Fashion-MNIST results ({s['img_size']} px, {s['epochs']} epochs, recipe `{s['recipe']}`)",
        "",
        f"{result['meta'].get('gpu', '')}, commit {result['meta'].get('commit')}, {result['meta'].get('date')}. "
        f"Test top-1 is the last epoch's (on {result['setup']['test_images']} test images); train img/s is measured "
        "alone after the runs." + _reused_note(result["rows"]),
        "",
        "| model | test top-1 (%) | best (%) | train img/s | params (M) | GMACs | status |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]

    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    for r in result["rows"]:
        lines.append(
            f"| {r['row']} | {f(r.get('top1'), '.2f')} | {f(r.get('best_top1'), '.2f')} | "
            f"{f(r.get('train_img_s'), '.0f')} | {f(r.get('params_m'), '.1f')} | {f(r.get('gmacs'), '.3f')} | "
            f"{r['status']} |"
        )
    lines += ["", "Commands (each run's resolved config is saved in its run folder):", "", "```"]
    lines += [r["command"] for r in result["rows"]]
    lines += ["```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--replot"]:  # redraw the PNG of a result: --replot RESULT.json
        if len(argv) != 2 or not Path(argv[1]).is_file():
            print("usage: fashion_mnist_table.py --replot RESULT.json", file=sys.stderr)
            return 2
        path = Path(argv[1])
        _plot(json.loads(path.read_text()), path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
        return 0
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.runs = Path(args.runs) if args.runs else out / "runs"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: pass --device cpu for a smoke run", file=sys.stderr)
        return 2
    argv_used = argv
    meta = (
        gpu_meta(argv_used, args.commit)
        if args.device == "cuda"
        else run_meta(shlex.join(["fashion_mnist_table.py", *argv_used]), "cpu", args.commit or "unknown")
    )
    todo = jobs(args)
    counts: dict[str, dict[str, float]] = {}
    t0 = time.monotonic()

    def write(status: dict[str, dict[str, Any]], speed: dict[str, float]) -> dict[str, Any]:
        rows = []
        for job in todo:
            model = job["name"] if job["after"] is None else STUDENT
            run = read_run(Path(args.runs) / job["name"])
            tops = [e["val_top1"] for e in run["epochs"] if e.get("val_top1") is not None]
            st = status.get(job["name"], {"status": "not run yet"})
            complete = st["status"] == "finished" and len(tops) == args.epochs
            if model not in counts:
                counts[model] = count(model, args)
            rows.append(
                {
                    "row": job["row"],
                    "model": model,
                    "status": st["status"] if complete or st["status"] != "finished" else "finished (epochs missing)",
                    "seconds": round(st.get("seconds", 0.0), 1),
                    "reused": bool(st.get("reused")),
                    "top1": tops[-1] if complete else None,
                    "best_top1": max(tops) if tops else None,
                    "epochs_done": len(tops),
                    "train_img_s": speed.get(model),
                    "data_wait_pct": run["epochs"][-1].get("data_wait_pct") if run["epochs"] else None,
                    "curve": run["epochs"],
                    "train_curve": run["train"][:: max(1, len(run["train"]) // 200)],
                    "command": "visionlin " + shlex.join(job["cmd"][3:]),
                    **counts[model],
                }
            )
        result = {
            "meta": meta,
            "setup": {
                "recipe": args.recipe,
                "epochs": args.epochs,
                "img_size": args.img_size,
                "batch_size": args.batch_size,
                "parallel": args.parallel,
                "workers": args.workers,
                "train_seconds": round(time.monotonic() - t0, 1),
                "test_images": next((e["val_n"] for r in rows for e in r["curve"] if e.get("val_n")), None),
                "speed_steps": args.speed_steps,
                "speed_sweeps": args.speed_sweeps,
            },
            "rows": rows,
        }
        (out / "fashion_mnist_table.json").write_text(json.dumps(result, indent=1))
        (out / "fashion_mnist_table.md").write_text(_markdown(result))
        return result

    status = run_jobs(args, todo, on_done=lambda st: write(st, {}))
    write(status, {})
    models = [j["name"] for j in todo if j["after"] is None]
    print("measuring training throughput alone ...", flush=True)
    result = write(status, train_speed(models, args))
    _plot(result, out / "fashion_mnist_table.png")
    with tarfile.open(out / "fashion_mnist_runs.tar.gz", "w:gz") as tar:
        for job in todo:
            d = Path(args.runs) / job["name"]
            for f in ("log.jsonl", "config.yaml", "curves.png"):
                if (d / f).exists():
                    tar.add(d / f, arcname=f"{job['name']}/{f}")
            log = Path(args.runs) / f"{job['name']}.stdout.log"
            if log.exists():
                tar.add(log, arcname=log.name)
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
