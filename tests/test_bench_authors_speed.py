"""``benchmarks/authors_speed.py`` without a GPU: the phases' rows and ratios, and the result file marked
``"partial": true`` while the run goes on (a run cut by a time limit is not mistaken for a complete one)."""

from __future__ import annotations

import json

from benchmarks import _meta, authors_speed


def test_rows_ratios_and_partial_marker_until_the_last_write(tmp_path, monkeypatch):
    monkeypatch.setattr(authors_speed, "PAIRS", {"p": (lambda d: None, "ours_m", "twin_m", (1024,))})
    seen = []

    def measure(builders, size, batch, train, args):
        out = tmp_path / "authors_speed.json"
        seen.append(json.loads(out.read_text()) if out.exists() else None)  # what a cut run would have left
        img_s = {"authors:p": 100.0, "ours:ours_m": 150.0, "twin:twin_m": 120.0}
        return {name: {"img_s": img_s[name]} for name in builders}

    monkeypatch.setattr(authors_speed, "measure", measure)
    monkeypatch.setattr(authors_speed, "_plot", lambda results, path: None)
    monkeypatch.setattr(_meta, "gpu_meta", lambda argv, commit=None, **extra: {"commit": commit})  # (needs CUDA)
    argv = ["--authors-dir", str(tmp_path), "--out", str(tmp_path), "--train", "--commit", "abc1234"]
    assert authors_speed.main(argv) == 0
    assert seen[0] is None and all(s["partial"] is True for s in seen[1:])
    assert [len(s["results"]) for s in seen[1:]] == [1, 2]  # each phase saved as it ended
    doc = json.loads((tmp_path / "authors_speed.json").read_text())
    assert "partial" not in doc and doc["meta"]["commit"] == "abc1234"
    phases = [(r["phase"], r["size"], r["batch"]) for r in doc["results"]]
    assert phases == [("infer", 224, 256), ("infer", 1024, 16), ("train", 224, 128)]
    assert all(abs(r["ours_vs_authors"] - 1.5) < 1e-9 and abs(r["ours_vs_twin"] - 1.25) < 1e-9 for r in doc["results"])


def test_phases_train_and_gpu_time_ratio(tmp_path, monkeypatch):
    """``--phases train --kernels``: only the training step runs, and the kernel times give a GPU-time ratio (theirs
    over ours) next to the wall-time one."""
    monkeypatch.setattr(authors_speed, "PAIRS", {"p": (lambda d: None, "ours_m", "twin_m", (1024,))})
    calls = []

    def measure(builders, size, batch, train, args):
        calls.append((size, batch, train, args.kernels))
        ms = {"authors:p": (80.0, 60.0), "ours:ours_m": (100.0, 30.0), "twin:twin_m": (70.0, 50.0)}
        return {n: {"img_s": batch * 1e3 / ms[n][0], "ms": ms[n][0], "kernels_ms": ms[n][1]} for n in builders}

    monkeypatch.setattr(authors_speed, "measure", measure)
    monkeypatch.setattr(authors_speed, "_plot", lambda results, path: None)
    monkeypatch.setattr(_meta, "gpu_meta", lambda argv, commit=None, **extra: {"commit": commit})
    argv = ["--authors-dir", str(tmp_path), "--out", str(tmp_path), "--train", "--phases", "train", "--kernels"]
    assert authors_speed.main(argv) == 0
    assert calls == [(224, 128, True, True)]
    (rec,) = json.loads((tmp_path / "authors_speed.json").read_text())["results"]
    assert abs(rec["ours_vs_authors"] - 0.8) < 1e-9  # slower in wall time ...
    assert abs(rec["ours_vs_authors_gpu"] - 2.0) < 1e-9  # ... with half the GPU time


def test_phases_train_needs_train(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        authors_speed.main(["--authors-dir", str(tmp_path), "--out", str(tmp_path), "--phases", "train"])
    assert "--phases train needs --train" in capsys.readouterr().err


def test_replot_draws_the_gpu_time_panel_from_a_result(tmp_path):
    pytest = __import__("pytest")
    pytest.importorskip("matplotlib")
    rows = {"authors:p": {"img_s": 80.0, "ms": 100.0, "kernels_ms": 60.0},
            "ours:o": {"img_s": 100.0, "ms": 80.0, "kernels_ms": 30.0},
            "twin:t": {"img_s": 120.0, "ms": 66.0, "kernels_ms": 45.0}}  # fmt: skip
    rec = {"pair": "p", "size": 224, "batch": 128, "phase": "train", "rows": rows, "ours_vs_authors": 1.25,
           "ours_vs_twin": 0.83, "authors_vs_twin": 0.67}  # fmt: skip
    assert authors_speed._gpu_vs_twin(rec) == (0.75, 1.5)
    assert authors_speed._gpu_vs_twin({**rec, "rows": {n: {"img_s": 1.0} for n in rows}}) == (0.0, 0.0)
    result = tmp_path / "authors_speed.json"
    result.write_text(json.dumps({"meta": {}, "results": [rec]}))
    assert authors_speed.main(["--replot", str(result)]) == 0
    assert (tmp_path / "authors_speed.png").stat().st_size > 1000
    for bad, text in ((tmp_path / "missing.json", None), (tmp_path / "x.json", "{"), (tmp_path / "y.json", "[1]")):
        if text is not None:
            bad.write_text(text)
        with pytest.raises(SystemExit):
            authors_speed.main(["--replot", str(bad)])
