"""Stage 1's jobs, one per layer: EPLB's replica counts, the strongest co-activation pairs, the migration
reward against a previous plan, and the balance allowance."""

from __future__ import annotations

import numpy as np

from ..plan import Placement
from ..stats import RoutingStats
from ..topology import Topology
from .layer import LOAD_UNITS, PAIR_UNITS, LayerJob
from .options import IlpOptions

__all__ = ["strong_pairs", "migration_reward", "stage1_jobs"]


def strong_pairs(coact: np.ndarray | None, per_expert: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The `per_expert` strongest partners of every expert as unique pairs, their integer weights, and the
    scale from tokens to those integers."""
    if coact is None or not np.any(coact > 0):
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64), 1.0
    E = coact.shape[0]
    c = coact.astype(np.float64).copy()
    np.fill_diagonal(c, 0)
    k = min(per_expert, E - 1)
    partners = np.argsort(-c, axis=1, kind="stable")[:, :k]
    a, b = np.repeat(np.arange(E), k), partners.ravel()
    strong = c[a, b] > 0
    pairs = np.unique(np.sort(np.stack([a[strong], b[strong]], 1), axis=1), axis=0)
    scale = PAIR_UNITS / c.max()
    weight = np.maximum(np.round(c[pairs[:, 0], pairs[:, 1]] * scale), 1).astype(np.int64)
    return pairs, weight, scale


def migration_reward(stats: RoutingStats, topology: Topology, options: IlpOptions, layer: int,
                     pair_scale: float, has_pairs: bool) -> np.ndarray | None:
    """int [E, G]: reward for leaving an expert where the previous plan has it, in the layer's objective
    units. Moving an expert costs its weight bytes once; the objective is paid in every window of the
    horizon (`interval_tokens`, by default 100x the statistics' tokens). None without a previous plan."""
    previous, params = options.previous, options.params
    if previous is None:
        return None
    horizon = options.interval_tokens if options.interval_tokens is not None else 100.0 * stats.tokens
    per_window = stats.tokens / max(horizon, 1.0)
    if has_pairs:  # objective = split pairs ~ token copies per window
        weight = params.expert_bytes / (params.hidden * params.dispatch_bytes) * per_window * pair_scale
    else:  # objective = heaviest GPU's load per window: seconds of copying as tokens of compute
        move_s = params.expert_bytes / (topology.intra_node_gbps * 1e9)
        token_s = params.flops_per_assignment / (topology.gpu_tflops * 1e12)
        weight = move_s / token_s * per_window * LOAD_UNITS / max(stats.tokens * stats.top_k, 1)
    return int(round(weight)) * (previous.replicas[layer] > 0).astype(np.int64)


def stage1_jobs(stats: RoutingStats, topology: Topology, hint: Placement, start: Placement, options: IlpOptions, *,
                follow: bool, budget: float, decompose: bool) -> tuple[list[LayerJob], list[float]]:
    """Every layer's stage-1 job from EPLB's plan `hint` (its replica counts; its arrangement sets the cap)
    and `start` (the arrangement to beat: the same plan with no expert twice on a GPU), and every layer's
    pair scale (tokens to pair units). `budget` is CP-SAT's per layer."""
    N = topology.num_nodes
    replicas = hint.logcnt  # EPLB's apportionment: it minimises the heaviest replica
    counts = stats.counts.astype(np.float64)
    node_penalty = int(round(topology.intra_node_gbps / topology.inter_node_gbps)) if N > 1 else 0
    per_gpu, start_per_gpu = hint.replicas, start.replicas
    jobs, pair_scales = [], []
    for layer in range(stats.num_layers):
        coact = None if stats.coact is None else stats.coact[layer]
        pairs, weight, pair_scale = strong_pairs(coact, options.pairs_per_expert)
        pair_scales.append(pair_scale)
        from_home = not follow or layer == 0  # in token-follow, tokens reach layer 0 from their home GPU
        replicated = (replicas[layer] > 1).any()
        jobs.append(LayerJob(
            layer=layer, load=counts[layer] / replicas[layer], replicas=replicas[layer], pairs=pairs,
            pair_weight=weight, eplb=per_gpu[layer], start=start_per_gpu[layer],
            reward=migration_reward(stats, topology, options, layer, pair_scale, len(pairs) > 0),
            num_nodes=N, slots_per_gpu=topology.slots_per_gpu(hint.num_slots),
            slack=options.replica_balance_slack if from_home and replicated else options.balance_slack,
            node_penalty=node_penalty, decompose=decompose, seed=options.seed,
            # In token-follow stage 1 only starts stage 3, which re-solves every layer flat: no competitor there.
            flat_competes=not follow, budget=budget,
        ))
    return jobs, pair_scales
