"""DeepSeek's expert-parallel load balancer (EPLB), written from its published description, vectorised.

The algorithm (research/placement.md §4), applied to every layer independently:

1. Balanced packing BP(w, m): items sorted by weight, heaviest first, each put on the lightest bin that
   still has room; every bin takes exactly n/m items (LPT with a cardinality limit).
2. Hierarchical policy: (a) BP of expert-group loads onto nodes, so whole groups stay on one node;
   (b) inside each node, each redundant slot goes to the expert with the largest load per replica
   (this greedy minimises max w[e] / cnt[e]); (c) BP of the replicas (load w[e] / cnt[e] each) onto the
   node's GPUs, S replicas per GPU.
3. Global policy = the hierarchical one with one group and one node.

DeepSeek's reference loops over layers in Python (~540 ms at 256 experts x 58 layers x 64 GPUs); here
every greedy step runs for all layers (and nodes) at once, so the loops are over items, not layers.
Ties break toward the lower index, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .plan import Placement
from .robust import RobustOptions, robust_record
from .spread import spread_replicas
from .stats import RoutingStats
from .topology import Topology, TopologyError

__all__ = ["EPLB_POLICIES", "EplbOptions", "rebalance_experts", "eplb", "balanced_packing", "replicate_experts"]

EPLB_POLICIES = ("auto", "global", "hierarchical")


@dataclass(frozen=True, kw_only=True)
class EplbOptions:
    """`policy`: "global", "hierarchical" (every expert its own group, so experts are balanced over nodes
    first and replicated within their node), or "auto" (hierarchical on several nodes, global on one).
    `spread_replicas`: never two copies of an expert on one GPU (while it has no more copies than GPUs in
    its node); DeepSeek's packing may put them there, and the default keeps its behaviour.
    `robust`: lower every layer's heaviest GPU in the load scenarios together (robust.py, `tighten_layer`);
    `place` fills in the scenarios from a trace."""

    policy: str = "auto"
    spread_replicas: bool = False
    robust: RobustOptions | None = None

    def __post_init__(self) -> None:
        if self.policy not in EPLB_POLICIES:
            raise ValueError(f"policy: expected one of {EPLB_POLICIES}, got {self.policy!r}")
        if self.robust is not None and not isinstance(self.robust, RobustOptions):
            raise ValueError(f"robust: expected RobustOptions or None, got {type(self.robust).__name__}")


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack n weighted items into `num_packs` bins of n / num_packs items each, for every row at once.

    weight [X, n]. Returns pack [X, n] (bin of each item) and rank [X, n] (position inside its bin).
    """
    X, n = weight.shape
    per_pack = n // num_packs
    assert per_pack * num_packs == n, "items must divide evenly into packs"
    if per_pack == 1:
        return np.tile(np.arange(n), (X, 1)), np.zeros((X, n), dtype=np.int64)
    order = np.argsort(-weight, axis=-1, kind="stable")
    pack = np.empty((X, n), dtype=np.int64)
    rank = np.empty((X, n), dtype=np.int64)
    pack_weight = np.zeros((X, num_packs))
    pack_items = np.zeros((X, num_packs), dtype=np.int64)
    rows = np.arange(X)
    for i in range(n):
        item = order[:, i]
        # Full bins are out of the running; the lightest remaining bin wins, lowest index on ties.
        candidate = np.where(pack_items < per_pack, pack_weight, np.inf)
        best = np.argmin(candidate, axis=-1)
        pack[rows, item] = best
        rank[rows, item] = pack_items[rows, best]
        pack_weight[rows, best] += weight[rows, item]
        pack_items[rows, best] += 1
    return pack, rank


def replicate_experts(weight: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give each redundant slot to the expert with the largest load per replica, for every row at once.

    weight [X, n]. Returns phy2log [X, num_physical], rank [X, num_physical] (replica index), logcnt [X, n].
    """
    X, n = weight.shape
    phy2log = np.tile(np.arange(num_physical), (X, 1))
    rank = np.zeros((X, num_physical), dtype=np.int64)
    logcnt = np.ones((X, n), dtype=np.int64)
    rows = np.arange(X)
    for slot in range(n, num_physical):
        hottest = np.argmax(weight / logcnt, axis=-1)
        phy2log[:, slot] = hottest
        rank[:, slot] = logcnt[rows, hottest]
        logcnt[rows, hottest] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _hierarchical(
    weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    L, E = weight.shape
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    per_gpu = num_physical // num_gpus

    # Step 1: whole groups onto nodes. mlog ("middle logical") numbers experts node by node.
    group_load = weight.reshape(L, num_groups, group_size).sum(-1)
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    log2mlog = (
        ((group_pack * groups_per_node + group_rank) * group_size)[:, :, None] + np.arange(group_size)
    ).reshape(L, E)
    mlog2log = _inverse(log2mlog)

    # Step 2: redundant experts inside every node (rows = layer x node).
    mlog_load = np.take_along_axis(weight, mlog2log, -1).reshape(L * num_nodes, E // num_nodes)
    phy2mlog, phy_rank, mlogcnt = replicate_experts(mlog_load, num_physical // num_nodes)

    # Step 3: replicas onto the node's GPUs, S each.
    phy_load = np.take_along_axis(mlog_load / mlogcnt, phy2mlog, -1)
    pack, rank = balanced_packing(phy_load, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * per_gpu + rank)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, -1)
    pphy2mlog = (
        pphy2mlog.reshape(L, num_nodes, -1) + (np.arange(num_nodes) * (E // num_nodes))[None, :, None]
    ).reshape(L, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, -1)
    pphy_rank = np.take_along_axis(phy_rank, pphy2phy, -1).reshape(L, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, -1), log2mlog, -1)
    return pphy2log, pphy_rank, logcnt


def rebalance_experts(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek's entry point and shapes: weight [L, E] -> phy2log [L, R], log2phy [L, E, maxcnt], logcnt [L, E].

    Hierarchical when num_groups % num_nodes == 0, else global.
    """
    weight = np.asarray(weight, dtype=np.float64)
    L, E = weight.shape
    if num_replicas % num_gpus or num_gpus % num_nodes:
        raise TopologyError(
            f"num_replicas={num_replicas} must be divisible by num_gpus={num_gpus}, "
            f"and num_gpus by num_nodes={num_nodes}"
        )
    if num_replicas < E:
        raise TopologyError(f"num_replicas: {num_replicas} slots cannot hold {E} experts")
    if E % num_groups:
        raise TopologyError(f"num_groups: expected a divisor of {E} experts, got {num_groups}")
    if num_groups % num_nodes == 0 and (num_replicas // num_nodes) >= E // num_nodes:
        phy2log, rank, logcnt = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, rank, logcnt = _hierarchical(weight, num_replicas, 1, 1, num_gpus)
    log2phy = np.full((L, E, int(logcnt.max())), -1, dtype=np.int64)
    layer = np.repeat(np.arange(L), num_replicas)
    log2phy[layer, phy2log.ravel(), rank.ravel()] = np.tile(np.arange(num_replicas), L)
    return phy2log, log2phy, logcnt


def _robust(phy2log: np.ndarray, stats: RoutingStats, topology: Topology, robust: RobustOptions) -> np.ndarray:
    """EPLB's rows with each layer's heaviest GPU lowered in every load scenario (robust_plan.py)."""
    from .robust_plan import robust_eplb_rows, scenarios_for

    plan = Placement(phy2log, topology.num_gpus, topology.num_nodes, stats.num_experts)
    return robust_eplb_rows(plan.replicas, scenarios_for(robust, stats), topology.node_of_gpu)


def eplb(
    stats: RoutingStats,
    topology: Topology,
    num_slots: int,
    options: EplbOptions | None = None,
) -> Placement:
    """EPLB on routing statistics, with the policy of `options` (see `EplbOptions`)."""
    options = options or EplbOptions()
    policy = options.policy
    topology.slots_per_gpu(num_slots)
    N, G, E = topology.num_nodes, topology.num_gpus, stats.num_experts
    hierarchical = policy == "hierarchical" or (policy == "auto" and N > 1)
    if hierarchical and E % N:
        if policy == "hierarchical":
            raise TopologyError(f"nodes: hierarchical EPLB needs {E} experts divisible by {N} nodes")
        hierarchical = False
    groups, nodes = (E, N) if hierarchical else (1, 1)
    phy2log, _, logcnt = rebalance_experts(stats.counts, num_slots, groups, nodes, G)
    if options.spread_replicas:
        phy2log = spread_replicas(phy2log, G, G // nodes, stats.counts / logcnt)
    record = {"policy": "hierarchical" if hierarchical else "global", "spread_replicas": options.spread_replicas}
    if options.robust is not None:
        phy2log = _robust(phy2log, stats, topology, options.robust)
        record["robust"] = robust_record(options.robust)
    return Placement(phy2log, G, N, E, "eplb", options=record)
