"""Kept for old commands: the op-level linear-attention benchmark now ships in the package as
``visionlin.train.bench_op`` (``visionlin bench op``).

Usage (on a GPU machine; the same flags as ``visionlin bench op``):
    python benchmarks/op_linear.py --out benchmarks/results/h200 [--sweep] [--commit SHA]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visionlin.train.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["op", *sys.argv[1:]], prog="python benchmarks/op_linear.py"))
