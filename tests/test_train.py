"""``visionlin train`` / ``validate`` / ``plot`` on a tiny synthetic ImageFolder (CPU, one thread).

The resume test really kills a training subprocess (SIGKILL) right after it wrote a mid-epoch checkpoint, resumes it
with ``--resume auto`` and checks every following per-step loss and the validation metrics against an uninterrupted
run with the same seed, bit for bit.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_utils import fresh_accelerate_state, usage_error  # noqa: F401  (the fixture: autouse here)

from visionlin import cli
from visionlin.train import checkpoint as ckpt
from visionlin.train.data import EpochSampler, FashionMNIST, make_synthetic_imagefolder
from visionlin.train.plot import read_log
from visionlin.train.trainer import list_recipes, resolve_config
from visionlin.train.validate import UsageError

TINY = ["--model", "infvit_tiny", "--img-size", "32", "--model-kwargs", "depth=2", "embed_dim=32", "num_heads=2"]
RUN = ["-b", "4", "--epochs", "2", "--warmup-epochs", "1", "--lr", "1e-3", "--log-interval", "1", "--no-plot"]
TIMEOUT = 240


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic_imagefolder(tmp_path_factory.mktemp("data"), classes=3, train_per_class=8, val_per_class=4)


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run_dir)["train"]}


# Data -----------------------------------------------------------------------------------------------------------------
def test_epoch_sampler_resumes_mid_epoch_and_shards():
    s = EpochSampler(10, shuffle=True, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_start(4)
    assert list(s) == full[4:]  # the same indices and the same per-sample seeds
    s.set_epoch(3)
    s.set_start(0)
    assert [i for i, _ in s] != [i for i, _ in full]
    shards = [EpochSampler(10, shuffle=True, seed=3, num_replicas=3, rank=r) for r in range(3)]
    seen = [i for sh in shards for i, _ in sh]
    assert len(seen) == 12 and set(seen) == set(range(10))


def test_fashion_mnist_reads_idx_files_and_names_the_install_command(tmp_path):
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(tmp_path, "train")
    _write_fashion(tmp_path, n=6)
    ds = FashionMNIST(tmp_path, "val")  # 'val' means the test split
    img, target = ds.load(1)
    assert len(ds) == 6 and img.mode == "RGB" and img.size == (28, 28) and target == 1
    assert ds.classes[9] == "ankle_boot"


def _write_fashion(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for stem in ("train", "t10k"):
        labels = np.arange(n) % 10
        images = (rng.integers(0, 40, (n, 28, 28)) + labels[:, None, None] * 20).astype(np.uint8)
        header = np.array([2051, n, 28, 28], ">i4").tobytes()
        (root / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
        header = np.array([2049, n], ">i4").tobytes()
        (root / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels.astype(np.uint8).tobytes()))


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist missing")
def test_debian_fashion_mnist_when_installed():
    ds = FashionMNIST(split="train")
    assert len(ds) == 60000 and ds.targets[0] == 9
    assert len(FashionMNIST(split="test")) == 10000


# Configuration and bad input ------------------------------------------------------------------------------------------
def test_recipes_resolve_and_flags_override_them(tmp_path):
    assert {"deit", "finetune"} <= set(list_recipes())
    cfg, source = resolve_config({"data_dir": "x", "weight_decay": 0.01, "model_kwargs": ["depth=3"]}, "deit")
    assert cfg["mixup"] == 0.8 and cfg["cutmix"] == 1.0 and cfg["aa"] == "rand-m9-mstd0.5-inc1"
    assert cfg["weight_decay"] == 0.01 and source["weight_decay"] == "flag" and source["mixup"] == "recipe 'deit'"
    assert cfg["model_kwargs"] == {"depth": 3}
    bad = tmp_path / "bad.yaml"
    bad.write_text("weight_decy: 0.1\n")
    with pytest.raises(UsageError, match=r"unknown key 'weight_decy' \(did you mean weight_decay"):
        resolve_config({"data_dir": "x"}, str(bad))
    bad.write_text("epochs: many\n")
    with pytest.raises(UsageError, match="epochs: 'many' is not a positive integer"):
        resolve_config({"data_dir": "x"}, str(bad))


def test_usage_errors_name_what_was_given(capsys, tmp_path, data):
    out = ["--output", str(tmp_path / "runs")]
    err = usage_error(capsys, ["train", *TINY, "--data-dir", str(data), "--model", "infvit_tiyn", *out])
    assert "unknown model 'infvit_tiyn' (did you mean infvit_tiny" in err
    err = usage_error(capsys, ["train", *TINY, *out])
    assert "--data-dir is required" in err
    err = usage_error(capsys, ["train", *TINY, "--data-dir", str(tmp_path / "nowhere"), *out])
    assert "nowhere' does not exist" in err
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    err = usage_error(capsys, ["train", *TINY, "--data-dir", str(tmp_path / "empty"), *out])
    assert "has 1 class folders but no images" in err
    err = usage_error(capsys, ["train", *TINY, "--data-dir", str(data), "--config", "deitt", *out])
    assert "unknown recipe 'deitt'" in err and "'deit'" in err
    err = usage_error(capsys, ["train", *TINY, "--data-dir", str(data), "--learning-rate", "1", *out])
    assert "unrecognized arguments: --learning-rate 1" in err
    err = usage_error(capsys, ["train", *TINY, "--data-dir", str(data), "--smoothing", "2", *out])
    assert "'2' is not a fraction in [0, 1)" in err
    err = usage_error(capsys, ["train", *TINY, "--data-dir", str(data), "--smoothing", "1", *out])
    assert "'1' is not a fraction in [0, 1)" in err  # (was timm's AssertionError)
    for flag, value, message in (
        ("--opt", "bogusopt", "'bogusopt' is not a timm optimizer"),
        ("--sched", "bogus", "'bogus' is not a timm scheduler; choose from constant, cosine"),
        ("--interpolation", "cubic", "'cubic' is not an interpolation; choose from bicubic"),
    ):  # (each was a traceback from inside timm)
        assert message in usage_error(capsys, ["train", *TINY, "--data-dir", str(data), flag, value, *out])
    for name in ("../../etc", "a/b", ".."):  # (../../etc escaped --output)
        err = usage_error(capsys, ["train", *TINY, "--data-dir", str(data), "--experiment", name, *out])
        assert f"{name!r} is not a folder name" in err
    for flag in ("--clip-grad", "--crop-pct"):  # 0 zeroed every gradient / was swapped for the model's default
        err = usage_error(capsys, ["train", *TINY, "--data-dir", str(data), flag, "0", *out])
        assert "'0' is not a positive number" in err, flag
    err = usage_error(capsys, ["train", *TINY, "--model-kwargs", "depth", "--data-dir", str(data), *out])
    assert "model kwarg 'depth' is not KEY=VALUE" in err
    err = usage_error(capsys, ["train", *TINY, "--data-dir", str(data), "--torchcompile-mode", "fast", *out])
    assert "'fast'" in err and "reduce-overhead" in err
    graphs = ["--torchcompile-mode", "reduce-overhead"]
    err = usage_error(capsys, ["train", *TINY, "--data-dir", str(data), *graphs, *out])
    assert "--torchcompile-mode reduce-overhead needs --torchcompile" in err
    err = usage_error(capsys, ["train", *TINY, "--data-dir", str(data), "--torchcompile", *graphs,
                                "--grad-accum-steps", "2", *out])  # fmt: skip
    assert "--grad-accum-steps 2: not supported" in err
    try:
        from torch.utils import tensorboard  # noqa: F401
    except ImportError:
        err = usage_error(capsys, ["train", *TINY, "--data-dir", str(data), "--tensorboard", *out])
        assert "pip install tensorboard" in err
    # each was a traceback; the --img-size one after the run folder had been made (its check ran at the first step)
    err = usage_error(capsys, ["train", *TINY, "--img-size", "33", "--data-dir", str(data), *out])
    assert "img_size=(33, 33) is not a multiple of patch_size=(16, 16): the model could not run an input" in err
    err = usage_error(capsys, ["train", *TINY, "-b", "4", "--data-dir", str(data), "--aa", "bogus", *out])
    assert "--aa 'bogus': Unknown AA policy bogus; --aa takes timm's policy strings" in err
    text, garbage, listed = tmp_path / "notes.pth", tmp_path / "noise.safetensors", tmp_path / "list.pth"
    text.write_text("hello")
    garbage.write_bytes(bytes(range(256)) * 4)
    torch.save([1, 2], listed)
    for path, message in (
        (tmp_path / "nowhere.pth", "does not exist"),
        (text, "as a torch.save'd state dict (KeyError"),
        (garbage, "as a safetensors file (SafetensorError"),
        (listed, "holds a list, not a state dict"),
        (tmp_path, "is neither a checkpoint folder nor a run folder with complete checkpoints"),
    ):
        err = usage_error(capsys, ["train", *TINY, "--data-dir", str(data), "--initial-checkpoint", str(path), *out])
        assert f"'{path}'" in err and message in err, (path, err)
    assert not (tmp_path / "runs").exists()


def test_img_size_probe_on_the_meta_device(monkeypatch):
    """``build_model``'s probe: a model that builds at a size and then refuses an input of it (``ValueError`` from our
    input checks, ``AssertionError`` from timm's) is a usage error naming the size; a failure of the meta device itself
    (no autocast, no kernels: ``RuntimeError``) is left to the real run."""
    import timm

    from visionlin.train import validate as val

    seen = []
    monkeypatch.setattr(val, "check_model_name", lambda name: name)

    class Refuses(torch.nn.Module):
        def __init__(self, error):
            super().__init__()
            self.error = error

        def forward(self, x):
            seen.append((tuple(x.shape), x.device.type))
            raise self.error

    for error, refused in ((ValueError("input 40 is not a multiple of 32"), True), (AssertionError("bad H"), True),
                           (RuntimeError("unknown device type for autocast"), False)):  # fmt: skip
        monkeypatch.setattr(timm, "create_model", lambda name, e=error, **kw: Refuses(e))
        if refused:
            with pytest.raises(UsageError, match=rf"--img-size 40 does not fit 'm': {error}"):
                val.build_model("m", num_classes=2, img_size=40, in_chans=1)
        else:
            assert isinstance(val.build_model("m", num_classes=2, img_size=40, in_chans=1), Refuses)
    assert seen == [((1, 1, 40, 40), "meta")] * 3


def test_fresh_run_sets_aside_an_old_log(capsys, tmp_path, data):
    """A fresh run into a folder that a run without checkpoints left: the old ``log.jsonl`` is renamed (the first
    free ``log.previous-N.jsonl``), not appended to; the new log holds only the new run's records."""
    from visionlin.train.trainer import set_aside_old_log

    run = tmp_path / "r"
    run.mkdir()
    (run / "log.jsonl").write_text('{"kind": "train", "step": 99, "loss": 7.0}\n')
    (run / "log.previous-1.jsonl").write_text("older\n")
    argv = ["train", *TINY, "-b", "4", "--epochs", "1", "--data-dir", str(data), "--output", str(tmp_path),
            "--experiment", "r", "--log-interval", "1", "--no-plot", "--workers", "0"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "moved to log.previous-2.jsonl" in capsys.readouterr().out
    assert 'step": 99' in (run / "log.previous-2.jsonl").read_text()
    assert (run / "log.previous-1.jsonl").read_text() == "older\n"
    assert 99 not in _losses(run) and _losses(run)
    assert set_aside_old_log(tmp_path / "nowhere") is None


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    w = {"model": {"a": torch.ones(3)}}
    kw = dict(weights_metadata={"format": "visionlin"}, train_state={"epoch": 0}, rng_states={0: ckpt.capture_rng()})
    first = ckpt.write_checkpoint(tmp_path, 1, weights=w, summary={}, **kw)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        ckpt.write_checkpoint(tmp_path, 2, weights=w, summary={}, **kw)
    assert ckpt.latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000000001"]
    assert torch.equal(ckpt.read_checkpoint(first)["model"]["a"], torch.ones(3))
    (tmp_path / "checkpoints" / "step-000000005").mkdir()  # a folder without its marker is not a checkpoint
    assert ckpt.latest_checkpoint(tmp_path) == first


# Training end to end --------------------------------------------------------------------------------------------------
def test_train_validate_plot_with_the_whole_recipe(capsys, tmp_path, data):
    bad = data / "train" / "class_1" / "corrupt.png"
    bad.write_bytes(b"\x89PNG not really")
    try:
        argv = ["train", *TINY, *RUN, "--data-dir", str(data), "--output", str(tmp_path), "--experiment", "r",
                "--workers", "0", "--model-ema", "--model-ema-decay", "0.9", "--mixup", "0.8", "--cutmix", "1.0",
                "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--drop-path", "0.1", "--grad-accum-steps", "2",
                "--clip-grad", "1.0", "--grad-checkpointing", "--checkpoint-hist", "1", "--plot"]  # fmt: skip
        assert cli.main(argv) == 0
    finally:
        bad.unlink()
    out = capsys.readouterr().out
    run = tmp_path / "r"
    assert "skipped unreadable image" in out and "corrupt.png" in out and "skipped 2 unreadable image(s)" in out
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-000000006"]  # 25 images / 4 = 6 batches / 2
    log = read_log(run)
    assert [r["step"] for r in log["train"]] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and r["img_s"] > 0 and 0 <= r["data_wait_pct"] <= 100 for r in log["train"])
    last = log["epoch"][-1]
    assert {"val_top1", "val_top5", "val_loss", "ema_val_top1"} <= set(last)
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    config = (run / "config.yaml").read_text()
    assert "mixup: 0.8" in config and "command: visionlin train" in config
    state = ckpt.read_checkpoint(ckpt.latest_checkpoint(run))
    groups = state["train_state"]["optimizer"]["param_groups"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05]  # pos_embed, cls_token, norms, biases excluded

    results = tmp_path / "val.json"

    def validate(checkpoint, *extra) -> dict:
        argv = ["validate", *TINY, "--checkpoint", str(checkpoint), "--data-dir", str(data), "--workers", "0"]
        assert cli.main([*argv, "--device", "cpu", "--results-file", str(results), *extra]) == 0
        return json.loads(results.read_text())

    r = validate(run)
    assert r["n"] == 12 and r["loaded_via"] == "visionlin safetensors"
    assert r["top1"] == pytest.approx(last["val_top1"]) and r["loss"] == pytest.approx(last["val_loss"], abs=1e-5)
    assert validate(run, "--use-ema")["top1"] == pytest.approx(last["ema_val_top1"])
    # the authors' path: a {'model': state_dict} .pth through the model's checkpoint_filter_fn
    authors = tmp_path / "authors.pth"
    torch.save({"model": state["model"]}, authors)
    r = validate(authors, "--num-classes", "3")
    assert r["top1"] == pytest.approx(last["val_top1"]) and r["loaded_via"] == "checkpoint_filter_fn"

    err = usage_error(capsys, ["validate", "--model", "infvit_pure_tiny", "--img-size", "32", "--checkpoint",
                                str(run), "--data-dir", str(data)])  # fmt: skip
    assert "trained as model 'infvit_tiny'" in err and "this run builds 'infvit_pure_tiny'" in err
    base = ["validate", *TINY, "--data-dir", str(data), "--workers", "0", "--device", "cpu"]
    err = usage_error(capsys, [*base, "--img-size", "40"])  # (a traceback at the first batch)
    assert "img_size=(40, 40) is not a multiple of patch_size=(16, 16)" in err
    garbage = tmp_path / "noise.pth"
    garbage.write_bytes(bytes(range(256)) * 4)
    err = usage_error(capsys, [*base, "--checkpoint", str(garbage)])
    assert f"cannot read checkpoint '{garbage}' as a torch.save'd state dict" in err
    err = usage_error(capsys, [*base, "--use-ema"])  # (was ignored: the random weights reported as the EMA's)
    assert "use_ema (--use-ema) needs a checkpoint (--checkpoint)" in err
    for bad in ("0", "nan", "-1"):  # 0 was swapped for the model's default; nan reached the transform
        assert f"{bad!r} is not a positive finite number" in usage_error(capsys, [*base, "--crop-pct", bad])
    assert "device='bogus' (--device) is not a torch device" in usage_error(capsys, [*base[:-2], "--device", "bogus"])
    if not torch.cuda.is_available():
        assert "on a machine with a CUDA GPU" in usage_error(capsys, [*base[:-2], "--device", "cuda"])
    for target in (tmp_path, tmp_path / "nowhere" / "r.json"):  # (refused after the whole evaluation before)
        err = usage_error(capsys, [*base, "--checkpoint", str(run), "--results-file", str(target)])
        assert "must be a file path in an existing folder" in err
    err = usage_error(capsys, ["train", *TINY, *RUN, "--data-dir", str(data), "--output", str(tmp_path),
                                "--experiment", "r"])  # fmt: skip
    assert "already has checkpoints (newest: step-000000006); pass --resume auto" in err
    (run / "curves.png").unlink()
    assert cli.main(["plot", str(run)]) == 0
    assert (run / "curves.png").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_training_matches_eager(tmp_path, data):
    """--torchcompile --torchcompile-mode reduce-overhead (CUDA graphs) trains as eager does: same losses within 5%,
    and final weights whose distance from eager's is a small part of how far eager's moved from the start (a run at
    learning rate 0 gives the start)."""
    weights = {}
    for name, extra in (("start", ["--lr", "0", "--warmup-lr", "0", "--min-lr", "0"]), ("eager", []),
                        ("graphs", ["--torchcompile", "--torchcompile-mode", "reduce-overhead"])):  # fmt: skip
        argv = ["train", *TINY, *RUN, "--data-dir", str(data), "--output", str(tmp_path), "--experiment", name,
                "--workers", "0", *extra]  # fmt: skip
        assert cli.main(argv) == 0
        weights[name] = ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path / name))["model"]
    eager, graphs = _losses(tmp_path / "eager"), _losses(tmp_path / "graphs")
    assert eager.keys() == graphs.keys() and len(eager) == 12  # 24 images, batch 4, 2 epochs
    np.testing.assert_allclose(list(graphs.values()), list(eager.values()), rtol=0.05)

    def dist(a: dict, b: dict) -> float:
        return sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a if a[k].is_floating_point()) ** 0.5

    moved = dist(weights["eager"], weights["start"])
    assert moved > 0 and dist(weights["graphs"], weights["eager"]) < 0.1 * moved


def test_fashion_mnist_option_trains(capsys, tmp_path):
    _write_fashion(tmp_path, n=8)
    argv = ["train", *TINY, "-b", "4", "--epochs", "1", "--warmup-epochs", "0", "--dataset", "fashion_mnist",
            "--data-dir", str(tmp_path), "--output", str(tmp_path / "runs"), "--workers", "0", "--no-plot"]  # fmt: skip
    assert cli.main(argv) == 0
    run = tmp_path / "runs" / "infvit_tiny-32"
    assert read_log(run)["epoch"][0]["val_top5"] >= 0 and "10 classes" in capsys.readouterr().out


def test_killed_run_resumes_exactly(tmp_path, data):
    common = [*TINY, *RUN, "--data-dir", str(data), "--recovery-interval", "2", "--model-ema",
              "--model-ema-decay", "0.9", "--reprob", "0.25", "--aa", "rand-m3-mstd0.5", "--mixup", "0.5",
              "--drop-path", "0.2"]  # fmt: skip
    ref_dir = tmp_path / "ref"
    assert cli.main(["train", *common, "--output", str(ref_dir), "--workers", "0"]) == 0
    ref = read_log(ref_dir / "infvit_tiny-32")

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "visionlin.train", *common, "--output", str(out), "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("checkpoint step-000000002 (recovery"):  # mid-epoch 0 of 6 steps: kill it now
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    run = out / "infvit_tiny-32"
    last = ckpt.latest_checkpoint(run)
    marker = json.loads((last / "complete.json").read_text())
    assert 0 < marker["position"] < 6 and marker["epoch"] == 0, marker  # really mid-epoch
    assert read_log(run)["epoch"] == []  # killed before the end of the first epoch

    assert cli.main(["train", *common, "--output", str(out), "--workers", "0", "--resume", "auto"]) == 0
    resumed = read_log(run)
    steps = [r["step"] for r in resumed["train"]]
    assert steps == list(range(1, 13))
    assert _losses(run) == _losses(ref_dir / "infvit_tiny-32")  # bitwise, every step (later records win)
    first_resumed = marker["step"] + 1
    assert [r["lr"] for r in resumed["train"][first_resumed - 1 :]] == [
        r["lr"] for r in ref["train"][first_resumed - 1 :]
    ]
    for mine, theirs in zip(resumed["epoch"], ref["epoch"], strict=True):
        for key in ("val_loss", "val_top1", "ema_val_loss", "ema_val_top1"):
            assert mine[key] == theirs[key], key
    a = ckpt.read_checkpoint(ckpt.latest_checkpoint(run))
    b = ckpt.read_checkpoint(ckpt.latest_checkpoint(ref_dir / "infvit_tiny-32"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in b["ema"])


def test_plot_refuses_a_log_it_cannot_read(capsys, tmp_path):
    """``visionlin plot`` on a log.jsonl that is not a run's (a non-JSON line before the last, no training records,
    a record without its step) or with an ``--out`` that is a folder: a usage error naming it, no PNG (it had drawn a
    blank one and exited 0). A last line cut short by a killed run is still skipped."""
    run = tmp_path / "run"
    run.mkdir()
    log = run / "log.jsonl"
    good = '{"kind": "train", "step": 1, "loss": 2.0, "lr": 0.1}\n{"kind": "train", "step": 2, "loss": 1.5, "lr": 0.1}'
    for text, message in (
        ("not json\n" + good, "line 1 is not JSON: 'not json'"),
        ("", "has no training records"),
        ('{"kind": "epoch"}\n' + good, "line 1: a 'epoch' record without its index"),
    ):
        log.write_text(text)
        assert message in usage_error(capsys, ["plot", str(run)])
        assert not (run / "curves.png").exists()
    log.write_text(good + '\n{"kind": "tra')  # cut short
    assert cli.main(["plot", str(run)]) == 0 and (run / "curves.png").is_file()
    assert "must be a file path in an existing folder" in usage_error(capsys, ["plot", str(run), "--out", str(run)])
