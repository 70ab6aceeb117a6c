"""Live routing figures of a replica, per MoE layer: balancedness and copies per token (DESIGN.md §4).

Every `EngineConfig.routing_every` steps a step returns its tokens' expert ids; `RoutingWindow` keeps the
last `max_tokens` of them with each token's home worker, and `figures()` applies the cost model's replica
rule (`placement.routing.choose_replicas`) to them under the replica's plan:

    load[l, g]   token-expert pairs served by GPU g           balancedness[l] = mean(load) / max(load)
    copies[l]    mean over tokens of distinct GPUs other than its home that it is dispatched to
"""

from __future__ import annotations

import numpy as np

from expertmesh.placement.plan import Placement
from expertmesh.placement.routing import choose_replicas, local_token_index

__all__ = ["RoutingWindow"]


class RoutingWindow:
    def __init__(self, max_tokens: int = 8192) -> None:
        self.max_tokens = max_tokens
        self._ids: list[np.ndarray] = []  # int [T_i, L, k]
        self._home: list[np.ndarray] = []  # int [T_i]

    def add(self, routed: list[np.ndarray | None]) -> None:
        """One step's expert ids, one array per worker (the worker is its tokens' home)."""
        for rank, ids in enumerate(routed):
            if ids is not None and len(ids):
                self._ids.append(np.asarray(ids))
                self._home.append(np.full(len(ids), rank, dtype=np.int64))
        while sum(len(h) for h in self._home) > self.max_tokens and len(self._home) > 1:
            self._ids.pop(0)
            self._home.pop(0)

    @property
    def tokens(self) -> int:
        return sum(len(h) for h in self._home)

    def figures(self, plan: Placement) -> tuple[list[float], list[float]]:
        """(balancedness, copies per token) per MoE layer over the window's tokens."""
        if not self._home:
            return [], []
        ids, home = np.concatenate(self._ids), np.concatenate(self._home)
        G = plan.num_gpus
        node = np.arange(G) // (G // plan.num_nodes)
        index = local_token_index(home, G)
        balance, copies = [], []
        for layer in range(ids.shape[1]):
            gpus = choose_replicas(ids[:, layer], home, plan.replicas[layer], node, index)  # [T, k]
            load = np.bincount(gpus.ravel(), minlength=G)
            balance.append(float(load.mean() / load.max()) if load.max() else 1.0)
            dest = np.zeros((len(home), G), dtype=bool)
            dest[np.repeat(np.arange(len(home)), gpus.shape[1]), gpus.ravel()] = True
            dest[np.arange(len(home)), home] = False
            copies.append(float(dest.sum() / len(home)))
        return balance, copies
