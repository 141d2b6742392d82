"""Kept for old commands: model-level inference throughput with each kernel backend next to the dense twin, now
``visionlin bench models`` (``visionlin.train.bench``), here with this script's old defaults: 224 px (batch 256) and
1024 px (batch 16), eager, the ``torch`` and ``triton`` backends of inline_deit_small and infvit_small.

Writes ``bench_models.json`` and ``.png`` to ``--out``. Any ``visionlin bench models`` flag given here wins over
those defaults.

Usage (on a GPU machine):
    python benchmarks/model_speed.py --out benchmarks/results/h200 --models inline_deit_small,infvit_small
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visionlin.train.bench import main  # noqa: E402

DEFAULTS = ["--sizes", "224,1024", "--modes", "eager", "--backends", "torch,triton", "--models",
            "inline_deit_small,infvit_small"]  # fmt: skip

if __name__ == "__main__":
    sys.exit(main(["models", *DEFAULTS, *sys.argv[1:]], prog="python benchmarks/model_speed.py"))
