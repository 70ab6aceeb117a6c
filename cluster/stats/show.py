"""What `expertmesh stats show` prints: a per-layer load table and a layer x expert heatmap (rich, stderr).

Per layer: tokens, mean and max load per expert, balancedness = mean / max (1.0 is perfectly even), the
hottest expert and its share of the layer's assignments, and how many experts got nothing.
"""

from __future__ import annotations

import numpy as np
from rich.table import Table
from rich.text import Text

from expertmesh.placement.stats import RoutingStats

__all__ = ["layer_summary", "load_table", "heatmap"]

# Light to dark: a cell's load relative to its layer's mean (1.0 = mean).
_SHADES = " ░▒▓█"


def layer_summary(stats: RoutingStats) -> list[dict]:
    """One dict per layer: layer, mean, max, balancedness, hottest, hottest_share, idle (experts with 0)."""
    rows = []
    for layer, counts in enumerate(np.asarray(stats.counts, dtype=np.float64)):
        total = counts.sum()
        peak = counts.max()
        hot = int(counts.argmax())
        rows.append(
            {
                "layer": layer,
                "mean": float(counts.mean()),
                "max": float(peak),
                "balancedness": float(counts.mean() / peak) if peak > 0 else 1.0,
                "hottest": hot,
                "hottest_share": float(counts[hot] / total) if total > 0 else 0.0,
                "idle": int((counts == 0).sum()),
            }
        )
    return rows


def load_table(stats: RoutingStats, title: str = "") -> Table:
    rows = layer_summary(stats)
    table = Table(title=title or None, header_style="bold")
    for name, justify in (
        ("layer", "right"),
        ("mean", "right"),
        ("max", "right"),
        ("balancedness", "right"),
        ("hottest", "right"),
        ("share", "right"),
        ("idle", "right"),
    ):
        table.add_column(name, justify=justify)
    for r in rows:
        colour = "green" if r["balancedness"] >= 0.8 else "yellow" if r["balancedness"] >= 0.5 else "red"
        table.add_row(
            str(r["layer"]),
            f"{r['mean']:.1f}",
            f"{r['max']:.0f}",
            Text(f"{r['balancedness']:.3f}", style=colour),
            str(r["hottest"]),
            f"{100 * r['hottest_share']:.1f}%",
            str(r["idle"]),
        )
    if rows:
        bal = np.array([r["balancedness"] for r in rows])
        worst = int(bal.argmin())
        table.caption = f"balancedness: mean {bal.mean():.3f}, worst {bal.min():.3f} (layer {worst})"
    return table


def heatmap(stats: RoutingStats, width: int = 64) -> Text:
    """Rows = layers, columns = experts (summed in groups of ceil(E / width) when E > width)."""
    counts = np.asarray(stats.counts, dtype=np.float64)
    L, E = counts.shape
    group = -(-E // max(width, 1))
    cols = -(-E // group)
    padded = np.zeros((L, cols * group))
    padded[:, :E] = counts
    binned = padded.reshape(L, cols, group).sum(axis=2)
    mean = binned.mean(axis=1, keepdims=True)
    rel = np.divide(binned, mean, out=np.zeros_like(binned), where=mean > 0)
    # Shade by load relative to the layer mean: 0, <0.5, <1, <2, >=2 times the mean.
    level = np.digitize(rel, [1e-12, 0.5, 1.0, 2.0])
    text = Text()
    label = f"experts {0}..{E - 1}" + (f", {group} per column" if group > 1 else "")
    text.append(f"load / layer mean ({label}):  ' '=0  ░<0.5  ▒<1  ▓<2  █>=2\n", style="dim")
    for layer in range(L):
        text.append(f"{layer:>4} ")
        text.append("".join(_SHADES[v] for v in level[layer]))
        text.append("\n")
    return text
