"""``visionlin train`` / ``distill`` in two CPU processes (``torchrun``, gloo backend) on a tiny synthetic ImageFolder.

What is checked against what:

- two processes with 2 images x 2 accumulated micro-batches each (global batch 8, DDP ``no_sync`` on the first
  micro-batch) give, step by step, the losses of one process with batch 8: the same images (the sampler shards one
  global order), the same augmentations (per-sample seeds from the global position), gradients averaged over the
  processes;
- a two-process run killed (SIGKILL to the launcher and both workers) right after a mid-epoch checkpoint and resumed
  with ``--resume auto`` gives the same following losses, validation metrics and final weights as the uninterrupted run;
- validation over 15 images in 2 processes (8 + 7, the shorter shard padded by one duplicate) counts 15 images, and
  its top-1 / loss are those of a one-process ``visionlin validate`` of the same checkpoint;
- ``visionlin distill`` (logit distillation and token matching through a trained projection) in two processes follows
  the one-process run with the same global batch.

Each test launches ``torchrun --standalone --nproc_per_node 2 -m visionlin.train ...`` as a subprocess. Marked
``multiprocess`` (deselect with ``-m 'not multiprocess'``); they run in CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_utils import fresh_accelerate_state  # noqa: F401  (autouse in this module)

from visionlin import cli
from visionlin.train import checkpoint as ckpt
from visionlin.train.data import EpochSampler, ShardedEvalSampler, make_synthetic_imagefolder
from visionlin.train.plot import read_log

pytestmark = pytest.mark.multiprocess

TINY = ["--model", "infvit_tiny", "--img-size", "32", "--model-kwargs", "depth=2", "embed_dim=32", "num_heads=2"]
RUN = ["--epochs", "2", "--warmup-epochs", "1", "--lr", "1e-3", "--log-interval", "1", "--no-plot", "--workers", "0",
       "--aa", "rand-m3-mstd0.5", "--reprob", "0.25", "--smoothing", "0.1"]  # fmt: skip
ONE = ["-b", "8"]  # one process: 8 images per step
TWO = ["-b", "2", "--grad-accum-steps", "2"]  # two processes x 2 images x 2 micro-batches: 8 images per step
RTOL = 1e-5  # float32 sums in another order (the gradient all-reduce, the per-process loss means)
TIMEOUT = 300
HELPER = str(Path(__file__).with_name("fsdp_on_cpu.py"))  # the command with accelerate's FSDP path on CPU processes
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _once_per_session(tmp_path_factory, name: str, make):
    """``make(folder)`` run once per pytest session, even under xdist: the workers of one ``pytest -n`` run share the
    parent of their temporary folders, so the first worker to get here makes ``folder`` (under a file lock) and the
    others reuse it, instead of each launching the same two-process run again."""
    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent  # this run's own folder, shared by its workers
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # left by a worker that failed here: this one tries again
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # 24 training images (12 per process: 3 steps of 8 per epoch), 15 validation images (8 + 7 over two processes)
    return _once_per_session(
        tmp_path_factory,
        "ddp_data",
        lambda folder: make_synthetic_imagefolder(folder, classes=3, train_per_class=8, val_per_class=5),
    )


def _torchrun(args: list[str], cwd: Path, **popen) -> subprocess.Popen:
    """``args``: a module and its arguments, or a script (``*.py``) and its arguments."""
    module = [] if args[0].endswith(".py") else ["-m"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *module, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=cwd,
                            start_new_session=True, **popen)  # fmt: skip


def _kill_all(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it. torchrun starts each worker in a session of its own, so killing the
    launcher's process group would leave the workers running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    doomed, todo = [], [pid]
    while todo:
        p = todo.pop()
        doomed.append(p)
        todo += children.get(p, [])
    for p in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _run2(args: list[str], cwd: Path) -> str:
    proc = _torchrun(args, cwd)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            _kill_all(proc.pid)
    assert proc.returncode == 0, out
    return out


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run_dir)["train"]}


@pytest.fixture(scope="module")
def two_process_run(data, tmp_path_factory) -> tuple[Path, list[str], str]:
    """The uninterrupted two-process reference run (with EMA and a recovery checkpoint every 2 steps)."""
    common = [*TINY, *RUN, *TWO, "--data-dir", str(data), "--model-ema", "--model-ema-decay", "0.9",
              "--recovery-interval", "2"]  # fmt: skip

    def make(out: Path) -> None:
        (out / "launcher.txt").write_text(_run2(["visionlin.train", *common, "--output", str(out)], out))

    out = _once_per_session(tmp_path_factory, "ddp", make)
    return out / "infvit_tiny-32", common, (out / "launcher.txt").read_text()


# Samplers -------------------------------------------------------------------------------------------------------------
def test_epoch_sampler_repeats_as_timms_repeat_aug_sampler():
    from timm.data.distributed_sampler import RepeatAugSampler

    n, world, repeats = 11, 2, 3
    for rank in range(world):
        theirs = RepeatAugSampler(range(n), num_replicas=world, rank=rank, num_repeats=repeats, selected_round=0)
        mine = EpochSampler(n, shuffle=True, seed=0, num_replicas=world, rank=rank, repeats=repeats)
        for epoch in (0, 1):
            theirs.set_epoch(epoch)  # timm seeds the order with the epoch; ours with seed + epoch (seed 0 here)
            mine.set_epoch(epoch)
            assert [i for i, _ in mine] == list(theirs) and len(mine) == len(theirs) == 6
    both = [x for r in range(world) for x in EpochSampler(n, shuffle=True, seed=0, num_replicas=world, rank=r,
                                                           repeats=repeats)]  # fmt: skip
    seeds = [s for _, s in both]
    assert len(set(seeds)) == len(seeds)  # every copy of an image has its own augmentation seed
    with pytest.raises(ValueError, match="repeats=0"):
        EpochSampler(n, shuffle=True, seed=0, repeats=0)


def test_sharded_eval_sampler_pads_with_marked_duplicates():
    shards = [list(ShardedEvalSampler(5, num_replicas=3, rank=r)) for r in range(3)]
    assert shards == [[0, 3], [1, 4], [2, (0, None, "pad")]]
    assert sorted(i for sh in shards for i in sh if isinstance(i, int)) == list(range(5))


def test_aug_repeats_flag_trains(tmp_path, data):
    argv = ["train", *TINY, *RUN, *ONE, "--epochs", "1", "--data-dir", str(data), "--output", str(tmp_path),
            "--aug-repeats", "3"]  # fmt: skip
    assert cli.main(argv) == 0
    assert len(read_log(tmp_path / "infvit_tiny-32")["train"]) == 3  # an epoch keeps its length (24 / 8 steps)


# Two processes --------------------------------------------------------------------------------------------------------
def test_two_processes_follow_one_process_with_the_same_global_batch(tmp_path, data, two_process_run):
    run2, _, text = two_process_run
    assert "global batch 8" in text and "processes: 2" in (run2 / "config.yaml").read_text()
    argv = ["train", *TINY, *RUN, *ONE, "--data-dir", str(data), "--output", str(tmp_path), "--model-ema",
            "--model-ema-decay", "0.9"]  # fmt: skip
    assert cli.main(argv) == 0
    run1 = tmp_path / "infvit_tiny-32"
    one, two = _losses(run1), _losses(run2)
    assert list(one) == list(two) == [1, 2, 3, 4, 5, 6]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=RTOL), step
    assert one[6] < one[1]  # it learns (the comparison is not between two constant losses)
    e1, e2 = read_log(run1)["epoch"], read_log(run2)["epoch"]
    for a, b in zip(e1, e2, strict=True):
        assert a["val_n"] == b["val_n"] == 15  # each validation image counted once, the padding duplicate left out
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
        assert b["ema_val_loss"] == pytest.approx(a["ema_val_loss"], rel=1e-4)
    w1 = ckpt.read_checkpoint(ckpt.latest_checkpoint(run1))["model"]
    w2 = ckpt.read_checkpoint(ckpt.latest_checkpoint(run2))["model"]
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_process_validation_counts_each_image_once(tmp_path, data, two_process_run):
    run2, _, _ = two_process_run
    last = read_log(run2)["epoch"][-1]
    results = tmp_path / "val.json"
    argv = ["validate", *TINY, "--checkpoint", str(run2), "--data-dir", str(data), "--workers", "0", "--device",
            "cpu", "--results-file", str(results)]  # fmt: skip
    assert cli.main(argv) == 0
    r = json.loads(results.read_text())
    assert r["n"] == last["val_n"] == 15
    assert r["top1"] == pytest.approx(last["val_top1"]) and r["loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    rngs = sorted(p.name for p in ckpt.latest_checkpoint(run2).glob("rng_rank*.pth"))
    assert rngs == ["rng_rank0.pth", "rng_rank1.pth"]
    a, b = (torch.load(ckpt.latest_checkpoint(run2) / n, weights_only=True)["torch"] for n in rngs)
    assert not torch.equal(a, b)  # each process's own generator state


def test_killed_two_process_run_resumes_exactly(capsys, tmp_path, two_process_run):
    ref_run, common, _ = two_process_run
    out = tmp_path / "killed"
    proc = _torchrun(["visionlin.train", *common, "--output", str(out)], tmp_path)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("checkpoint step-000000002 (recovery"):  # mid-epoch 0 (of 3 steps): kill them all
                _kill_all(proc.pid)
                break
        rest, _ = proc.communicate(timeout=TIMEOUT)  # EOF: every process that held the pipe is gone
    finally:
        if proc.poll() is None:
            _kill_all(proc.pid)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert "epoch 0 done" not in rest, rest  # the workers died too (they hold the pipe: EOF came only after them)
    run = out / "infvit_tiny-32"
    marker = json.loads((ckpt.latest_checkpoint(run) / "complete.json").read_text())
    assert marker["epoch"] == 0 and 0 < marker["position"] < 6 and marker["step"] == 2, marker
    assert read_log(run)["epoch"] == []

    _run2(["visionlin.train", *common, "--output", str(out), "--resume", "auto"], tmp_path)
    assert [r["step"] for r in read_log(run)["train"]] == list(range(1, 7))
    assert _losses(run) == _losses(ref_run)  # bitwise, every step (later records win)
    for mine, theirs in zip(read_log(run)["epoch"], read_log(ref_run)["epoch"], strict=True):
        for key in ("val_loss", "val_top1", "val_n", "ema_val_loss", "ema_val_top1"):
            assert mine[key] == theirs[key], key
    a = ckpt.read_checkpoint(ckpt.latest_checkpoint(run))
    b = ckpt.read_checkpoint(ckpt.latest_checkpoint(ref_run))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in b["ema"])

    # one process cannot continue a two-process checkpoint: the order and the generators are per process
    with pytest.raises(SystemExit):
        cli.main(["train", *common, "--output", str(out), "--resume", "auto", "--epochs", "3"])
    assert "was written by 2 process(es); this run has 1" in capsys.readouterr().err


def test_distill_in_two_processes_follows_one_process(tmp_path, data):
    teacher = ["--teacher", "deit_tiny_patch16_224", "--teacher-kwargs", "depth=3", "embed_dim=48", "num_heads=2"]
    losses = ["--distill-logits", "1", "--distill-temperature", "2", "--match-layers", "1:2,2:3", "--match-weight",
              "1"]  # fmt: skip
    common = [*TINY, *teacher, *losses, *RUN, "--epochs", "1", "--data-dir", str(data)]
    out2 = tmp_path / "two"
    # through the helper (no --fsdp: DDP as `python -m visionlin.cli`), which reports gloo's threads after the command
    text = _run2([HELPER, "distill", *common, *TWO, "--output", str(out2)], tmp_path)
    # a DDP run's group is destroyed before the command returns (the FSDP one is not, hence the helper's os._exit)
    assert text.count("gloo threads left after the command: 0") == 2, text
    assert cli.main(["distill", *common, *ONE, "--output", str(tmp_path / "one")]) == 0
    one, two = _losses(tmp_path / "one" / "infvit_tiny-32"), _losses(out2 / "infvit_tiny-32")
    assert list(one) == list(two) == [1, 2, 3]
    for step in one:  # a projection trained in one process only would leave step 2 and 3 apart
        assert two[step] == pytest.approx(one[step], rel=RTOL), step
    extra1 = ckpt.load_weights(ckpt.latest_checkpoint(tmp_path / "one" / "infvit_tiny-32") / "extra.safetensors")
    extra2 = ckpt.load_weights(ckpt.latest_checkpoint(out2 / "infvit_tiny-32") / "extra.safetensors")
    assert set(extra1) == set(extra2) and any(k.startswith("proj.") for k in extra1)
    for k in extra1:
        torch.testing.assert_close(extra2[k], extra1[k], rtol=1e-4, atol=1e-5, msg=k)


def test_a_process_with_an_unreadable_micro_batch_does_not_stall_the_others(tmp_path):
    # one image per process and step: the process that draws the corrupt file has nothing to compute that step; it
    # must still take part in the gradient reduction (at weight 0) or the other process waits forever
    data = make_synthetic_imagefolder(tmp_path / "data", classes=2, train_per_class=3, val_per_class=1)
    (data / "train" / "class_0" / "corrupt.png").write_bytes(b"\x89PNG not really")
    argv = ["visionlin.train", *TINY, *RUN, "-b", "1", "--epochs", "1", "--data-dir", str(data), "--output",
            str(tmp_path / "runs"), "--val-split", "none"]  # fmt: skip
    text = _run2(argv, tmp_path)
    run = tmp_path / "runs" / "infvit_tiny-32"
    assert "skipped unreadable image" in text and "corrupt.png" in text
    assert [r["step"] for r in read_log(run)["train"]] == [1, 2, 3, 4]  # 7 images over 2 processes: 4 steps
    end = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()][-1]
    assert end["kind"] == "end" and end["skipped_images"] >= 1  # summed over the processes


def test_fsdp_follows_ddp_and_resumes_exactly(tmp_path, data, two_process_run):
    # accelerate's FSDP path on CPU processes through tests/fsdp_on_cpu.py (accelerate forms FSDP on GPUs only)
    # with the reference's EMA: under FSDP each process averages its own shards (visionlin.train.ema)
    ref_run, common, _ = two_process_run
    assert "--model-ema" in common
    args = [HELPER, "train", *common, "--fsdp", "--checkpoint-hist", "0", "--output", str(tmp_path)]

    def run(*extra):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               *args, *extra], capture_output=True, text=True, env=ENV, cwd=tmp_path,
                              timeout=TIMEOUT)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    run("--experiment", "fsdp")
    fsdp = tmp_path / "fsdp"
    for step, loss in _losses(ref_run).items():
        assert _losses(fsdp)[step] == pytest.approx(loss, rel=RTOL), step
    for mine, theirs in zip(read_log(fsdp)["epoch"], read_log(ref_run)["epoch"], strict=True):
        assert mine["ema_val_loss"] == pytest.approx(theirs["ema_val_loss"], rel=1e-4)  # the sharded EMA is DDP's
        assert mine["ema_val_loss"] != mine["val_loss"]  # and it is not the model evaluated twice
    mid = fsdp / "checkpoints" / "step-000000002"
    assert json.loads((mid / "complete.json").read_text())["position"] == 4  # mid-epoch 0 (of 6 micro-batches)
    assert "resumed from" in run("--experiment", "resumed", "--resume", str(mid))
    resumed = tmp_path / "resumed"
    assert [r["step"] for r in read_log(resumed)["train"]] == [3, 4, 5, 6]
    assert all(_losses(resumed)[s] == _losses(fsdp)[s] for s in (3, 4, 5, 6))  # bitwise
    for mine, theirs in zip(read_log(resumed)["epoch"], read_log(fsdp)["epoch"], strict=True):
        assert (mine["val_loss"], mine["val_n"]) == (theirs["val_loss"], theirs["val_n"]) == (mine["val_loss"], 15)
        assert mine["ema_val_loss"] == theirs["ema_val_loss"]
    a = ckpt.read_checkpoint(ckpt.latest_checkpoint(resumed))
    b = ckpt.read_checkpoint(ckpt.latest_checkpoint(fsdp))
    for part in ("model", "ema"):  # the gathered weights and average, bitwise after the resume
        assert set(a[part]) == set(b[part]) and all(torch.equal(a[part][k], b[part][k]) for k in b[part]), part
    ref_ema = ckpt.read_checkpoint(ckpt.latest_checkpoint(ref_run))["ema"]
    for k, v in ref_ema.items():
        torch.testing.assert_close(b["ema"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert a["train_state"]["optimizer_format"] == "fsdp_full"
    ddp = ckpt.read_checkpoint(ckpt.latest_checkpoint(ref_run))["model"]  # the gathered weights are the whole model
    assert set(ddp) == set(b["model"]) and all(b["model"][k].shape == ddp[k].shape for k in ddp)


def test_fsdp_refusals_name_the_reason(capsys, tmp_path, data):
    base = ["train", *TINY, *RUN, *ONE, "--data-dir", str(data), "--output", str(tmp_path), "--fsdp"]
    with pytest.raises(SystemExit):
        cli.main(base)
    assert "--fsdp needs several GPU processes" in capsys.readouterr().err
    assert not (tmp_path / "infvit_tiny-32").exists()
