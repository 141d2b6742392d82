"""Training checkpoints: one folder per optimizer step, written whole or not at all.

Layout of ``RUN_DIR/checkpoints/step-000000120/``:

- ``model.safetensors`` (and ``ema.safetensors``): weights, with ``{"format": "visionlin", "model": name,
  "num_classes": ...}`` in the safetensors metadata;
- ``train_state.pth``: optimizer, scheduler, grad scaler, epoch, position in the epoch, step, resolved config
  (only tensors and plain containers: loaded with ``weights_only=True``);
- ``rng_rank<r>.pth``: python / numpy / torch / CUDA generator states of process ``r`` (one file per process);
- ``complete.json``: written last, with the sizes of the other files.

Everything is written into ``.tmp-step-...`` (each file fsync-ed), then the folder is renamed into place and its parent
fsync-ed: a killed process or a full disk leaves at most a ``.tmp-*`` folder, never a half-written checkpoint under a
real name, and the previous checkpoints are untouched (old ones are pruned only after the new one is in place).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

__all__ = [
    "CKPT_SUBDIR",
    "SELF_FILLED",
    "CheckpointError",
    "capture_rng",
    "check_complete",
    "complete_checkpoints",
    "latest_checkpoint",
    "load_weights",
    "prune_checkpoints",
    "READ_ERRORS",
    "read_error",
    "read_part",
    "read_weights_metadata",
    "restore_rng",
    "save_weights",
    "torch_load",
    "write_checkpoint",
]

CKPT_SUBDIR = "checkpoints"
MARKER = "complete.json"
_NAME = re.compile(r"step-(\d{9})")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here: incomplete, for another model, or with mismatched keys."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write: Callable[[Path], None]) -> None:
    write(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a state dict as safetensors atomically (temp file in the same folder, fsync, rename). Tensors that share
    memory are saved as separate copies."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_file(tmp, lambda p: save_file(tensors, str(p), metadata=metadata))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


#: State-dict entries a model fills in itself when a checkpoint lacks them (the grid records, ``pos_embed_grid``, that
#: checkpoints saved before a model family had one lack).
SELF_FILLED = ("pos_embed_grid",)


def read_weights_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _np_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached": float(cached)}  # fmt: skip


def capture_rng() -> dict[str, Any]:
    """This process's generator states (python, numpy, torch CPU, every CUDA device) in a ``weights_only``-safe form."""
    version, internal, gauss = random.getstate()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": _np_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoint folders of a run, oldest step first."""
    root = Path(run_dir) / CKPT_SUBDIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.fullmatch(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def write_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    weights: dict[str, dict[str, torch.Tensor]],
    weights_metadata: dict[str, str],
    train_state: dict[str, Any],
    rng_states: dict[int, dict[str, Any]],
    summary: dict[str, Any],
) -> Path:
    """Write ``RUN_DIR/checkpoints/step-<step>/`` atomically (see the module docstring) and return its path.

    Args:
        weights: ``{"model": state_dict, "ema": state_dict}`` (each becomes ``<name>.safetensors``).
        rng_states: generator states per process rank (``rng_rank<r>.pth``).
        summary: small JSON-able facts (epoch, position, step) repeated in ``complete.json``.
    """
    root = Path(run_dir) / CKPT_SUBDIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:09d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        sizes = {}
        for name, state in weights.items():
            tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
            p = tmp / f"{name}.safetensors"
            _write_file(p, lambda q, t=tensors: save_file(t, str(q), metadata=weights_metadata))
            sizes[p.name] = p.stat().st_size
        p = tmp / "train_state.pth"
        _write_file(p, lambda q: torch.save(train_state, q))
        sizes[p.name] = p.stat().st_size
        for rank, rng in rng_states.items():
            p = tmp / f"rng_rank{rank}.pth"
            _write_file(p, lambda q, r=rng: torch.save(r, q))
            sizes[p.name] = p.stat().st_size
        marker = tmp / MARKER
        _write_file(marker, lambda q: q.write_text(json.dumps({**summary, "files": sizes}, indent=1)))
        _fsync_dir(tmp)
        old = None
        if final.exists():  # the same step written again (a re-run): swap, then drop the old one
            old = root / f".old-{final.name}-{os.getpid()}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints (``keep <= 0`` keeps all); returns what was deleted."""
    found = complete_checkpoints(run_dir)
    if keep <= 0 or len(found) <= keep:
        return []
    doomed = found[:-keep]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Remove ``.tmp-*`` / ``.old-*`` folders that a killed run left behind; returns them."""
    root = Path(run_dir) / CKPT_SUBDIR
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


#: What reading a damaged or foreign file raises: safetensors' header errors, torch.load's unpickling errors
#: (``KeyError`` for a text file's first byte), truncated files, unreadable paths.
READ_ERRORS = (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError)


def read_error(e: BaseException) -> str:
    """``"<type>: <first line of the message>"`` of a :data:`READ_ERRORS` error, for a one-line message."""
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def _damaged(path: Path, name: str, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {str(path)!r} is damaged: {name} {why}; resume from another checkpoint "
                           f"(a step-... folder of {str(path.parent)!r}) or start afresh")  # fmt: skip


def read_part(path: Path, name: str, read: Callable[[Path], Any]) -> Any:
    """``read(path / name)`` with a damaged file as :class:`CheckpointError` naming the checkpoint and the file."""
    try:
        return read(path / name)
    except READ_ERRORS as e:
        raise _damaged(path, name, f"cannot be read ({read_error(e)})") from e


def torch_load(p: Path) -> Any:
    """A ``torch.save``'d file of tensors and plain containers, on the CPU (``weights_only``: no code runs)."""
    return torch.load(p, map_location="cpu", weights_only=True)


def check_complete(path: str | Path) -> dict[str, int]:
    """The files ``complete.json`` lists with their sizes, each checked to be there with that size; raises
    :class:`CheckpointError` naming the folder and the file otherwise."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{str(path)!r} is not a complete checkpoint folder (no {MARKER})")
    marker = read_part(path, MARKER, lambda p: json.loads(p.read_text()))
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict) or "model.safetensors" not in files:
        raise _damaged(path, MARKER, "does not list the checkpoint's files")
    for name, size in files.items():
        if not (path / name).is_file():
            raise _damaged(path, name, "is missing")
        if (path / name).stat().st_size != size:
            raise _damaged(path, name, f"has {(path / name).stat().st_size} bytes, not the {size} written")
    return files


def read_checkpoint(path: str | Path, rank: int = 0) -> dict[str, Any]:
    """Load a complete checkpoint folder: ``{"model", "ema" (or None), "train_state", "rng" (or None), "metadata",
    "path"}``. Raises :class:`CheckpointError` for an incomplete folder, or a missing, cut short or unreadable file,
    naming the folder and the file."""
    path = Path(path)
    files = check_complete(path)
    rng = f"rng_rank{rank}.pth"
    return {
        "model": read_part(path, "model.safetensors", load_weights),
        "ema": read_part(path, "ema.safetensors", load_weights) if "ema.safetensors" in files else None,
        "metadata": read_part(path, "model.safetensors", read_weights_metadata),
        "train_state": read_part(path, "train_state.pth", torch_load),
        "rng": read_part(path, rng, torch_load) if rng in files else None,
        "path": path,
    }
