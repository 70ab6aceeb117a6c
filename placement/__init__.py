"""expertmesh.placement: pure planning, arrays in and plan out (no torch, Ray, Redis or gRPC).

    trace      Trace: topk_ids [T, L, k], seq_ids [T]; the canonical .npz
    stats      RoutingStats: counts [L, E], coact [L, E, E], trans [L-1, E, E]; additive
    sources    importers: router JSON Lines, count matrices, DeepSpeed exp_counts
    synthetic  seeded traces with planted co-activation and cross-layer structure
    topology   Topology: GPUs, nodes, bandwidths, slots
    routing    the replica-choice rules (fixed; balanced, the run-time hedge) shared with the kernels
    cost       the cost model: balancedness, copies, internode copies, busiest port, step time, and the
               expected held-out balance
    heldout    splits of a trace into planning and held-out parts (by sequence, or in time)
    scenarios, robust, robust_plan: load scenarios (sequence bootstrap) and plans that keep balance in each
    baselines, eplb, ilp/, placers: the placers behind `place`, each with its own options
    partition  the partition subproblem (local_search: greedy and swaps; cpsat_models: CP-SAT; assignment)
    spread     co-located replicas moved apart (round_robin, ilp; eplb on request)
    plan       Placement: phy2log [L, R] and the plan file (solver_report: ilp's typed report)
    export     vLLM / SGLang / EPLB files;  plot: load heatmaps on one fixed scale
    cli/       `expertmesh plan | evaluate | compare | export | trace | plan-demo`; exits: errors and exit codes
"""

from .cost import CostParams, Metrics, evaluate, expected_balance
from .heldout import SplitSpec, parse_split, split_trace
from .plan import Placement, PlanError, load_plan, save_plan
from .robust import RobustOptions
from .sources import load_routing
from .stats import RoutingStats, stats_from_trace
from .synthetic import SyntheticSpec, synthetic_trace
from .topology import Topology, TopologyError
from .trace import Trace, TraceError, load_trace, save_trace

__all__ = [
    "Trace", "TraceError", "load_trace", "save_trace", "load_routing",
    "RoutingStats", "stats_from_trace", "SyntheticSpec", "synthetic_trace",
    "Topology", "TopologyError", "Placement", "PlanError", "load_plan", "save_plan",
    "STRATEGIES", "InfeasibleError", "IlpOptions", "EplbOptions", "RobustOptions", "place",
    "CostParams", "Metrics", "evaluate", "expected_balance", "SplitSpec", "parse_split", "split_trace",
]

# The placers load on first use: they need OR-Tools, which the runtime's machines may not have (a GPU box),
# and the runtime, which reads plans and traces, must not pull a placer in (tests/test_layering.py).
_LAZY = {"STRATEGIES": "placers", "InfeasibleError": "placers", "place": "placers", "IlpOptions": "ilp",
         "EplbOptions": "eplb"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
