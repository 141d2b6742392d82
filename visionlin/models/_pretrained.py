"""Building models with timm, with clear errors when pretrained weights are absent or cannot be fetched."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from timm.models import build_model_with_cfg
from timm.models._builder import resolve_pretrained_cfg
from timm.models._pretrained import PretrainedCfg
from torch import nn

__all__ = ["build_with_weights", "resolve_cfg"]

_SOURCES = ("url", "file", "hf_hub_id", "state_dict")


def resolve_cfg(variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The pretrained cfg ``timm.create_model`` will use for ``variant`` (tag and overlay applied), as a dict.

    ``create_model("name.tag")`` passes the tag as ``pretrained_cfg="tag"``; timm's own resolver turns it into the
    ``name.tag`` entry.
    """
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
    if not sources:
        raise ValueError(
            f"{variant}: no released pretrained weights are known for this configuration "
            f"({cfg.get('notes') or 'no url/file/hf_hub_id in its pretrained_cfg'}). Load your own checkpoint with "
            f"timm.create_model({variant.split('.')[0]!r}, pretrained=True, "
            "pretrained_cfg_overlay=dict(file='/path/to/checkpoint.pth'))"
        )
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
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except (OSError, ConnectionError, TimeoutError) as e:
        where = ", ".join(f"{k}={v!r}" for k, v in sources.items() if k != "state_dict")
        raise RuntimeError(
            f"{variant}: could not load pretrained weights from {where}: {type(e).__name__}: {e}. If this machine is "
            "offline, download the checkpoint elsewhere and pass "
            "pretrained_cfg_overlay=dict(file='/path/to/checkpoint.pth') (it is mapped by checkpoint_filter_fn)."
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
