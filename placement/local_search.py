"""Greedy construction and swap local search for `PartitionProblem`s (the ILP's hints); no solver.

CP-SAT starts from what these find: a good first solution lets a short solve spend its time on the bound
and on improvements instead of on getting feasible. Both are deterministic.
"""

from __future__ import annotations

import numpy as np

from .partition import PartitionProblem

__all__ = ["affinity_matrix", "greedy_partition", "lpt_partition", "improve_by_swaps"]


def affinity_matrix(problem: PartitionProblem) -> np.ndarray:
    """float [n, n] symmetric pair weights."""
    n = len(problem.replicas)
    a = np.zeros((n, n))
    if len(problem.pairs):
        a[problem.pairs[:, 0], problem.pairs[:, 1]] = problem.pair_weight
        a[problem.pairs[:, 1], problem.pairs[:, 0]] = problem.pair_weight
    return a


def greedy_partition(problem: PartitionProblem) -> np.ndarray | None:
    """Heaviest replica first, into the part with room and load headroom whose experts it shares most
    affinity with, plus its reward there (lightest part on ties). None when the cap cannot be kept this way."""
    pb = problem
    n, P = len(pb.replicas), pb.num_parts
    affinity = affinity_matrix(pb)
    x = np.zeros((n, P), dtype=np.int64)
    part_load = np.zeros(P, dtype=np.int64)
    items = np.repeat(np.arange(n), pb.replicas)
    items = items[np.argsort(-pb.load[items], kind="stable")]
    copy_load = pb.copy_load()
    lightest = copy_load[items[-1]].min() if len(items) else 0
    bound = pb.bound_experts()
    for e in items:
        # Look ahead: the part's other free slots will each take at least the lightest remaining load.
        free = pb.slots - x.sum(0)
        room = (free > 0) & (x[e] < pb.max_per_part) & (part_load + copy_load[e] + (free - 1) * lightest <= pb.cap)
        if bound[e] and x[e].any():  # later copies follow the first into its replica group
            room &= pb.replica_group == pb.replica_group[np.argmax(x[e] > 0)]
        if not room.any():
            return None
        gain = affinity[e] @ (x > 0) + (0 if pb.reward is None else pb.reward[e])
        score = np.where(room, gain, -np.inf)
        best = np.flatnonzero(score == score.max())
        p = best[np.argmin(part_load[best])]
        x[e, p] += 1
        part_load[p] += copy_load[e, p]
    return x


def lpt_partition(problem: PartitionProblem) -> np.ndarray:
    """Longest processing time first with equal counts (EPLB's packing), ignoring the cap."""
    pb = problem
    n = len(pb.replicas)
    x = np.zeros((n, pb.num_parts), dtype=np.int64)
    part_load = np.zeros(pb.num_parts)
    items = np.repeat(np.arange(n), pb.replicas)
    bound = pb.bound_experts()
    copy_load = pb.copy_load()
    for e in items[np.argsort(-pb.load[items], kind="stable")]:
        ok = (x.sum(0) < pb.slots) & (x[e] < pb.max_per_part)
        if bound[e] and x[e].any():
            ok &= pb.replica_group == pb.replica_group[np.argmax(x[e] > 0)]
        if not ok.any():
            ok = x.sum(0) < pb.slots
        p = np.flatnonzero(ok)[np.argmin(part_load[ok])]
        x[e, p] += 1
        part_load[p] += copy_load[e, p]
    return x


def _items(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts [n, P] -> expert of each item [m], part of each item [m]."""
    experts, parts = np.nonzero(x)
    reps = x[experts, parts]
    return np.repeat(experts, reps), np.repeat(parts, reps)


def improve_by_swaps(problem: PartitionProblem, x: np.ndarray, max_rounds: int = 5000) -> np.ndarray:
    """Best-improvement swaps of two items in different parts while the split pair weight falls; each round
    applies the best swap and every other improving one on parts (nodes, for a node-penalised problem) the
    round has not touched yet.

    A replicated expert's affinity is shared between its copies (a proxy; the caller compares exact
    objectives). Swaps keep every part's slot count, never break the cap and never put more than
    `max_per_part` copies of an expert in one part.
    """
    pb = problem
    n, P = x.shape
    expert, part = _items(x)
    if len(expert) < 2 or P < 2 or (not len(pb.pairs) and pb.reward is None):
        return x  # only the peak term is left: the starts are already packed for it
    swaps = _Swaps(pb, x, expert, part)
    for _ in range(max_rounds):
        if not swaps.apply(swaps.gains()):
            break
    out = np.zeros((n, P), dtype=np.int64)
    np.add.at(out, (expert, swaps.part), 1)
    return out


class _Swaps:
    """The working state of `improve_by_swaps`: every item's part, its affinity to every part (and node),
    part loads and copies held, updated in place as swaps apply."""

    def __init__(self, pb: PartitionProblem, x: np.ndarray, expert: np.ndarray, part: np.ndarray) -> None:
        m, P = len(expert), x.shape[1]
        copies = x.sum(1)
        w = affinity_matrix(pb)[np.ix_(expert, expert)] / np.outer(copies[expert], copies[expert])
        w[expert[:, None] == expert[None, :]] = 0
        self.pb, self.expert, self.part, self.w, self.m, self.P = pb, expert, part.copy(), w, m, P
        self.node_of = pb.node_of_part if pb.node_of_part is not None and pb.node_penalty else None
        self.item_load = pb.copy_load()[expert].astype(np.float64)  # [m, P]: each item's load in each part
        self.conn = np.zeros((m, P))  # affinity of every item to every part
        np.add.at(self.conn.T, part, w)
        if self.node_of is not None:
            self.node_conn = np.zeros((m, int(self.node_of.max()) + 1))
            np.add.at(self.node_conn.T, self.node_of[part], w)
        self.part_load = np.bincount(part, weights=self.item_load[np.arange(m), part], minlength=P)
        self.holds = x.copy()
        self.bound = pb.bound_experts()
        self.same_expert = expert[:, None] == expert[None, :]
        self.rows = np.arange(m)
        # Reward of every item in every part (a replicated expert's reward is shared between its copies).
        self.reward = np.zeros((m, P)) if pb.reward is None else pb.reward[expert] / copies[expert][:, None]

    def gains(self) -> np.ndarray:
        """float [m, m] upper triangle: how much within-part affinity (plus reward) rises if items i and j
        trade parts; 0 where the trade is not allowed."""
        pb, part, rows, w = self.pb, self.part, self.rows, self.w
        own = self.conn[rows, part] + self.reward[rows, part]
        moved = self.conn[:, part] + self.reward[:, part]  # [i, j]: item i's affinity and reward in j's part
        gain = moved - own[:, None] + (moved - own[:, None]).T - 2 * w
        if self.node_of is not None:
            node = self.node_of[part]
            own_n = self.node_conn[rows, node]
            across = node[:, None] != node[None, :]
            node_gain = (self.node_conn[:, node] - own_n[:, None] + (self.node_conn[:, node] - own_n[:, None]).T
                         - 2 * w)
            gain = gain + pb.node_penalty * np.where(across, node_gain, 0.0)
        # i's part after the trade: it loses i and gains j
        load_i = (self.part_load[part] - self.item_load[rows, part])[:, None] + self.item_load[:, part].T
        ok = (part[:, None] != part[None, :]) & (load_i <= pb.cap) & (pb.cap >= load_i.T)
        room = self.holds[self.expert][:, part] < pb.max_per_part  # expert of i has room in the part of j
        ok &= (room | self.same_expert) & (room.T | self.same_expert)
        if self.bound.any():  # copies of a bound expert never leave their replica group
            stays = pb.replica_group[part][:, None] == pb.replica_group[part][None, :]
            ok &= (~self.bound[self.expert][:, None] | stays) & (~self.bound[self.expert][None, :] | stays)
        return np.where(ok, np.triu(gain, 1), 0.0)

    def apply(self, gain: np.ndarray) -> int:
        """Apply, best first, every improving swap whose two parts (and nodes) no earlier swap of this round
        touched: its gain only depends on those parts' columns, so it is still exact. Returns the count."""
        m, P, w, part, node_of = self.m, self.P, self.w, self.part, self.node_of
        flat_gain = gain.ravel()
        best = np.flatnonzero(flat_gain > 1e-9)
        if best.size > 4 * P:
            best = best[np.argpartition(flat_gain[best], best.size - 4 * P)[-4 * P:]]
        best = best[np.argsort(flat_gain[best])[::-1]]
        touched: set[int] = set()
        applied = 0
        for flat in best.tolist():
            i, j = divmod(flat, m)
            if not gain[i, j] > 1e-9:
                break
            p, q = int(part[i]), int(part[j])
            keys = {p, q} if node_of is None else {-1 - int(node_of[p]), -1 - int(node_of[q])}
            if keys & touched:
                continue
            touched |= keys
            applied += 1
            self.conn[:, p] += w[:, j] - w[:, i]
            self.conn[:, q] += w[:, i] - w[:, j]
            if node_of is not None and node_of[p] != node_of[q]:
                self.node_conn[:, node_of[p]] += w[:, j] - w[:, i]
                self.node_conn[:, node_of[q]] += w[:, i] - w[:, j]
            self.holds[self.expert[i], p] -= 1
            self.holds[self.expert[i], q] += 1
            self.holds[self.expert[j], q] -= 1
            self.holds[self.expert[j], p] += 1
            self.part_load[p] += self.item_load[j, p] - self.item_load[i, p]
            self.part_load[q] += self.item_load[i, q] - self.item_load[j, q]
            part[i], part[j] = q, p
        return applied
