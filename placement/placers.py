"""One entry point for every placer: `place(strategy, data, topology, redundant, options) -> Placement`.

Each placer takes its own options: `IlpOptions` for ilp, `EplbOptions` for eplb, none for contiguous and
round_robin; `place` refuses options of another placer, so a setting is never silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from .baselines import contiguous, round_robin
from .eplb import EplbOptions, eplb
from .ilp import IlpOptions, ilp
from .plan import Placement
from .stats import RoutingStats, stats_from_trace
from .topology import Topology, TopologyError
from .trace import Trace

__all__ = ["STRATEGIES", "InfeasibleError", "place", "options_type", "with_scenarios"]

STRATEGIES = ("contiguous", "round_robin", "eplb", "ilp")
_OPTIONS = {"contiguous": None, "round_robin": None, "eplb": EplbOptions, "ilp": IlpOptions}


class InfeasibleError(TopologyError):
    """The request cannot be met by any plan (for example fewer slots than experts)."""


def options_type(strategy: str) -> type | None:
    """The options class `strategy` takes (None: it takes none)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    return _OPTIONS[strategy]


def with_scenarios(options: EplbOptions | None, data: RoutingStats | Trace) -> EplbOptions | None:
    """eplb's options with robust scenarios resampled from `data` when robust asks for them (eplb itself
    sees statistics only); ilp resamples its trace itself."""
    if options is None or options.robust is None or options.robust.scenarios is not None:
        return options
    if not isinstance(data, Trace):
        raise ValueError("robust: needs a trace (its sequences are resampled) or RobustOptions.scenarios; "
                         "statistics alone do not say how the load varies")
    from .scenarios import scenario_counts

    r = options.robust
    return replace(options, robust=replace(r, scenarios=scenario_counts(data, r.resamples, r.seed, r.inflate)))


def place(
    strategy: str,
    data: RoutingStats | Trace,
    topology: Topology,
    redundant: int = 0,
    options: IlpOptions | EplbOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Placement:
    """Plan `data` (statistics, or a trace: ilp then also scores its layers on it) onto `topology` with
    E + `redundant` slots per layer. `options`: the placer's own (`options_type(strategy)`), or None for its
    defaults. `progress(done, total)`: ilp's layers as they finish."""
    expected = options_type(strategy)
    if options is not None and not (expected and isinstance(options, expected)):
        takes = f"{expected.__name__} or None" if expected else "no options (None)"
        raise ValueError(f"options: {strategy} takes {takes}, got {type(options).__name__}")
    if isinstance(redundant, bool) or not isinstance(redundant, int | np.integer) or redundant < 0:
        raise ValueError(f"redundant: expected a whole number of extra slots >= 0, got {redundant!r}")
    stats = data if isinstance(data, RoutingStats) else stats_from_trace(data)
    if stats.is_empty:
        raise ValueError("data: holds no tokens (empty trace or statistics); there is nothing to plan from")
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
        return eplb(stats, topology, num_slots, with_scenarios(options, data))
    return ilp(data, topology, num_slots, options, progress)
