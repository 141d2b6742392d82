"""Print the README's model table: name, mechanism, params, GMACs at 224 px and at the training size, source paper,
the authors' published top-1 / params / GMACs (``visionlin/models/_published.py``), and the papers' table.

MACs are counted by :func:`visionlin.model_complexity` (``torch.utils.flop_counter.FlopCounterMode`` on fake tensors:
matrix products, attention (SDPA included) and convolutions; element-wise work is not counted), so a model whose
authors' counter left the softmax-attention products out (MAViT, RAVLT, NaLaFormer, MambaVision) shows a few percent
above its published GMACs.

Usage: python scripts/model_table.py [--markdown docs/models/table.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm

import visionlin
from visionlin.models._published import PAPERS as PUBLISHED_PAPERS
from visionlin.models._published import PUBLISHED

PAPERS = {
    "infvit": ("Linear InfSA", "[Roffo & Palmer 2026](https://arxiv.org/abs/2603.00175)"),
    "infvit_pure": ("pure InfSA (O(N²))", "[Roffo & Palmer 2026](https://arxiv.org/abs/2603.00175)"),
    "flatten": ("focused linear (FLatten)", "[Han et al., ICCV 2023](https://arxiv.org/abs/2308.00442)"),
    "agent": ("agent attention", "[Han et al., ECCV 2024](https://arxiv.org/abs/2312.08874)"),
    "inline": ("injective linear (InLine)", "[Han et al., NeurIPS 2024](https://arxiv.org/abs/2412.06590)"),
    "nat": ("neighborhood attention 7x7 + rpb", "[Hassani et al., CVPR 2023](https://arxiv.org/abs/2204.07143)"),
    "dinat": ("dilated neighborhood attention 7x7 + rpb", "[Hassani & Shi 2022](https://arxiv.org/abs/2209.15001)"),
    "mambavision": (
        "selective scan (Mamba) + softmax, windows",
        "[Hatamizadeh & Kautz, CVPR 2025](https://arxiv.org/abs/2407.08083)",
    ),
    "vig": ("bidirectional gated linear attention", "[Liao et al., AAAI 2025](https://arxiv.org/abs/2405.18425)"),
    "mavit": (
        "magnitude-aware linear (MALA) + RoPE softmax",
        "[Fan et al., ICCV 2025](https://arxiv.org/abs/2507.00698)",
    ),
    "ravlt": (
        "rank-augmented linear (RALA) + RoPE softmax",
        "[Fan et al., CVPR 2025](https://arxiv.org/abs/2411.07635)",
    ),
    "nalaformer": ("norm-aware linear (NaLa) + RoPE softmax", "[Meng et al. 2025](https://arxiv.org/abs/2506.21137)"),
}


# Swin variants: the linear mixer in the early stages, shifted-window softmax (7x7, relative position bias) after.
SWIN_LATE = {
    "flatten_swin_tiny": " (stages 1-2) + window softmax",
    "flatten_swin_small": " (stages 1-2) + window softmax",
    "flatten_swin_base": " (stages 1-2) + window softmax",
    "agent_swin_tiny": " (stages 1-3) + window softmax",
    "agent_swin_small": " (stages 1-2) + window softmax",
    "agent_swin_base": " (stages 1-2, first 2 blocks of stage 3) + window softmax",
}


def _family(name: str) -> str:
    return "infvit_pure" if name.startswith("infvit_pure") else name.split("_")[0]


def row(name: str) -> dict:
    model = timm.create_model(name).eval()
    size = model.pretrained_cfg["input_size"][-1]
    params = sum(p.numel() for p in model.parameters())
    gmacs = {s: visionlin.model_complexity(model, s)["gmacs"] for s in {224, size}}  # attention products included
    mechanism, paper = PAPERS[_family(name)]
    weights = "yes" if model.pretrained_cfg.get("url") or model.pretrained_cfg.get("hf_hub_id") else "no"
    if name == "agent_deit_base":
        mechanism += " (blocks 1-4) + softmax"
    mechanism += SWIN_LATE.get(name, "")
    return dict(
        name=name,
        mechanism=mechanism,
        params=params / 1e6,
        gmacs=gmacs[224],
        gmacs_native=gmacs[size],
        size=size,
        paper=paper,
        weights=weights,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    lines = [
        "| model | mechanism | params (M) | GMACs @224 | trained at | GMACs there | authors' weights | paper | "
        "published top-1 | published params (M) | published GMACs |",
        "|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for name in visionlin.list_models():
        r = row(name)
        pub = " | ".join(f"{v:g}" if v is not None else "–" for v in PUBLISHED[name][:3])
        lines.append(
            f"| `{r['name']}` | {r['mechanism']} | {r['params']:.1f} | {r['gmacs']:.2f} | {r['size']} | "
            f"{r['gmacs_native']:.2f} | "
            f"{r['weights']} | {r['paper']} | {pub} |"
        )
    lines += ["", "Papers (the `paper` column):", "", "| family | paper | arXiv |", "|---|---|---|"]
    for fam in sorted({_family(n) for n in visionlin.list_models()}):
        paper = PUBLISHED_PAPERS[fam]
        lines.append(
            f"| `{fam}_*` | {paper.title} ({paper.venue}) | [{paper.arxiv}](https://arxiv.org/abs/{paper.arxiv}) |"
        )
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
