"""Building models with timm, with clear errors when pretrained weights are absent or cannot be fetched."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from timm.models import build_model_with_cfg
from timm.models._pretrained import PretrainedCfg
from timm.models._registry import get_pretrained_cfg
from torch import nn

__all__ = ["build_with_weights"]

_SOURCES = ("url", "file", "hf_hub_id", "state_dict")


def _merged_cfg(variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    cfg = kwargs.get("pretrained_cfg")
    if isinstance(cfg, str):
        cfg = get_pretrained_cfg(cfg)
    if cfg is None:
        cfg = get_pretrained_cfg(variant)
    cfg = cfg.to_dict() if isinstance(cfg, PretrainedCfg) else dict(cfg or {})
    cfg.update(kwargs.get("pretrained_cfg_overlay") or {})
    return cfg


def build_with_weights(model_cls: Callable[..., nn.Module], variant: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``timm.models.build_model_with_cfg`` that fails clearly for ``pretrained=True``.

    Raises:
        ValueError: ``pretrained=True`` but the configuration names no weights (the message says how to give a file).
        RuntimeError: the weights could not be fetched (offline, unreachable host, missing file); the message names
            the source and how to load a local copy instead.
    """
    if not pretrained:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    cfg = _merged_cfg(variant, kwargs)
    sources = {k: cfg[k] for k in _SOURCES if cfg.get(k)}
    if not sources:
        raise ValueError(
            f"{variant}: no released pretrained weights are known for this configuration "
            f"({cfg.get('notes') or 'no url/file/hf_hub_id in its pretrained_cfg'}). Load your own checkpoint with "
            f"timm.create_model({variant.split('.')[0]!r}, pretrained=True, "
            "pretrained_cfg_overlay=dict(file='/path/to/checkpoint.pth'))"
        )
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except (OSError, ConnectionError, TimeoutError) as e:
        where = ", ".join(f"{k}={v!r}" for k, v in sources.items() if k != "state_dict")
        raise RuntimeError(
            f"{variant}: could not load pretrained weights from {where}: {type(e).__name__}: {e}. If this machine is "
            "offline, download the checkpoint elsewhere and pass "
            "pretrained_cfg_overlay=dict(file='/path/to/checkpoint.pth') (it is mapped by checkpoint_filter_fn)."
        ) from None
