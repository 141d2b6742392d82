"""Split the ``gpu``-marked tests into shards of test files with about as many tests each (greedy, largest file first),
so that the whole GPU suite can run at one commit over several device calls (``gpu_check.sh tests-shard``).

    python scripts/gpu_shards.py SHARDS INDEX     # the test files of shard INDEX (1-based), one line, space-separated
"""

from __future__ import annotations

import collections
import subprocess
import sys


def shards(counts: dict[str, int], n: int) -> list[list[str]]:
    """``n`` lists of files whose test counts are about equal: each file, largest first, to the lightest shard
    (ties by name, so every call splits the same way)."""
    bins: list[tuple[int, list[str]]] = [(0, []) for _ in range(n)]
    for name, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        i = min(range(n), key=lambda j: (bins[j][0], j))
        bins[i] = (bins[i][0] + count, [*bins[i][1], name])
    return [sorted(files) for _, files in bins]


def gpu_test_counts() -> dict[str, int]:
    """Collected ``gpu`` tests per file (``pytest --collect-only``)."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    return collections.Counter(line.split("::")[0] for line in out.splitlines() if "::" in line)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not all(a.isdigit() for a in argv) or not 1 <= int(argv[1]) <= int(argv[0]):
        print(f"usage: gpu_shards.py SHARDS INDEX (1 <= INDEX <= SHARDS, integers); got {argv}", file=sys.stderr)
        return 2
    counts = gpu_test_counts()
    if not counts:
        print("gpu_shards.py: no gpu test collected", file=sys.stderr)
        return 1
    print(" ".join(shards(counts, int(argv[0]))[int(argv[1]) - 1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
