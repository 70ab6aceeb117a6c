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

from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

__all__ = ["SolveReport", "PartitionProblem", "partition", "assign", "assignment_objective"]

_STATUS = {
    cp_model.OPTIMAL: "OPTIMAL",
    cp_model.FEASIBLE: "FEASIBLE",
    cp_model.INFEASIBLE: "INFEASIBLE",
    cp_model.MODEL_INVALID: "MODEL_INVALID",
    cp_model.UNKNOWN: "UNKNOWN",
}


@dataclass(frozen=True)
class SolveReport:
    status: str
    objective: float
    bound: float
    hint_objective: float
    wall_s: float

    @property
    def has_solution(self) -> bool:
        return self.status in ("OPTIMAL", "FEASIBLE")


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


@dataclass(frozen=True)
class PartitionProblem:
    """Place every replica of n experts into P parts (GPUs, or nodes of several GPUs).

    replicas [n] copies of each expert to place; load [n] integer load of one copy. Every part takes exactly
    `slots` copies, at most `max_per_part` copies of one expert (its distinct GPUs) and at most `cap` load.
    pairs [m, 2] expert index pairs with integer weights pair_weight [m]: a pair whose experts share no part
    costs its weight. node_of_part [P] (optional) groups parts into nodes; a pair sharing no node costs
    `node_penalty` times its weight on top. reward [n, P] (optional) is subtracted for every part that holds
    the expert: a previous plan's placement (migration saved) or the GPUs a layer's tokens arrive from
    (token-follow). `peak_weight` > 0 adds the heaviest part's load (used when there are no pairs).
    replica_group [P] (optional) groups parts (a node's GPUs; or each node by itself when parts are nodes):
    the copies of an expert that fit in one group must all lie in one group. The replica rule sends a token
    to a replica on its own node first, so copies spread unevenly over nodes would not share the expert's
    load evenly; kept in one node, they do (EPLB's hierarchical policy does the same).
    load_at [n, P] (optional) replaces `load` where a copy's load depends on its part: in the token-follow
    dataflow a replica serves the tokens already on its GPU first, so it carries more where they arrive.
    """

    replicas: np.ndarray
    load: np.ndarray
    num_parts: int
    slots: int
    max_per_part: int
    cap: int
    pairs: np.ndarray
    pair_weight: np.ndarray
    node_of_part: np.ndarray | None = None
    node_penalty: int = 0
    reward: np.ndarray | None = None
    peak_weight: int = 0
    replica_group: np.ndarray | None = None
    load_at: np.ndarray | None = None

    def copy_load(self) -> np.ndarray:
        """int [n, P]: the load one copy of each expert adds to each part."""
        if self.load_at is not None:
            return self.load_at
        return np.broadcast_to(self.load[:, None], (len(self.load), self.num_parts))

    def bound_experts(self) -> np.ndarray:
        """bool [n]: experts whose copies must share one replica group."""
        if self.replica_group is None:
            return np.zeros(len(self.replicas), dtype=bool)
        group_size = np.bincount(self.replica_group).min() * self.max_per_part
        return (self.replicas > 1) & (self.replicas <= group_size)

    def part_loads(self, x: np.ndarray) -> np.ndarray:
        return (self.copy_load() * x).sum(0)

    def feasible(self, x: np.ndarray) -> bool:
        ok = bool(
            (x.sum(1) == self.replicas).all() and (x.sum(0) == self.slots).all()
            and (x <= self.max_per_part).all() and (self.part_loads(x) <= self.cap).all()
        )
        bound = self.bound_experts()
        if ok and bound.any():
            groups = int(self.replica_group.max()) + 1
            held = np.stack([(x[bound][:, self.replica_group == k] > 0).any(1) for k in range(groups)], 1)
            ok = bool((held.sum(1) == 1).all())
        return ok

    def objective(self, x: np.ndarray) -> float:
        """The objective of an assignment [n, P], computed directly (for hints and checks)."""
        held = x > 0
        total = float(self.peak_weight * self.part_loads(x).max()) if self.peak_weight else 0.0
        if len(self.pairs):
            a, b = self.pairs[:, 0], self.pairs[:, 1]
            shared = (held[a] & held[b]).sum(1)
            if self.max_per_part == 1:
                # GPUs: an expert's tokens split evenly over its replicas, so a pair meets with probability
                # shared GPUs / (replicas of e x replicas of f); 0 or 1 when neither is replicated.
                total += float(np.sum(self.pair_weight - self._shared_weight() * shared))
            else:  # nodes: a token reaches a replica on its own node first, so any shared node counts
                total += float(self.pair_weight @ (shared == 0))
            if self.node_of_part is not None and self.node_penalty:
                nodes = int(self.node_of_part.max()) + 1
                on = np.stack([held[:, self.node_of_part == k].any(1) for k in range(nodes)], 1)
                total += self.node_penalty * float(self.pair_weight @ ~(on[a] & on[b]).any(1))
        if self.reward is not None:
            total -= float((self.reward * held).sum())
        return total

    def _shared_weight(self) -> np.ndarray:
        """int [m]: what each GPU shared by a pair saves, w / (replicas of e x replicas of f)."""
        copies = self.replicas[self.pairs[:, 0]] * self.replicas[self.pairs[:, 1]]
        return np.round(self.pair_weight / copies).astype(np.int64)


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
    shared_weight = pb._shared_weight() if len(pb.pairs) else np.zeros(0, np.int64)
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
