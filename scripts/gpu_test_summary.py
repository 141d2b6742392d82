"""Summarise the ``gpu`` test logs of a GPU session (``gpu_check.sh``'s ``gpu_tests_NAME_COMMIT.log``, pytest ``-vv``
under xdist or not) against the ``gpu`` tests this checkout collects: per test file how many passed, failed, xfailed,
were skipped, errored or were never reached, and the node ids of every test that did not pass. A test in several logs
(a re-run) counts by its last outcome in the order the logs are given; each log's commit is read from its name.

    python scripts/gpu_test_summary.py LOG [LOG ...] --gpu "NVIDIA H100 80GB HBM3" --out summary.json

Exit status 0 when every collected ``gpu`` test passed or xfailed, 1 otherwise (the summary is written either way).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # (gpu_shards beside this file, however this one is loaded)
from gpu_shards import gpu_test_ids as collected  # noqa: E402 (the collected gpu tests' node ids)

#: ``[gw3] [ 58%] PASSED tests/x.py::t[a]`` (xdist) or ``tests/x.py::t[a] PASSED [ 58%]`` (one process), ``-vv``.
#: (Parametrisation ids may hold spaces: ``t[tile 4096-4-4]``.)
_XDIST = re.compile(r"^\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+::.+?)\s*$")
_PLAIN = re.compile(r"^(\S+::.+?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?:\s+\[\s*\d+%\])?\s*$")
_OUTCOME = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped", "XFAIL": "xfailed",
            "XPASS": "xpassed"}  # fmt: skip
_FINE = {"passed", "xfailed"}


def outcomes(text: str) -> dict[str, str]:
    """``{node id: outcome}`` from one ``-vv`` log; a node with a teardown error after passing counts as ``error``."""
    got: dict[str, str] = {}
    for line in text.splitlines():
        m = _XDIST.match(line)
        status, node = (m.group(1), m.group(2)) if m else (None, None)
        if m is None and (m := _PLAIN.match(line)) is not None:
            node, status = m.group(1), m.group(2)
        if status is not None:
            got[node] = "error" if got.get(node) == "passed" and status == "ERROR" else _OUTCOME[status]
    return got


def commit_of(log: Path) -> str | None:
    """The commit in ``gpu_tests_NAME_COMMIT.log`` (7 to 40 hex digits), else None."""
    m = re.search(r"_([0-9a-f]{7,40})\.log$", log.name)
    return m.group(1) if m else None


def summarise(logs: dict[str, str], nodes: list[str]) -> dict:
    """``logs``: ``{log name: text}`` in re-run order; ``nodes``: the collected gpu tests. Outcomes of nodes not
    collected (renamed or removed tests) are listed apart and not counted."""
    final: dict[str, str] = {}
    where: dict[str, str] = {}
    for name, text in logs.items():
        for node, outcome in outcomes(text).items():
            final[node], where[node] = outcome, name
    per_file: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for node in nodes:
        per_file[node.split("::")[0]][final.get(node, "not_run")] += 1
    totals = collections.Counter()
    for counts in per_file.values():
        totals.update(counts)
    known = set(nodes)
    return {
        "collected": len(nodes),
        "totals": dict(sorted(totals.items())),
        "all_passed": all(final.get(n) in _FINE for n in nodes),
        "per_file": {f: dict(sorted(c.items())) for f, c in sorted(per_file.items())},
        "not_passed": {
            n: {"outcome": final.get(n, "not_run"), "log": where.get(n)} for n in nodes if final.get(n) not in _FINE
        },
        "not_collected_here": sorted(n for n in final if n not in known),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/gpu_test_summary.py", description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", type=Path, help="gpu_tests_NAME_COMMIT.log files, re-runs last")
    p.add_argument("--gpu", required=True, help="the GPU the logs ran on (nvidia-smi's name)")
    p.add_argument("--out", type=Path, required=True, help="the JSON summary to write")
    p.add_argument("--tests", default="tests", help="what pytest collects the gpu tests from (default: tests)")
    args = p.parse_args(argv)
    missing = [str(log) for log in args.logs if not log.is_file()]
    if missing:
        p.error(f"no such log: {', '.join(missing)}")
    texts = {log.name: log.read_text(errors="replace") for log in args.logs}
    empty = [name for name, text in texts.items() if not outcomes(text)]
    if empty:
        p.error(f"no test outcome in {', '.join(empty)} (not a pytest -vv log?)")
    try:
        nodes = collected(args.tests)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"gpu_test_summary.py: {e}", file=sys.stderr)
        return 2
    doc = {
        "benchmark": "gpu_test_summary",
        "gpu": args.gpu,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "scripts/gpu_test_summary.py", *(argv if argv is not None else sys.argv[1:])]),
        "logs": {log.name: commit_of(log) for log in args.logs},
        **summarise(texts, nodes),
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    t = doc["totals"]
    print(f"{doc['collected']} gpu tests: " + ", ".join(f"{v} {k}" for k, v in t.items()) + f" -> {args.out}")
    return 0 if doc["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
