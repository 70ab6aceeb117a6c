"""Stage 1 on several nodes, decomposed: a layer's replicas to nodes (a node is one part of G/N GPUs), then
each node's replicas to its GPUs; the flat heuristic over all GPUs competes where node sets pack poorly."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..partition import PartitionProblem, SolveReport
from .subproblem import heuristic, subproblem

if TYPE_CHECKING:
    from .layer import LayerJob

__all__ = ["decomposed"]

_NODE_CAP_STEPS = (1.0, 0.97, 0.93, 0.0, None)  # node cap x the GPU cap, looser first; None: the start's sets


def _gpus_of(job: LayerJob) -> list[np.ndarray]:
    per_node = job.eplb.shape[1] // job.num_nodes
    return [np.arange(n * per_node, (n + 1) * per_node) for n in range(job.num_nodes)]


def _restrict_pairs(pairs: np.ndarray, weight: np.ndarray, members: np.ndarray):
    """The pairs among `members`, renumbered to positions in `members`."""
    if not len(pairs):
        return pairs, weight
    index = np.full(int(max(pairs.max(), members.max(initial=0))) + 1, -1)
    index[members] = np.arange(len(members))
    inside = (index[pairs[:, 0]] >= 0) & (index[pairs[:, 1]] >= 0)
    return index[pairs[inside]].reshape(-1, 2), weight[inside]


def _node_problem(job: LayerJob, whole: PartitionProblem, node_cap: int) -> PartitionProblem:
    """The layer's replicas to nodes: a node is one part of S x G/N slots holding at most G/N copies."""
    per_node = len(_gpus_of(job)[0])
    node_reward = None if whole.reward is None else np.stack([whole.reward[:, g].max(1) for g in _gpus_of(job)], 1)
    return PartitionProblem(job.replicas, whole.load, job.num_nodes, job.slots_per_gpu * per_node, per_node,
                            node_cap, job.pairs, job.pair_weight, reward=node_reward,
                            peak_weight=whole.peak_weight, replica_group=np.arange(job.num_nodes))


def _gpu_problems(job: LayerJob, whole: PartitionProblem, node_x: np.ndarray
                  ) -> list[tuple[np.ndarray, PartitionProblem]]:
    """Per node: its experts and the problem of placing their copies on its GPUs under the GPU cap."""
    out = []
    for n, gpus in enumerate(_gpus_of(job)):
        members = np.flatnonzero(node_x[:, n])
        pairs, weight = _restrict_pairs(job.pairs, job.pair_weight, members)
        reward = None if whole.reward is None else whole.reward[np.ix_(members, gpus)]
        load_at = None if whole.load_at is None else whole.load_at[np.ix_(members, gpus)]
        out.append((members, PartitionProblem(node_x[members, n], whole.load[members], len(gpus),
                                              job.slots_per_gpu, 1, whole.cap, pairs, weight, reward=reward,
                                              peak_weight=whole.peak_weight, load_at=load_at)))
    return out


def _pack(job: LayerJob, whole: PartitionProblem, node_x: np.ndarray) -> list[np.ndarray] | None:
    """Heuristic GPU assignments for every node under the cap, or None if some node does not pack."""
    packed = []
    for (members, pb), gpus in zip(_gpu_problems(job, whole, node_x), _gpus_of(job), strict=True):
        sub = heuristic(pb, job.start[np.ix_(members, gpus)])
        if sub is None:
            return None
        packed.append(sub)
    return packed


def decomposed(job: LayerJob, whole: PartitionProblem) -> tuple[np.ndarray | None, list[SolveReport]]:
    """Returns the layer's assignment [E, G] (None if nothing kept the cap) and the reports.

    A node's replicas must still pack onto its GPUs under the cap, which the node model cannot see. So the
    cheap heuristics first find the loosest node cap that packs, tightening toward the starting plan's
    heaviest node (whose replicas are known to pack) and at last keeping its node sets; the solver budget is
    then spent once per subproblem. Once the node cap has had to tighten, the flat heuristic (GPUs with the
    node penalty) competes: node sets that pack poorly lose most of their internode gain.
    """
    E, G = job.eplb.shape
    N = job.num_nodes
    gpus_of = _gpus_of(job)
    node_hint = np.stack([job.start[:, g].sum(1) for g in gpus_of], 1)
    start_node_peak = int((whole.load[:, None] * node_hint).sum(0).max())  # nodes: loads split evenly
    flat = None
    for tighten in _NODE_CAP_STEPS:
        nodes_pb = _node_problem(job, whole, max(int(whole.cap * len(gpus_of[0]) * (tighten or 0)), start_node_peak))
        node_x = heuristic(nodes_pb, node_hint) if tighten is not None else node_hint
        packed = None if node_x is None else _pack(job, whole, node_x)
        if packed is not None:
            break
        if flat is None and job.flat_competes:  # only where the node cap had to tighten (~1 s at 64 GPUs)
            flat = heuristic(whole, job.start)
    else:
        return flat, []
    reports = []
    solved, rep = subproblem(nodes_pb, node_hint, job.seed, job.budget / 2, start=node_x)
    reports.extend(rep)
    if not np.array_equal(solved, node_x) and nodes_pb.feasible(solved):
        repacked = _pack(job, whole, solved)
        if repacked is not None:
            node_x, packed = solved, repacked
    x = np.zeros((E, G), dtype=np.int64)
    for n, ((members, pb), first) in enumerate(zip(_gpu_problems(job, whole, node_x), packed, strict=True)):
        sub_x, rep = subproblem(pb, None, job.seed, job.budget / (2 * N), start=first)
        reports.extend(rep)
        x[np.ix_(members, gpus_of[n])] = sub_x if pb.feasible(sub_x) else first
    if flat is not None and whole.objective(flat) < whole.objective(x):
        return flat, reports
    return x, reports
