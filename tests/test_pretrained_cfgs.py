"""Every entrypoint's pretrained configurations: where the authors' weights are (or a documented absence), well-formed
sources, tags that build at their own size, ``pretrained=True`` failing clearly without a network, and the published
numbers of ``visionlin/models/_published.py`` (the README's table) against our counts.

The sources below were read from the authors' repositories (README / model code) and their Hugging Face repositories;
no weights are downloaded here.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import socket
from urllib.parse import urlparse

import pytest
import timm
import torch
from timm.models import get_arch_pretrained_cfgs

import visionlin
from visionlin.layers import ShiftedWindowAttention
from visionlin.models._published import PAPERS, PUBLISHED, family

_TH = "https://cloud.tsinghua.edu.cn/f/{}/?dl=1"
_NAT = "https://shi-labs.com/projects/nat/checkpoints/CLS/{}.pth"
_DINAT = "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/{}.pth"
_MV = "https://huggingface.co/nvidia/MambaVision-{}/resolve/main/{}.pth.tar"

# 'name.tag' -> ("url", url) or ("hub", repo id, file name): the authors' released ImageNet-1k weights.
SOURCES: dict[str, tuple[str, ...]] = {
    **{f"nat_{s}.in1k": ("url", _NAT.format(f"nat_{s}")) for s in ("mini", "tiny", "small", "base")},
    **{f"dinat_{s}.in1k": ("url", _DINAT.format(f"dinat_{s}_in1k_224")) for s in ("mini", "tiny", "small", "base")},
    "dinat_large.in22k_ft_in1k": ("url", _DINAT.format("dinat_large_in22k_in1k_224")),
    "dinat_large.in22k_ft_in1k_384": ("url", _DINAT.format("dinat_large_in22k_in1k_384")),
    "mambavision_tiny.in1k": ("url", _MV.format("T-1K", "mambavision_tiny_1k")),
    "mambavision_tiny2.in1k": ("url", _MV.format("T2-1K", "mambavision_tiny2_1k")),
    "mambavision_small.in1k": ("url", _MV.format("S-1K", "mambavision_small_1k")),
    "mambavision_base.in1k": ("url", _MV.format("B-1K", "mambavision_base_1k")),
    "mambavision_base.in21k_ft_in1k": ("url", _MV.format("B-21K", "mambavision_base_21k")),
    "mambavision_large.in1k": ("url", _MV.format("L-1K", "mambavision_large_1k")),
    "mambavision_large.in21k_ft_in1k": ("url", _MV.format("L-21K", "mambavision_large_21k")),
    "mambavision_large2.in1k": ("url", _MV.format("L2-1K", "mambavision_large2_1k")),
    "mambavision_large2.in21k_ft_in1k_512": ("url", _MV.format("L2-512-21K", "mambavision_L2_21k_240m_512")),
    "vig_tiny.in1k": ("hub", "hustvl/ViG", "vig_t_77p2acc.pth"),
    "vig_small.in1k": ("hub", "hustvl/ViG", "vig_s_81p7acc.pth"),
    "vig_base.in1k": ("hub", "hustvl/ViG", "vig_b_82p6acc.pth"),
    **{f"mavit_{s}.in1k": ("hub", "aldjalkdf/MAViT", f"MAViT_{s[0].upper()}.pth") for s in ("tiny", "small", "base")},
    "mavit_large.in1k": ("hub", "aldjalkdf/MAViT", "MAViT_L.pth"),
    **{f"ravlt_{s}.in1k": ("hub", "aldjalkdf/RAVLT", f"RAVLT_{s[0].upper()}.pth") for s in ("tiny", "small", "base")},
    "ravlt_large.in1k": ("hub", "aldjalkdf/RAVLT", "RAVLT_L.pth"),
    "flatten_pvt_tiny.in1k": ("url", _TH.format("3ab1d773f19d45648690")),
    "flatten_swin_tiny.in1k": ("url", _TH.format("e1518e76703e4e57a7f2")),
    "flatten_swin_small.in1k": ("url", _TH.format("94188e52af354bf4a88b")),
    "flatten_swin_base.in1k": ("url", _TH.format("7a9e5186bad04e7fb3a9")),
    "flatten_swin_base.in1k_384": ("url", _TH.format("0d0330cf2e5249f1abb6")),
    "agent_deit_tiny.in1k": ("url", _TH.format("57e0904221824ee7b7af")),
    "agent_deit_small.in1k": ("url", _TH.format("fdd43304372541db8ea7")),
    "agent_deit_small.in1k_448": ("url", _TH.format("a228f86241c445f1969b")),
    "agent_deit_base.in1k": ("url", _TH.format("5115f15fdd7e4ab58fbc")),
    "agent_pvt_tiny.in1k": ("url", _TH.format("13fdf0e0a7c5498c934f")),
    "agent_pvt_small.in1k": ("url", _TH.format("36b8be9a8863456685a3")),
    "agent_pvt_medium.in1k": ("url", _TH.format("4d00ecacf18b45f9b88c")),
    "agent_pvt_medium.in1k_256": ("url", _TH.format("654df734121643b19c52")),
    "agent_pvt_large.in1k": ("url", _TH.format("040cfe0cfbbe4762ad09")),
    "agent_swin_tiny.in1k": ("url", _TH.format("a2ddc1190c224f768a41")),
    "agent_swin_small.in1k": ("url", _TH.format("f607172c9fea4d6e99bb")),
    "agent_swin_small.in1k_288": ("url", _TH.format("09760394e93b4046a25e")),
    "agent_swin_base.in1k": ("url", _TH.format("4fcd2d0114bb490483c3")),
    "agent_swin_base.in1k_384": ("url", _TH.format("bb84ee9058954706a557")),
    "inline_deit_tiny.in1k": ("url", _TH.format("1d6b8191ad6d4114b291")),
    "inline_deit_small.in1k": ("url", _TH.format("2f3898b07e9247f3beb3")),
    "inline_deit_base.in1k": ("url", _TH.format("10bdd726d4b0435eb34e")),
}
# Configurations without released weights, and why (each cfg's notes must say so).
NO_WEIGHTS = {
    **{f"infvit{p}_{s}.untrained": "architecture only" for p in ("", "_pure") for s in ("tiny", "small", "base")},
    **{f"flatten_deit_{s}.untrained": "architecture only" for s in ("tiny", "small")},
    **{f"flatten_pvt_{s}.in1k": "FLatten-PVT-T only" for s in ("small", "medium", "large")},
    **{f"nalaformer_{s}.in1k": "coming soon" for s in ("tiny", "small", "base", "large")},
}
# Tags trained at another size: (input size, the softmax window of the authors' config at that size or None).
SIZED_TAGS = {
    "flatten_swin_base.in1k_384": (384, 12),
    "agent_swin_small.in1k_288": (288, 9),
    "agent_swin_base.in1k_384": (384, 12),
    "agent_pvt_medium.in1k_256": (256, None),
    "mambavision_large2.in21k_ft_in1k_512": (512, None),
    "dinat_large.in22k_ft_in1k_384": (384, None),
}
# The authors' dinat_large_384 (classification/dinat.py): dilations per block at 384 px.
DINAT_LARGE_384 = [[1, 13, 1], [1, 6, 1, 6], [1, 3] * 9, [1] * 5]
HOSTS = {"cloud.tsinghua.edu.cn", "huggingface.co", "shi-labs.com"}


def _all_cfgs() -> dict[str, dict]:
    out = {}
    for name in visionlin.list_models():
        for full in get_arch_pretrained_cfgs(name):
            out[full] = timm.models.get_pretrained_cfg(full).to_dict()
    return out


CFGS = _all_cfgs()


def test_every_configuration_is_listed_with_its_source_or_absence():
    assert set(CFGS) == set(SOURCES) | set(NO_WEIGHTS)
    assert not set(SOURCES) & set(NO_WEIGHTS)
    models = set(visionlin.list_models())
    assert {n.split(".")[0] for n in CFGS} == models


@pytest.mark.parametrize("full", sorted(SOURCES))
def test_released_weights_point_at_the_authors_files(full):
    cfg = CFGS[full]
    kind, *where = SOURCES[full]
    if kind == "url":
        assert cfg.get("url") == where[0] and not cfg.get("hf_hub_id")
    else:
        assert (cfg.get("hf_hub_id"), cfg.get("hf_hub_filename")) == tuple(where) and not cfg.get("url")
    assert cfg["paper_ids"] == f"arXiv:{PAPERS[family(full)].arxiv}"
    assert cfg["origin_url"].startswith("https://github.com/")


@pytest.mark.parametrize("full", sorted(NO_WEIGHTS))
def test_no_weights_is_documented(full):
    cfg = CFGS[full]
    assert not (cfg.get("url") or cfg.get("hf_hub_id") or cfg.get("file"))
    notes = cfg.get("notes") or ""
    notes = " ".join(notes) if isinstance(notes, (list, tuple)) else notes
    assert NO_WEIGHTS[full].lower() in notes.lower()
    name = full.split(".")[0]
    with pytest.raises(ValueError, match=rf"{name}: no released pretrained weights .*{re.escape(NO_WEIGHTS[full])}"):
        timm.create_model(name, pretrained=True, device="meta")


@pytest.mark.parametrize("full", sorted(SOURCES))
def test_sources_are_well_formed(full):
    cfg = CFGS[full]
    if cfg.get("url"):
        url = urlparse(cfg["url"])
        assert url.scheme == "https" and url.netloc in HOSTS, cfg["url"]
        if url.netloc == "cloud.tsinghua.edu.cn":  # a share link: '/f/<20 hex>/' with '?dl=1' downloads the file
            assert re.fullmatch(r"/f/[0-9a-f]{20}/", url.path) and url.query == "dl=1", cfg["url"]
        elif url.netloc == "huggingface.co":  # a file, not a page: '/<org>/<repo>/resolve/<rev>/<file>'
            assert re.fullmatch(r"/[\w.-]+/[\w.-]+/resolve/main/[\w.-]+\.pth(\.tar)?", url.path), cfg["url"]
        else:
            assert url.path.endswith(".pth") and not url.query, cfg["url"]
    else:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", cfg["hf_hub_id"])
        assert re.fullmatch(r"[\w.-]+\.(pth|pth\.tar|safetensors|bin)", cfg["hf_hub_filename"])


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: sockets refuse to connect and both download functions timm uses raise; returns the calls."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args[:2])
        raise ConnectionError("network is unreachable (test)")

    def no_socket(self, *args, **kwargs):
        raise OSError("network is unreachable (test socket)")

    monkeypatch.setattr(socket.socket, "connect", no_socket)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return calls


@pytest.mark.parametrize("full", sorted(SOURCES))
def test_pretrained_offline_fails_naming_model_and_source(full, offline, tmp_path):
    name, tag = full.split(".")
    kind, *where = SOURCES[full]
    with pytest.raises(RuntimeError) as err:
        timm.create_model(full, pretrained=True, device="meta", cache_dir=str(tmp_path / "cache"))
    msg = str(err.value)
    assert msg.startswith(f"{name}: could not load pretrained weights from ")
    for part in where:
        assert part in msg
    assert "pretrained_cfg_overlay=dict(file=" in msg
    assert offline, "the download function was never called (a cached file was used?)"
    if kind == "hub":
        assert offline[-1][0] == where[0]


def test_training_checkpoint_with_argparse_args_loads(monkeypatch, tmp_path):
    """DeiT / timm training scripts save {'model': ..., 'args': Namespace}: loaded weights-only, the Namespace
    allowed; any other object is refused with a message naming it."""
    src = timm.create_model("flatten_deit_tiny", num_classes=10)

    def fake_download(url, dst, *args, **kwargs):
        torch.save({"model": src.state_dict(), "args": argparse.Namespace(lr=5e-4, model="x")}, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    url = "https://example.invalid/ckpt.pth"
    dst = timm.create_model(
        "flatten_deit_tiny",
        pretrained=True,
        num_classes=10,
        pretrained_cfg_overlay=dict(url=url),
        cache_dir=str(tmp_path / "a"),
    )
    torch.testing.assert_close(dst.blocks[3].attn.qkv.weight, src.blocks[3].attn.qkv.weight)

    def bad_download(url, dst, *args, **kwargs):
        torch.save({"model": src.state_dict(), "config": socket.AddressFamily.AF_INET}, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", bad_download)
    with pytest.raises(
        RuntimeError,
        match=r"flatten_deit_tiny: the checkpoint from url='https://example.invalid/"
        r"ckpt.pth' holds Python objects .*socket.AddressFamily.*weights_only=False",
    ):
        timm.create_model(
            "flatten_deit_tiny",
            pretrained=True,
            num_classes=10,
            pretrained_cfg_overlay=dict(url=url),
            cache_dir=str(tmp_path / "b"),
        )


def _count(full: str) -> tuple[float, float]:
    """Parameters (M) and GMACs at the configuration's input size (meta parameters, fake tensors). The isotropic
    models' mixers run their plain-PyTorch reference: the counter does not see inside their fused CPU path
    (Agent-DeiT-T counts 1.08 GMACs through SDPA, 1.17 through the reference). The hierarchical ones keep the
    automatic choice: the selective-scan reference materialises products the authors' count (ptflops) leaves out
    (MambaVision-L2 at 512 px: 196.0 automatic, 206.2 reference, 196.3 published)."""
    model = timm.create_model(full, device="meta").to_empty(device="cpu")  # the fake forward reads only shapes
    if not hasattr(model, "stages"):
        with contextlib.suppress(ValueError):  # a mixer's op without a backend of that name keeps the automatic one
            visionlin.set_backend(model, "reference")
    r = visionlin.model_complexity(model, cpu_sdpa=False)  # at the configuration's size, as the published tables
    return r["params_m"], r["gmacs"]


@pytest.mark.parametrize("full", sorted(SIZED_TAGS))
def test_sized_tag_builds_at_its_size_with_the_authors_windows(full):
    size, window = SIZED_TAGS[full]
    model = timm.create_model(full, device="meta")
    assert tuple(model.img_size) == (size, size) and model.pretrained_cfg["input_size"] == (3, size, size)
    name = full.split(".")[0]
    default = timm.create_model(name, device="meta")
    assert tuple(default.img_size) == (224, 224)
    if window is not None:  # the softmax (Swin window) blocks use the authors' window at that size
        windows = {
            b.attn.window_size for s in model.stages for b in s.blocks if isinstance(b.attn, ShiftedWindowAttention)
        }
        assert windows == {window}
    if name.startswith("dinat"):
        assert [[b.attn.dilation[0] for b in s.blocks] for s in model.stages] == DINAT_LARGE_384
    if name.startswith("mambavision"):
        assert [s.window_size for s in model.stages[2:]] == [size // 16, size // 32]
        assert [s.window_size for s in default.stages[2:]] == [14, 7]


# Families whose GMACs no other test checks (tests/test_models_pyramid.py and test_models_rope_hybrid.py cover the
# PVT / Swin / MAViT / RAVLT / NaLaFormer 224-px entrypoints), plus every tag trained at another size.
GMACS_CHECKED = sorted(
    {"nat_mini", "nat_tiny", "nat_small", "nat_base", "dinat_large"}
    | {n for n in PUBLISHED if n.startswith(("mambavision", "agent_deit", "inline_deit", "flatten_deit"))}
    | {n for n in SIZED_TAGS if n in PUBLISHED}
)
# Where the entrypoint follows the authors' code and their table disagrees with it (tests/test_models_rope_hybrid.py
# pins our count of the code): NaLaFormer-T's code has MLP ratio 4 (15.9 M), the table's 15 M fits 3.5.
CODE_NOT_TABLE = {"nalaformer_tiny"}


@pytest.mark.parametrize(
    "name", sorted(n for n in PUBLISHED if PUBLISHED[n].params is not None and n not in CODE_NOT_TABLE)
)
def test_published_params(name):
    """Within 2 %, or within the rounding of a count published in whole millions (the repo's tolerance)."""
    model = timm.create_model(name, device="meta")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    pub = PUBLISHED[name].params
    rounding = 0.5 if float(pub).is_integer() else 0.05
    assert abs(params - pub) <= max(0.02 * pub, rounding), (params, pub)


@pytest.mark.parametrize("name", [n for n in GMACS_CHECKED if PUBLISHED[n].gmacs is not None])
def test_published_gmacs(name):
    """Within 5 % (the papers count with fvcore / ptflops, which also count norms; we count products only)."""
    _, gmacs = _count(name)
    pub = PUBLISHED[name].gmacs
    assert abs(gmacs - pub) / pub < 0.05, (gmacs, pub)


def test_published_table_covers_every_entrypoint_and_sized_tag():
    names = set(visionlin.list_models())
    assert names <= set(PUBLISHED)
    assert {n for n in PUBLISHED if "." not in n} == names
    assert {n for n in PUBLISHED if "." in n} <= set(CFGS)
    assert {family(n) for n in names} == set(PAPERS)
    assert all(re.fullmatch(r"\d{4}\.\d{5}", p.arxiv) for p in PAPERS.values())


def test_readme_table_rows_match_the_published_numbers():
    """Each README row carries the published top-1 / params / GMACs of _published.py (scripts/model_table.py)."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    start = text.index("<!-- generated by: python scripts/model_table.py -->")
    table = text[start : text.index("\n\n", start)]  # the model table only (other tables name the models too)
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([\w.]+)` \|.*$", table, re.M)}
    assert set(visionlin.list_models()) <= set(rows)
    for name in visionlin.list_models():
        cells = [c.strip() for c in rows[name].strip("|").split("|")]
        pub = PUBLISHED[name]
        want = [f"{v:g}" if v is not None else "–" for v in (pub.top1, pub.params, pub.gmacs)]
        assert cells[-3:] == want, (name, cells)
