"""Split the ``gpu``-marked tests into shards of about as many tests each, so that the whole GPU suite can run at one
commit over several device calls (``gpu_check.sh tests-shard``). The unit is a test function with all its parameters
(``file::function``: no brackets or spaces for the shell to split or glob), largest first, each to the lightest shard.

    python scripts/gpu_shards.py SHARDS INDEX     # the units of shard INDEX (1-based), one line, space-separated
"""

from __future__ import annotations

import collections
import subprocess
import sys


def shards(counts: dict[str, int], n: int) -> list[list[str]]:
    """``n`` lists of units whose test counts are about equal: each unit, largest first, to the lightest shard
    (ties by name, so every call splits the same way); each list in name order."""
    bins: list[tuple[int, list[str]]] = [(0, []) for _ in range(n)]
    for name, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        i = min(range(n), key=lambda j: (bins[j][0], j))
        bins[i] = (bins[i][0] + count, [*bins[i][1], name])
    return [sorted(units) for _, units in bins]


def gpu_test_ids(tests: str = "tests") -> list[str]:
    """The node ids of the ``gpu`` tests that ``pytest --collect-only`` finds in ``tests``; a collection that fails (a
    test module that does not import would drop out of every shard) raises ``RuntimeError`` with pytest's output."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", tests],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    if run.returncode != 0:
        raise RuntimeError(f"pytest --collect-only exited {run.returncode}:\n{run.stdout[-3000:]}{run.stderr[-2000:]}")
    return [line.strip() for line in run.stdout.splitlines() if "::" in line]


def gpu_test_counts() -> dict[str, int]:
    """Collected ``gpu`` tests per ``file::function`` (:func:`gpu_test_ids`)."""
    return collections.Counter(node.split("[")[0] for node in gpu_test_ids())


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not all(a.isdigit() for a in argv) or not 1 <= int(argv[1]) <= int(argv[0]):
        print(f"usage: gpu_shards.py SHARDS INDEX (1 <= INDEX <= SHARDS, integers); got {argv}", file=sys.stderr)
        return 2
    try:
        counts = gpu_test_counts()
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"gpu_shards.py: {e}", file=sys.stderr)
        return 1
    print(" ".join(shards(counts, int(argv[0]))[int(argv[1]) - 1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
