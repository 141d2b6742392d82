"""``scripts/gpu_test_summary.py``: a GPU session's ``-vv`` test logs against the collected ``gpu`` tests."""

import importlib.util
import json
import pathlib

import pytest

SPEC = importlib.util.spec_from_file_location(
    "gpu_test_summary", pathlib.Path(__file__).parents[1] / "scripts" / "gpu_test_summary.py"
)
summary = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(summary)

XDIST_LOG = """\
============================= test session starts ==============================
[gw1] [  3%] PASSED tests/test_a.py::test_one[fp32]
tests/test_a.py::test_two[tile 4096-4-4]
[gw0] [  5%] FAILED tests/test_a.py::test_two[tile 4096-4-4]
[gw2] [ 50%] XFAIL tests/test_b.py::test_three
[gw3] [100%] PASSED tests/test_b.py::test_four
FAILED tests/test_a.py::test_two[tile 4096-4-4] - RuntimeError: Triton Error [CUDA]: out of memory
=========== 1 failed, 2 passed, 1 xfailed in 9.99s ===========
"""
RERUN_LOG = "tests/test_a.py::test_two[tile 4096-4-4] PASSED                     [100%]\n"
NODES = [
    "tests/test_a.py::test_one[fp32]",
    "tests/test_a.py::test_two[tile 4096-4-4]",
    "tests/test_b.py::test_three",
    "tests/test_b.py::test_four",
    "tests/test_b.py::test_five",
]


def test_outcomes_read_xdist_and_plain_lines_with_spaces_in_ids():
    got = summary.outcomes(XDIST_LOG)
    assert got == {
        "tests/test_a.py::test_one[fp32]": "passed",
        "tests/test_a.py::test_two[tile 4096-4-4]": "failed",
        "tests/test_b.py::test_three": "xfailed",
        "tests/test_b.py::test_four": "passed",
    }  # the short summary's "FAILED node - reason" line and the bare "started" line are not outcomes
    assert summary.outcomes(RERUN_LOG) == {"tests/test_a.py::test_two[tile 4096-4-4]": "passed"}
    teardown = "[gw0] [ 1%] PASSED tests/t.py::a\n[gw0] [ 1%] ERROR tests/t.py::a\n"
    assert summary.outcomes(teardown) == {"tests/t.py::a": "error"}  # passed, then its teardown failed


def test_summary_counts_the_last_outcome_and_the_tests_never_reached():
    doc = summary.summarise({"shard": XDIST_LOG}, NODES)
    assert doc["totals"] == {"failed": 1, "not_run": 1, "passed": 2, "xfailed": 1} and not doc["all_passed"]
    assert doc["per_file"]["tests/test_b.py"] == {"not_run": 1, "passed": 1, "xfailed": 1}
    assert doc["not_passed"] == {
        "tests/test_a.py::test_two[tile 4096-4-4]": {"outcome": "failed", "log": "shard"},
        "tests/test_b.py::test_five": {"outcome": "not_run", "log": None},
    }
    rerun = summary.summarise({"shard": XDIST_LOG, "rerun": RERUN_LOG + "[gw0] [ 9%] PASSED tests/gone.py::t\n"}, NODES)
    assert rerun["totals"] == {"not_run": 1, "passed": 3, "xfailed": 1}  # the re-run's pass replaces the failure
    assert rerun["not_collected_here"] == ["tests/gone.py::t"]  # a test no longer collected: listed, not counted
    assert summary.summarise({"shard": XDIST_LOG, "rerun": RERUN_LOG}, NODES[:4])["all_passed"]


def test_commit_is_read_from_the_log_name():
    assert summary.commit_of(pathlib.Path("gpu_tests_shard1of2_f8a140d.log")) == "f8a140d"
    assert summary.commit_of(pathlib.Path("notes.log")) is None


def test_main_writes_the_summary_and_refuses_missing_or_foreign_logs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(summary, "collected", lambda tests="tests": NODES[:4])
    log, rerun = tmp_path / "gpu_tests_shard_abcdef1.log", tmp_path / "gpu_tests_rerun_abcdef1.log"
    log.write_text(XDIST_LOG)
    rerun.write_text(RERUN_LOG)
    out = tmp_path / "summary.json"
    assert summary.main([str(log), "--gpu", "H100", "--out", str(out)]) == 1  # one failure: exit 1, written anyway
    assert json.loads(out.read_text())["totals"] == {"failed": 1, "passed": 2, "xfailed": 1}
    assert summary.main([str(log), str(rerun), "--gpu", "H100", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["all_passed"] and doc["gpu"] == "H100" and doc["logs"] == {log.name: "abcdef1", rerun.name: "abcdef1"}
    with pytest.raises(SystemExit):
        summary.main([str(tmp_path / "missing.log"), "--gpu", "H100", "--out", str(out)])
    assert "no such log" in capsys.readouterr().err
    (tmp_path / "other.log").write_text("hello\n")
    with pytest.raises(SystemExit):
        summary.main([str(tmp_path / "other.log"), "--gpu", "H100", "--out", str(out)])
    assert "no test outcome" in capsys.readouterr().err
