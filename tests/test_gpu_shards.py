"""``scripts/gpu_shards.py``: the gpu suite split into shards of whole test files (``gpu_check.sh tests-shard``)."""

import importlib.util
import pathlib

SPEC = importlib.util.spec_from_file_location(
    "gpu_shards", pathlib.Path(__file__).parents[1] / "scripts" / "gpu_shards.py"
)
gpu_shards = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gpu_shards)


def test_shards_cover_every_file_once_and_balance_the_counts():
    counts = {"a.py": 10, "b.py": 7, "c.py": 5, "d.py": 5, "e.py": 2, "f.py": 1}
    shards = gpu_shards.shards(counts, 3)
    assert sorted(f for s in shards for f in s) == sorted(counts)
    assert sorted(sum(counts[f] for f in s) for s in shards) == [10, 10, 10]
    assert gpu_shards.shards(counts, 3) == shards  # the same split every call
    assert gpu_shards.shards({"a.py": 1}, 2) == [["a.py"], []]  # more shards than files: empty ones


def test_every_collected_gpu_test_lands_in_exactly_one_shard():
    counts = gpu_shards.gpu_test_counts()
    assert sum(counts.values()) > 1000  # the suite's gpu tests (collection needs no GPU)
    assert all("::" in u and not any(c in u for c in " []*?") for u in counts)  # file::function, shell-safe
    shards = gpu_shards.shards(counts, 6)
    assert sorted(u for s in shards for u in s) == sorted(counts)
    sizes = [sum(counts[u] for u in s) for s in shards]
    assert max(sizes) - min(sizes) <= max(counts.values())  # balanced to within the largest unit


def test_a_failed_collection_is_an_error_not_a_smaller_suite(monkeypatch, capsys):
    import subprocess

    monkeypatch.setattr(
        subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 2, "ERROR tests/test_x.py\n", "")
    )
    assert gpu_shards.main(["6", "1"]) == 1
    assert "exited 2" in capsys.readouterr().err


def test_bad_arguments_are_a_usage_error(capsys):
    for argv in ([], ["6"], ["6", "0"], ["6", "7"], ["x", "1"]):
        assert gpu_shards.main(argv) == 2
        assert "usage: gpu_shards.py SHARDS INDEX" in capsys.readouterr().err
