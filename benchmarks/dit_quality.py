"""Quality of the converter's methods on real data: a small class-conditional DiT trained here on Fashion-MNIST,
converted with each method (training-free, then after a short distillation fine-tune), sampled from the same noise
and scored in the feature space of a Fashion-MNIST classifier trained here. One process, one ``--time-budget``.

Stages (the JSON is rewritten after each, so a run cut short keeps what it measured):

1. Data: Fashion-MNIST through ``visionlin.train.data.FashionMNIST`` (Debian's ``dataset-fashion-mnist`` IDX files;
   ``--data-dir``), 28 px zero-padded to ``--img-size`` (32: the background is 0) or resized down when smaller,
   scaled to ``[-1, 1]``; held on the device.
2. Classifier (the metrics' feature space; trained here, not Inception): a 5-conv CNN (BN, GELU, two max-pools,
   global average pool -> 128-d penultimate features -> 10 logits), AdamW, ``--classifier-steps`` steps of batch 256
   with horizontal flips; its test accuracy is reported.
3. DiT: diffusers ``DiTTransformer2DModel`` (``--depth`` blocks, ``--heads`` x ``--head-dim``, patch 2, 1 channel,
   10 classes; at 32 px 16 x 16 = 256 tokens, so the block structure of ``sparse`` / ``sla`` is 8 x 8 blocks of 32
   tokens) trained by rectified flow (``x_t = (1 - t) x_0 + t eps``, velocity target ``eps - x_0``, ``t`` uniform,
   the model's timestep ``1000 t``), bf16 autocast on the GPU, AdamW with a linear warm-up and then a constant rate
   (as DiT), class-label dropout 0.1 (the DiT class's own), EMA of the weights (timm ``ModelEmaV3``) used for every
   later stage; ``--train-steps`` steps, stopped earlier when ``--train-time`` seconds have passed (the JSON says
   how many were done). The defaults train a fixed 4,000 steps of batch 256 (0.037-0.051 s per step on an H200 in
   three runs: 150-200 s), with 300 s as a cap, so that runs are comparable: three runs stopped by a 200 s limit
   trained 5,361, 5,281 and 3,942 steps and their KIDs differed more than the methods' did.
4. Sampling: ``--samples`` images, class ``i mod 10`` for sample ``i``, fixed noise (seed ``--seed``), the
   deterministic Euler sampler of the flow ODE over ``--sampler-steps`` uniform steps from ``t = 1`` to 0, in
   ``--sample-batch`` batches, on a bf16 copy of the model (fp32 on the CPU). The step time is the median of the
   CUDA-synchronised wall time of every denoiser call of a full batch (after one untimed warm-up call), in ms.
5. Methods: for each of ``--methods`` (dense = the unconverted model), a copy of the dense model converted with
   ``visionlin.convert(copy, method, **options)`` (defaults below; ``--set METHOD.OPTION=VALUE`` changes one) is
   sampled training-free; then all converted copies are fine-tuned with ``visionlin.convert.finetune`` (distillation
   against the dense model itself with the conversion off: MSE of the velocities) for ``--finetune-steps`` (<= 500)
   steps of batch ``--finetune-batch`` on noisy training images at the sampler's timesteps, ``trainable`` all weights
   by default (``--finetune-trainable``; a method without parameters of its own takes ``lora`` where ``converter``
   is asked), bf16 mixed precision on the GPU, and sampled again from the same noise.
6. Metrics, per row: FID and KID (unbiased MMD^2 with the cubic polynomial kernel ``(x.y / d + 1)^3``, mean and
   standard deviation over ``--kid-subsets`` subsets of ``min(1000, n)`` samples) between the row's samples and the
   10,000 test images, in the classifier's penultimate features; PSNR of each sample against the dense model's
   sample from the same noise and label (images mapped to ``[0, 1]``; mean and median, capped at 100 dB); ms per
   denoiser call and dense ms / method ms. A ``real`` row scores ``--samples`` training images the same way (the
   floor of FID / KID at this sample count). The issue's target: ``sla`` after fine-tuning within 10% of the dense
   model's KID (``target`` in the JSON).

Defaults per method (256 tokens is short: 95% sparsity would keep less than one of 8 blocks): ``sparse`` and ``sla``
at sparsity 0.75 with 32-token blocks (2 of 8 key blocks exact per query block); ``hybrid``, ``linear`` and
``agent`` at the converter's defaults.

Usage::

    python benchmarks/dit_quality.py --out benchmarks/results/h200/dit_quality --time-budget 500   # ~8 min, H200
    python benchmarks/dit_quality.py --tiny --device cpu --out /tmp/x                                # smoke test

Writes ``dit_quality.json`` (metadata, settings, classifier, DiT, rows), ``dit_quality.md`` (the table),
``dit_quality_samples.png`` (one row of samples per method and mode, the same noise and classes across rows) and
``dit_quality.png`` (KID, FID, PSNR and ms per call per row) to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._convert_options import method_option, resolve_options  # noqa: E402
from benchmarks._plot import finish  # noqa: E402
from visionlin._io import atomic_write  # noqa: E402
from visionlin.train.bench import run_meta, write_result  # noqa: E402

METHODS = ("dense", "sparse", "sla", "hybrid", "linear", "agent")
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "sparse": {"sparsity": 0.75, "block_size": 32},
    "sla": {"sparsity": 0.75, "block_size": 32},
}
TRAINABLE = ("converter", "lora", "lora+converter", "all")
MAX_FINETUNE_STEPS = 500
NUM_CLASSES = 10
MODES = ("training-free", "fine-tuned")
# name: (default, --tiny default); an explicit flag wins over both.
SIZES: dict[str, tuple[Any, Any]] = {
    "train_steps": (4000, 3), "train_batch": (256, 8), "train_time": (300.0, 60.0), "lr": (3e-4, 1e-3),
    "classifier_steps": (2000, 3), "samples": (2000, 12), "sample_batch": (500, 12), "sampler_steps": (25, 2),
    "finetune_steps": (500, 1), "finetune_batch": (128, 4), "img_size": (32, 8), "depth": (6, 1), "heads": (4, 2),
    "head_dim": (64, 8), "kid_subsets": (100, 10), "real_test": (10000, 20),
}  # fmt: skip


# Data -----------------------------------------------------------------------------------------------------------------
def load_split(
    root: str | None, split: str, img_size: int, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, 1, S, S] in [-1, 1], labels [N])`` of a Fashion-MNIST split (28 px padded or resized to S)."""
    from visionlin.train.data import FashionMNIST

    ds = FashionMNIST(root, split)
    n = len(ds) if limit is None else min(limit, len(ds))
    x = torch.from_numpy(ds.images[:n].copy()).float().div(127.5).sub(1.0).unsqueeze(1)
    if img_size >= 28:
        lo = (img_size - 28) // 2
        x = F.pad(x, (lo, img_size - 28 - lo, lo, img_size - 28 - lo), value=-1.0)
    else:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1, 1), torch.tensor(ds.targets[:n], dtype=torch.long)


# Classifier (feature space) -------------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """A small CNN; ``features(x)`` is the 128-d penultimate layer the metrics use."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def conv(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.GELU()]

        w = width
        self.body = nn.Sequential(
            *conv(1, w), *conv(w, w), nn.MaxPool2d(2), *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2),
            *conv(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(4 * w, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(x: torch.Tensor, y: torch.Tensor, steps: int, device: torch.device, seed: int) -> Classifier:
    torch.manual_seed(seed)
    model = Classifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator(device="cpu").manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(256, len(x)),), generator=g)
        xb, yb = x[idx.to(x.device)], y[idx.to(y.device)]
        flip = torch.rand(len(idx), generator=g).to(device) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        with _autocast(device):
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def embed(
    model: Classifier, x: torch.Tensor, device: torch.device, batch: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [N, 128] float64 on the CPU, logits [N, 10])`` of images ``x`` in ``[-1, 1]``."""
    feats, logits = [], []
    for i in range(0, len(x), batch):
        f = model.features(x[i : i + batch].to(device).float().clamp(-1, 1))
        feats.append(f.double().cpu())
        logits.append(model.head(f).float().cpu())
    return torch.cat(feats), torch.cat(logits)


# Metrics --------------------------------------------------------------------------------------------------------------
def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance of Gaussians fitted to feature sets ``a`` [N, d] and ``b`` [M, d] (float64)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(ca cb) = sum of sqrt of the eigenvalues of the symmetric ca^1/2 cb ca^1/2
    w, v = torch.linalg.eigh(ca)
    root = (v * w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root @ cb @ root).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + ca.trace() + cb.trace() - 2 * cross)


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    m, n = len(x), len(y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


def kid(
    a: torch.Tensor, b: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """``(mean, std)`` over ``subsets`` random subset pairs of the unbiased polynomial-kernel MMD^2 (KID)."""
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set; got {len(a)} and {len(b)}")
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        ia, ib = torch.randperm(len(a), generator=g)[:size], torch.randperm(len(b), generator=g)[:size]
        vals.append(_mmd2_unbiased(a[ia.to(a.device)].double(), b[ib.to(b.device)].double()))
    return statistics.fmean(vals), statistics.pstdev(vals)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR in dB of images in ``[-1, 1]`` mapped to ``[0, 1]`` (capped at 100 dB)."""
    mse = ((x.float().clamp(-1, 1) - ref.float().clamp(-1, 1)) / 2).square().flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp_min(1e-10))).clamp(max=100.0)


# DiT ------------------------------------------------------------------------------------------------------------------
def _autocast(device: torch.device):
    return (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )


def build_dit(args: argparse.Namespace) -> nn.Module:
    import diffusers

    torch.manual_seed(args.seed)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=args.heads, attention_head_dim=args.head_dim, in_channels=1, out_channels=1,
        num_layers=args.depth, sample_size=args.img_size, patch_size=2, num_embeds_ada_norm=NUM_CLASSES,
    )  # fmt: skip


def train_dit(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, args, device, deadline: float
) -> tuple[nn.Module, dict]:
    """Rectified-flow training; returns the EMA model and a summary."""
    from timm.utils import ModelEmaV3

    model.to(device).train()
    ema = ModelEmaV3(model, decay=0.9995, use_warmup=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warm = max(1, min(500, args.train_steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    losses: list[float] = []
    t0, step = time.perf_counter(), 0
    while step < args.train_steps and time.monotonic() < deadline:
        idx = torch.randint(0, len(x), (args.train_batch,), generator=g).to(x.device)
        x0, labels = x[idx], y[idx]
        t = torch.rand(len(idx), generator=g).to(device)
        eps = torch.randn(x0.shape, generator=g).to(device)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
        with _autocast(device):
            v = model(xt, timestep=t * 1000, class_labels=labels, return_dict=False)[0]
        loss = F.mse_loss(v.float(), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        ema.update(model, step=step)
        if step % 100 == 0 or step == args.train_steps:
            losses.append(float(loss.detach()))
            if step % 1000 == 0:
                print(
                    f"dit step {step}/{args.train_steps} loss {losses[-1]:.4f} {time.perf_counter() - t0:.0f} s",
                    flush=True,
                )
    seconds = time.perf_counter() - t0
    summary = {"steps_done": step, "steps_asked": args.train_steps, "seconds": seconds,
               "s_per_step": seconds / max(step, 1), "loss_every_100": losses,
               "stopped_by": "train_time" if step < args.train_steps else "steps"}  # fmt: skip
    return ema.module.eval().requires_grad_(False), summary


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    """Floating-point parameters and buffers to ``dtype``, in place (the converter's hooks stay on this object)."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            t.data = t.data.to(dtype)


@torch.no_grad()
def sample(
    model: nn.Module, noise: torch.Tensor, labels: torch.Tensor, steps: int, batch: int, device
) -> tuple[torch.Tensor, list[float]]:
    """Euler steps of the flow ODE from ``t = 1`` (noise) to 0 in bf16 on the GPU (fp32 on the CPU); returns (images
    on the CPU, ms per denoiser call of full batches). ``model`` is cast in place for the run and restored exactly
    afterwards (a copy would lose the converter's forward hooks, which are bound to this object)."""
    m = model
    m.__dict__.pop("forward", None)  # accelerate's mixed-precision wrapper of a fine-tuned model: the class's again
    m.__dict__.pop("_original_forward", None)
    saved = {k: v.detach().clone() for k, v in m.state_dict().items()}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m.to(device).eval()
    _cast(m, dtype)
    try:
        return _sample(m, noise, labels, steps, batch, device, dtype)
    finally:
        _cast(m, torch.float32)
        m.load_state_dict(saved)


def _sample(m, noise, labels, steps, batch, device, dtype) -> tuple[torch.Tensor, list[float]]:
    ts = torch.linspace(1.0, 0.0, steps + 1)
    cuda = device.type == "cuda"

    def call(x, t, c):
        return m(x, timestep=torch.full((len(x),), float(t) * 1000, device=device), class_labels=c, return_dict=False)[
            0
        ]

    n0 = min(batch, len(noise))
    call(noise[:n0].to(device, dtype), 1.0, labels[:n0].to(device))  # warm-up (kernel compilation, autotuning)
    out, times = [], []
    for i in range(0, len(noise), batch):
        x, c = noise[i : i + batch].to(device, dtype), labels[i : i + batch].to(device)
        full = len(x) == n0
        for j in range(steps):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            v = call(x, ts[j], c)
            if cuda:
                torch.cuda.synchronize(device)
            if full:
                times.append((time.perf_counter() - t0) * 1e3)
            x = x + (ts[j + 1] - ts[j]) * v
        out.append(x.float().cpu())
    return torch.cat(out), times


# The study ------------------------------------------------------------------------------------------------------------
def _method_has_params(model: nn.Module) -> bool:
    from visionlin.convert._methods import CORE_ATTR

    return any(f".{CORE_ATTR}." in f".{n}" for n, _ in model.named_parameters())


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def _failed(row: dict, e: BaseException) -> None:
    """Mark ``row`` failed: the error's first line for the table, the traceback's last frames (printed too) for the
    JSON."""
    row.update(status="error", error=_short(e), traceback=traceback.format_exc(limit=-12))
    print(row["traceback"], file=sys.stderr, flush=True)


def run(args: argparse.Namespace, save: Callable[..., None]) -> dict:
    import visionlin.convert as vc

    start = time.monotonic()
    end = start + args.time_budget if args.time_budget else math.inf
    dev = torch.device(args.device)
    meta = run_meta(" ".join(["benchmarks/dit_quality.py", *args.argv]), dev, args.commit or _git_commit(),
                    diffusers=_version("diffusers"), accelerate=_version("accelerate"))  # fmt: skip
    settings = {k: getattr(args, k) for k in (*SIZES, "seed", "methods", "options", "finetune_trainable",
                                               "finetune_lr", "time_budget", "tiny", "data_dir")}  # fmt: skip
    settings["sampler"] = f"Euler, flow ODE, {args.sampler_steps} uniform steps from t=1 to 0, no guidance"
    settings["objective"] = "rectified flow: x_t = (1-t) x0 + t eps, velocity target eps - x0, timestep 1000 t"
    settings["dtype"] = "bf16" if dev.type == "cuda" else "fp32"
    result: dict[str, Any] = {"benchmark": "dit_quality", "meta": meta, "settings": settings, "stages": {},
                              "rows": [], "target": None}  # fmt: skip

    def stage(name: str, t0: float, **info: Any) -> None:
        result["stages"][name] = {"seconds": round(time.monotonic() - t0, 2), **info}
        print(f"== {name}: {result['stages'][name]}", flush=True)
        save(result)

    t0 = time.monotonic()
    x_train, y_train = load_split(args.data_dir, "train", args.img_size)
    x_test, y_test = load_split(args.data_dir, "test", args.img_size, args.real_test)
    x_train_d, y_train_d = x_train.to(dev), y_train.to(dev)
    stage("data", t0, train=len(x_train), test=len(x_test), img_size=args.img_size)

    t0 = time.monotonic()
    clf = train_classifier(x_train_d, y_train_d, args.classifier_steps, dev, args.seed)
    test_feats, test_logits = embed(clf, x_test, dev)
    acc = float((test_logits.argmax(1) == y_test).float().mean())
    test_feats_d = test_feats.to(dev)
    result["classifier"] = {"arch": "5-conv CNN (32-64-128, BN, GELU), GAP, 128-d features, linear head",
                            "params": sum(p.numel() for p in clf.parameters()), "steps": args.classifier_steps,
                            "test_top1": acc, "feature_dim": test_feats.shape[1],
                            "note": "trained here on Fashion-MNIST train; FID/KID are in its penultimate features, "
                                    "not Inception's: not comparable to published FIDs"}  # fmt: skip
    stage("classifier", t0, test_top1=round(acc, 4))

    def score(name: str, mode: str, imgs: torch.Tensor, ref: torch.Tensor | None, times: list[float]) -> dict:
        feats, logits = embed(clf, imgs, dev)
        k_mean, k_std = kid(feats.to(dev), test_feats_d, args.kid_subsets, seed=args.seed)  # float64 on the device
        row = {"method": name, "mode": mode, "status": "ok", "fid": fid(feats, test_feats), "kid": k_mean,
               "kid_std": k_std, "samples": len(imgs)}  # fmt: skip
        if labels is not None and len(logits) == len(labels):
            row["class_agreement"] = float((logits.argmax(1) == labels).float().mean())
        if ref is not None:
            p = psnr(imgs, ref)
            row.update(psnr_mean=float(p.mean()), psnr_median=float(p.median()))
        if times:
            row.update(ms_per_call=statistics.median(times), calls_timed=len(times))
        return row

    labels = None
    t0 = time.monotonic()
    g = torch.Generator().manual_seed(args.seed + 2)
    real_idx = torch.randperm(len(x_train), generator=g)[: args.samples]
    result["rows"].append({**score("real", "train images", x_train[real_idx], None, []), "method": "real"})
    stage("real_floor", t0)

    t0 = time.monotonic()
    dit = build_dit(args)
    result["dit"] = {"class": "diffusers.DiTTransformer2DModel", "params": sum(p.numel() for p in dit.parameters()),
                     "depth": args.depth, "heads": args.heads, "head_dim": args.head_dim, "patch": 2,
                     "tokens": (args.img_size // 2) ** 2, "batch": args.train_batch, "lr": args.lr,
                     "ema": "timm ModelEmaV3 decay 0.9995 with warm-up"}  # fmt: skip
    train_deadline = min(end, time.monotonic() + args.train_time)
    dense, summary = train_dit(dit, x_train_d, y_train_d, args, dev, train_deadline)
    del dit
    result["dit"].update(summary)
    stage("train_dit", t0, steps_done=summary["steps_done"], s_per_step=round(summary["s_per_step"], 4))

    noise = torch.randn(
        args.samples, 1, args.img_size, args.img_size, generator=torch.Generator().manual_seed(args.seed + 3)
    )
    labels = torch.arange(args.samples) % NUM_CLASSES
    t0 = time.monotonic()
    dense_imgs, dense_times = sample(dense, noise, labels, args.sampler_steps, args.sample_batch, dev)
    dense_row = score("dense", "training-free", dense_imgs, None, dense_times)
    result["rows"].append(dense_row)
    grid_rows: dict[str, torch.Tensor] = {"real": _real_per_class(x_test, y_test), "dense": dense_imgs[:NUM_CLASSES]}
    result["grid_rows"] = list(grid_rows)
    stage("dense", t0, kid=dense_row["kid"], ms_per_call=dense_row.get("ms_per_call"))
    _grid(grid_rows, args, save_png=args.out_png)

    def finish_row(row: dict) -> None:
        if row.get("ms_per_call") and dense_row.get("ms_per_call"):
            row["speedup_vs_dense"] = dense_row["ms_per_call"] / row["ms_per_call"]
        if row.get("kid") is not None and dense_row["kid"]:
            row["kid_vs_dense"] = row["kid"] / dense_row["kid"]

    converted: dict[str, nn.Module] = {}
    others = [m for m in args.methods if m != "dense"]
    for method in others:  # training-free first: cheap, and a cut run keeps every method's first row
        row = {"method": method, "mode": "training-free", "options": args.options.get(method, {}), "status": "skipped"}
        result["rows"].append(row)
        if time.monotonic() > end:
            continue
        t0 = time.monotonic()
        try:
            model = copy.deepcopy(dense)
            vc.convert(model, method, **args.options.get(method, {}))
            imgs, times = sample(model, noise, labels, args.sampler_steps, args.sample_batch, dev)
            row.update(score(method, "training-free", imgs, dense_imgs, times))
            converted[method] = model
            grid_rows[f"{method} (training-free)"] = imgs[:NUM_CLASSES]
        except Exception as e:  # noqa: BLE001 (one failing method must not lose the others' rows)
            _failed(row, e)
        finish_row(row)
        result["grid_rows"] = list(grid_rows)
        stage(f"{method} training-free", t0, status=row["status"], kid=row.get("kid"))
        _grid(grid_rows, args, save_png=args.out_png)

    for method in others:
        row = {"method": method, "mode": "fine-tuned", "options": args.options.get(method, {}), "status": "skipped"}
        result["rows"].append(row)
        if method not in converted or time.monotonic() > end:
            if method not in converted:
                row["error"] = "no training-free conversion to fine-tune"
            continue
        t0 = time.monotonic()
        try:
            model = converted.pop(method)
            trainable = args.finetune_trainable
            if trainable == "converter" and not _method_has_params(model):
                trainable = "lora"
            data = _finetune_data(x_train, y_train, args)
            ft = vc.finetune(model, data, steps=args.finetune_steps, trainable=trainable, lr=args.finetune_lr,
                             warmup_steps=min(20, args.finetune_steps // 10), clip_grad=1.0, seed=args.seed,
                             log_interval=max(1, args.finetune_steps // 5), cpu=dev.type == "cpu",
                             mixed_precision="bf16" if dev.type == "cuda" else "no", progress=False)  # fmt: skip
            ft_seconds = time.monotonic() - t0
            imgs, times = sample(model, noise, labels, args.sampler_steps, args.sample_batch, dev)
            row.update(score(method, "fine-tuned", imgs, dense_imgs, times))
            row["finetune"] = {"steps": ft.step, "trainable": trainable, "seconds": ft_seconds,
                               "trainable_parameters": ft.trainable_parameters, "loss_first": ft.losses[0],
                               "loss_last": ft.losses[-1]}  # fmt: skip
            grid_rows[f"{method} (fine-tuned)"] = imgs[:NUM_CLASSES]
            del model
        except Exception as e:  # noqa: BLE001
            _failed(row, e)
        finish_row(row)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        result["grid_rows"] = list(grid_rows)
        stage(f"{method} fine-tuned", t0, status=row["status"], kid=row.get("kid"))
        _grid(grid_rows, args, save_png=args.out_png)
    for r in result["rows"]:
        if r["status"] == "skipped" and "error" not in r:
            r["error"] = "time budget spent before it started"
    sla = next((r for r in result["rows"] if r["method"] == "sla" and r["mode"] == "fine-tuned"), None)
    if sla is not None and sla.get("kid") is not None:
        result["target"] = {"what": "sla fine-tuned KID within 10% of the dense model's KID",
                            "sla_kid": sla["kid"], "dense_kid": dense_row["kid"],
                            "met": sla["kid"] <= 1.1 * dense_row["kid"]}  # fmt: skip
    result["seconds"] = round(time.monotonic() - start, 2)
    save(result, False)  # complete
    return result


def _real_per_class(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rows = []
    for c in range(NUM_CLASSES):
        hit = (y == c).nonzero()
        rows.append(x[int(hit[0])] if len(hit) else torch.full_like(x[0], -1.0))
    return torch.stack(rows)


def _finetune_data(x: torch.Tensor, y: torch.Tensor, args) -> Callable[[int, torch.Generator], dict]:
    """Distillation batches: training images noised at the sampler's own timesteps (t = 1 ... 1 / steps)."""
    ts = torch.linspace(1.0, 0.0, args.sampler_steps + 1)[:-1]
    bs = args.finetune_batch

    def data(step: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, len(x), (bs,), generator=g)
        t = ts[torch.randint(0, len(ts), (bs,), generator=g)]
        eps = torch.randn(bs, *x.shape[1:], generator=g)
        xt = (1 - t[:, None, None, None]) * x[idx] + t[:, None, None, None] * eps
        return {"hidden_states": xt, "timestep": t * 1000, "class_labels": y[idx]}

    return data


# Outputs --------------------------------------------------------------------------------------------------------------
def _grid(rows: dict[str, torch.Tensor], args, save_png: Path | None) -> None:
    """One row of images per method / mode (the same noise and class per column), labelled; PNG via PIL."""
    if save_png is None:
        return
    from PIL import Image, ImageDraw

    s, pad, label_w = args.img_size, 2, 150
    scale = max(1, 64 // s)
    cell = s * scale + pad
    img = Image.new("L", (label_w + NUM_CLASSES * cell + pad, len(rows) * cell + pad), 255)
    draw = ImageDraw.Draw(img)
    for r, (name, imgs) in enumerate(rows.items()):
        draw.text((4, r * cell + cell // 2 - 6), name, fill=0)
        for c, im in enumerate(imgs[:NUM_CLASSES]):
            a = ((im[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
            tile = Image.fromarray(a, mode="L").resize((s * scale, s * scale), Image.NEAREST)
            img.paste(tile, (label_w + c * cell + pad, r * cell + pad))
    atomic_write(save_png, lambda p: img.save(p, format="PNG"))


def plot(result: dict, path: Path) -> None:
    """Bars per row (method x mode): KID (with its subset std), FID, PSNR vs dense, ms per denoiser call."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] == "ok"]
    names = [r["method"] + ("*" if r["mode"] == "fine-tuned" else "") for r in rows]
    colors = [f"C{(['real', *METHODS].index(r['method']))}" for r in rows]
    panels = [("kid", "KID (classifier features)"), ("fid", "FID (classifier features)"),
              ("psnr_mean", "PSNR vs dense, dB"), ("ms_per_call", "ms per denoiser call")]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    for ax, (key, title) in zip(axes, panels, strict=True):
        vals = [r.get(key) or 0.0 for r in rows]
        err = [r.get("kid_std") or 0.0 for r in rows] if key == "kid" else None
        ax.bar(range(len(rows)), vals, color=colors, yerr=err, alpha=0.8)
        for i, r in enumerate(rows):
            if r["mode"] == "fine-tuned":
                ax.patches[i].set_hatch("//")
        ax.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    finish(fig, result, path, note="  (* hatched: after distillation fine-tune)")


def _fmt(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def table(result: dict) -> str:
    """The markdown results table."""
    d = result.get("dit", {})
    c = result.get("classifier", {})
    s = result["settings"]
    lines = [
        f"# DiT quality study ({result['meta'].get('gpu') or result['meta'].get('cpu')}, commit "
        f"{result['meta']['commit']})", "",
        f"DiT: diffusers DiTTransformer2DModel, {d.get('params', 0) / 1e6:.2f} M parameters, {d.get('depth')} blocks, "
        f"{d.get('heads')} x {d.get('head_dim')} heads, {d.get('tokens')} tokens; trained {d.get('steps_done')} of "
        f"{d.get('steps_asked')} steps (batch {d.get('batch')}, {d.get('seconds', 0):.0f} s). Sampler: "
        f"{s['sampler']}, {s['samples']} samples, {s['dtype']}. Features: a CNN classifier trained here on "
        f"Fashion-MNIST (test top-1 {c.get('test_top1', float('nan')):.4f}); FID/KID against {s['real_test']} test "
        "images, not comparable to Inception FIDs. PSNR: against the dense model's sample from the same noise.", "",
        "| method | mode | FID | KID x1e3 (std) | KID / dense | PSNR mean / median (dB) | ms / call | speed vs dense | "
        "fine-tune (steps, trainable, loss first -> last) | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]  # fmt: skip
    for r in result["rows"]:
        ft = r.get("finetune")
        ftxt = f"{ft['steps']}, {ft['trainable']}, {ft['loss_first']:.3g} -> {ft['loss_last']:.3g}" if ft else ""
        k = f"{r['kid'] * 1e3:.3f} ({r['kid_std'] * 1e3:.3f})" if r.get("kid") is not None else ""
        p = f"{r['psnr_mean']:.2f} / {r['psnr_median']:.2f}" if r.get("psnr_mean") is not None else ""
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}"
        lines.append(f"| {r['method']} | {r['mode']} | {_fmt(r.get('fid'), '.3f')} | {k} | "
                     f"{_fmt(r.get('kid_vs_dense'), '.2f')} | {p} | {_fmt(r.get('ms_per_call'), '.2f')} | "
                     f"{_fmt(r.get('speedup_vs_dense'), '.2f')} | {ftxt} | {status} |")  # fmt: skip
    t = result.get("target")
    if t:
        lines += ["", f"Target (sla fine-tuned KID <= 1.1 x dense KID): {'met' if t['met'] else 'missed'} "
                      f"({t['sla_kid']:.3g} vs {t['dense_kid']:.3g})."]  # fmt: skip
    return "\n".join(lines) + "\n"


# Command line ---------------------------------------------------------------------------------------------------------
def _git_commit() -> str:
    from benchmarks._meta import git_commit

    return git_commit()


def _version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except ImportError:
        return None


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in METHODS]
    if not names or bad or len(set(names)) != len(names) or "dense" not in names:
        raise argparse.ArgumentTypeError(
            f"--methods must be distinct, comma-separated names from {', '.join(METHODS)}, dense included (the "
            f"reference); got {text!r}"
        )
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/dit_quality.py", description=__doc__.split("\n\n")[0])
    for name, (full, tiny) in SIZES.items():
        kind = float if isinstance(full, float) else int
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=f"default {full} (--tiny: {tiny})")
    p.add_argument("--methods", type=_names, default=list(METHODS), help=f"default {','.join(METHODS)}")
    p.add_argument("--set", dest="set_options", type=method_option(METHODS), action="append", default=[],
                   metavar="M.OPT=VALUE",
                   help="a method option (repeatable; JSON values), e.g. sla.sparsity=0.5 (defaults: sparse and sla "
                   "at sparsity 0.75 with 32-token blocks)")  # fmt: skip
    p.add_argument("--finetune-trainable", choices=TRAINABLE, default="all", help="default all")
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="default 1e-4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=None,
                   help="whole-run seconds: no method starts after it; rows not started are 'skipped'")  # fmt: skip
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (default Debian's)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU smoke test")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--no-plot", action="store_true", help="no PNGs")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    for name, (full, tiny) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
        value = getattr(args, name)
        if not math.isfinite(value) or value <= 0:
            p.error(f"argument --{name.replace('_', '-')}: {value} must be a positive number")
    if args.finetune_steps > MAX_FINETUNE_STEPS:
        p.error(f"argument --finetune-steps: {args.finetune_steps} exceeds the study's limit of {MAX_FINETUNE_STEPS} "
                "steps (issue 10: a short fine-tune)")  # fmt: skip
    if args.img_size % 2:
        p.error(f"argument --img-size: {args.img_size} must be even (patch size 2)")
    if args.samples < 2 or args.real_test < 2:
        p.error(f"--samples {args.samples} and --real-test {args.real_test} must be >= 2 (KID, FID)")
    if args.time_budget is not None and not (math.isfinite(args.time_budget) and args.time_budget > 0):
        p.error(f"argument --time-budget: {args.time_budget} must be a positive number of seconds")
    if not (math.isfinite(args.finetune_lr) and args.finetune_lr > 0):
        p.error(f"argument --finetune-lr: {args.finetune_lr} must be a positive number")
    if args.seed < 0:
        p.error(f"argument --seed: {args.seed} must be >= 0")
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        p.error(f"argument --device: {args.device!r} is not a torch device")
    if dev.type not in ("cuda", "cpu"):
        p.error(f"argument --device: {args.device!r}; use cuda or cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU on this machine (use --device cpu --tiny for a smoke test)")
    if dev.type == "cpu" and not args.tiny:
        p.error("--device cpu at the real sizes would take hours; add --tiny (smoke test)")
    defaults = {m: o for m, o in DEFAULT_OPTIONS.items() if m in args.methods}
    args.options = resolve_options(p, defaults, args.set_options)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    args.out_png = None if args.no_plot else out / "dit_quality_samples.png"

    def save(result: dict, partial: bool = True) -> None:
        write_result(result, out, "dit_quality", plot=False, partial=partial)
        atomic_write(out / "dit_quality.md", lambda p: p.write_text(table(result)))

    result = run(args, save)
    print(table(result))
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("dit_quality.png skipped: matplotlib is not installed")
        else:
            atomic_write(out / "dit_quality.png", lambda p: plot(result, p))
            print(f"wrote {out / 'dit_quality.png'}")
    return 1 if any(r["status"] == "error" for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
