"""Pictures of plans: per-GPU load per layer as a heatmap (1.0 = the layer's mean GPU load)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .cost import Metrics

__all__ = ["load_heatmaps"]


def load_heatmaps(panels: dict[str, Metrics], path: str | Path, title: str = "") -> None:
    """One heatmap per named plan, side by side, on a shared colour scale; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    names = list(panels)
    rel = {n: m.load / np.maximum(m.load.mean(1, keepdims=True), 1e-12) for n, m in panels.items()}
    vmax = max(2.0, max(float(r.max()) for r in rel.values()))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 1, 4.2), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names, strict=True):
        image = ax.imshow(rel[name], aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        s = panels[name].summary()
        ax.set_title(f"{name}\nbalance {s['balancedness']:.3f}, copies {s['copies']:.2f}", fontsize=9)
        ax.set_xlabel("GPU")
    axes[0][0].set_ylabel("MoE layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="load / layer mean", shrink=0.9)
    if title:
        fig.suptitle(title, fontsize=10, y=1.04)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
