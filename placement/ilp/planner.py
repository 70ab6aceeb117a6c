"""`ilp()`: the stages in order (the package docstring describes them)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from ..eplb import EplbOptions, eplb
from ..plan import Placement
from ..solver_report import SolverReport
from ..spread import spread_replicas
from ..stats import RoutingStats, stats_from_trace
from ..topology import Topology
from ..trace import Trace
from .exact import one_expert_per_gpu_follow
from .follow import FollowSetup, auto_follow_starts, stage3
from .layer import run_layers
from .options import IlpOptions
from .report import summarise
from .selection import choose_by_step
from .stage1 import stage1_jobs
from .stage2 import map_groups

__all__ = ["ilp", "with_step_objective", "with_robust"]

_DECOMPOSE_ABOVE_GPUS = 16  # stage 1 over nodes, then GPUs, above this many GPUs on several nodes


def ilp(
    data: RoutingStats | Trace,
    topology: Topology,
    num_slots: int,
    options: IlpOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Placement:
    """Plan with CP-SAT (see the package docstring). `progress(done, total)` is called as layers finish.

    With a trace and the "step" objective (the default), the solver's plan takes as few of EPLB's layers as
    the cost model needs to predict a step time no slower than EPLB's (selection.py); statistics alone plan
    by the solver only."""
    options = options or IlpOptions()
    stats = data if isinstance(data, RoutingStats) else stats_from_trace(data)
    plan = _solve(stats, topology, num_slots, options, progress)
    if options.robust is not None:
        plan = with_robust(data, plan, topology, options)
    if options.objective == "step" and isinstance(data, Trace):
        plan = with_step_objective(data, plan, topology, options)
    return plan


def with_step_objective(trace: Trace, plan: Placement, topology: Topology, options: IlpOptions) -> Placement:
    """The solver's own `plan` (objective "traffic") with as few layers replaced by EPLB's as it takes for
    the cost model to predict, on `trace`, a step time no slower than EPLB's (selection.py): what the
    default objective "step" returns."""
    _, eplb_plan = _eplb_plans(stats_from_trace(trace), topology, plan.num_slots, options)
    rows, choice = choose_by_step(trace, plan, eplb_plan, topology, options.params, options.dataflow)
    solver = replace(plan.solver, step_choice=choice)
    return Placement(rows, plan.num_gpus, plan.num_nodes, plan.num_experts, "ilp", solver=solver,
                     options={**plan.options, "objective": "step"})


def _solve(stats: RoutingStats, topology: Topology, num_slots: int, options: IlpOptions,
           progress: Callable[[int, int], None] | None) -> Placement:
    """The solver's own plan (objective "traffic")."""
    start_time = time.perf_counter()
    L, E = stats.num_layers, stats.num_experts
    G, N = topology.num_gpus, topology.num_nodes
    previous = options.previous
    if previous is not None and (previous.num_layers, previous.num_experts, previous.num_gpus) != (L, E, G):
        raise ValueError(
            f"previous: plan has {previous.num_layers} layers x {previous.num_experts} experts on "
            f"{previous.num_gpus} GPUs, expected {L} x {E} on {G}"
        )
    hint, spread = _eplb_plans(stats, topology, num_slots, options)
    workers = max(1, min(options.workers or os.cpu_count() or 1, L))
    follow = options.dataflow == "follow" and stats.trans is not None and L > 1
    if follow and G == E == num_slots and N == 1 and previous is None:
        return _exact_follow(stats, topology, options, start_time)
    # CP-SAT's deterministic time runs ~2x slower than the wall clock here, and the local search and
    # process start-up take their share: the solver gets a fifth of the wall budget, spread over stages.
    solver_time = 0.2 * options.time_limit * workers
    # In token-follow, stage 1 only gives stage 3 its start: stage 3 gets most of the time.
    decompose = options.decompose if options.decompose is not None else (N > 1 and G > _DECOMPOSE_ABOVE_GPUS)
    jobs, pair_scales = stage1_jobs(stats, topology, hint, spread, options, follow=follow, decompose=decompose,
                                    budget=solver_time * (0.1 if follow else 1.0) / L)
    results = run_layers(jobs, workers, progress)
    stage_s = {"stage1": time.perf_counter() - start_time}
    xs = [r.x for r in results]
    reports = [rep for r in results for rep in r.reports]
    follow_starts = None
    if follow:
        trans = stats.follow_trans()  # from their top-1 expert's GPU (where tokens sit) to their next experts
        if previous is None:  # with a previous plan the GPU labels are already fixed by stage 1
            xs, stage2 = map_groups(xs, trans, topology, options.seed, solver_time * 0.1 / (L - 1))
            reports.extend(stage2)
        stage_s["stage2"] = time.perf_counter() - start_time - sum(stage_s.values())
        setup = FollowSetup(jobs=jobs, trans=trans, pair_scales=pair_scales, solver_time=solver_time,
                            workers=workers)
        starts = options.follow_starts if options.follow_starts is not None else auto_follow_starts(
            E, G, L, options.time_limit)
        if previous is not None:  # other starts would move experts the migration term pins: one start
            starts = 1
        # A single start is the forward chain (it beat stage 2's plan on every shape measured).
        xs, stage3_reports, follow_starts = stage3(setup, xs, starts, options.seed,
                                                   chain_first=starts == 1 and previous is None)
        reports.extend(stage3_reports)
        stage_s["stage3"] = time.perf_counter() - start_time - sum(stage_s.values())
    phy2log = np.stack([np.concatenate([np.repeat(np.arange(E), x[:, g]) for g in range(G)]) for x in xs])
    solver = summarise(reports, results, time_s=time.perf_counter() - start_time, workers=workers,
                       stage_s=stage_s, follow_starts=follow_starts)
    return Placement(phy2log, G, N, E, "ilp", solver=solver, options=_options_record(options, decompose))


def with_robust(data: RoutingStats | Trace, plan: Placement, topology: Topology, options: IlpOptions) -> Placement:
    """The solver's own `plan` with every layer repaired until it keeps its balance within the robust slack
    of EPLB's in every load scenario of `options.robust` (robust_plan.py); layers the repair cannot fix take
    EPLB's arrangement. What `ilp` does with `robust` set, before the step objective; also usable on a plan
    solved before (the controller's, a benchmark's)."""
    from ..robust import robust_record
    from ..robust_plan import robust_ilp_rows, scenarios_for

    if options.robust is None:
        raise ValueError("robust: with_robust needs IlpOptions.robust")
    stats = data if isinstance(data, RoutingStats) else stats_from_trace(data)
    _, spread = _eplb_plans(stats, topology, plan.num_slots, options)
    coact = stats.coact if stats.coact is not None else np.zeros((stats.num_layers,) + stats.counts.shape[1:] * 2)
    rows, fallback = robust_ilp_rows(plan.replicas, spread.replicas, coact, scenarios_for(options.robust, data),
                                     options.robust.slack, topology.node_of_gpu)
    record = {**plan.options, "robust": {**robust_record(options.robust), "layers_from_eplb": fallback}}
    return Placement(rows, plan.num_gpus, plan.num_nodes, plan.num_experts, "ilp", solver=plan.solver,
                     options=record)


def _eplb_plans(stats: RoutingStats, topology: Topology, num_slots: int, options: IlpOptions
                ) -> tuple[Placement, Placement]:
    """EPLB's plan, which sets the cap, and the same with no expert twice on a GPU, every layer's start and
    the "step" objective's alternative. An expert with more copies than a node has GPUs may span nodes in
    ilp, so the copies EPLB's node cannot spread are spread over all GPUs."""
    G = topology.num_gpus
    hint = eplb(stats, topology, num_slots, EplbOptions(policy=options.eplb_policy))
    spread = eplb(stats, topology, num_slots, EplbOptions(policy=options.eplb_policy, spread_replicas=True))
    rows = spread_replicas(spread.phy2log, G, None, stats.counts / hint.logcnt)
    return hint, Placement(rows, G, topology.num_nodes, stats.num_experts, "eplb", options=dict(spread.options))


def _options_record(options: IlpOptions, decompose: bool) -> dict:
    return {"dataflow": options.dataflow, "objective": options.objective, "seed": options.seed,
            "time_limit": options.time_limit, "balance_slack": options.balance_slack, "decompose": decompose}


def _exact_follow(stats: RoutingStats, topology: Topology, options: IlpOptions, start_time: float) -> Placement:
    phy2log, crossing, staying = one_expert_per_gpu_follow(stats)
    L = stats.num_layers
    solver = SolverReport(
        status="OPTIMAL", objective=crossing, bound=crossing, gap=0.0,
        method="assignment per layer pair (one expert per GPU)", subproblems=L - 1, subproblems_optimal=L - 1,
        staying_tokens=staying, time_s=time.perf_counter() - start_time, workers=1,
    )
    return Placement(phy2log, topology.num_gpus, topology.num_nodes, stats.num_experts, "ilp", solver=solver,
                     options=_options_record(options, False))
