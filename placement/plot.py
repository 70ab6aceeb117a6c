"""Pictures of plans: per-GPU load per layer as heatmaps, one panel per plan, on one fixed colour scale.

Every picture uses the same scale, so panels and files compare at a glance: a GPU's load over its layer's
mean GPU load, on a diverging map centred at 1.0 (white) from 0.5 (blue, idle) to 1.5 (red, a straggler).
Dashed lines mark node boundaries. Balancedness in the titles is the layer's mean GPU load over its
busiest GPU's (1.0 = perfectly even), averaged over layers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .cost import Metrics

__all__ = ["LOAD_SCALE", "plot_formats", "heatmap_figure", "load_heatmaps"]

LOAD_SCALE = (0.5, 1.0, 1.5)  # load / layer mean: low end, centre, high end of every picture's colour map


def plot_formats() -> tuple[str, ...]:
    """File suffixes (without the dot) matplotlib can write here, e.g. png, pdf, svg."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return tuple(sorted(FigureCanvasAgg.get_supported_filetypes()))



def _title(name: str, metrics: Metrics) -> str:
    s = metrics.summary()
    title = f"{name}\nbalance {s['balancedness']:.3f}"
    if math.isfinite(s["copies"]):  # statistics have no per-token traffic
        title += f", copies {s['copies']:.2f}"
    return title


def heatmap_figure(panels: dict[str, Metrics], title: str = "", gpus_per_node: int | None = None):
    """The matplotlib Figure of `load_heatmaps` (one panel per named plan, on the fixed scale `LOAD_SCALE`;
    `gpus_per_node` draws the node boundaries). The caller closes it."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    low, centre, high = LOAD_SCALE
    names = list(panels)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 1, 4.2), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names, strict=True):
        load = panels[name].load
        rel = load / np.maximum(load.mean(1, keepdims=True), 1e-12)
        norm = TwoSlopeNorm(vmin=low, vcenter=centre, vmax=high)
        image = ax.imshow(rel, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
        G = load.shape[1]
        nodes = bool(gpus_per_node) and gpus_per_node < G
        for boundary in range(gpus_per_node, G, gpus_per_node) if nodes else ():
            ax.axvline(boundary - 0.5, color="black", linewidth=1.0, linestyle="--")
        ax.set_title(_title(name, panels[name]), fontsize=9)
        ax.set_xlabel(f"GPU (dashed: nodes of {gpus_per_node})" if nodes else "GPU")
    axes[0][0].set_ylabel("MoE layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="GPU load / layer mean", shrink=0.9, extend="both")
    note = "balance = mean / max GPU load per layer, averaged over layers"
    fig.suptitle(f"{title}\n{note}" if title else note, fontsize=9, y=1.06)
    return fig


def load_heatmaps(panels: dict[str, Metrics], path: str | Path, title: str = "", gpus_per_node: int | None = None
                  ) -> None:
    """Write `heatmap_figure` to `path`, in the format its suffix names."""
    fig = heatmap_figure(panels, title, gpus_per_node)  # (selects the Agg backend before pyplot loads here)
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
