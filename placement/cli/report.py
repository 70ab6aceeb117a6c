"""What the planning commands print: one row of figures per plan, shown as a table with a legend on stderr
(metrics down the side, plans across, so it fits 80 columns), as `key=value` lines, or as JSON."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from ..cost import Metrics
from ..plan import Placement

__all__ = ["err", "plan_row", "table", "legend", "tsv_lines", "print_json", "fmt", "ROWS"]

# Tables and notes on stderr: wide enough for the table when stderr is a file or a pipe; soft_wrap keeps
# messages on one line (grep-able paths and URLs).
err = Console(stderr=True, width=None if sys.stderr.isatty() else 150, soft_wrap=True)

# (key, label, digits): the table's rows, in order.
ROWS = [
    ("balancedness", "balance (mean/max)", 3), ("balancedness_worst", "worst layer balance", 3),
    ("expected_balancedness", "expected held-out balance", 3),
    ("heldout_balancedness", "held-out balance", 3), ("heldout_copies", "held-out copies", 3),
    ("heldout_step_ms", "held-out step ms", 2),
    ("copies", "copies per token", 3), ("internode_copies", "internode per token", 3),
    ("busiest_link_mb", "busiest port MB", 2), ("follow_cross", "follow cross", 3), ("step_ms", "step ms", 2),
    ("colocated_replicas", "co-located copies", 0), ("solve_s", "solve s", 2), ("gap", "solver gap", 3),
]

LEGEND = (
    "balance: mean / max GPU load per layer (1 = even), averaged over layers.",
    "copies: GPUs other than its own that a token is sent to, per layer;",
    "  internode: other nodes. step ms: predicted compute + dispatch + combine",
    "  over all layers (cost model; n/a without per-token data).",
    "co-located copies: copies of an expert on a GPU that already holds it",
    "  (they serve no token).",
    "expected held-out balance: mean over sequence-level resamples of the",
    "  trace, spread as a second sample would be (traces only), an expert's",
    "  tokens split evenly over its copies; balance routes each token by the",
    "  runtime's replica rule, so on a short trace with replicas it can read",
    "  lower. held-out: the plan scored on --held-out or --split's other part.",
    "solver gap: ilp's (objective - bound) / objective, summed over its",
    "  subproblems in their own units; 0 proves each subproblem optimal. It",
    "  measures the solve, not the plan: compare plans on the rows above.",
)


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return str(int(value))
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def plan_row(plan: Placement, metrics: Metrics, solve_s: float) -> dict:
    """Every figure of one plan on one data set: the cost model's summary plus the plan's own."""
    solver = plan.solver
    return {**metrics.summary(), "colocated_replicas": plan.colocated_replicas, "solve_s": solve_s,
            "gap": solver.gap if solver else float("nan"), "status": solver.status if solver else None,
            "version": plan.version}


def table(rows: dict[str, dict], title: str) -> Table:
    """Metrics down, plans across: four placers fit in 80 columns without truncating a name or a value."""
    out = Table(title=title, title_style="bold", header_style="bold cyan", box=box.SIMPLE_HEAD, pad_edge=False)
    out.add_column("", no_wrap=True)
    for name in rows:
        out.add_column(name, justify="right", no_wrap=True)
    for key, label, digits in _shown(rows):
        out.add_row(label, *(fmt(row.get(key, float("nan")), digits) for row in rows.values()))
    return out


def _shown(rows: dict[str, dict]) -> list[tuple[str, str, int]]:
    """The table's rows that some plan has a figure for (held-out rows only with held-out data)."""
    return [r for r in ROWS if any(r[0] in row for row in rows.values())]


def legend() -> str:
    """The table's legend, lines under 80 columns (print with highlight=False)."""
    return "\n".join(f"[dim]{line}[/]" for line in LEGEND)


def tsv_lines(rows: dict[str, dict]) -> list[str]:
    """One line per plan: its name, then tab-separated key=value figures (for scripts and pipes)."""
    return [name + "\t" + "\t".join(f"{key}={fmt(row.get(key), 4)}" for key, _, _ in _shown(rows))
            for name, row in rows.items()]


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def print_json(doc) -> None:
    sys.stdout.write(json.dumps(_jsonable(doc), indent=1) + "\n")
