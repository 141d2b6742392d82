"""The metadata every GPU benchmark result carries: command, commit, date, GPU and versions.

Built by ``visionlin.train.bench.run_meta`` (the packaged benchmarks use it directly); this keeps the scripts'
older call.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from visionlin.train.bench import run_meta

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
    """``run_meta`` for a script run with ``argv`` (``None``: ``sys.argv``) on the current CUDA device: command,
    commit, date, gpu, torch, cuda, triton, timm, visionlin, python and ``extra``."""
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    return run_meta(command, "cuda", commit or git_commit(), **extra)
