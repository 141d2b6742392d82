"""The Fashion-MNIST table runner (benchmarks/fashion_mnist_table.py): its scheduling and bookkeeping. The trainings
themselves are ``visionlin train`` / ``distill`` runs, tested in test_train.py / test_distill.py; here the commands are
stand-ins so the test stays fast."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks import fashion_mnist_table as fmt


def test_jobs_put_the_teacher_first_and_the_distillation_after_it(tmp_path):
    args = fmt.parse_args(["--out", str(tmp_path), "--models", f"nat_tiny,{fmt.TEACHER},infvit_small", "--epochs", "2"])
    args.runs = tmp_path / "runs"
    jobs = fmt.jobs(args)
    assert [j["name"] for j in jobs] == [fmt.TEACHER, "infvit_small-distilled", "nat_tiny", "infvit_small"]
    distill = jobs[1]
    assert distill["after"] == fmt.TEACHER and distill["cmd"][3] == "distill"
    assert str(args.runs / fmt.TEACHER) in distill["cmd"]
    i = distill["cmd"].index("--epochs")
    assert distill["cmd"][i + 1] == "2"
    no_teacher = fmt.parse_args(["--out", str(tmp_path), "--models", "nat_tiny"])
    no_teacher.runs = tmp_path / "runs"
    assert [j["name"] for j in fmt.jobs(no_teacher)] == ["nat_tiny"]


@pytest.mark.parametrize(
    "argv, match",
    [(["--epochs", "0"], "--epochs must be >= 1"), (["--models", " , "], "--models is empty"),
     (["--workers", "-1"], "--workers must be >= 0"), (["--model-kwargs", "depth"], "KEY=VALUE")],
)  # fmt: skip
def test_bad_arguments_are_named(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit):
        fmt.parse_args(["--out", str(tmp_path), *argv])
    assert match in capsys.readouterr().err


def _job(name, code, after=None):
    return {"row": name, "name": name, "cmd": [sys.executable, "-c", code], "after": after}


def test_runner_limits_parallelism_and_skips_what_depends_on_a_failed_run(tmp_path):
    args = fmt.parse_args(["--out", str(tmp_path), "--parallel", "2"])
    args.runs = tmp_path / "runs"
    marker = tmp_path / "running"
    marker.mkdir()
    # Each job records how many jobs run at its start; the teacher fails, so its dependant never starts.
    code = (
        "import os, sys, time; d = sys.argv[1] if len(sys.argv) > 1 else {d!r}; n = len(os.listdir(d)); "
        "p = os.path.join(d, str(os.getpid())); open(p, 'w').close(); print('concurrent', n + 1); "
        "time.sleep(0.6); os.remove(p); sys.exit({rc})"
    )
    todo = [
        _job("teacher", code.format(d=str(marker), rc=3)),
        _job("a", code.format(d=str(marker), rc=0)),
        _job("b", code.format(d=str(marker), rc=0)),
        _job("student", code.format(d=str(marker), rc=0), after="teacher"),
    ]
    done = fmt.run_jobs(args, todo)
    assert done["teacher"]["status"] == "failed (exit 3)" and done["a"]["status"] == "finished"
    assert done["student"]["status"] == "not run: teacher did not finish"
    seen = [int((args.runs / f"{n}.stdout.log").read_text().split()[-1]) for n in ("teacher", "a", "b")]
    assert max(seen) <= 2


def test_runner_stops_at_the_hard_limit_and_respects_the_budget(tmp_path):
    args = fmt.parse_args(["--out", str(tmp_path), "--parallel", "1", "--time-budget", "0.5", "--hard-limit", "1"])
    args.runs = tmp_path / "runs"
    done = fmt.run_jobs(args, [_job("slow", "import time; time.sleep(30)"), _job("late", "pass")])
    assert done["slow"]["status"] == "stopped at the hard limit" and done["slow"]["seconds"] < 10
    assert done["late"]["status"] == "not run: time budget spent"


def test_read_run_collects_epochs_train_records_and_the_end(tmp_path):
    records = [
        {"kind": "train", "step": 1, "epoch": 0, "loss": 2.3, "lr": 1e-3, "img_s": 100.0},
        {"kind": "epoch", "epoch": 0, "val_top1": 71.5, "val_top5": 98.0, "val_loss": 0.9, "val_n": 10000},
        {"kind": "epoch", "epoch": 1, "val_top1": 80.25, "val_top5": 99.0, "val_loss": 0.6, "val_n": 10000},
        {"kind": "end", "step": 2, "epoch": 2, "skipped_images": 0},
    ]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    run = fmt.read_run(tmp_path)
    assert [e["val_top1"] for e in run["epochs"]] == [71.5, 80.25] and run["end"]["step"] == 2
    assert run["train"][0]["loss"] == 2.3
    assert fmt.read_run(tmp_path / "missing") == {"epochs": [], "train": [], "end": None}
