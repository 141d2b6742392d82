"""``visionlin train`` / ``validate`` / ``plot`` against hostile input: values that passed the flag checks and then
failed deep inside (or, worse, gave a wrong result with exit status 0). Each case is refused up front with a usage
error naming the value and what is allowed, or stops cleanly without leaving wrong files behind. Kept cheap: the
checks are called directly where they can be, the end-to-end runs use a one-block model at 32 px."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from cli_utils import fresh_accelerate_state, usage_error  # noqa: F401  (the fixture: autouse here)
from PIL import Image

from visionlin import cli
from visionlin.train import checkpoint as ckpt
from visionlin.train.data import make_synthetic_imagefolder
from visionlin.train.plot import plot_run
from visionlin.train.trainer import TrainingDiverged, _resolve_resume, resolve_config, train
from visionlin.train.validate import UsageError, build_model, check_crop_pct, eval_transform

TINY = ["--model", "infvit_tiny", "--img-size", "32", "--model-kwargs", "depth=1", "embed_dim=32", "num_heads=2"]
RUN = ["-b", "4", "--epochs", "1", "--warmup-epochs", "0", "--log-interval", "1", "--no-plot", "--workers", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic_imagefolder(tmp_path_factory.mktemp("data"), classes=3, train_per_class=4, val_per_class=2)


@pytest.fixture(scope="module")
def garbage(tmp_path_factory) -> Path:
    """An image folder whose every .png is text."""
    root = tmp_path_factory.mktemp("garbage")
    for split in ("train", "val"):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(4):
                (root / split / f"c{c}" / f"{i}.png").write_text("not an image")
    return root


def _fake_checkpoint(run_dir: Path, step: int) -> Path:
    return ckpt.write_checkpoint(run_dir, step, weights={"model": {"w": torch.ones(4)}},
                                 weights_metadata={"format": "visionlin", "model": "m", "num_classes": "3"},
                                 train_state={"epoch": 1}, rng_states={0: ckpt.capture_rng()},
                                 summary={"step": step})  # fmt: skip


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# 1: --resume of another run into a run folder with checkpoints of its own ---------------------------------------------
def test_resume_from_another_run_does_not_replace_this_runs_checkpoints(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    _fake_checkpoint(a, 12)
    theirs = _fake_checkpoint(b, 6)
    before = _tree(a)
    for resume in (str(b), str(theirs)):
        with pytest.raises(UsageError, match="continues another run") as e:
            _resolve_resume({"resume": resume}, a)
        assert str(b) in str(e.value) and f"{str(a)!r} already has checkpoints" in str(e.value)
    assert _tree(a) == before
    assert _resolve_resume({"resume": str(b)}, tmp_path / "C") == theirs  # a fresh folder may continue another run
    assert _resolve_resume({"resume": str(a)}, a) == ckpt.latest_checkpoint(a)  # its own run folder, by path


# 2: divergence, and rates beyond float32 ------------------------------------------------------------------------------
def test_diverged_training_stops_before_saving_nan_weights(capsys, tmp_path, data):
    """A loss that turns NaN in the second epoch: the run stops with TrainingDiverged at that epoch's end, the first
    epoch's checkpoint is the newest (no NaN weights saved); from the command line, exit status 1 and one line."""
    cfg, _ = resolve_config({"data_dir": str(data), "model": "infvit_tiny", "img_size": 32, "batch_size": 4,
                             "model_kwargs": ["depth=1", "embed_dim=32", "num_heads=2"], "epochs": 2,
                             "warmup_epochs": 0, "workers": 0, "plot": False, "output": str(tmp_path),
                             "experiment": "nan", "val_split": "none"})  # fmt: skip
    calls = []

    def loss_fn(model, images, targets):
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        return loss * float("nan") if len(calls) > 3 else loss  # 12 images, batch 4: 3 steps an epoch

    with pytest.raises(TrainingDiverged, match=r"non-finite training loss at epoch 1, steps 4\.\.6"):
        train(cfg, loss_fn=loss_fn)
    run = tmp_path / "nan"
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-000000003"]
    state = ckpt.read_checkpoint(ckpt.latest_checkpoint(run))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert '"kind": "stopped"' in (run / "log.jsonl").read_text()

    argv = ["train", *TINY, *RUN, "--data-dir", str(data), "--output", str(tmp_path), "--experiment", "lr6",
            "--lr", "1e6", "--val-split", "none"]  # fmt: skip
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "visionlin train: error: training diverged" in err and "Traceback" not in err
    assert ckpt.complete_checkpoints(tmp_path / "lr6") == []


@pytest.mark.parametrize("flag", ["--lr", "--weight-decay", "--warmup-lr", "--min-lr", "--lr-base", "--opt-eps"])
def test_rates_beyond_float32_are_refused_up_front(capsys, tmp_path, flag):
    err = usage_error(capsys, ["train", *TINY, "--data-dir", str(tmp_path), flag, "1e300"])
    assert "'1e300' is not a non-negative number up to 1e+06" in err


# 3: no readable image -------------------------------------------------------------------------------------------------
def test_no_readable_image_is_an_error_not_a_metric(capsys, tmp_path, garbage):
    err = usage_error(capsys, ["validate", *TINY, "--data-dir", str(garbage), "--workers", "0", "--device", "cpu"])
    assert f"none of the 8 images of split 'val' ('{garbage / 'val'}') could be read" in err
    assert "UnidentifiedImageError" in err and "top-1" not in capsys.readouterr().out
    err = usage_error(capsys, ["train", *TINY, *RUN, "--data-dir", str(garbage), "--output", str(tmp_path)])
    assert f"none of the 8 images of split 'train' ('{garbage / 'train'}') could be read" in err
    assert ckpt.complete_checkpoints(tmp_path / "infvit_tiny-32") == []


# 4: --crop-pct that resizes to nothing (or to a giant) ----------------------------------------------------------------
def test_crop_pct_must_give_a_sane_resize(capsys, tmp_path, data):
    check_crop_pct(None, 32)
    for ok in (0.875, 1.0, 32):
        check_crop_pct(ok, 32)
    for bad, scale in ((100, "0 px"), (32.5, "0 px"), (1e-9, "31999999999 px")):
        with pytest.raises(UsageError, match=f"resizes the images to {scale}.*allowed: 0.00195 < crop_pct <= 32"):
            check_crop_pct(bad, 32)
    out = ["--output", str(tmp_path / "runs")]
    assert "resizes the images to 0 px" in usage_error(capsys, ["train", *TINY, "--data-dir", str(data),
                                                                "--crop-pct", "100", *out])  # fmt: skip
    assert "resizes the images to 0 px" in usage_error(capsys, ["validate", *TINY, "--data-dir", str(data),
                                                                "--crop-pct", "100"])  # fmt: skip
    assert not (tmp_path / "runs").exists()


# 5 and 21: plotting a run whose epochs differ in what they record; --out's format -------------------------------------
def test_plot_draws_each_series_over_the_epochs_that_have_it(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"kind": "train", "step": s, "loss": 1.0 / s, "lr": 0.1} for s in (1, 2, 3, 4)]
    records += [{"kind": "epoch", "epoch": 0, "step": 2, "val_loss": 1.0, "val_top1": 50.0, "val_top5": 100.0,
                 "ema_val_top1": 40.0},  # a resume turned validation and the EMA off
                {"kind": "epoch", "epoch": 1, "step": 4}]  # fmt: skip
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot_run(run).read_bytes()[:4] == b"\x89PNG"
    records[-2], records[-1] = {"kind": "epoch", "epoch": 0, "step": 2}, {**records[-2], "epoch": 1, "step": 4}
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))  # turned on at a resume
    assert plot_run(run).is_file()
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "c.pdf")]) == 0
    assert (tmp_path / "c.pdf").read_bytes()[:5] == b"%PDF-"
    err = usage_error(capsys, ["plot", str(run), "--out", str(tmp_path / "c.xyz")])
    assert "matplotlib cannot write '.xyz' files" in err and ".png" in err
    assert not (tmp_path / "c.xyz").exists()


# 6: --model-kwargs repeating a dedicated flag -------------------------------------------------------------------------
def test_model_kwargs_that_have_their_own_flag_are_refused(capsys, tmp_path, data):
    base = ["train", *TINY, "--data-dir", str(data), "--output", str(tmp_path)]
    for item, flag in (("img_size=32", "--img-size"), ("num_classes=3", "--num-classes"), ("drop_rate=0.1", "--drop"),
                       ("pretrained=True", "--pretrained"), ("drop_path_rate=0.1", "--drop-path")):  # fmt: skip
        err = usage_error(capsys, [*base, "--model-kwargs", "depth=1", item])
        assert f"--model-kwargs {item}" in err and f"pass {flag} instead" in err, item
    err = usage_error(capsys, ["validate", *TINY, "--data-dir", str(data), "--model-kwargs", "img_size=32"])
    assert "--model-kwargs img_size=32: img_size has its own flag here, pass --img-size instead" in err
    err = usage_error(capsys, ["distill", *base[1:], "--teacher", "infvit_tiny", "--teacher-kwargs", "depth=2",
                               "num_classes=10"])  # fmt: skip
    assert "--teacher-kwargs num_classes=10: num_classes has its own flag here, pass --num-classes instead" in err
    assert list(tmp_path.iterdir()) == []


# 7: a damaged checkpoint on --resume ----------------------------------------------------------------------------------
def test_damaged_checkpoint_files_are_named(tmp_path):
    folder = _fake_checkpoint(tmp_path, 6)
    assert torch.equal(ckpt.read_checkpoint(folder)["model"]["w"], torch.ones(4))
    for name, message in (("model.safetensors", "cannot be read (SafetensorError"),
                          ("train_state.pth", "cannot be read (UnpicklingError"),
                          ("rng_rank0.pth", "cannot be read (UnpicklingError"),
                          ("complete.json", "cannot be read (JSONDecodeError")):  # fmt: skip
        path = folder / name
        good = path.read_bytes()
        path.write_bytes(b"x" * len(good))  # garbled in place, the size unchanged
        with pytest.raises(
            ckpt.CheckpointError, match=re.escape(f"checkpoint {str(folder)!r} is damaged: {name} {message}")
        ):
            ckpt.read_checkpoint(folder)
        path.write_bytes(good[:-5])
        if name != "complete.json":
            with pytest.raises(ckpt.CheckpointError, match=f"{name} has {len(good) - 5} bytes, not the {len(good)}"):
                ckpt.read_checkpoint(folder)
        path.unlink()
        with pytest.raises(ckpt.CheckpointError, match=f"{name} is missing|no complete.json"):
            ckpt.read_checkpoint(folder)
        path.write_bytes(good)


# 8, 17, 18, 25: checked before anything is made -----------------------------------------------------------------------
def test_flags_checked_before_the_run_folder_exists(capsys, tmp_path, data):
    out = ["--output", str(tmp_path / "runs")]
    err = usage_error(capsys, ["train", *TINY, "--data-dir", str(data), "--num-classes", "2", *out])
    assert "the data has 3 classes but --num-classes is 2" in err
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for output in (a_file, a_file / "sub"):
        err = usage_error(capsys, ["train", *TINY, "--data-dir", str(data), "--output", str(output)])
        assert f"{str(a_file)!r} (in " in err and "is a file, not a folder" in err
    assert a_file.read_text() == "mine"
    for cmd in ("train", "validate"):
        err = usage_error(capsys, [cmd, *TINY, "--data-dir", str(data), "--img-size", "100000"])
        assert "'100000' is not a positive integer up to 16384" in err
        assert "is not a number of worker processes in 0.." in usage_error(capsys, [cmd, *TINY, "-j", "5000"])
    assert not (tmp_path / "runs").exists()


# 9: --interpolation random for evaluation -----------------------------------------------------------------------------
def test_random_interpolation_evaluates_with_bicubic():
    transform = eval_transform(torch.nn.Linear(2, 2), 32, None, "random")
    assert "bicubic" in repr(transform).lower()
    assert tuple(transform(Image.new("RGB", (40, 40))).shape) == (3, 32, 32)


# 10: the --img-size probe and BatchNorm -------------------------------------------------------------------------------
def test_img_size_probe_takes_batchnorm_models():
    model = build_model("resnet18", num_classes=3, img_size=32)  # ('Expected more than 1 value per channel')
    assert model.training


# 19: recipe values for integer options --------------------------------------------------------------------------------
def test_recipe_integer_options_refuse_fractions(tmp_path):
    recipe = tmp_path / "r.yaml"
    for text, message in (("epochs: 2.9\n", "epochs: 2.9 is not a positive integer"),
                          ("img_size: 32.5\n", "img_size: 32.5 is not a positive integer"),
                          ("epochs: .inf\n", "epochs: inf is not a positive integer")):  # fmt: skip
        recipe.write_text(text)
        with pytest.raises(UsageError, match=message):
            resolve_config({"data_dir": "x"}, str(recipe))
    recipe.write_text("epochs: 2.0\n")
    assert resolve_config({"data_dir": "x"}, str(recipe))[0]["epochs"] == 2


def test_mixup_needs_two_images_a_batch():
    """Mixup pairs a batch's images and drops one of an odd batch: at -b 1 every batch was dropped, and the zero-image
    check then said no image could be read."""
    for flags in ({"mixup": 0.8}, {"cutmix": 1.0}):
        with pytest.raises(UsageError, match=r"--batch-size 1 with mixup / cutmix .* needs at least 2"):
            resolve_config({"data_dir": "x", "batch_size": 1, **flags})
    assert resolve_config({"data_dir": "x", "batch_size": 2, "mixup": 0.8})[0]["batch_size"] == 2


# 23: an unwritable --results-file -------------------------------------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/version").is_file(), reason="needs Linux /proc")
def test_results_file_that_cannot_be_written_is_refused_before_evaluating(capsys, data):
    err = usage_error(capsys, ["validate", *TINY, "--data-dir", str(data), "--results-file", "/proc/version"])
    assert "argument --results-file: '/proc/version' cannot be written" in err
    assert "top-1" not in capsys.readouterr().out


# stop 55: a resumption restored the checkpoint's optimizer groups and schedule over the new settings it announced


def test_resumption_applies_changed_lr_weight_decay_and_epochs(capsys, tmp_path, data):
    """Resuming a finished 1-epoch run with --epochs 2, another --lr and --weight-decay: the steps after the checkpoint
    follow the new schedule (as a straight 2-epoch run with those settings does; they ran at the old schedule's lr 0)
    and the optimizer groups carry the new weight decay (they kept the old one while the note said otherwise)."""
    base = [*TINY, "-b", "4", "--warmup-epochs", "0", "--log-interval", "1", "--no-plot", "--workers", "0",
            "--data-dir", str(data), "--min-lr", "0"]  # fmt: skip
    run = tmp_path / "run"
    assert (
        cli.main(["train", *base, "--epochs", "1", "--lr", "1e-3", "--weight-decay", "0.05", "--output", str(run)]) == 0
    )
    assert cli.main(["train", *base, "--epochs", "2", "--lr", "2e-3", "--weight-decay", "0.5", "--output", str(run),
                     "--resume", "auto"]) == 0  # fmt: skip
    assert "the learning-rate schedule follows this run's settings from step 3 on: lr: 0.001 -> 0.002" in (
        capsys.readouterr().out
    )
    straight = tmp_path / "straight"
    assert cli.main(["train", *base, "--epochs", "2", "--lr", "2e-3", "--weight-decay", "0.5", "--output",
                     str(straight)]) == 0  # fmt: skip
    from visionlin.train.plot import read_log

    def lrs(path):
        return {r["step"]: r["lr"] for r in read_log(next(path.iterdir()))["train"]}

    resumed, want = lrs(run), lrs(straight)
    assert [resumed[s] for s in (4, 5, 6)] == [want[s] for s in (4, 5, 6)] and want[4] > 0
    state = ckpt.read_checkpoint(ckpt.latest_checkpoint(next(run.iterdir())))
    decays = sorted({g["weight_decay"] for g in state["train_state"]["optimizer"]["param_groups"]})
    assert decays == [0.0, 0.5]


def test_validate_maps_labels_by_class_name_and_use_ema_needs_a_folder(capsys, tmp_path, data):
    """A validation folder without one of the training classes numbered the others from 0 (scored against the wrong
    outputs, exit 0): the run records its class names and validate maps the folder's labels by them, or refuses a
    class it did not train on. ``--use-ema`` with a weights file was ignored (the plain weights were reported)."""
    import shutil

    from visionlin.train.validate import validate

    run = tmp_path / "run"
    assert cli.main(["train", *TINY, *RUN, "--data-dir", str(data), "--output", str(run), "--model-ema"]) == 0
    folder = next(run.iterdir())
    part = tmp_path / "part"
    shutil.copytree(data / "val", part / "val")
    first = sorted(p.name for p in (part / "val").iterdir())[0]
    shutil.rmtree(part / "val" / first)
    kw = dict(checkpoint=str(folder), data_dir=str(part), img_size=32, batch_size=4, workers=0, device="cpu",
              model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})  # fmt: skip
    full = validate("infvit_tiny", **{**kw, "data_dir": str(data)})
    partial = validate("infvit_tiny", **kw)
    # the same model on the other classes' images: per-image correctness is the full run's, restricted
    from visionlin.train.data import create_dataset

    ds = create_dataset("imagefolder", str(part), "val")
    assert ds.classes != create_dataset("imagefolder", str(data), "val").classes
    assert partial["n"] == full["n"] - 2
    import torch.nn.functional as F  # noqa: N812

    from visionlin.train.validate import build_model, eval_transform, load_model_weights

    model = build_model("infvit_tiny", num_classes=3, img_size=32, **kw["model_kwargs"]).eval()
    load_model_weights(model, ckpt.latest_checkpoint(folder) / "model.safetensors", "infvit_tiny")
    tf = eval_transform(model, 32, None)
    images, labels = zip(
        *[
            (
                tf(Image.open(p).convert("RGB")),
                sorted(c.name for c in (data / "val").iterdir()).index(Path(p).parent.name),
            )
            for p, _ in ds.samples
        ],
        strict=True,
    )
    with torch.no_grad():
        logits = model(torch.stack(images))
    want = float(F.cross_entropy(logits, torch.tensor(labels)))
    assert partial["loss"] == pytest.approx(want, rel=1e-5)
    (part / "val" / "stranger").mkdir()
    Image.new("RGB", (32, 32)).save(part / "val" / "stranger" / "x.png")
    with pytest.raises(UsageError, match=r"the data's classes \['stranger'\] are not among the 3 classes"):
        validate("infvit_tiny", **kw)
    weights = ckpt.latest_checkpoint(folder) / "model.safetensors"
    with pytest.raises(UsageError, match=r"use_ema \(--use-ema\) picks ema.safetensors in a checkpoint or run folder"):
        validate("infvit_tiny", **{**kw, "checkpoint": str(weights), "use_ema": True})


def test_stop55_flag_and_recipe_checks(capsys, tmp_path, data):
    """Found by the stop-55 probe: a recipe's null passed unchecked (tracebacks later, weight_decay silently 0); any
    prefix before "_" passed as an optimizer ("lookahaed_adamw" ran plain AdamW); seeds past numpy's range were a
    traceback; float16 autocast on the CPU was silently off; a schedule above the peak lr or a warm-up longer than the
    run went unsaid."""
    recipe = tmp_path / "r.yaml"
    for key in ("epochs", "weight_decay", "opt", "sched", "log_interval"):
        recipe.write_text(f"{key}: null\n")
        with pytest.raises(UsageError, match=rf"{key} cannot be null \(its default is"):
            resolve_config({"data_dir": "x"}, str(recipe))
    recipe.write_text("lr: null\nclip_grad: null\n")  # options whose default is None take null
    assert resolve_config({"data_dir": "x"}, str(recipe))[0]["lr"] is None
    out = ["--output", str(tmp_path / "runs")]
    base = ["train", *TINY, "--data-dir", str(data), *out]
    for opt in ("lookahaed_adamw", "bogus_adamw"):
        assert f"{opt!r} is not a timm optimizer" in usage_error(capsys, [*base, "--opt", opt])
    assert resolve_config({"data_dir": "x", "opt": "lookahead_adamw"}, None)[0]["opt"] == "lookahead_adamw"
    for seed in ("4294967295", "99999999999999999999"):
        assert f"'{seed}' is not an integer in [0, 4294901760]" in usage_error(capsys, [*base, "--seed", seed])
    err = usage_error(capsys, [*base, "--amp", "--amp-dtype", "float16", "--cpu"])
    assert "--amp --amp-dtype float16 does not run on the CPU" in err
    assert not (tmp_path / "runs").exists()
    assert cli.main([*base, *RUN, "--epochs", "1", "--warmup-epochs", "1", "--lr", "1e-6", "--min-lr", "1e-5"]) == 0
    said = capsys.readouterr().out
    assert "note: the schedule rises above the peak lr 1e-06: --min-lr 1e-05" in said
    assert "note: the warm-up (1 epochs) covers the whole run (1 epochs)" in said


def test_a_model_that_cannot_take_the_images_is_refused_before_the_run_folder(capsys, tmp_path, data):
    """A student or teacher that cannot take the data's images failed at the first step with a traceback, after
    config.yaml and log.jsonl were written; an output folder that cannot be written failed at its first file."""
    out = tmp_path / "runs"
    big_patch = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--model-kwargs", "patch_size=64", "depth=1"]
    err = usage_error(capsys, ["train", *big_patch, *RUN, "--data-dir", str(data), "--output", str(out)])
    assert "model 'vit_tiny_patch16_224' cannot take the data's images ([B, 3, 32, 32])" in err
    err = usage_error(capsys, ["train", *TINY[:-3], "embed_dim=32", "num_heads=2", "in_chans=1", *RUN, "--data-dir",
                               str(data), "--output", str(out)])  # fmt: skip
    assert "cannot take the data's images" in err and "in_chans=1" in err
    teacher = ["--teacher", "vit_tiny_patch16_224", "--teacher-kwargs", "depth=1", "patch_size=64"]
    err = usage_error(capsys, ["distill", *TINY, *teacher, *RUN, "--data-dir", str(data), "--output", str(out)])
    assert "teacher 'vit_tiny_patch16_224' cannot take the data's images" in err
    assert not out.exists()
    if Path("/proc").is_dir():  # a folder nobody can create anything in
        err = usage_error(capsys, ["train", *TINY, *RUN, "--data-dir", str(data), "--output", "/proc/visionlin-x"])
        assert "cannot write to folder '/proc'" in err


def test_plot_names_damaged_records_and_unwritable_outputs(capsys, tmp_path):
    """``plot`` on records without the values it draws (KeyError tracebacks), with a string loss (drawn as a category
    axis, exit 0), a binary log, or an --out it cannot write (a PermissionError traceback): usage errors."""
    run = tmp_path / "run"
    run.mkdir()
    log = run / "log.jsonl"
    good = '{"kind": "train", "step": 1, "loss": 2.0, "lr": 0.1}\n'
    for text, message in (
        ('{"kind": "train", "step": 1, "lr": 0.1}\n', "a 'train' record whose 'loss' is not a number"),
        ('{"kind": "train", "step": 1, "loss": "abc", "lr": 0.1}\n', "whose 'loss' is not a number"),
        (good + '{"kind": "epoch", "epoch": 0, "val_loss": 1.0}\n', "a 'epoch' record whose 'step' is not a number"),
    ):
        log.write_text(text)
        assert message in usage_error(capsys, ["plot", str(run)])
    log.write_bytes(b"\xff\xfe\x00garbage")
    assert "is not a text log" in usage_error(capsys, ["plot", str(run)])
    log.write_text(good)
    if Path("/proc").is_dir():
        assert "cannot use" in usage_error(capsys, ["plot", str(run), "--out", "/proc/self/x.png"])


def test_damaged_fashion_mnist_files_are_named(tmp_path):
    """A truncated or non-gzip .gz and an IDX file of the wrong size were tracebacks (EOFError, BadGzipFile, a
    reshape) naming no file."""
    import gzip

    import numpy as np
    from test_train import _write_fashion

    from visionlin.train.data import FashionMNIST

    _write_fashion(tmp_path, n=6)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    good = images.read_bytes()
    for blob, message in (
        (good[: len(good) // 2], "cannot read Fashion-MNIST file"),
        (b"not gzip at all", "cannot read Fashion-MNIST file"),
        (gzip.compress(np.array([2051, 6, 28, 28], ">i4").tobytes() + bytes(100)), r"header says \[6, 28, 28\]"),
        (gzip.compress(np.array([2049, 6], ">i4").tobytes() + bytes(6)), "is not an IDX file of 3-D unsigned bytes"),
    ):
        images.write_bytes(blob)
        with pytest.raises(ValueError, match=message) as caught:
            FashionMNIST(tmp_path, "train")
        assert str(images) in str(caught.value)


def test_image_folder_refuses_empty_classes_and_walks_a_link_loop_once(capsys, tmp_path):
    """An empty class folder became a class of its own (a wider head, silently); a link to a parent folder made the
    walk repeat the same images until the path was too long (4 images read as 324)."""
    import os

    from visionlin.train.data import DataError, ImageFolder

    root = make_synthetic_imagefolder(tmp_path / "d", classes=2, train_per_class=4, val_per_class=2)
    n = len(ImageFolder(root / "train"))
    os.symlink(".", root / "train" / "class_0" / "loop")
    (root / "train" / "class_1" / "deeper").mkdir()
    os.symlink("..", root / "train" / "class_1" / "deeper" / "up")
    assert len(ImageFolder(root / "train")) == n == 8
    os.symlink("../class_1", root / "train" / "class_0" / "sibling")  # a link elsewhere is followed, as before
    assert len(ImageFolder(root / "train")) == n + 4
    os.remove(root / "train" / "class_0" / "sibling")
    (root / "train" / "class_2").mkdir()
    with pytest.raises(DataError, match=r"class folders without images: \['class_2'\]"):
        ImageFolder(root / "train")
    (root / "val" / "class_2").mkdir()  # an evaluation split may lack a class's images (its labels keep their places)
    assert ImageFolder(root / "val", allow_empty=True).classes == ["class_0", "class_1", "class_2"]


def test_logged_lr_is_the_steps_own_and_ema_decay_below_one(capsys, tmp_path, data):
    """The log gave each step the lr of the next (step 1 showed the second warm-up value); --model-ema-decay 1 kept
    the EMA at the initial weights."""
    from visionlin.train.plot import read_log

    run = tmp_path / "run"
    argv = ["train", *TINY, *RUN, "--data-dir", str(data), "--output", str(run), "--epochs", "2"]
    assert cli.main([*argv, "--warmup-epochs", "1", "--warmup-lr", "1e-6", "--lr", "1e-3", "--min-lr", "0"]) == 0
    lrs = [r["lr"] for r in read_log(next(run.iterdir()))["train"]]
    # 3 steps an epoch: the warm-up runs 1e-6, then + (1e-3 - 1e-6) / 3 a step (timm's linear warm-up)
    assert lrs[:3] == pytest.approx([1e-6, 1e-6 + (1e-3 - 1e-6) / 3, 1e-6 + 2 * (1e-3 - 1e-6) / 3])
    assert "'1' is not a decay in [0, 1)" in usage_error(capsys, [*argv, "--model-ema", "--model-ema-decay", "1"])


def test_a_hierarchical_checkpoint_from_before_the_grid_record_loads_through_the_cli_path(tmp_path):
    """The CLI's strict load counted the new ``pos_embed_grid`` buffer missing in a checkpoint saved before it existed
    (resume, validate, --initial-checkpoint, --teacher-checkpoint all refused); the model fills it in itself."""
    import timm
    from safetensors.torch import save_file

    from visionlin.train.validate import load_model_weights

    src = timm.create_model("flatten_pvt_tiny", img_size=64, num_classes=3)
    old = {k: v.contiguous() for k, v in src.state_dict().items() if k != "pos_embed_grid"}
    path = tmp_path / "model.safetensors"
    save_file(old, str(path), metadata={"format": "visionlin", "model": "flatten_pvt_tiny", "num_classes": "3"})
    dst = timm.create_model("flatten_pvt_tiny", img_size=64, num_classes=3)
    load_model_weights(dst, path, "flatten_pvt_tiny")
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())
    square_only = timm.create_model("flatten_pvt_tiny", img_size=(64, 96), num_classes=3)
    save_file({k: v.contiguous() for k, v in square_only.state_dict().items() if k != "pos_embed_grid"}, str(path),
              metadata={"format": "visionlin", "model": "flatten_pvt_tiny", "num_classes": "3"})  # fmt: skip
    with pytest.raises(ckpt.CheckpointError, match="has no pos_embed_grid"):
        load_model_weights(
            timm.create_model("flatten_pvt_tiny", img_size=(64, 96), num_classes=3), path, "flatten_pvt_tiny"
        )
