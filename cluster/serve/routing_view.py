"""Live routing figures of a replica, per MoE layer: balancedness and copies per token (DESIGN.md §4).

Every `EngineConfig.routing_every` steps a step returns its tokens' expert ids; `RoutingWindow` keeps the
last `max_tokens` of them with each token's home worker, and `figures()` applies the cost model's replica
rule (`placement.routing.choose_replicas`) to them under the replica's plan:

    load[l, g]   token-expert pairs served by GPU g           balancedness[l] = mean(load) / max(load)
    copies[l]    mean over tokens of distinct GPUs other than its home that it is dispatched to

(Under the fixed replica rule a replicated expert's replica is chosen by a token's position among its home's
tokens of the window, not of its step: the same even spread the runtime gets. Under the balanced rule each
step is split by its own counts, as the runtime splits it.)
"""

from __future__ import annotations

import numpy as np

from expertmesh.placement.plan import Placement
from expertmesh.placement.routing import DEFAULT_REPLICA_RULE, choose_balanced, choose_replicas, local_token_index

__all__ = ["RoutingWindow"]


class RoutingWindow:
    """Recent tokens' expert ids and homes. `add` runs on the engine's loop, `figures` on a scrape thread:
    each step is one (ids, homes) entry of a list, so a reader's copy of the list is always consistent."""

    def __init__(self, max_tokens: int = 8192) -> None:
        self.max_tokens = max_tokens
        self._steps: list[tuple[np.ndarray, np.ndarray]] = []  # (int [T_i, L, k], int [T_i]) per step

    def add(self, routed: list[np.ndarray | None]) -> None:
        """One step's expert ids, one array per worker (the worker is its tokens' home)."""
        parts = [(np.asarray(ids), np.full(len(ids), rank, dtype=np.int64))
                 for rank, ids in enumerate(routed) if ids is not None and len(ids)]
        if not parts:
            return
        self._steps.append((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
        while self.tokens > self.max_tokens and len(self._steps) > 1:
            self._steps.pop(0)

    @property
    def tokens(self) -> int:
        return sum(len(home) for _, home in list(self._steps))

    def figures(self, plan: Placement, replica_rule: str = DEFAULT_REPLICA_RULE) -> tuple[list[float], list[float]]:
        """(balancedness, copies per token) per MoE layer over the window's tokens, under the group's rule."""
        steps = list(self._steps)
        if not steps:
            return [], []
        ids, home = np.concatenate([s[0] for s in steps]), np.concatenate([s[1] for s in steps])
        G = plan.num_gpus
        node = np.arange(G) // (G // plan.num_nodes)
        index = local_token_index(home, G)
        balance, copies = [], []
        for layer in range(ids.shape[1]):
            if replica_rule == "balanced":  # [T, k], step by step
                gpus = np.concatenate([choose_balanced(i[:, layer], h, plan.replicas[layer], node) for i, h in steps])
            else:
                gpus = choose_replicas(ids[:, layer], home, plan.replicas[layer], node, index)  # [T, k]
            load = np.bincount(gpus.ravel(), minlength=G)
            balance.append(float(load.mean() / load.max()) if load.max() else 1.0)
            dest = np.zeros((len(home), G), dtype=bool)
            dest[np.repeat(np.arange(len(home)), gpus.shape[1]), gpus.ravel()] = True
            dest[np.arange(len(home)), home] = False
            copies.append(float(dest.sum() / len(home)))
        return balance, copies
