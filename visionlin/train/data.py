"""Datasets and loaders for ``visionlin train`` / ``validate``: ImageNet-layout folders, Debian's Fashion-MNIST, a
tiny synthetic folder for tests, and a sampler whose order is a seeded permutation that can start mid-epoch.

Exact resume rests on two things here. The order of an epoch is ``randperm(n, seed + epoch)`` (sharded by rank), so the
position in the epoch is one integer. Each sample's augmentation draws its randomness from its own seed (a function of
the run's seed, the epoch and the sample's position), not from whichever worker process loads it, so the images of step
``k`` are the same whether the run started at step 0 or resumed at ``k``, with any number of workers.

Corrupt or unreadable images are skipped (the batch is smaller), counted and reported by the caller; they never crash
a run.
"""

from __future__ import annotations

import gzip
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, default_collate, get_worker_info

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_INSTALL",
    "IMG_EXTENSIONS",
    "DataError",
    "EpochSampler",
    "FashionMNIST",
    "ImageFolder",
    "SeededTransform",
    "ShardedEvalSampler",
    "collate_skipping",
    "create_dataset",
    "make_synthetic_imagefolder",
    "patch_posterize",
]

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "sudo apt-get install dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}
DATASETS = ("imagefolder", "fashion_mnist")


class DataError(ValueError):
    """The data given cannot be used: a missing or empty folder, missing dataset files, an unknown split."""


def _walk_once(top: Path):
    """``(dirpath, files)`` of every folder under ``top``, following links except those that lead back to a folder the
    walk is inside (a link to a parent made the walk loop until the path was too long: the same images many times
    over; a link to the split root pulled in the other classes). Links elsewhere are followed as before."""
    for dirpath, dirnames, files in os.walk(top, followlinks=True):
        here = os.path.realpath(dirpath)
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if not (here == real or here.startswith(real.rstrip(os.sep) + os.sep)):
                keep.append(d)
        dirnames[:] = keep
        yield dirpath, files


class ImageFolder(Dataset):
    """``root/<class>/<image>`` (ImageNet layout). Classes are the sorted sub-folder names.

    ``__getitem__`` returns ``(image, target)`` with ``image`` a PIL RGB image (or ``transform(image)``), or ``None``
    with the path recorded in ``self.last_error`` when the file cannot be decoded.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, allow_empty: bool = False) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder {str(root)!r} does not exist (expected ImageNet layout: root/<class>/<img>)")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise DataError(f"image folder {str(root)!r} has no class sub-folders (expected root/<class>/<img>)")
        self.root, self.classes, self.transform = root, classes, transform
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.samples: list[tuple[str, int]] = []
        empty = []
        for c in classes:
            found = [(dirpath, files) for dirpath, files in _walk_once(root / c)]
            n = len(self.samples)
            for dirpath, files in sorted(found):
                for f in sorted(files):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, f), self.class_to_idx[c]))
            if len(self.samples) == n:
                empty.append(c)
        if not self.samples:
            raise DataError(
                f"image folder {str(root)!r} has {len(classes)} class folders but no images "
                f"(extensions: {', '.join(IMG_EXTENSIONS)})"
            )
        if empty and not allow_empty:  # (each was a class of its own with no image: a wider head, silently; an
            # evaluation split may lack images of a class it must still list, to keep the training classes' labels)
            raise DataError(
                f"image folder {str(root)!r}: class folders without images: {empty[:8]}"
                f"{' ...' if len(empty) > 8 else ''} (extensions: {', '.join(IMG_EXTENSIONS)}); remove them"
            )
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, int]:
        path, target = self.samples[index]
        with Image.open(path) as img:
            return img.convert("RGB"), target

    def describe(self, index: int) -> str:
        return self.samples[index][0]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, target = self.load(index)
        return (self.transform(img) if self.transform else img), target


#: IDX magic numbers: unsigned bytes, 3 dimensions (images) / 1 dimension (labels).
_IDX_MAGIC = {16: 0x00000803, 8: 0x00000801}


def _read_idx(path: Path, offset: int) -> np.ndarray:
    """The payload of an IDX file (``offset``: its header's size), checked against the header: a truncated or
    non-gzip ``.gz`` and a file of the wrong size were tracebacks (EOFError, BadGzipFile, a reshape) naming no file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # (gzip.BadGzipFile is an OSError)
        raise DataError(f"cannot read Fashion-MNIST file {str(path)!r}: {e}") from e
    dims = offset // 4 - 1  # 3 (count, rows, cols) for images, 1 (count) for labels
    if len(raw) < offset or int.from_bytes(raw[:4], "big") != _IDX_MAGIC[offset]:
        raise DataError(f"{str(path)!r} is not an IDX file of {dims}-D unsigned bytes (bad header)")
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    if len(raw) - offset != int(np.prod(shape)):
        raise DataError(
            f"{str(path)!r}: its header says {shape} ({int(np.prod(shape))} bytes) but it holds {len(raw) - offset}"
        )
    return np.frombuffer(raw, np.uint8, offset=offset)


class FashionMNIST(Dataset):
    """Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist`` (``train``: 60k, ``test``: 10k images,
    28x28 gray). Images are PIL RGB (the gray channel replicated), resized by the transform like any other image."""

    def __init__(self, root: str | Path | None = None, split: str = "train", transform: Callable | None = None) -> None:
        root = Path(root or FASHION_MNIST_DIR)
        split = {"val": "test", "validation": "test", "t10k": "test"}.get(split, split)
        if split not in FASHION_MNIST_FILES:
            raise DataError(f"fashion_mnist has splits 'train' and 'test' ('val' means 'test'), not {split!r}")
        stem = FASHION_MNIST_FILES[split]
        paths = []
        for kind in ("images-idx3", "labels-idx1"):
            cands = [root / f"{stem}-{kind}-ubyte.gz", root / f"{stem}-{kind}-ubyte"]
            found = [p for p in cands if p.is_file()]
            if not found:
                raise DataError(
                    f"Fashion-MNIST file {cands[0].name} not found in {str(root)!r}. Install Debian's package "
                    f"(files go to {FASHION_MNIST_DIR}): `{FASHION_MNIST_INSTALL}`, or pass --data-dir pointing at "
                    "a folder with the IDX files"
                )
            paths.append(found[0])
        images = _read_idx(paths[0], 16)
        self.images = images.reshape(-1, 28, 28)
        self.targets = _read_idx(paths[1], 8).astype(np.int64).tolist()
        if len(self.targets) != len(self.images):
            raise DataError(f"Fashion-MNIST {split}: {len(self.images)} images but {len(self.targets)} labels")
        self.classes, self.transform, self.root = list(FASHION_MNIST_CLASSES), transform, root

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index], mode="L").convert("RGB"), self.targets[index]

    def describe(self, index: int) -> str:
        return f"fashion_mnist[{index}]"

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, target = self.load(index)
        return (self.transform(img) if self.transform else img), target


def create_dataset(
    name: str, root: str | Path | None, split: str, *, evaluation: bool = False
) -> ImageFolder | FashionMNIST:
    """``name`` ``"imagefolder"`` (``root/split/<class>/<img>``; ``split=""`` means ``root`` itself) or
    ``"fashion_mnist"`` (``root`` the IDX folder, default Debian's). An ``evaluation`` split may have class folders
    without images (a training split may not: each would be a class of its own)."""
    if name == "fashion_mnist":
        return FashionMNIST(root, split)
    if name != "imagefolder":
        raise DataError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if root is None:
        raise DataError("--data-dir is required for an image folder (ImageNet layout: DIR/train/<class>/<img>)")
    folder = Path(root) / split if split else Path(root)
    if split and not folder.is_dir() and not Path(root).is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist")
    if split and not folder.is_dir():
        subdirs = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
        raise DataError(f"split folder {str(folder)!r} does not exist; {str(root)!r} has sub-folders {subdirs}")
    return ImageFolder(folder, allow_empty=evaluation)


class SeededTransform(Dataset):
    """Wraps a dataset (``load(i) -> (PIL image, target)``) and a transform. Indices are ``(index, seed)`` pairs from
    :class:`EpochSampler`: python's, numpy's and torch's CPU generators are seeded with ``seed`` while the sample is
    transformed (and restored afterwards in the main process), so augmentations depend on the sample's seed only. A
    plain ``int`` index transforms without reseeding (evaluation); a padded index of :class:`ShardedEvalSampler` gives
    target ``-1``. Unreadable images give ``None`` (see :func:`collate_skipping`)."""

    def __init__(self, dataset: Dataset, transform: Callable | None) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int | tuple) -> tuple[Any, int] | tuple[None, str]:
        pad = isinstance(index, tuple) and len(index) == 3 and index[2] == PAD
        index, seed = index[:2] if isinstance(index, tuple) else (index, None)
        if pad:  # a padding duplicate of ShardedEvalSampler: transformed as usual, target -1 (not counted)
            img, _ = self[index]
            return (img, -1) if img is not None else (None, None)  # an unreadable one is reported once, not twice
        try:
            img, target = self.dataset.load(index)
        except Exception as e:  # a corrupt or vanished file: skipped and counted by the loop, never a crash
            return None, f"{self.dataset.describe(index)}: {type(e).__name__}: {e}"
        if self.transform is None:
            return img, target
        if seed is None:
            return self.transform(img), target
        in_worker = get_worker_info() is not None  # a worker's generators serve nothing else: no need to restore
        states = None if in_worker else (random.getstate(), np.random.get_state(), torch.get_rng_state())
        try:
            random.seed(seed)
            np.random.seed(seed)
            torch.default_generator.manual_seed(seed)
            return self.transform(img), target
        finally:
            if states is not None:
                random.setstate(states[0])
                np.random.set_state(states[1])
                torch.set_rng_state(states[2])


def collate_skipping(batch: Sequence[tuple[Any, Any]]) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str]]:
    """Collate ``(image, target)`` pairs, leaving out the ``(None, reason)`` ones: ``(images, targets, reasons)``
    (``images`` and ``targets`` ``None`` when nothing in the batch could be read)."""
    good = [b for b in batch if b[0] is not None]
    bad = [b[1] for b in batch if b[0] is None and b[1] is not None]
    if not good:
        return None, None, bad
    images, targets = default_collate(good)
    return images, targets, bad


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:  # what Pillow < 12 returned for 0 bits (every value masked to 0); Pillow 12+ raises
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def patch_posterize(transform: Any) -> Any:
    """timm's RandAugment asks Pillow for 0-bit posterization at the top of its magnitude range (``rand-m9-mstd0.5``
    reaches it), which Pillow 12+ refuses with ``ValueError``; give the transform's posterize ops the old result (a
    black image) instead. Returns ``transform``, changed in place."""
    for t in getattr(transform, "transforms", [transform]):
        ops = list(getattr(t, "ops", []))
        for sub in getattr(t, "policy", []):
            ops += list(sub)
        for op in ops:
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


def _sample_seed(seed: int, epoch: int, position: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + position * 104_729 + 12_345) % (2**32)


class EpochSampler(Sampler):
    """The epoch's order is ``torch.randperm(n, generator seeded with seed + epoch)`` (``arange`` when not shuffling),
    each index repeated ``repeats`` times in a row (repeated augmentation), padded to a multiple of ``num_replicas``
    and taken every ``num_replicas``-th from ``rank``; yields ``(index, sample_seed)``, the seed a function of the
    position in that global order, so the copies of a repeated image get different augmentations. ``set_epoch``
    chooses the epoch and ``set_start(k)`` skips this rank's first ``k`` samples (a resumed epoch).

    ``len`` is this rank's share of one pass over the data, ``ceil(n / num_replicas)``, whatever ``repeats`` is: with
    ``repeats=r`` an epoch shows about ``n / r`` distinct images ``r`` times each, the copies of one image on
    consecutive ranks. This is timm's ``RepeatAugSampler`` (DeiT's) with ``selected_round=0``; unlike timm's it also
    runs in one process.
    """

    def __init__(
        self, n: int, *, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0, repeats: int = 1
    ) -> None:
        if n <= 0:
            raise DataError(f"cannot sample from an empty dataset ({n=})")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"{rank=} must be in [0, {num_replicas=})")
        if repeats < 1:
            raise ValueError(f"{repeats=} must be a positive integer (1: no repeated augmentation)")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.num_replicas, self.rank, self.repeats = num_replicas, rank, repeats
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(n / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        self.start = start

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        order = order.repeat_interleave(self.repeats).tolist()
        total = self.per_rank * self.num_replicas
        order += order[: max(total - len(order), 0)]
        for pos in range(self.rank + self.start * self.num_replicas, total, self.num_replicas):
            yield order[pos], _sample_seed(self.seed, self.epoch, pos)


PAD = "pad"  # third element of a padded index from ShardedEvalSampler


class ShardedEvalSampler(Sampler):
    """Evaluation order ``0..n-1`` sharded over processes (every ``num_replicas``-th from ``rank``), padded at the end
    so every process gets ``ceil(n / num_replicas)`` samples, hence the same number of batches: a sharded (FSDP) model
    gathers its parameters in every forward, so no process may stop early. Real samples are yielded as ``int``; the
    padding repeats the first samples and is yielded as ``(index, None, PAD)``, which :class:`SeededTransform` turns
    into target ``-1`` so that :func:`visionlin.train.validate.evaluate` leaves it out: each sample is counted exactly
    once over all processes."""

    def __init__(self, n: int, *, num_replicas: int = 1, rank: int = 0) -> None:
        if n <= 0:
            raise DataError(f"cannot evaluate on an empty dataset ({n=})")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"{rank=} must be in [0, {num_replicas=})")
        self.n, self.num_replicas, self.rank = n, num_replicas, rank
        self.per_rank = math.ceil(n / num_replicas)

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int | tuple[int, None, str]]:
        for pos in range(self.rank, self.per_rank * self.num_replicas, self.num_replicas):
            yield pos if pos < self.n else (pos % self.n, None, PAD)


def make_synthetic_imagefolder(
    root: str | Path,
    *,
    classes: int = 3,
    train_per_class: int = 8,
    val_per_class: int = 4,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """Write a tiny learnable ImageNet-layout folder of PNGs: ``root/{train,val}/class_<c>/<i>.png``. Each class has
    its own color and stripe direction plus noise, so a tiny model separates them within a few steps; returns
    ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    palette = rng.integers(30, 226, size=(classes, 3))
    yy, xx = np.mgrid[0:size, 0:size]
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            stripes = ((xx if c % 2 else yy) + (xx + yy) * (c // 2)) // max(2, size // 8) % 2
            for i in range(count):
                base = palette[c][None, None, :] * (0.6 + 0.4 * stripes[..., None])
                img = np.clip(base + rng.normal(0, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:04d}.png")
    return root
