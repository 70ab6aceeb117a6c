"""One entry point for every placer: `place(strategy, stats, topology, redundant, ...) -> Placement`."""

from __future__ import annotations

from collections.abc import Callable

from .baselines import contiguous, round_robin
from .eplb import eplb
from .ilp import IlpOptions, ilp
from .plan import Placement
from .stats import RoutingStats
from .topology import Topology, TopologyError

__all__ = ["STRATEGIES", "InfeasibleError", "place"]

STRATEGIES = ("contiguous", "round_robin", "eplb", "ilp")


class InfeasibleError(TopologyError):
    """The request cannot be met by any plan (for example fewer slots than experts)."""


def place(
    strategy: str,
    stats: RoutingStats,
    topology: Topology,
    redundant: int = 0,
    ilp_options: IlpOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Placement:
    """Plan `stats` onto `topology` with E + `redundant` slots per layer."""
    ilp_options = ilp_options or IlpOptions()
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    if redundant < 0:
        raise InfeasibleError(f"redundant: expected >= 0 extra slots, got {redundant}")
    num_slots = stats.num_experts + redundant
    try:
        topology.slots_per_gpu(num_slots)
    except TopologyError as exc:
        raise InfeasibleError(str(exc)) from None
    if strategy == "contiguous":
        return contiguous(stats, topology, num_slots)
    if strategy == "round_robin":
        return round_robin(stats, topology, num_slots)
    if strategy == "eplb":
        return eplb(stats, topology, num_slots, ilp_options.eplb_policy)
    return ilp(stats, topology, num_slots, ilp_options, progress)
