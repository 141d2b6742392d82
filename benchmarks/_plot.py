"""Plot pieces shared by the benchmark scripts: grouped bar charts and the figure footer (GPU, versions, commit,
date from the result's ``meta``, as ``visionlin bench`` titles its own plots)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from visionlin.train.bench import _title


def grouped_bars(
    ax: Any,
    groups: Sequence[str],
    series: Sequence[str],
    value: Callable[[str, str], float],
    *,
    label_fmt: str | None = None,
    label_size: int = 6,
    **tick_kwargs: Any,
) -> None:
    """One bar per ``series`` entry in each of ``groups`` (height ``value(group, series)``, 0 for a missing one),
    optionally labelled with ``label_fmt``; the group names as x ticks (``tick_kwargs``: their font size, rotation),
    the series in the legend's order."""
    width = 0.8 / max(1, len(series))
    for i, s in enumerate(series):
        bars = ax.bar([j + i * width for j in range(len(groups))], [value(g, s) for g in groups], width, label=s)
        if label_fmt:
            ax.bar_label(bars, fmt=label_fmt, fontsize=label_size)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(groups))], groups, **tick_kwargs)


def finish(fig: Any, result: dict, path: Path, *, note: str = "", fontsize: int = 8) -> None:
    """Title ``fig`` with the run's GPU, versions, commit and date (plus ``note``), save it to ``path``, close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(_title(result) + note, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def forward_backward_bars(result: dict, path: Path, rows: Sequence[dict]) -> None:
    """Two panels, ``forward`` and ``forward_backward``: ms per call of each ``row["method"]`` grouped by
    ``row["shape"]`` (an op benchmark's rows, ``mode`` one of the two), titled and saved by :func:`finish`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ms = {(r["shape"], r["method"], r["mode"]): r["ms"] for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, ("forward", "forward_backward"), strict=True):
        grouped_bars(ax, shapes, methods, lambda s, m, mode=mode: ms.get((s, m, mode), 0.0), label_fmt="%.3f",
                     fontsize=7, rotation=15)  # fmt: skip
        ax.set_ylabel("ms per call (median)")
        ax.set_title(mode, fontsize=9)
        ax.legend(fontsize=7)
    finish(fig, result, path, fontsize=7)
