"""Robust plans: every layer of an ilp or eplb plan kept balanced in the load scenarios (robust.py).

    scenarios_for   the scenarios a robust placer plans against: given ones, or resampled from a trace
    robust_ilp_rows ilp's layers repaired against EPLB's caps in every scenario, pairs kept where they can be
    robust_eplb_rows eplb's layers with every scenario's heaviest GPU lowered (no pair weight)
"""

from __future__ import annotations

import numpy as np

from .robust import RobustOptions, robust_caps, robust_layer, tighten_layer
from .scenarios import scenario_counts
from .stats import RoutingStats, stats_from_trace
from .trace import Trace

__all__ = ["scenarios_for", "robust_ilp_rows", "robust_eplb_rows", "rows_from"]


def scenarios_for(robust: RobustOptions, data: RoutingStats | Trace) -> np.ndarray:
    """float [S + 1, L, E]: the plan's own counts first, then the scenarios (given, or resampled by sequence
    from a trace). Statistics alone carry no sequence-level variance, so they need given scenarios."""
    if robust.scenarios is not None:
        scenarios = robust.scenarios
    elif isinstance(data, Trace):
        scenarios = scenario_counts(data, robust.resamples, robust.seed, robust.inflate)
    else:
        raise ValueError("robust: needs a trace (its sequences are resampled) or scenarios [S, L, E] in "
                         "RobustOptions.scenarios; statistics alone do not say how the load varies")
    counts = data if isinstance(data, RoutingStats) else stats_from_trace(data)
    L, E = counts.counts.shape
    if scenarios.shape[1:] != (L, E):
        raise ValueError(f"robust: scenarios have shape {list(scenarios.shape)}, expected [S, {L}, {E}]")
    return np.concatenate([counts.counts[None].astype(np.float64), scenarios])


def rows_from(xs: list[np.ndarray]) -> np.ndarray:
    """phy2log [L, R] from every layer's copies per GPU [E, G] (a GPU's slots in expert order)."""
    E, G = xs[0].shape
    return np.stack([np.concatenate([np.repeat(np.arange(E), x[:, g]) for g in range(G)]) for x in xs])


def robust_ilp_rows(replicas: np.ndarray, reference: np.ndarray, coact: np.ndarray, scenarios: np.ndarray,
                    slack: float, node_of_gpu: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """phy2log [L, R] of the solver's arrangement `replicas` [L, E, G] repaired, layer by layer, until its
    balancedness is within `slack` of the `reference` arrangement's (EPLB's) in every scenario [S, L, E],
    keeping as much co-activation weight `coact` [L, E, E] together as the swaps find; and the layers where
    the repair stalled, which take the reference's arrangement."""
    xs, fallback = [], []
    for layer in range(replicas.shape[0]):
        caps = robust_caps(scenarios[:, layer], reference[layer], slack)
        x, ok = robust_layer(replicas[layer], coact[layer], scenarios[:, layer], caps, node_of_gpu)
        if not ok:
            x = reference[layer]
            fallback.append(layer)
        xs.append(x)
    return rows_from(xs), fallback


def robust_eplb_rows(replicas: np.ndarray, scenarios: np.ndarray, node_of_gpu: np.ndarray) -> np.ndarray:
    """phy2log [L, R] of EPLB's arrangement `replicas` [L, E, G] with each layer's heaviest GPU lowered in
    every scenario [S, L, E] together (`tighten_layer`)."""
    return rows_from([tighten_layer(replicas[layer], scenarios[:, layer], node_of_gpu)
                      for layer in range(replicas.shape[0])])
