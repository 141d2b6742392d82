"""``visionlin distill`` on the tiny synthetic ImageFolder (CPU): the student's initialisation from the teacher, every
loss term's gradients, a run through the command line, exact resume of a stopped run, bad-input errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from cli_utils import fresh_accelerate_state, usage_error  # noqa: F401  (the fixture: autouse here)

import visionlin  # noqa: F401  (registers the models)
from visionlin import cli
from visionlin.train import checkpoint as ckpt
from visionlin.train.data import make_synthetic_imagefolder
from visionlin.train.distill import DISTILL_OPTIONS, DistillLoss, init_from_teacher
from visionlin.train.plot import read_log

STUDENT = ["--model", "infvit_tiny", "--img-size", "32", "--model-kwargs", "depth=2", "embed_dim=32", "num_heads=2"]
TEACHER = ["--teacher", "deit_tiny_patch16_224", "--teacher-kwargs", "depth=3", "embed_dim=48", "num_heads=2"]
RUN = ["-b", "4", "--epochs", "2", "--warmup-epochs", "1", "--lr", "1e-3", "--log-interval", "1", "--no-plot",
       "--workers", "0"]  # fmt: skip
LOSSES = ["--distill-logits", "1", "--distill-temperature", "2", "--distill-hard", "0.5", "--match-layers", "1:2,2:3",
          "--mask-weight", "1", "--mask-ratio", "0.5"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic_imagefolder(tmp_path_factory.mktemp("data"), classes=3, train_per_class=8, val_per_class=4)


def _cfg(**over) -> dict:
    cfg = {o.key: o.default for o in DISTILL_OPTIONS}
    return {**cfg, "smoothing": 0.0, **over}


def test_init_from_teacher_copies_what_fits_and_says_why_not():
    torch.manual_seed(0)
    teacher = timm.create_model("deit_tiny_patch16_224", img_size=48, num_classes=3)
    student = timm.create_model("infvit_tiny", img_size=32, num_classes=3)  # another grid: pos_embed resampled
    report = init_from_teacher(student, teacher)
    own, theirs = student.state_dict(), teacher.state_dict()
    params = {n for n, _ in student.named_parameters()}
    assert set(report["copied"]) == params  # every parameter: same widths (rho_logit is a buffer)
    for k in report["copied"]:
        if k != "pos_embed":
            assert torch.equal(own[k], theirs[k]), k
    assert own["pos_embed"].shape == (1, 5, 192) and torch.equal(own["pos_embed"][:, 0], theirs["pos_embed"][:, 0])
    assert all(v.startswith("buffer") for v in report["skipped"].values())
    assert report["copied_params"] == report["student_params"]

    narrow = timm.create_model("inline_deit_small", img_size=32, num_classes=3)  # width 320 vs deit_small's 384
    report = init_from_teacher(narrow, timm.create_model("deit_small_patch16_224", img_size=32, num_classes=3))
    assert report["copied_params"] < 0.01 * report["student_params"]
    assert "shape mismatch: teacher (384, 3, 16, 16) vs student (320, 3, 16, 16)" in report["skipped"][
        "patch_embed.proj.weight"]  # fmt: skip


@pytest.mark.parametrize(
    "term,over",
    [
        ("ce", {"distill_logits": 0.0}),
        ("kl", {"ce_weight": 0.0, "distill_temperature": 3.0}),
        ("hard", {"ce_weight": 0.0, "distill_logits": 0.0, "distill_hard": 1.0}),
        ("match", {"ce_weight": 0.0, "distill_logits": 0.0, "match_layers": "1:2,2:3"}),
        ("mask", {"ce_weight": 0.0, "distill_logits": 0.0, "mask_weight": 1.0}),
    ],
)
def test_each_loss_term_trains_the_student_and_its_parts_not_the_teacher(term, over):
    torch.manual_seed(0)
    teacher = timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=3, depth=3, embed_dim=48, num_heads=2)
    teacher.eval().requires_grad_(False)
    student = timm.create_model("infvit_tiny", img_size=32, num_classes=3, depth=2, embed_dim=32, num_heads=2)
    loss_fn = DistillLoss(student, teacher, _cfg(**over))
    loss = loss_fn(student, torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))
    assert set(loss_fn.last_terms) == {term} and torch.isfinite(loss)
    loss.backward()
    assert student.patch_embed.proj.weight.grad is not None and student.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    extra = list(loss_fn.named_parameters())
    if term in ("match", "mask"):  # widths 32 vs 48: projections / head exist and train
        assert extra and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in extra)
    else:
        assert not extra
    assert not any(n.startswith("_teacher") for n, _ in loss_fn.state_dict().items())


def test_distill_cli_runs_and_a_killed_run_resumes_exactly(capsys, tmp_path, data):
    torch.manual_seed(1)
    teacher = timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=3, depth=3, embed_dim=48, num_heads=2)
    weights = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict()}, weights)
    common = ["distill", *STUDENT, *TEACHER, *RUN, *LOSSES, "--data-dir", str(data), "--recovery-interval", "2",
              "--teacher-checkpoint", str(weights)]  # fmt: skip
    ref = tmp_path / "ref"
    assert cli.main([*common, "--output", str(ref)]) == 0
    out = capsys.readouterr().out
    run = ref / "infvit_tiny-32"
    assert f"teacher deit_tiny_patch16_224 loaded from {weights}" in out
    assert "init from teacher deit_tiny_patch16_224 -> infvit_tiny" in out
    report = json.loads((run / "init_from_teacher.json").read_text())
    assert report["copied_params"] < report["student_params"] and report["skipped"]["patch_embed.proj.weight"]
    log = read_log(run)
    assert [r["step"] for r in log["train"]] == list(range(1, 13)) and "val_top1" in log["epoch"][-1]
    last = ckpt.latest_checkpoint(run)
    extra = ckpt.load_weights(last / "extra.safetensors")
    assert {"proj.0.weight", "proj.1.weight", "mask_head.1.weight"} <= set(extra)
    state = ckpt.read_checkpoint(last)
    assert set(state["model"]) == set(timm.create_model("infvit_tiny", depth=2).state_dict())  # the student alone
    assert "teacher: deit_tiny_patch16_224" in (run / "config.yaml").read_text()

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "visionlin.cli", *common, "--output", str(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("checkpoint step-000000002 (recovery"):  # mid-epoch 0 of 6 steps
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    part = killed / "infvit_tiny-32"
    assert ckpt.latest_checkpoint(part).name == "step-000000002"
    assert cli.main([*common, "--output", str(killed), "--resume", "auto"]) == 0
    mine = {r["step"]: r["loss"] for r in read_log(part)["train"]}
    theirs = {r["step"]: r["loss"] for r in log["train"]}
    assert sorted(mine) == list(range(1, 13))
    assert mine == theirs  # bitwise, every step (later records win)
    assert [r["val_loss"] for r in read_log(part)["epoch"]] == [r["val_loss"] for r in log["epoch"]]
    a = ckpt.read_checkpoint(ckpt.latest_checkpoint(part))
    assert all(torch.equal(a["model"][k], state["model"][k]) for k in state["model"])
    a_extra = ckpt.load_weights(ckpt.latest_checkpoint(part) / "extra.safetensors")
    assert all(torch.equal(a_extra[k], extra[k]) for k in extra)

    # validate reads the distilled student
    assert cli.main(["validate", *STUDENT, "--checkpoint", str(run), "--data-dir", str(data), "--workers", "0",
                     "--device", "cpu"]) == 0  # fmt: skip


def test_distill_bad_input_is_a_usage_error(capsys, tmp_path, data):
    base = ["distill", *STUDENT, *RUN, "--data-dir", str(data), "--output", str(tmp_path / "runs")]
    err = usage_error(capsys, [*base, "--teacher", "deit_tiyn_patch16_224"])
    assert "unknown model 'deit_tiyn_patch16_224'" in err
    err = usage_error(capsys, base)
    assert "--teacher is required" in err
    err = usage_error(capsys, [*base, *TEACHER, "--match-layers", "1:4"])
    assert "teacher block 4 is out of range 1..3" in err
    err = usage_error(capsys, [*base, *TEACHER, "--match-layers", "3"])
    assert "student block 3 is out of range 1..2" in err
    err = usage_error(capsys, [*base, *TEACHER, "--match-layers", "a,b"])
    assert "'a' is not N or STUDENT:TEACHER" in err
    err = usage_error(capsys, [*base, *TEACHER, "--distill-logits", "-1"])
    assert "'-1' is not a non-negative number" in err
    err = usage_error(capsys, [*base, *TEACHER, "--mask-weight", "-0.5"])
    assert "'-0.5' is not a non-negative number" in err
    err = usage_error(capsys, [*base, *TEACHER, "--ce-weight", "0", "--distill-logits", "0"])
    assert "every loss weight is 0" in err
    wrong = tmp_path / "wrong.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=3).state_dict(), wrong)
    err = usage_error(capsys, [*base, *TEACHER, "--teacher-checkpoint", str(wrong)])
    assert f"--teacher-checkpoint '{wrong}' does not fit teacher 'deit_tiny_patch16_224'" in err
    wrong.write_bytes(bytes(range(256)))  # not a checkpoint at all (was a traceback)
    err = usage_error(capsys, [*base, *TEACHER, "--teacher-checkpoint", str(wrong)])
    assert f"cannot read checkpoint '{wrong}' as a torch.save'd state dict" in err
    assert not list((tmp_path / "runs").glob("*/checkpoints/step-*"))


def test_initial_weights_turn_the_teacher_initialisation_off(capsys, tmp_path):
    """--initial-checkpoint / --pretrained loaded the student, then --init-from-teacher (on by default) copied the
    teacher's weights over them: now the default yields to them, and asking for both is a usage error."""
    from visionlin.train.distill import resolve_distill_config
    from visionlin.train.validate import UsageError

    weights = tmp_path / "student.pth"
    torch.save(timm.create_model("infvit_tiny", img_size=32, num_classes=3).state_dict(), weights)
    given = {"model": "infvit_tiny", "teacher": "deit_tiny_patch16_224", "initial_checkpoint": str(weights),
             "data_dir": str(tmp_path)}  # fmt: skip
    assert resolve_distill_config(given, None)["init_from_teacher"] is False
    assert "--initial-checkpoint initialise(s) the student: --init-from-teacher is off" in capsys.readouterr().out
    assert resolve_distill_config({**given, "initial_checkpoint": None}, None)["init_from_teacher"] is True
    with pytest.raises(UsageError, match="--initial-checkpoint and --init-from-teacher both initialise the student"):
        resolve_distill_config({**given, "init_from_teacher": True}, None)
