"""The two CP-SAT models behind the `ilp` placer, each written as data, variables, constraints, objective, solve.

`partition`  groups replicas of experts into parts (nodes or GPUs) of fixed slot counts under a load cap,
             minimising the co-activation weight of expert pairs that share no part (MoETuner stage 1,
             extended with replicas, co-activation and migration).
`assign`     maps groups onto GPUs one-to-one, minimising cross-part traffic and the busiest
             bandwidth-weighted pair, or maximising overlap with a previous plan (MoETuner stage 2).

Both take integer data (the caller scales), a complete hint, a seed and a deterministic time budget, run one
search worker (so a plan is reproducible for a given seed), and report status, objective and bound.
"""

from __future__ import annotations

import numpy as np
from ortools.sat.python import cp_model

from .partition import PartitionProblem, SolveReport

__all__ = ["partition", "assign", "assignment_objective"]

_STATUS = {
    cp_model.OPTIMAL: "OPTIMAL",
    cp_model.FEASIBLE: "FEASIBLE",
    cp_model.INFEASIBLE: "INFEASIBLE",
    cp_model.MODEL_INVALID: "MODEL_INVALID",
    cp_model.UNKNOWN: "UNKNOWN",
}


def _solve(model: cp_model.CpModel, seed: int, budget: float) -> tuple[cp_model.CpSolver, int]:
    solver = cp_model.CpSolver()
    # One worker and a deterministic time limit make the result a function of the seed, not the clock;
    # the wall limit is a safety net against a slow machine.
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = seed
    solver.parameters.max_deterministic_time = max(budget, 0.01)
    # Generous: hitting it would make the plan depend on machine load (seen on a busy 2-core box).
    solver.parameters.max_time_in_seconds = 60 * budget + 10.0
    return solver, solver.solve(model)


def _split_indicator(model, name: str, e: int, f: int, holds, single: bool, hint_held):
    """A bool that is 1 when experts e and f share none of the parts in `holds` ([n][P] bools)."""
    P = len(holds[e])
    cut = model.new_bool_var(name)
    model.add_hint(cut, int(not (hint_held[e] & hint_held[f]).any()))
    if single:
        # A single-copy pair is split when some part holds one of them but not the other.
        for p in range(P):
            model.add(cut >= holds[e][p] - holds[f][p])
    else:
        # A pair with a replicated expert is together when any part holds both.
        shared = []
        for p in range(P):
            y = model.new_bool_var(f"{name}_y{p}")
            model.add_implication(y, holds[e][p])
            model.add_implication(y, holds[f][p])
            model.add_hint(y, int(hint_held[e, p] and hint_held[f, p]))
            shared.append(y)
        model.add(sum(shared) + cut >= 1)
    return cut


def partition(
    problem: PartitionProblem, hint: np.ndarray, seed: int = 0, budget: float = 1.0
) -> tuple[np.ndarray, SolveReport]:
    """Solve `problem` with CP-SAT from a complete hint [n, P]. Returns counts [n, P] and the report."""
    # Data: n experts with their copies and loads, P parts of `slots` slots under `cap` (see PartitionProblem).
    pb = problem
    n, P = len(pb.replicas), pb.num_parts
    model = cp_model.CpModel()

    # Variables: copies of expert e in part p, and whether part p holds e at all.
    count = [[model.new_int_var(0, min(int(pb.replicas[e]), pb.max_per_part), f"n_{e}_{p}") for p in range(P)]
             for e in range(n)]
    holds = [[model.new_bool_var(f"a_{e}_{p}") for p in range(P)] for e in range(n)]

    # Every replica is placed somewhere.
    for e in range(n):
        model.add(sum(count[e]) == int(pb.replicas[e]))
    # Every part is full: exactly its slot count.
    for p in range(P):
        model.add(sum(count[e][p] for e in range(n)) == pb.slots)
    # No part carries more load than the cap (the balance guarantee against EPLB).
    copy_load = pb.copy_load()
    part_load = [sum(int(copy_load[e, p]) * count[e][p] for e in range(n)) for p in range(P)]
    for p in range(P):
        model.add(part_load[p] <= pb.cap)
    # `holds` is true exactly when at least one copy sits in the part.
    for e in range(n):
        for p in range(P):
            model.add(count[e][p] >= holds[e][p])
            model.add(count[e][p] <= pb.max_per_part * holds[e][p])
    # The copies of a bound expert all lie in one replica group (so its load splits evenly, see above).
    for e in np.flatnonzero(pb.bound_experts()).tolist():
        groups = int(pb.replica_group.max()) + 1
        chosen = [model.new_bool_var(f"g_{e}_{k}") for k in range(groups)]
        model.add_exactly_one(chosen)
        for p in range(P):
            model.add_implication(holds[e][p], chosen[int(pb.replica_group[p])])
        for k in range(groups):
            model.add_hint(chosen[k], int((hint[e, pb.replica_group == k] > 0).any()))

    # Objective: split pairs (their GPU and node terms), rewards and the peak, in the order below.
    objective = []
    single = pb.replicas == 1
    hint_held = hint > 0
    node_holds = None
    if pb.node_of_part is not None and pb.node_penalty and len(pb.pairs):
        # A node holds e when any of its parts does.
        nodes = int(pb.node_of_part.max()) + 1
        node_holds = [[model.new_bool_var(f"b_{e}_{k}") for k in range(nodes)] for e in range(n)]
        hint_node = np.stack([hint_held[:, pb.node_of_part == k].any(1) for k in range(nodes)], 1)
        for e in range(n):
            for k in range(nodes):
                members = [holds[e][p] for p in np.flatnonzero(pb.node_of_part == k)]
                model.add_max_equality(node_holds[e][k], members)
                model.add_hint(node_holds[e][k], int(hint_node[e, k]))
    shared_weight = pb.shared_weight() if len(pb.pairs) else np.zeros(0, np.int64)
    for (e, f), w, w_shared in zip(pb.pairs.tolist(), pb.pair_weight.tolist(), shared_weight.tolist(), strict=True):
        if w <= 0:
            continue
        # Every co-activated pair split across parts costs its weight: a token that chose both is
        # copied to one more GPU.
        both_single = bool(single[e] and single[f])
        if both_single or pb.max_per_part > 1:
            objective.append(w * _split_indicator(model, f"cut_{e}_{f}", e, f, holds, both_single, hint_held))
        else:
            # With replicas on GPUs, each GPU the pair shares saves its share of the weight.
            objective.append(w)
            for p in range(P):
                y = model.new_bool_var(f"y_{e}_{f}_{p}")
                model.add_implication(y, holds[e][p])
                model.add_implication(y, holds[f][p])
                model.add_hint(y, int(hint_held[e, p] and hint_held[f, p]))
                objective.append(-w_shared * y)
        if node_holds is not None:
            # ...and across nodes it costs `node_penalty` times more: that copy crosses the NIC.
            cut_node = _split_indicator(model, f"cutn_{e}_{f}", e, f, node_holds, both_single, hint_node)
            objective.append(pb.node_penalty * w * cut_node)
    if pb.reward is not None:
        # Holding e where it is rewarded: it need not be moved there, or tokens find it where they are.
        objective.extend(-int(pb.reward[e, p]) * holds[e][p] for e in range(n) for p in range(P) if pb.reward[e, p])
    if pb.peak_weight:
        # No pair statistics: minimise the heaviest part (MoETuner's balanced grouping).
        peak = model.new_int_var(0, pb.cap, "peak")
        for p in range(P):
            model.add(part_load[p] <= peak)
        model.add_hint(peak, int(pb.part_loads(hint).max()))
        objective.append(pb.peak_weight * peak)

    model.minimize(sum(objective))
    for e in range(n):
        for p in range(P):
            model.add_hint(count[e][p], int(hint[e, p]))
            model.add_hint(holds[e][p], int(hint[e, p] > 0))

    # Solve from the hint; an answer is kept only when CP-SAT has one (OPTIMAL or FEASIBLE).
    solver, status = _solve(model, seed, budget)
    report = SolveReport(
        _STATUS.get(status, str(status)),
        solver.objective_value if status in (cp_model.OPTIMAL, cp_model.FEASIBLE) else float("nan"),
        solver.best_objective_bound,
        pb.objective(hint),
        solver.wall_time,
    )
    if not report.has_solution:
        return hint.copy(), report
    result = np.array([[solver.value(count[e][p]) for p in range(P)] for e in range(n)], dtype=np.int64)
    return result, report


def assign(
    cost: np.ndarray,
    hint: np.ndarray,
    traffic: np.ndarray | None = None,
    inverse_bandwidth: np.ndarray | None = None,
    bottleneck_weight: int = 0,
    seed: int = 0,
    budget: float = 1.0,
) -> tuple[np.ndarray, SolveReport]:
    """Map C groups one-to-one onto C targets.

    cost [C, C] integer cost of putting group c on target h (cross-part traffic, minus a reward for keeping
    a previous plan's experts in place). With traffic [S, C] (weight each fixed source s sends to group c),
    inverse_bandwidth [S, C] (integer cost per unit on pair s -> h, 0 where no link is used) and a positive
    `bottleneck_weight`, the busiest bandwidth-weighted pair is minimised too (MoETuner's stage-2
    objective). hint [C] target of each group. Returns target [C] and the report.
    """
    C = cost.shape[0]
    model = cp_model.CpModel()

    # Variables: group c goes to target h.
    y = [[model.new_bool_var(f"y_{c}_{h}") for h in range(C)] for c in range(C)]

    # Every group goes to exactly one target, every target takes exactly one group.
    for c in range(C):
        model.add_exactly_one(y[c])
    for h in range(C):
        model.add_exactly_one(y[c][h] for c in range(C))

    objective = [int(cost[c, h]) * y[c][h] for c in range(C) for h in range(C) if cost[c, h]]
    if traffic is not None and inverse_bandwidth is not None and bottleneck_weight > 0:
        # The busiest pair: what target h receives from source s, weighted by 1/bandwidth, is at most `peak`.
        upper = int(np.abs(traffic).sum() * inverse_bandwidth.max()) + 1
        peak = model.new_int_var(0, upper, "peak")
        for s in range(traffic.shape[0]):
            for h in range(C):
                if inverse_bandwidth[s, h]:
                    flow = [int(traffic[s, c]) * y[c][h] for c in range(C) if traffic[s, c]]
                    if flow:
                        model.add(int(inverse_bandwidth[s, h]) * sum(flow) <= peak)
        objective.append(bottleneck_weight * peak)
    model.minimize(sum(objective))
    for c in range(C):
        for h in range(C):
            model.add_hint(y[c][h], int(hint[c] == h))

    solver, status = _solve(model, seed, budget)
    hint_obj = assignment_objective(cost, hint, traffic, inverse_bandwidth, bottleneck_weight)
    report = SolveReport(
        _STATUS.get(status, str(status)),
        solver.objective_value if status in (cp_model.OPTIMAL, cp_model.FEASIBLE) else float("nan"),
        solver.best_objective_bound,
        hint_obj,
        solver.wall_time,
    )
    if not report.has_solution:
        return hint.copy(), report
    target = np.array([next(h for h in range(C) if solver.value(y[c][h])) for c in range(C)], dtype=np.int64)
    return target, report


def assignment_objective(cost, target, traffic=None, inverse_bandwidth=None, bottleneck_weight=0) -> float:
    """The assignment objective of a mapping group -> target, computed directly."""
    C = cost.shape[0]
    total = float(cost[np.arange(C), target].sum())
    if traffic is not None and inverse_bandwidth is not None and bottleneck_weight > 0:
        received = np.zeros((traffic.shape[0], C))
        received[:, target] = traffic
        total += bottleneck_weight * float((received * inverse_bandwidth).max(initial=0))
    return total
