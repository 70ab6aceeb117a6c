"""Baseline placements: what Megatron/DeepSpeed (contiguous) and vLLM (round robin) do without statistics.

With redundant slots (R > E), both fill the extra slots as vLLM's initial layout does: physical slot p
holds logical expert p mod E, i.e. experts 0..R-E-1 get a second copy regardless of load. Round robin then
moves apart the copies its dealing puts on one GPU (spread.py): a second copy there would serve no token.
"""

from __future__ import annotations

import numpy as np

from .plan import Placement
from .spread import spread_replicas
from .stats import RoutingStats
from .topology import Topology

__all__ = ["contiguous", "contiguous_plan", "round_robin"]


def _contiguous(num_layers: int, num_experts: int, num_slots: int, num_gpus: int, num_nodes: int) -> Placement:
    """Slot s holds expert s mod E in every layer: GPU g gets slots gS .. gS+S-1."""
    row = np.arange(num_slots, dtype=np.int64) % num_experts
    return Placement(np.tile(row, (num_layers, 1)), num_gpus, num_nodes, num_experts, "contiguous")


def contiguous_plan(num_layers: int, num_experts: int, num_gpus: int) -> Placement:
    """Experts 0..E-1 in order, E / G per GPU, in every one of `num_layers` layers (the Megatron-LM /
    DeepSpeed default), on one node. Needs no statistics."""
    for name, value in (("num_layers", num_layers), ("num_experts", num_experts)):
        if value < 1:
            raise ValueError(f"{name}: expected >= 1, got {value}")
    if num_gpus < 1 or num_experts % num_gpus:
        raise ValueError(f"num_gpus: the contiguous plan needs a divisor of the {num_experts} experts, got {num_gpus}")
    return _contiguous(num_layers, num_experts, num_experts, num_gpus, 1)


def contiguous(stats: RoutingStats, topology: Topology, num_slots: int) -> Placement:
    """Slot s holds expert s mod E: GPU g gets experts gS .. gS+S-1 (Megatron-LM / DeepSpeed)."""
    topology.slots_per_gpu(num_slots)
    return _contiguous(stats.num_layers, stats.num_experts, num_slots, topology.num_gpus, topology.num_nodes)


def round_robin(stats: RoutingStats, topology: Topology, num_slots: int) -> Placement:
    """The i-th logical copy (expert i mod E) goes to GPU i mod G (vLLM's round_robin strategy), then
    copies dealt to a GPU that holds their expert already are swapped apart."""
    S = topology.slots_per_gpu(num_slots)
    G = topology.num_gpus
    logical = np.arange(num_slots) % stats.num_experts
    # Physical slot g*S + j holds the copy dealt to GPU g in round j.
    row = spread_replicas(logical.reshape(S, G).T.reshape(1, -1), G)[0]
    return Placement(
        np.tile(row, (stats.num_layers, 1)), G, topology.num_nodes, stats.num_experts, "round_robin"
    )
