"""What the authors published for each family and named configuration: the paper, ImageNet-1k top-1, parameters and
FLOPs. The README's model table (``scripts/model_table.py``) and the tests (``tests/test_pretrained_cfgs.py``) read it.

FLOPs as the papers give them are multiply-accumulates (fvcore / ptflops convention), so they compare with our GMACs.
``None`` where the authors published nothing for that configuration.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["PAPERS", "PUBLISHED", "Paper", "Published", "family"]


class Paper(NamedTuple):
    title: str
    arxiv: str
    venue: str


class Published(NamedTuple):
    top1: float | None  # ImageNet-1k top-1 (%)
    params: float | None  # millions
    gmacs: float | None  # at the configuration's input size
    source: str  # where the numbers are published


PAPERS: dict[str, Paper] = {
    "infvit": Paper("Infinite Self-Attention", "2603.00175", "Roffo & Palmer 2026"),
    "infvit_pure": Paper("Infinite Self-Attention", "2603.00175", "Roffo & Palmer 2026"),
    "flatten": Paper(
        "FLatten Transformer: Vision Transformer using Focused Linear Attention", "2308.00442", "ICCV 2023"
    ),
    "agent": Paper("Agent Attention: On the Integration of Softmax and Linear Attention", "2312.08874", "ECCV 2024"),
    "inline": Paper("Bridging the Divide: Reconsidering Softmax and Linear Attention", "2412.06590", "NeurIPS 2024"),
    "nat": Paper("Neighborhood Attention Transformer", "2204.07143", "CVPR 2023"),
    "dinat": Paper("Dilated Neighborhood Attention Transformer", "2209.15001", "2022"),
    "mambavision": Paper("MambaVision: A Hybrid Mamba-Transformer Vision Backbone", "2407.08083", "CVPR 2025"),
    "vig": Paper(
        "ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention", "2405.18425", "AAAI 2025"
    ),
    "mavit": Paper("Rectifying Magnitude Neglect in Linear Attention", "2507.00698", "ICCV 2025"),
    "ravlt": Paper("Breaking the Low-Rank Dilemma of Linear Attention", "2411.07635", "CVPR 2025"),
    "nalaformer": Paper(
        "Norm x Direction: Restoring the Missing Query Norm in Vision Linear Attention", "2506.21137", "ICML 2026"
    ),
}

_NAT = "SHI-Labs/Neighborhood-Attention-Transformer classification/NAT.md"
_DINAT = "SHI-Labs/Neighborhood-Attention-Transformer classification/DiNAT.md"
_MV = "NVlabs/MambaVision README"
_VIG = "hustvl/ViG README (params rounded to 1M; no FLOPs there)"
_FL = "LeapLabTHU/FLatten-Transformer README + paper"
_AG = "LeapLabTHU/Agent-Attention agent_transformer/README.md"
_IN = "LeapLabTHU/InLine README"
_MA = "qhfan/MALA: MAViT-S from the ICCV 2025 abstract; T/B/L top-1 from the paper's table via third-party notes"
_RA = "qhfan/RALA README"
_NA = "ZacharyMeng/NaLaFormer README / MODEL_ZOO.md"
_IV = "giorgioroffo/infinite-self-attention README: its InfViT models (4 / 24 layers) are not these configurations"

PUBLISHED: dict[str, Published] = {
    "nat_mini": Published(81.8, 20, 2.7, _NAT),
    "nat_tiny": Published(83.2, 28, 4.3, _NAT),
    "nat_small": Published(83.7, 51, 7.8, _NAT),
    "nat_base": Published(84.3, 90, 13.7, _NAT),
    "dinat_mini": Published(81.8, 20, 2.7, _DINAT),
    "dinat_tiny": Published(82.7, 28, 4.3, _DINAT),
    "dinat_small": Published(83.8, 51, 7.8, _DINAT),
    "dinat_base": Published(84.4, 90, 13.7, _DINAT),
    "dinat_large": Published(86.6, 200, 30.6, _DINAT + " (ImageNet-22k pretrained)"),
    "dinat_large.in22k_ft_in1k_384": Published(87.4, 200, 89.7, _DINAT + " (ImageNet-22k pretrained)"),
    "mambavision_tiny": Published(82.3, 31.8, 4.4, _MV),
    "mambavision_tiny2": Published(82.7, 35.1, 5.1, _MV),
    "mambavision_small": Published(83.3, 50.1, 7.5, _MV),
    "mambavision_base": Published(84.2, 97.7, 15.0, _MV),
    "mambavision_base.in21k_ft_in1k": Published(84.9, 97.7, 15.0, _MV),
    "mambavision_large": Published(85.0, 227.9, 34.9, _MV),
    "mambavision_large.in21k_ft_in1k": Published(86.1, 227.9, 34.9, _MV),
    "mambavision_large2": Published(85.3, 241.5, 37.5, _MV),
    "mambavision_large2.in21k_ft_in1k_512": Published(87.3, 241.5, 196.3, _MV),
    "vig_tiny": Published(77.2, 6, None, _VIG),
    "vig_small": Published(81.7, 23, None, _VIG),
    "vig_base": Published(82.6, 89, None, _VIG),
    "flatten_deit_tiny": Published(74.1, 6.1, 1.1, "FLatten paper (no DeiT code or weights released)"),
    "flatten_deit_small": Published(None, None, None, "FLatten paper (no DeiT code or weights released)"),
    "flatten_pvt_tiny": Published(77.8, 12.2, 2.0, _FL),
    "flatten_pvt_small": Published(81.7, 21.7, 4.0, _FL),
    "flatten_pvt_medium": Published(None, None, 7.0, _FL + " (figure only)"),
    "flatten_pvt_large": Published(None, None, None, _FL),
    "flatten_swin_tiny": Published(82.1, 29, 4.5, _FL),
    "flatten_swin_small": Published(83.5, 51, 8.7, _FL),
    "flatten_swin_base": Published(83.8, 89, 15.4, _FL),
    "flatten_swin_base.in1k_384": Published(85.0, 91, 46.5, _FL),
    "agent_deit_tiny": Published(74.9, 6.0, 1.2, _AG),
    "agent_deit_small": Published(80.5, 22.7, 4.4, _AG),
    "agent_deit_small.in1k_448": Published(83.1, 23.1, 17.7, _AG),
    "agent_deit_base": Published(82.0, 87.2, 17.6, _AG),
    "agent_pvt_tiny": Published(78.4, 11.6, 2.0, _AG),
    "agent_pvt_small": Published(82.2, 20.6, 4.0, _AG),
    "agent_pvt_medium": Published(83.4, 35.9, 7.0, _AG),
    "agent_pvt_medium.in1k_256": Published(83.8, 36.1, 9.2, _AG),
    "agent_pvt_large": Published(83.7, 48.7, 10.4, _AG),
    "agent_swin_tiny": Published(82.6, 29, 4.5, _AG),
    "agent_swin_small": Published(83.7, 50, 8.7, _AG),
    "agent_swin_small.in1k_288": Published(84.1, 50, 14.6, _AG),
    "agent_swin_base": Published(84.0, 88, 15.4, _AG),
    "agent_swin_base.in1k_384": Published(84.9, 88, 46.3, _AG),
    "inline_deit_tiny": Published(74.5, 6.5, 1.1, _IN),
    "inline_deit_small": Published(80.2, 16.7, 5.0, _IN + " (at 288 px)"),
    "inline_deit_base": Published(82.3, 23.8, 17.2, _IN + " (at 448 px)"),
    "mavit_tiny": Published(82.9, 16, 2.5, _MA),
    "mavit_small": Published(84.7, 27, 4.6, _MA),
    "mavit_base": Published(85.7, 50, 9.9, _MA),
    "mavit_large": Published(86.0, 98, 16.1, _MA),
    "ravlt_tiny": Published(82.8, 15, 2.4, _RA),
    "ravlt_small": Published(84.4, 26, 4.6, _RA),
    "ravlt_base": Published(85.5, 48, 9.9, _RA),
    "ravlt_large": Published(85.8, 95, 16.0, _RA),
    "nalaformer_tiny": Published(82.6, 15, 2.7, _NA),
    "nalaformer_small": Published(84.3, 26, 5.1, _NA),
    "nalaformer_base": Published(85.2, 52, 12.0, _NA),
    "nalaformer_large": Published(85.7, 95, 18.0, _NA),
    **{f"infvit{p}_{s}": Published(None, None, None, _IV) for p in ("", "_pure") for s in ("tiny", "small", "base")},
}


def family(name: str) -> str:
    """The :data:`PAPERS` key of an entrypoint (``'agent_swin_base'`` -> ``'agent'``)."""
    return "infvit_pure" if name.startswith("infvit_pure") else name.split("_")[0]
