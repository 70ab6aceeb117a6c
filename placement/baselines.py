"""Baseline placements: what Megatron/DeepSpeed (contiguous) and vLLM (round robin) do without statistics.

With redundant slots (R > E), both fill the extra slots as vLLM's initial layout does: physical slot p
holds logical expert p mod E, i.e. experts 0..R-E-1 get a second copy regardless of load.
"""

from __future__ import annotations

import numpy as np

from .plan import Placement
from .stats import RoutingStats
from .topology import Topology

__all__ = ["contiguous", "round_robin"]


def contiguous(stats: RoutingStats, topology: Topology, num_slots: int) -> Placement:
    """Slot s holds expert s mod E: GPU g gets experts gS .. gS+S-1 (Megatron-LM / DeepSpeed)."""
    topology.slots_per_gpu(num_slots)
    row = np.arange(num_slots) % stats.num_experts
    return Placement(
        np.tile(row, (stats.num_layers, 1)), topology.num_gpus, topology.num_nodes, stats.num_experts,
        "contiguous",
    )


def round_robin(stats: RoutingStats, topology: Topology, num_slots: int) -> Placement:
    """The i-th logical copy (expert i mod E) goes to GPU i mod G (vLLM's round_robin strategy)."""
    S = topology.slots_per_gpu(num_slots)
    G = topology.num_gpus
    logical = np.arange(num_slots) % stats.num_experts
    # Physical slot g*S + j holds the copy dealt to GPU g in round j.
    row = logical.reshape(S, G).T.reshape(-1)
    return Placement(
        np.tile(row, (stats.num_layers, 1)), G, topology.num_nodes, stats.num_experts, "round_robin"
    )
