"""Token-follow with one expert per GPU (one node, no replicas, no previous plan), solved exactly.

Balance and copies are fixed there, and a layer pair's staying tokens depend only on the relative
permutation of the two layers' GPUs. Those permutations are independent, so the optimum is each pair's
max-weight assignment: GPU g holds expert rows[l][g], and layer l's expert sigma_l(a) joins layer l-1's
expert a on its GPU.
"""

from __future__ import annotations

import numpy as np

from ..stats import RoutingStats

__all__ = ["one_expert_per_gpu_follow"]


def one_expert_per_gpu_follow(stats: RoutingStats) -> tuple[np.ndarray, float, float]:
    """phy2log [L, E] of the optimum, with its crossing and staying tokens summed over layer pairs."""
    from ortools.graph.python import linear_sum_assignment

    L, E = stats.num_layers, stats.num_experts
    # Integer weights with the argmax of `follow_trans`: the top-1 counts, else trans (= k x its expectation).
    weights = stats.trans_top1 if stats.trans_top1 is not None else stats.trans
    rows, staying, crossing = [np.arange(E)], 0, 0
    for layer in range(1, L):
        w = weights[layer - 1].astype(np.int64)
        solver = linear_sum_assignment.SimpleLinearSumAssignment()
        for a in range(E):
            for b in range(E):
                solver.add_arc_with_cost(a, b, -int(w[a, b]))
        if solver.solve() != solver.OPTIMAL:
            raise RuntimeError(f"linear sum assignment failed on layer {layer}")  # a complete graph always solves
        sigma = np.array([solver.right_mate(a) for a in range(E)])
        rows.append(sigma[rows[-1]])
        staying += -solver.optimal_cost()
        crossing += int(w.sum()) + solver.optimal_cost()
    scale = 1.0 if stats.trans_top1 is not None else 1.0 / stats.top_k
    return np.stack(rows), crossing * scale, staying * scale
