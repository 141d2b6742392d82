"""Building models with timm, with clear errors when pretrained weights are absent or cannot be fetched."""

from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from timm.models import build_model_with_cfg, get_arch_pretrained_cfgs
from timm.models._builder import resolve_pretrained_cfg
from timm.models._pretrained import PretrainedCfg
from torch import nn

__all__ = ["build_with_weights", "check_checkpoint_file", "resolve_cfg", "weights_source"]

_SOURCES = ("url", "file", "hf_hub_id", "state_dict")
# Objects the authors' full training checkpoints hold besides tensors that the weights-only unpickler may rebuild:
# DeiT-style and timm training scripts save their command line as ``args`` (an ``argparse.Namespace`` of plain
# values). Anything else is refused with a message naming it.
_SAFE_GLOBALS = (argparse.Namespace,)


def _fetch_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the weights could not be fetched (offline, unreachable host, missing file on the hub)."""
    errors: tuple[type[BaseException], ...] = (OSError, ConnectionError, TimeoutError)
    try:
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:  # pragma: no cover (timm depends on huggingface_hub)
        return errors
    return (*errors, EntryNotFoundError)


def weights_source(cfg: dict[str, Any]) -> str:
    """Where ``cfg`` fetches its weights from, in words: ``url='...'``, ``hf_hub_id='org/repo'`` (with the file
    name), ``file='...'``; empty when it names no weights."""
    if cfg.get("file"):
        return f"file={cfg['file']!r}"
    parts = []
    if cfg.get("hf_hub_id"):
        hub = f"hf_hub_id={cfg['hf_hub_id']!r}"
        parts.append(hub + (f" (file {cfg['hf_hub_filename']!r})" if cfg.get("hf_hub_filename") else ""))
    if cfg.get("url"):
        parts.append(f"url={cfg['url']!r}")
    return ", ".join(parts)


def resolve_cfg(variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The pretrained cfg ``timm.create_model`` will use for ``variant`` (tag and overlay applied), as a dict.

    ``create_model("name.tag")`` passes the tag as ``pretrained_cfg="tag"``; timm's own resolver turns it into the
    ``name.tag`` entry.

    Raises:
        ValueError: the tag names no configuration of ``variant`` (the message lists the valid tags).
    """
    tag = kwargs.get("pretrained_cfg")
    if isinstance(tag, str):
        tags = sorted(n.split(".", 1)[1] for n in get_arch_pretrained_cfgs(variant))
        if tag not in tags:
            raise ValueError(f"{variant}: unknown pretrained tag {tag!r}; valid tags: {tags}")
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get("pretrained_cfg"),
        pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
    )
    return cfg.to_dict() if isinstance(cfg, PretrainedCfg) else dict(cfg)


def build_with_weights(model_cls: Callable[..., nn.Module], variant: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``timm.models.build_model_with_cfg`` that fails clearly for ``pretrained=True``.

    Raises:
        ValueError: ``pretrained=True`` but the configuration names no weights (the message says how to give a file).
        RuntimeError: the weights could not be fetched (offline, unreachable host, missing file); the message names
            the source and how to load a local copy instead.
    """
    if not pretrained:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    cfg = resolve_cfg(variant, kwargs)
    sources = {k: cfg[k] for k in _SOURCES if cfg.get(k)}
    if cfg.get("file"):  # timm loads a file before a url: the url is not used
        check_checkpoint_file(cfg["file"])
        sources = {"file": cfg["file"]}
    if not sources:
        notes = cfg.get("notes") or "no url/file/hf_hub_id in its pretrained_cfg"
        notes = "; ".join(notes) if isinstance(notes, (list, tuple)) else notes
        where = f" (authors' code: {cfg['origin_url']})" if cfg.get("origin_url") else ""
        raise ValueError(
            f"{variant}: no released pretrained weights are known for this configuration ({notes}){where}. Load "
            f"your own checkpoint with timm.create_model({variant.split('.')[0]!r}, pretrained=True, "
            "pretrained_cfg_overlay=dict(file='/path/to/checkpoint.pth'))"
        )
    where = weights_source(cfg)
    try:
        if cfg.get("url") and not cfg.get("file") and not Path(urlparse(cfg["url"]).path).suffix:
            # Share links such as '.../f/<id>/?dl=1' have no file name, which torch.hub needs for its cache:
            # download under the variant's name and hand timm the file.
            kwargs["pretrained_cfg_overlay"] = {
                **(kwargs.get("pretrained_cfg_overlay") or {}),
                "file": str(
                    _download(
                        cfg["url"],
                        f"{cfg.get('architecture', variant)}.{cfg.get('tag') or 'default'}.pth",
                        kwargs.get("cache_dir"),
                    )
                ),
            }
        with torch.serialization.safe_globals(list(_SAFE_GLOBALS)):
            return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        needs = f"it needs {found.group(1)}" if found else str(e).strip().splitlines()[0]
        raise RuntimeError(
            f"{variant}: the checkpoint from {where or 'state_dict'} holds Python objects other than tensors, which "
            f"are not loaded for safety ({needs}). If you trust its source: state = torch.load(path, "
            "weights_only=False), then model.load_state_dict(checkpoint_filter_fn(state, model))."
        ) from None
    except _fetch_errors() as e:
        raise RuntimeError(
            f"{variant}: could not load pretrained weights from {where or 'state_dict'}: {type(e).__name__}: {e}. If "
            "this machine is offline, download the checkpoint elsewhere and pass "
            "pretrained_cfg_overlay=dict(file='/path/to/checkpoint.pth') (it is mapped by checkpoint_filter_fn)."
        ) from None


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Raise a clear error unless ``path`` is a checkpoint timm can load (``.safetensors``, or a ``torch.save`` file
    of tensors readable with ``weights_only=True``). Reads only the header / index (``mmap``) where it can.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: the file is not a readable checkpoint or holds pickled Python objects (the message says how to
            load a trusted one).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint file {str(path)!r} is a directory; pass the checkpoint file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist (pretrained_cfg_overlay file=...)")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                f.keys()
        else:
            with torch.serialization.safe_globals(list(_SAFE_GLOBALS)):
                torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if not found:  # the weights-only unpickler met bytes that are no pickle at all
            raise ValueError(
                f"checkpoint file {str(path)!r} is not a readable torch or safetensors checkpoint (not a pickle or "
                "zip archive torch.save writes); is the download complete?"
            ) from None
        first = f"it needs {found.group(1)}"
        raise ValueError(
            f"checkpoint file {str(path)!r} holds Python objects other than tensors, which are not loaded for safety "
            f"({first}). If you trust its source: state = torch.load(path, weights_only=False), then load "
            "checkpoint_filter_fn(state, model) into the model yourself."
        ) from None
    except Exception as e:  # corrupt, truncated or not a checkpoint at all
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"checkpoint file {str(path)!r} is not a readable torch or safetensors checkpoint "
            f"({type(e).__name__}: {first}); is the download complete?"
        ) from None


def _download(url: str, file_name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Download ``url`` once into the torch hub cache (or ``cache_dir``) as ``visionlin/<file_name>``."""
    folder = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints" / "visionlin"
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / file_name
    if not dst.is_file():
        tmp = dst.with_suffix(dst.suffix + ".part")
        torch.hub.download_url_to_file(url, str(tmp), progress=True)
        os.replace(tmp, dst)  # atomic: a broken download never looks like a checkpoint
    return dst
