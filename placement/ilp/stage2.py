"""Stage 2 (token-follow): map each layer's stage-1 groups onto GPUs, one-to-one, so tokens find their next
experts where they already are (MoETuner's objective: traffic plus the busiest bandwidth-weighted pair)."""

from __future__ import annotations

import numpy as np

from ..cpsat_models import assign
from ..partition import SolveReport
from ..topology import Topology
from .layer import PAIR_UNITS

__all__ = ["share", "map_groups"]

_FLAT_GPUS = 16  # above this, nodes are mapped first, then the GPUs inside each node


def share(x: np.ndarray) -> np.ndarray:
    """Expert -> GPU share of its tokens: replicas split an expert's tokens evenly."""
    return x / np.maximum(x.sum(1, keepdims=True), 1)


def map_groups(xs: list[np.ndarray], trans: np.ndarray, topology: Topology, seed: int, budget: float
               ) -> tuple[list[np.ndarray], list[SolveReport]]:
    """Permute every layer's GPU columns (from layer 1, each after its predecessor's) to follow the tokens."""
    G = topology.num_gpus
    bw = topology.bandwidth_matrix()
    inverse_bw = np.where(np.isinf(bw), 0, np.round(bw[np.isfinite(bw)].max() / bw)).astype(np.int64)
    reports: list[SolveReport] = []
    out = [xs[0]]
    for layer in range(1, len(xs)):
        traffic = share(out[-1]).T @ trans[layer - 1] @ share(xs[layer])  # [G sources, G groups]
        traffic = np.round(traffic * (PAIR_UNITS / max(traffic.max(), 1e-12))).astype(np.int64)
        if G <= _FLAT_GPUS:
            cost = traffic.sum(0)[:, None] - traffic.T  # group c on target h: all it receives but from h
            target, rep = assign(cost, np.arange(G), traffic, inverse_bw, G, seed, budget)
            reports.append(rep)
        else:
            target = _map_by_node(traffic, topology, seed, budget, reports)
        mapped = np.empty_like(xs[layer])
        mapped[:, target] = xs[layer]
        out.append(mapped)
    return out, reports


def _map_by_node(traffic: np.ndarray, topology: Topology, seed: int, budget: float,
                 reports: list[SolveReport]) -> np.ndarray:
    """int [G]: target GPU of each group, node blocks of groups to nodes first, then within each node."""
    G, N = topology.num_gpus, topology.num_nodes
    per_node = G // N
    block = np.arange(G) // per_node  # stage 1's groups come in node blocks
    node_traffic = np.stack([traffic[:, block == b].sum(1) for b in range(N)], 1)  # [G, N blocks]
    node_in = np.stack([node_traffic[block == n].sum(0) for n in range(N)], 0)  # [N, N blocks]
    node_target, rep = assign(node_in.sum(0)[:, None] - node_in.T, np.arange(N), seed=seed, budget=budget / 2)
    reports.append(rep)
    target = np.empty(G, dtype=np.int64)
    for b in range(N):
        groups = np.flatnonzero(block == b)
        gpus = np.arange(node_target[b] * per_node, (node_target[b] + 1) * per_node)
        sub = traffic[np.ix_(gpus, groups)]
        local, rep = assign(sub.sum(0)[:, None] - sub.T, np.arange(per_node), seed=seed, budget=budget / (2 * N))
        reports.append(rep)
        target[groups] = gpus[local]
    return target
