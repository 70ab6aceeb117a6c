"""The plan `ilp` returns by default (objective "step"): the solver's plan, with as few of its layers
replaced by EPLB's as it takes for the cost model to predict a step time no slower than EPLB's.

The solver minimises traffic under the balance cap; on compute-bound layers EPLB's arrangement can still be
predicted faster. When the solver's whole plan is predicted no slower than EPLB's, it is returned as is.
Otherwise, in the home dataflow a layer's time (compute + dispatch + combine) depends on that layer alone:
layers are taken from EPLB's plan, the most time saved per copy given up first, until the total is no
slower than EPLB's (taking every faster layer gets there, so the promise always holds). In token-follow,
layer l's tokens arrive from their top-1 expert's GPU in layer l-1, so its time depends on both choices: a
shortest path over (layer, choice) gives the fastest mix, which is scored in full (with replicas a token's
GPU also depends on earlier layers) and kept only if it is no slower than EPLB's whole plan.
"""

from __future__ import annotations

import numpy as np

from ..cost import CostParams, evaluate
from ..plan import Placement
from ..solver_report import StepChoice
from ..topology import Topology
from ..trace import Trace

__all__ = ["choose_by_step"]


def _scores(trace: Trace, rows: np.ndarray, like: Placement, topology: Topology, params: CostParams,
            dataflow: str) -> tuple[np.ndarray, np.ndarray]:
    """float [L] each: every layer's predicted compute + dispatch + combine seconds, and copies per token."""
    plan = Placement(rows, like.num_gpus, like.num_nodes, like.num_experts)
    m = evaluate(trace, plan, topology, params, dataflow)
    return m.compute_s + m.dispatch_s + m.combine_s, m.copies


def _home_choice(a: np.ndarray, b: np.ndarray, own_copies: np.ndarray, eplb_copies: np.ndarray) -> np.ndarray:
    """bool [L]: the fewest layers taken from EPLB, most seconds saved per copy given up first, that bring
    the total time down to EPLB's."""
    saving = a - b
    lost = np.maximum(eplb_copies - own_copies, 1e-12)
    pick = np.zeros(len(a), dtype=bool)
    excess = a.sum() - b.sum()
    for layer in sorted(np.flatnonzero(saving > 0), key=lambda layer: (-saving[layer] / lost[layer], layer)):
        if excess <= 0:
            break
        pick[layer] = True
        excess -= saving[layer]
    return pick


def _follow_choice(trace, ours, theirs, a, b, topology, params) -> np.ndarray:
    """bool [L]: the fastest mix by a shortest path over (layer, ours|theirs), layer l's time given l-1's."""
    L = len(a)
    even = np.arange(L) % 2 == 0
    mixes = [np.where(even[:, None], x.phy2log, y.phy2log) for x, y in ((ours, theirs), (theirs, ours))]
    c, d = (_scores(trace, rows, ours, topology, params, "follow")[0] for rows in mixes)
    # time[l][p][q]: layer l with layer l-1 on choice p and layer l on q (0 ours, 1 theirs); the four plans
    # scored hold every (p, q) for every layer (c: even layers ours, odd theirs; d: the other way).
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
    """phy2log [L, R]: `ours` with layers from `theirs` (EPLB's) where needed to predict a step time no
    slower than theirs (module docstring), and the record of that choice."""
    a, own_copies = _scores(trace, ours.phy2log, ours, topology, params, dataflow)
    b, eplb_copies = _scores(trace, theirs.phy2log, ours, topology, params, dataflow)
    pick = np.zeros(len(a), dtype=bool)
    step = float(a.sum())
    if step > b.sum() and dataflow == "home":
        pick = _home_choice(a, b, own_copies, eplb_copies)
        step = float(np.where(pick, b, a).sum())
    elif step > b.sum():
        pick = _follow_choice(trace, ours, theirs, a, b, topology, params)
        rows = np.where(pick[:, None], theirs.phy2log, ours.phy2log)
        step = float(_scores(trace, rows, ours, topology, params, dataflow)[0].sum())
        if step > b.sum():  # with replicas the mix is not exact: then EPLB's whole plan
            pick, step = np.ones(len(a), dtype=bool), float(b.sum())
    rows = np.where(pick[:, None], theirs.phy2log, ours.phy2log)
    choice = StepChoice(layers_from_eplb=tuple(int(i) for i in np.flatnonzero(pick)), step_ms=step * 1e3,
                        solver_step_ms=float(a.sum()) * 1e3, eplb_step_ms=float(b.sum()) * 1e3)
    return rows, choice
