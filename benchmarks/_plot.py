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
