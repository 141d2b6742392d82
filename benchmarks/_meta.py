"""The metadata every GPU benchmark result carries: command, commit, date, GPU and versions."""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The checkout's short HEAD, or ``"unknown"`` (a copied tree may carry a stale or no git directory: pass the
    commit explicitly then)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def gpu_meta(argv: list[str] | None, commit: str | None = None, **extra: Any) -> dict[str, Any]:
    """``{"command", "commit", "date", "gpu", "torch", "triton", "python", **extra}`` for a script run with ``argv``
    (``None``: ``sys.argv``)."""
    import triton

    return {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "commit": commit or git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        **extra,
    }
