"""The plan `ilp` returns by default: layer by layer, its own arrangement or EPLB's, whichever the cost
model predicts faster on the routing data, so its predicted step time is never above EPLB's.

In the home dataflow a layer's time (compute + dispatch + combine) depends on that layer alone, so the
per-layer minimum is exact. In token-follow, layer l's tokens arrive from their top-1 expert's GPU in
layer l-1, so its time depends on both choices: a shortest path over (layer, choice) finds the best mix,
which is then scored in full (with replicas a token's GPU also depends on earlier layers) and kept only if
it beats both whole plans.
"""

from __future__ import annotations

import numpy as np

from ..cost import CostParams, evaluate
from ..plan import Placement
from ..solver_report import StepChoice
from ..topology import Topology
from ..trace import Trace

__all__ = ["choose_by_step"]


def _layer_seconds(trace: Trace, rows: np.ndarray, like: Placement, topology: Topology, params: CostParams,
                   dataflow: str) -> np.ndarray:
    """float [L]: every layer's predicted compute + dispatch + combine seconds for phy2log `rows`."""
    plan = Placement(rows, like.num_gpus, like.num_nodes, like.num_experts)
    m = evaluate(trace, plan, topology, params, dataflow)
    return m.compute_s + m.dispatch_s + m.combine_s


def _follow_choice(trace, ours, theirs, a, b, topology, params) -> np.ndarray:
    """bool [L]: the shortest path over (layer, ours|theirs), layer l's time given layers l-1 and l."""
    L = len(a)
    even = np.arange(L) % 2 == 0
    mixes = [np.where(even[:, None], x.phy2log, y.phy2log) for x, y in ((ours, theirs), (theirs, ours))]
    c, d = (_layer_seconds(trace, rows, ours, topology, params, "follow") for rows in mixes)
    # time[l][p][q]: layer l with layer l-1 on choice p and layer l on q (0 ours, 1 theirs); the four plans
    # scored above hold every (p, q) for every layer (c: even layers ours, odd theirs; d: the other way).
    cost = np.empty((L, 2, 2))
    cost[:, 0, 0], cost[:, 1, 1] = a, b
    cost[:, 1, 0] = np.where(even, c, d)  # previous theirs, this one ours
    cost[:, 0, 1] = np.where(even, d, c)
    total, back = np.array([a[0], b[0]]), []
    for layer in range(1, L):
        step = total[:, None] + cost[layer]  # [p, q]
        back.append(np.argmin(step, axis=0))  # ties keep ours (index 0)
        total = step.min(axis=0)
    choice = [int(np.argmin(total))]
    for prev in reversed(back):
        choice.append(int(prev[choice[-1]]))
    return np.array(choice[::-1], dtype=bool)


def choose_by_step(trace: Trace, ours: Placement, theirs: Placement, topology: Topology, params: CostParams,
                   dataflow: str) -> tuple[np.ndarray, StepChoice]:
    """phy2log [L, R] taking each layer from `ours` or `theirs` (EPLB's), the faster by predicted step time,
    and the record of that choice. Ties keep ours."""
    a = _layer_seconds(trace, ours.phy2log, ours, topology, params, dataflow)
    b = _layer_seconds(trace, theirs.phy2log, ours, topology, params, dataflow)
    if dataflow == "home":
        pick = b < a
        step = float(np.minimum(a, b).sum())
    else:
        pick = _follow_choice(trace, ours, theirs, a, b, topology, params)
        rows = np.where(pick[:, None], theirs.phy2log, ours.phy2log)
        step = float(_layer_seconds(trace, rows, ours, topology, params, dataflow).sum())
        if step >= min(a.sum(), b.sum()):  # the mix must beat both whole plans (replicas break exactness)
            pick = np.full(len(a), b.sum() < a.sum())
            step = float(min(a.sum(), b.sum()))
    rows = np.where(pick[:, None], theirs.phy2log, ours.phy2log)
    choice = StepChoice(layers_from_eplb=tuple(int(i) for i in np.flatnonzero(pick)), step_ms=step * 1e3,
                        solver_step_ms=float(a.sum()) * 1e3, eplb_step_ms=float(b.sum()) * 1e3)
    return rows, choice
