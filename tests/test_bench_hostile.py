"""``visionlin demo`` / ``visionlin bench`` against hostile use: a JSON and a PNG of different runs left together, an
interrupted run's message, ``--name`` values that are not file stems, ``bench plot`` on a JSON it cannot draw, a CNN
twin. The measuring functions are replaced (and the drawing, where the PNG's content does not matter)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from cli_utils import usage_error
from test_bench import no_measuring  # noqa: F401  (a fixture: bench's measuring functions fail if called)

from visionlin import cli
from visionlin.train import bench, scaling

TINY = ["--device", "cpu", "--models", "infvit_tiny", "--sizes", "32", "--modes", "eager"]


def _fake_png(result, path):
    path.write_bytes(b"png of " + result["meta"]["command"].encode())


def _row(model: str, status: str = "ok", **extra) -> dict:
    return {"model": model, "backend": "auto", "mode": "eager", "size": 32, "batch": 1, "status": status,
            "img_s": 1.0 if status == "ok" else None, "peak_mib": None, "ratio_vs_twin": 1.0, **extra}  # fmt: skip


@pytest.fixture
def fake_models(monkeypatch):
    """``bench_models`` replaced: each call plays ``script`` (a list of ``"block"`` (one ok row saved), ``"error"``
    (one error row saved) and ``"interrupt"``) and the PNG is a few bytes naming the command."""
    script: list[str] = []

    def fake(models, *, on_rows, **kwargs):
        rows: list[dict] = []
        for step in script:
            if step == "interrupt":
                raise KeyboardInterrupt
            rows.append(_row(f"m{len(rows)}", "ok" if step == "block" else "error", error="deliberate"))
            on_rows(rows)
        return rows

    monkeypatch.setattr(bench, "bench_models", fake)
    monkeypatch.setattr(bench, "plot_result", _fake_png)
    return script


# Defect 14: the JSON and the PNG in --out always belong to the same run -----------------------------------------------
def test_interrupted_bench_keeps_the_previous_result_whole_and_says_where_the_rows_are(capsys, fake_models, tmp_path):
    argv = ["bench", "models", *TINY, "--out", str(tmp_path)]
    fake_models[:] = ["block", "block"]
    assert cli.main([*argv, "--iters", "1"]) == 0  # a complete result: JSON and PNG
    old = {p.name: p.read_bytes() for p in tmp_path.glob("bench_models.*")}
    assert set(old) == {"bench_models.json", "bench_models.png"}
    capsys.readouterr()

    fake_models[:] = ["block", "interrupt"]  # Ctrl-C after the first block
    assert cli.main([*argv, "--iters", "2"]) == 130
    err = capsys.readouterr().err
    partial = tmp_path / "bench_models.partial.json"
    assert f"the rows measured so far are in {partial}; {tmp_path / 'bench_models.json'} is unchanged" in err
    assert {p.name: p.read_bytes() for p in tmp_path.glob("bench_models.*") if p != partial} == old
    assert [r["model"] for r in json.loads(partial.read_text())["rows"]] == ["m0"]
    assert "--iters 2" in json.loads(partial.read_text())["meta"]["command"]

    fake_models[:] = ["interrupt"]  # Ctrl-C before the first block ends: nothing of this run anywhere
    partial.unlink()
    assert cli.main([*argv, "--iters", "3"]) == 130
    err = capsys.readouterr().err
    assert "interrupted before the first block was measured; nothing written" in err
    assert "rows measured so far" not in err and not partial.exists()
    assert {p.name: p.read_bytes() for p in tmp_path.glob("bench_models.*")} == old

    fake_models[:] = ["block"]  # a run that ends: its JSON and PNG, no partial file left
    assert cli.main([*argv, "--iters", "4"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "bench_models.json",
        "bench_models.png",
    ]
    assert b"--iters 4" in (tmp_path / "bench_models.png").read_bytes()


def test_interrupted_first_bench_run_says_nothing_is_unchanged(capsys, fake_models, tmp_path):
    fake_models[:] = ["interrupt"]
    assert cli.main(["bench", "models", *TINY, "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "interrupted before the first block was measured; nothing written"


def test_bench_without_a_measurement_removes_the_previous_runs_png(capsys, fake_models, tmp_path):
    argv = ["bench", "models", *TINY, "--out", str(tmp_path)]
    fake_models[:] = ["block"]
    assert cli.main(argv) == 0
    fake_models[:] = ["error"]
    assert cli.main(argv) == 1
    assert not (tmp_path / "bench_models.png").exists()
    assert json.loads((tmp_path / "bench_models.json").read_text())["rows"][0]["status"] == "error"
    out = capsys.readouterr().out
    assert "bench_models.png skipped: nothing was measured" in out
    assert f"removed {tmp_path / 'bench_models.png'}: it showed an earlier run" in out


def test_write_result_never_pairs_a_json_with_an_earlier_png(monkeypatch, tmp_path):
    result = {"benchmark": "models", "meta": {"command": "first"}, "rows": [_row("a")]}
    png = tmp_path / "r.png"
    assert bench.write_result(result, tmp_path, "r", plot=_fake_png)[-1] == f"wrote {png}"
    notes = bench.write_result({**result, "meta": {"command": "partial"}}, tmp_path, "r", plot=False)
    assert notes[-1] == f"removed {png}: it showed an earlier run" and not png.exists()
    bench.write_result(result, tmp_path, "r", plot=_fake_png)

    def broken(result, path):
        raise ValueError("the drawing failed")

    with pytest.raises(ValueError, match="the drawing failed"):
        bench.write_result({**result, "meta": {"command": "second"}}, tmp_path, "r", plot=broken)
    assert not png.exists() and json.loads((tmp_path / "r.json").read_text())["meta"]["command"] == "second"
    bench.write_result(result, tmp_path, "r", plot=_fake_png)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert "removed" in bench.write_result(result, tmp_path, "r", plot=_fake_png)[-1] and not png.exists()


def _fake_measure(models, sizes, device, repeats, threads, command=""):
    """``mixer*`` models fail, as a worker that raised would; the others are measured."""
    rows = [
        {"model": m, "size": None, "error": "RuntimeError: deliberate"}
        if m.startswith("mixer")
        else {"model": m, "size": s, "latency_ms": 1.0, "peak_mib": 1.0}
        for m in models
        for s in sizes
    ]
    meta = {"command": command, "commit": "abc", "date": "d", "device": "cpu", "versions": {"torch": "t"}}
    return {**meta, "models": models, "sizes": sizes, "rows": rows}


def test_failed_demo_removes_the_previous_runs_png(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(scaling, "measure", _fake_measure)
    monkeypatch.setattr(scaling, "_plot", lambda rows, path, title: path.write_bytes(title.encode()))
    out = tmp_path / "demo"
    assert cli.main(["demo", "--models", "infvit_tiny", "--sizes", "32,64", "--out", str(out)]) == 0
    assert (out / "scaling.png").is_file()
    assert cli.main(["demo", "--models", "mixer_s16_224", "--sizes", "32", "--out", str(out)]) == 1
    assert not (out / "scaling.png").exists()
    assert json.loads((out / "scaling.json").read_text())["models"] == ["mixer_s16_224"]
    assert f"removed {out / 'scaling.png'}: it showed an earlier run" in capsys.readouterr().out

    assert cli.main(["demo", "--models", "infvit_tiny", "--sizes", "32", "--out", str(out)]) == 0

    def broken(rows, path, title):
        raise RuntimeError("the drawing failed")

    monkeypatch.setattr(scaling, "_plot", broken)
    with pytest.raises(RuntimeError, match="the drawing failed"):
        cli.main(["demo", "--models", "infvit_tiny", "--sizes", "64", "--out", str(out)])
    assert not (out / "scaling.png").exists() and json.loads((out / "scaling.json").read_text())["sizes"] == [64]


# Defect 15: --name is a plain file stem -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "argument --name: '' is empty; give a plain file stem: letters, digits, '_', '-', '+' and '.'"),
        (" ", "argument --name: ' ' is empty"),
        ("sub/x", "'sub/x' is a path (the folder is --out)"),
        ("../escaped", "'../escaped' is a path (the folder is --out)"),
        ("..\\escaped", "is a path (the folder is --out)"),
        (".hidden", "'.hidden' starts with '.'"),
        ("-x", "'-x' starts with '-'"),
        ("res.json", "'res.json' ends with a file suffix (.json and .png are added)"),
        ("a b", "'a b' has ' '"),
        ("x" * 201, "is longer than 200 characters"),
    ],
)
@pytest.mark.parametrize("what", ["models", "op"])
@pytest.mark.usefixtures("no_measuring")
def test_name_that_is_not_a_file_stem_is_a_usage_error(capsys, tmp_path, what, name, message):
    err = usage_error(capsys, ["bench", what, "--device", "cpu", f"--name={name}"], f"usage: visionlin bench {what}")
    assert message in err
    assert not list(tmp_path.iterdir())  # refused before the output folder was made


def test_name_with_dots_and_dashes_is_a_file_stem(fake_models, tmp_path):
    fake_models[:] = ["block"]
    assert cli.main(["bench", "models", *TINY, "--out", str(tmp_path), "--name", "bench_models-h200.v2+x"]) == 0
    assert (tmp_path / "bench_models-h200.v2+x.json").is_file() and (tmp_path / "bench_models-h200.v2+x.png").is_file()


# Defect 22: bench plot on a JSON it cannot draw -----------------------------------------------------------------------
META = {"gpu": None, "cpu": "c", "torch": "t", "triton": None, "commit": "abc", "date": "d", "command": "x"}


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ({"benchmark": "models", "rows": []}, "'bp.json' has no rows: nothing to plot"),
        (
            {"benchmark": "models", "rows": [{}]},
            "'bp.json' has no 'model', 'backend', 'mode', 'size', 'batch', 'status' in row 0 (a models row needs",
        ),
        (
            {"benchmark": "models", "meta": META, "rows": [{**_row("a"), "img_s": 1.0}, {"model": "b"}]},
            "has no 'backend', 'mode', 'size', 'batch', 'status' in row 1",
        ),
        (
            {"benchmark": "models", "rows": [{k: v for k, v in _row("a").items() if k != "ratio_vs_twin"}]},
            "has no 'ratio_vs_twin' in row 0",
        ),
        ({"benchmark": "largest", "rows": [{"model": "a", "backend": "auto", "status": "ok"}]}, "no 'largest_px'"),
        ({"benchmark": "train", "rows": {"a": 1}}, "has 'rows' that are not a list of objects"),
        ({"benchmark": "train", "rows": [1]}, "has 'rows' that are not a list of objects"),
        (
            {"benchmark": "models", "meta": META, "rows": [_row("a", "error"), _row("b", "oom")]},
            "has no measured row (status 'ok'; its rows are error, oom): nothing to plot",
        ),
        ({"benchmark": "models", "rows": [_row("a")]}, "'bp.json' has no 'meta' object"),
        ({"benchmark": "models", "meta": {"gpu": None}, "rows": [_row("a")]}, "no 'torch', 'triton', 'commit', 'date'"),
        ({"benchmark": "op", "meta": META, "rows": [{"case": "c"}]}, "has no 'copy_bandwidth_GBs' in its 'meta'"),
    ],
)
def test_plot_of_a_json_it_cannot_draw_is_a_usage_error_naming_what_is_missing(capsys, tmp_path, result, message):
    (tmp_path / "bp.json").write_text(json.dumps(result))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert message in usage_error(capsys, ["bench", "plot", "bp.json"], "usage: visionlin bench plot")
    assert not (tmp_path / "bp.png").exists()


def test_plot_of_a_value_it_cannot_draw_is_an_error_not_a_traceback(capsys, monkeypatch, tmp_path):
    def draw(result, path):
        return result["rows"][0]["size"] / 2  # what the drawing does with a size

    monkeypatch.setattr(bench, "plot_result", draw)
    path = tmp_path / "bp.json"
    path.write_text(json.dumps({"benchmark": "models", "meta": META, "rows": [_row("a", size="big")]}))
    assert cli.main(["bench", "plot", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"error: cannot draw {tmp_path / 'bp.png'} from {path} (TypeError: " in err and "Traceback" not in err
    assert not (tmp_path / "bp.png").exists()


# Defect 26: a twin that takes no img_size (a CNN) ---------------------------------------------------------------------
def test_cnn_twin_is_built_without_the_size_keywords():
    meta = torch.device("meta")
    assert type(bench._create("resnet18", meta, 32)).__name__ == "ResNet"  # (was a TypeError: img_size)
    assert type(bench._create("resnet18", meta)).__name__ == "ResNet"  # (dynamic_img_size)
    assert bench._create("deit_tiny_patch16_224", meta, 32).patch_embed.img_size == (32, 32)  # still built for it
    assert bench._create("deit_tiny_patch16_224", meta).dynamic_img_size


def test_models_benchmark_with_a_cnn_twin_measures_it(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "plot_result", _fake_png)
    argv = ["bench", "models", *TINY, "--twin", "resnet18", "--batch-sizes", "32=1", "--warmup", "1", "--iters", "1"]
    assert cli.main([*argv, "--repeats", "1", "--min-time", "0.01", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_models.json").read_text())["rows"]
    assert [(r["model"], r["backend"], r["status"]) for r in rows] == [
        ("infvit_tiny", "auto", "ok"),
        ("resnet18", "twin", "ok"),
    ]
    assert rows[0]["ratio_vs_twin"] > 0
