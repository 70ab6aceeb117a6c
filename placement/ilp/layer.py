"""One layer's arrangement of expert copies on GPUs under the balance cap: the job, its partition problem,
its solve (flat, or nodes then GPUs), and the pool that solves a batch of layers in parallel processes."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context

import numpy as np

from ..partition import PartitionProblem, SolveReport
from .decompose import decomposed
from .subproblem import subproblem

__all__ = ["LOAD_UNITS", "PAIR_UNITS", "LayerJob", "LayerResult", "layer_problem", "follow_copy_load",
           "solve_layer", "run_layers"]

LOAD_UNITS = 1_000_000  # a layer's total load in integer units (resolution 1e-6 of the layer)
PAIR_UNITS = 100_000  # the heaviest co-activation pair (or reward) in a layer weighs about this much


@dataclass(frozen=True, kw_only=True)
class LayerJob:
    layer: int
    load: np.ndarray  # [E] float load of one replica (count / replicas)
    replicas: np.ndarray  # [E] replica count
    pairs: np.ndarray  # [m, 2]
    pair_weight: np.ndarray  # [m] int
    eplb: np.ndarray  # [E, G] EPLB's replicas per GPU: sets the cap
    start: np.ndarray  # [E, G] the arrangement to beat (EPLB's in stage 1, stage 2's in stage 3)
    reward: np.ndarray | None = None  # [E, G] int reward for holding e on g (migration, token-follow)
    arrivals: np.ndarray | None = None  # [E, G] float tokens of e that reach the layer on GPU g (token-follow)
    num_nodes: int
    slots_per_gpu: int
    slack: float  # balancedness may fall this far below EPLB's on this layer
    node_penalty: int  # a pair split across nodes costs this many times a pair split across GPUs
    decompose: bool  # nodes first, then each node's GPUs
    seed: int
    flat_competes: bool  # the flat heuristic competes with the decomposition (see `decomposed`)
    budget: float  # CP-SAT deterministic time for the layer


@dataclass(frozen=True, kw_only=True)
class LayerResult:
    layer: int
    x: np.ndarray  # [E, G] copies of e on g
    reports: list[SolveReport]
    objective: float
    start_objective: float
    kept_start: bool


def follow_copy_load(job: LayerJob, scale: float, arrivals: np.ndarray | None) -> np.ndarray | None:
    """int [E, G]: the load of one copy of e on g in the token-follow dataflow, where a token is served by
    a replica on the GPU it sits on (routing.py, rule 1) and otherwise by one picked in rotation (rule 3).
    A copy on g takes the A[e, g] tokens arriving on g plus its share of those arriving where e has no
    copy; counting the expert's other copies as arriving-average GPUs (w / G each) makes that linear:
    w / r + (1 - 1/r) (A[e, g] - w / G). Exact for unreplicated experts (w) and uniform arrivals (w / r).
    None when nothing is replicated or no arrivals are known (the home dataflow: home GPUs are uniform)."""
    if arrivals is None or not (job.replicas > 1).any():
        return None
    G = arrivals.shape[1]
    r = job.replicas[:, None].astype(np.float64)
    w = (job.load * job.replicas)[:, None]
    per_copy = w / r + (1 - 1 / r) * (arrivals - w / G)
    return np.maximum(np.round(per_copy * scale), 0).astype(np.int64)


def layer_problem(job: LayerJob) -> PartitionProblem:
    """The layer over all GPUs: integer loads and the cap that keeps balancedness within `slack` of EPLB's."""
    E, G = job.eplb.shape
    per_node = G // job.num_nodes
    scale = LOAD_UNITS / max(float((job.load * job.replicas).sum()), 1e-12)
    load = np.round(job.load * scale).astype(np.int64)
    # EPLB's planned (even-split) loads set the cap in token-follow with replicas too: measured, that holds
    # the allowance within a few thousandths (placement.notes.md).
    eplb_loads = (load[:, None] * job.eplb).sum(0)
    mean = eplb_loads.sum() / G
    eplb_bal = mean / max(eplb_loads.max(), 1)
    cap = int(max(np.floor(mean / max(eplb_bal - job.slack, 1e-9)), eplb_loads.max()))
    return PartitionProblem(
        job.replicas, load, G, job.slots_per_gpu, 1, cap, job.pairs, job.pair_weight,
        node_of_part=np.arange(G) // per_node, node_penalty=job.node_penalty, reward=job.reward,
        peak_weight=0 if len(job.pairs) or job.reward is not None else 1,
        replica_group=np.arange(G) // per_node if job.num_nodes > 1 else None,
        load_at=follow_copy_load(job, scale, job.arrivals),
    )


def solve_layer(job: LayerJob) -> LayerResult:
    whole = layer_problem(job)
    if job.num_nodes > 1 and job.decompose:
        x, reports = decomposed(job, whole)
    else:
        x, reports = subproblem(whole, job.start, job.seed, job.budget)

    # Keep the starting arrangement unless ours keeps the cap and is at least as good on the whole layer
    # (or the start breaks the cap, as stage 2's may once replicas carry the tokens arriving on their GPU).
    theirs = whole.objective(job.start)
    ours = whole.objective(x) if x is not None and whole.feasible(x) else np.inf
    kept = bool(ours > theirs) and (whole.feasible(job.start) or not np.isfinite(ours))
    if kept:
        x, ours = job.start.copy(), theirs
    return LayerResult(layer=job.layer, x=x, reports=reports, objective=ours, start_objective=theirs, kept_start=kept)


def run_layers(jobs: list[LayerJob], workers: int, progress: Callable[[int, int], None] | None
               ) -> list[LayerResult]:
    results: list[LayerResult] = []
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            results.append(solve_layer(job))
            if progress:
                progress(len(results), len(jobs))
        return results
    # fork: a spawned pool would re-import the caller's __main__ (scripts without a main guard break);
    # the parent holds no solver threads at this point, so forking is safe.
    context = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
        for result in pool.map(solve_layer, jobs):
            results.append(result)
            if progress:
                progress(len(results), len(jobs))
    return results
