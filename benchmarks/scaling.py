"""Kept for old commands: the demo / scaling benchmark now ships in the package as ``visionlin.train.scaling``.

Usage (the same flags as ``visionlin demo``; results go to ``--out``, default the current directory):
    python -m benchmarks.scaling [--models infvit_small,deit_small_patch16_224] [--sizes 224,448,896] [--out DIR]
"""

import sys

from visionlin.train.scaling import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m benchmarks.scaling"))
