"""Curves of a training run from its ``log.jsonl``: ``visionlin plot RUN_DIR`` writes ``RUN_DIR/curves.png``
(training loss and learning rate per step, validation loss and top-1 / top-5 per epoch)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "execute", "plot_run", "read_log"]

INSTALL_PLOT = "pip install 'visionlin[bench]'"


_EPOCH_SERIES = ("val_loss", "val_top1", "val_top5", "ema_val_top1")


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def read_log(run_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The run's records by kind. A resumed run re-logs the steps after its checkpoint: the later record of a step
    (or epoch) replaces the earlier one. A last line cut short (a killed process) is skipped; any other line that is
    not a record, or a log without training records, raises ``ValueError`` naming it."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no log.jsonl in {str(run_dir)!r} (is it a `visionlin train` run folder?)")
    train: dict[int, dict] = {}
    epochs: dict[int, dict] = {}
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(path)!r} is not a text log ({e})") from None
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):  # the last line cut short by a killed process
                continue
            raise ValueError(f"{str(path)!r} line {i} is not JSON: {line[:80]!r}") from None
        kind = rec.get("kind") if isinstance(rec, dict) else None
        try:
            if kind == "train":
                train[int(rec["step"])] = rec
            elif kind == "epoch":
                epochs[int(rec["epoch"])] = rec
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{str(path)!r} line {i}: a {kind!r} record without its index: {line[:80]!r}") from None
        # the values the plot draws: numbers (a missing loss was a KeyError, a string a category axis, exit 0)
        needed = ("loss", "lr") if kind == "train" else ("step",) if kind == "epoch" and "val_loss" in rec else ()
        for key in needed + tuple(k for k in _EPOCH_SERIES if kind == "epoch" and k in rec):
            if not _number(rec.get(key)):
                raise ValueError(f"{str(path)!r} line {i}: a {kind!r} record whose {key!r} is not a number: "
                                 f"{line[:80]!r}")  # fmt: skip
    if not train:
        raise ValueError(f"{str(path)!r} has no training records: nothing to plot")
    return {"train": [train[k] for k in sorted(train)], "epoch": [epochs[k] for k in sorted(epochs)]}


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the curves of ``run_dir`` to ``out`` (default ``RUN_DIR/curves.png``); returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(f"plotting needs matplotlib: {INSTALL_PLOT}") from e
    log = read_log(run_dir)
    out = Path(out) if out else Path(run_dir) / "curves.png"
    if out.is_dir() or not out.parent.is_dir():
        raise FileNotFoundError(f"--out {str(out)!r} must be a file path in an existing folder")
    fmt = out.suffix[1:].lower() or "png"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    if fmt not in fig.canvas.get_supported_filetypes():  # (a .pdf got PNG bytes)
        plt.close(fig)
        raise ValueError(f"--out {str(out)!r}: matplotlib cannot write {out.suffix!r} files; use one of "
                         f"{', '.join('.' + k for k in sorted(fig.canvas.get_supported_filetypes()))}")  # fmt: skip
    steps = [r["step"] for r in log["train"]]
    axes[0].plot(steps, [r["loss"] for r in log["train"]], label="train (per step)")
    # each series over the epochs that have it: a resumed run may have turned validation or the EMA off (or on)
    val = [r for r in log["epoch"] if "val_loss" in r]
    if val:
        axes[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    for key, style in (("val_top1", "o-"), ("val_top5", "s--"), ("ema_val_top1", "^:")):
        if have := [r for r in log["epoch"] if key in r]:
            axes[1].plot([r["epoch"] + 1 for r in have], [r[key] for r in have], style, label=key.replace("_", " "))
    if axes[1].lines:
        axes[1].legend()
    axes[0].set(xlabel="optimizer step", ylabel="loss", title="loss")
    axes[0].legend()
    axes[1].set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    axes[2].plot(steps, [r["lr"] for r in log["train"]])
    axes[2].set(xlabel="optimizer step", ylabel="learning rate", title="learning rate")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(str(Path(run_dir).resolve().name))
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.{fmt}")
    fig.savefig(tmp, dpi=100, format=fmt)
    plt.close(fig)
    tmp.replace(out)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a `visionlin train` run folder (with log.jsonl)")
    p.add_argument("--out", default=None, help="image path, its format from the suffix (.png, .pdf, .svg, ...; "
                   "default: RUN_DIR/curves.png)")  # fmt: skip


def execute(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    try:
        print(f"wrote {plot_run(args.run_dir, args.out)}")
    except ValueError as e:
        parser.error(str(e))
    except OSError as e:  # ours name the problem; the file system's name the file (a PermissionError traceback)
        parser.error(f"cannot use {e.filename!r}: {e.strerror or e}" if e.filename else str(e))
    except ImportError as e:
        print(f"visionlin plot: {e}", flush=True)
        return 1
    return 0
