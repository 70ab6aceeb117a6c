"""Placing a layer's experts when every (expert, GPU) pair has its own value: an assignment under a load cap.

With its neighbours' placements fixed, a layer's token-follow objective is linear: holding expert e on GPU g
is worth R[e, g] (tokens that arrive on g and want e, plus tokens of e that go on to experts on g). What is
left is a generalised assignment problem: every expert's copies on distinct GPUs, exactly S slots per GPU,
at most `cap` load per GPU. Swapping two experts at a time stalls on it when the cap is tight (moving load
off one GPU needs a chain of moves), so:

1. the cap is priced in (Lagrangian relaxation): holding e on g costs lambda[g] x its load there, and the
   rest, copies to GPUs with exact slot counts, is a transportation problem solved exactly by min-cost
   flow; prices rise on GPUs over the cap and fall on the others (subgradient steps);
2. every priced answer that breaks the cap is repaired by swaps that take load off the heaviest GPU at the
   least value lost per unit of overload removed;
3. the best answer that keeps the cap is returned, with the Lagrangian bound (no plan is worth more).

Pure functions of integer arrays; deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ortools.graph.python import min_cost_flow

__all__ = ["AssignmentResult", "transport", "repair_cap", "assign_under_cap"]

_REPAIR_STEPS_PER_PART = 2
_ITERATIONS = 12


def transport(cost: np.ndarray, replicas: np.ndarray, slots: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """int [n, P] 0/1: the cheapest placement of `replicas[e]` copies of every expert on distinct parts with
    exactly `slots` copies per part, using only `allowed` [n, P] pairs. cost [n, P] int. Min-cost flow:
    experts supply their copies, parts demand their slots, one arc of capacity 1 per allowed pair."""
    n, P = cost.shape
    ok = np.ones((n, P), dtype=bool) if allowed is None else allowed
    tails, heads = np.nonzero(ok)
    flow = min_cost_flow.SimpleMinCostFlow()
    arcs = flow.add_arcs_with_capacity_and_unit_cost(
        tails.astype(np.int64), (n + heads).astype(np.int64), np.ones(len(tails), dtype=np.int64),
        cost[tails, heads].astype(np.int64))
    supplies = np.concatenate([np.asarray(replicas, dtype=np.int64), np.full(P, -slots, dtype=np.int64)])
    flow.set_nodes_supplies(np.arange(n + P, dtype=np.int64), supplies)
    status = flow.solve()
    if status != flow.OPTIMAL:
        raise ValueError(f"transport: no placement with {int(np.sum(replicas))} copies in {P} x {slots} slots "
                         f"over the allowed pairs (min-cost flow status {status})")
    x = np.zeros((n, P), dtype=np.int64)
    x[tails, heads] = flow.flows(arcs)
    return x


def repair_cap(x: np.ndarray, value: np.ndarray, copy_load: np.ndarray, cap: float,
               allowed: np.ndarray | None = None, max_steps: int | None = None) -> np.ndarray | None:
    """Swap copies until no part carries more than `cap`: each step trades a copy on the heaviest part for a
    lighter copy elsewhere (the other part staying under the cap, no expert twice on a part), choosing the
    trade that loses the least value per unit of overload removed. None when no such trade is left."""
    x = x.copy()
    n, P = x.shape
    ok_pair = np.ones((n, P), dtype=bool) if allowed is None else allowed
    loads = (copy_load * x).sum(0).astype(np.float64)
    expert, part = np.nonzero(x)  # one entry per copy (x is 0/1)
    for _ in range(max_steps or _REPAIR_STEPS_PER_PART * P):
        over = loads - cap
        if (over <= 0).all():
            return x
        g = int(np.argmax(over))
        on_g = part == g
        es, fs, hs = expert[on_g], expert[~on_g], part[~on_g]  # copies on g; copies f elsewhere, on h
        leaving = copy_load[es, g][:, None] - copy_load[fs, g][None, :]  # load g sheds
        arriving = copy_load[es][:, hs] - copy_load[fs, hs][None, :]  # load h gains
        ok = (leaving > 0) & (loads[hs][None, :] + arriving <= cap)
        ok &= (x[es][:, hs] == 0) & (x[fs, g] == 0)[None, :]  # no expert twice on one part
        ok &= ok_pair[es][:, hs] & ok_pair[fs, g][None, :]
        if not ok.any():
            return None
        lost = (value[es, g][:, None] + value[fs, hs][None, :] - value[es][:, hs] - value[fs, g][None, :])
        shed = np.where(ok, np.minimum(leaving, over[g]), 1.0)
        score = np.where(ok, (np.maximum(lost, 0) + 1e-9) / shed, np.inf)
        i, j = np.unravel_index(int(np.argmin(score)), score.shape)
        e, f, h = es[i], fs[j], hs[j]
        x[e, g], x[e, h], x[f, h], x[f, g] = 0, 1, 0, 1
        loads[g] -= leaving[i, j]
        loads[h] += arriving[i, j]
        ie, jf = np.flatnonzero(on_g)[i], np.flatnonzero(~on_g)[j]  # positions of the two copies
        part[ie], part[jf] = h, g
    return None


@dataclass(frozen=True)
class AssignmentResult:
    x: np.ndarray | None  # [n, P] the best placement found that keeps the cap (None: none found)
    value: float  # its value, sum of value[e, p] over held pairs
    bound: float  # Lagrangian bound: no placement under the cap is worth more


def assign_under_cap(value: np.ndarray, copy_load: np.ndarray, replicas: np.ndarray, slots: int, cap: float,
                     start: np.ndarray, allowed: np.ndarray | None = None, iterations: int | None = None
                     ) -> AssignmentResult:
    """Maximise sum value[e, p] x[e, p] over placements of `replicas[e]` copies on distinct parts, `slots`
    per part, at most `cap` load (copy_load [n, P]) per part, only on `allowed` pairs. `start` is returned
    when nothing better is found, if it keeps the cap. Subgradient steps of Polyak's size (against the best
    value so far, or the start's), halved every 5 steps."""
    v = value.astype(np.float64)
    w = copy_load.astype(np.float64)
    start_value = float((v * start).sum())
    keeps = bool(((w * start).sum(0) <= cap).all())
    best = start.copy() if keeps else None
    best_value = start_value if keeps else -np.inf
    bound = np.inf
    prices = np.zeros(v.shape[1])
    # Integer costs for the flow: the largest value maps to ~1e6, fine enough to keep the order of options.
    unit = 1e6 / max(float(np.abs(v).max()), 1e-12)
    step = 1.0
    for it in range(iterations or _ITERATIONS):
        x = transport(np.round((prices[None, :] * w - v) * unit).astype(np.int64), replicas, slots, allowed)
        loads = (w * x).sum(0)
        got = float((v * x).sum())
        bound = min(bound, got - float(prices @ (loads - cap)))
        fixed = x if (loads <= cap).all() else repair_cap(x, v, w, cap, allowed)
        if fixed is not None and float((v * fixed).sum()) > best_value:
            best, best_value = fixed, float((v * fixed).sum())
        excess = loads - cap
        norm = float(excess @ excess)
        target = best_value if best is not None else start_value
        if bound - target <= 1e-9 * max(abs(target), 1.0) or norm == 0:
            break
        prices = np.maximum(0.0, prices + step * (bound - target) / norm * excess)
        if it % 5 == 4:
            step /= 2
    return AssignmentResult(best, best_value, float(bound))
