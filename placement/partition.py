"""The partition problem behind every `ilp` subproblem, and what solving one reports (no solver here).

A `PartitionProblem` places every copy of n experts into P parts (GPUs, or nodes of several GPUs) of fixed
slot counts under a load cap, pricing co-activated pairs that share no part. The greedy and local search of
`local_search.py`, the priced assignment of `assignment.py` and the CP-SAT model of `cpsat_models.py` all
solve it; `SolveReport` is what each of them says about its answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PartitionProblem", "SolveReport"]


@dataclass(frozen=True)
class SolveReport:
    """One subproblem's outcome: status (OPTIMAL, FEASIBLE, NO_SOLUTION or CP-SAT's), the objective of the
    answer, a lower bound on the optimum, the objective of the arrangement it started from, wall seconds."""

    status: str
    objective: float
    bound: float
    hint_objective: float
    wall_s: float

    @property
    def has_solution(self) -> bool:
        return self.status in ("OPTIMAL", "FEASIBLE")


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

    def group_mask(self, hint: np.ndarray) -> np.ndarray | None:
        """bool [n, P]: where each expert's copies may go so that a bound expert stays in the replica group
        of its first copy in `hint` (None when no expert is bound)."""
        bound = self.bound_experts()
        if not bound.any():
            return None
        group_of = self.replica_group[np.argmax(hint > 0, axis=1)]
        return ~bound[:, None] | (self.replica_group[None, :] == group_of[:, None])

    @property
    def is_linear(self) -> bool:
        """The objective is a value per (expert, GPU): rewards, no pairs, no peak (token-follow, stage 3)."""
        return not len(self.pairs) and self.reward is not None and not self.peak_weight and self.max_per_part == 1

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
                total += float(np.sum(self.pair_weight - self.shared_weight() * shared))
            else:  # nodes: a token reaches a replica on its own node first, so any shared node counts
                total += float(self.pair_weight @ (shared == 0))
            if self.node_of_part is not None and self.node_penalty:
                nodes = int(self.node_of_part.max()) + 1
                on = np.stack([held[:, self.node_of_part == k].any(1) for k in range(nodes)], 1)
                total += self.node_penalty * float(self.pair_weight @ ~(on[a] & on[b]).any(1))
        if self.reward is not None:
            total -= float((self.reward * held).sum())
        return total

    def shared_weight(self) -> np.ndarray:
        """int [m]: what each GPU shared by a pair saves, w / (replicas of e x replicas of f)."""
        copies = self.replicas[self.pairs[:, 0]] * self.replicas[self.pairs[:, 1]]
        return np.round(self.pair_weight / copies).astype(np.int64)
