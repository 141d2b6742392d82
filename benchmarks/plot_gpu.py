"""Plot ``scripts/gpu_sanity.py`` results: inference img/s relative to the dense DeiT twin at 224 and 1024 px.

Usage: python -m benchmarks.plot_gpu benchmarks/results/h100/gpu_sanity_reference_kernels.json
Writes the PNG next to the JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    rows = {k: v for k, v in data["throughput"].items() if "ratio_vs_twin" in v}
    names = sorted({k.split("@")[0] for k in rows})
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.4
    for j, size in enumerate(("224", "1024")):
        vals = [rows.get(f"{n}@{size}", {}).get("ratio_vs_twin", 0.0) for n in names]
        ax.bar([i + (j - 0.5) * width for i in range(len(names))], vals, width, label=f"{size} px")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("img/s relative to dense DeiT twin")
    ax.legend()
    ax.set_title(
        f"{data['gpu']} | torch {data['versions']['torch']} | commit {data['commit'][:8]} | {data['date']}", fontsize=9
    )
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(plot(Path(sys.argv[1])))
