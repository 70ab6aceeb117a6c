"""The `ilp` placer: MoETuner's two stages, extended with replicas, co-activation, node topology and migration.

Stage 1, per layer (layers run in parallel processes): group the layer's expert replicas into one group
per GPU. Every group holds exactly S replicas and at most `cap` load, where `cap` keeps the layer's
balancedness within `balance_slack` of EPLB's at the same slot budget. Where MoETuner only balances, we
minimise the co-activation weight of expert pairs split across GPUs, which is what the home dataflow pays
for (a token is copied once per distinct GPU among its experts). On several nodes the grouping is
hierarchical: replicas to nodes first (minimising pairs split across nodes: internode copies), then to
the GPUs of each node. Without pair statistics (count matrices), stage 1 minimises the heaviest GPU.

Stage 2, layer after layer: map each layer's groups onto GPUs, one-to-one, minimising the traffic from
where tokens are after layer l-1 to the GPUs of their layer-l experts and the busiest bandwidth-weighted
GPU pair (MoETuner's objective), in the token-follow dataflow; in the home dataflow every layer's dispatch
starts at the token's home GPU, so the mapping does not change traffic and stage 2 only serves migration.

Migration: with a previous plan, stage 1 labels its parts as the previous plan's nodes and GPUs and rewards
every expert left in place by the bytes it would cost to move, converted to token copies over the horizon
`interval_tokens`.

Every subproblem starts from EPLB's plan (hint), runs on a deterministic time budget with a fixed seed, and a
layer keeps EPLB's arrangement whenever the solver's is not better on the same objective.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context

import numpy as np

from .cost import DATAFLOWS, CostParams
from .cpsat_models import PartitionProblem, SolveReport, assign, partition
from .eplb import eplb
from .local_search import greedy_partition, improve_by_swaps
from .plan import Placement
from .stats import RoutingStats
from .topology import Topology

__all__ = ["IlpOptions", "ilp"]

# Load is scaled so a layer's total is this many integer units (resolution 1e-6 of the layer).
_LOAD_UNITS = 1_000_000
_PAIR_UNITS = 100_000  # the heaviest co-activation pair in a layer weighs this much


@dataclass(frozen=True)
class IlpOptions:
    dataflow: str = "home"
    time_limit: float = 10.0  # wall-clock seconds the whole plan may take (approximately)
    seed: int = 0
    workers: int = 0  # processes solving layers in parallel; 0 = one per CPU core
    balance_slack: float = 0.01  # balancedness may fall at most this far below EPLB's, per layer
    pairs_per_expert: int = 8  # strongest co-activation partners kept per expert (sparsifies the model)
    eplb_policy: str = "auto"
    previous: Placement | None = None
    interval_tokens: float | None = None  # tokens over which a re-placement must pay for its migration
    params: CostParams = field(default_factory=CostParams)
    # Stage 1 over nodes, then GPUs (True), or in one model over all GPUs with a node penalty (False).
    # None decides: decompose above 16 GPUs on several nodes. Forcing False measures the decomposition's loss.
    decompose: bool | None = None

    def __post_init__(self) -> None:
        if self.dataflow not in DATAFLOWS:
            raise ValueError(f"dataflow: expected one of {DATAFLOWS}, got {self.dataflow!r}")
        if self.time_limit <= 0:
            raise ValueError(f"time_limit: expected a positive number of seconds, got {self.time_limit}")
        if not 0 <= self.balance_slack < 1:
            raise ValueError(f"balance_slack: expected a value in [0, 1), got {self.balance_slack}")
        if self.workers < 0:
            raise ValueError(f"workers: expected >= 0, got {self.workers}")


@dataclass(frozen=True)
class _LayerJob:
    layer: int
    load: np.ndarray  # [E] float load of one replica (count / replicas)
    replicas: np.ndarray  # [E] replica count
    pairs: np.ndarray  # [m, 2]
    pair_weight: np.ndarray  # [m] int
    hint: np.ndarray  # [E, G] EPLB's replicas per GPU
    previous: np.ndarray | None  # [E, G] previous plan's replicas per GPU
    keep_weight: int
    num_nodes: int
    slots_per_gpu: int
    slack: float
    node_penalty: int
    decompose: bool
    seed: int
    budget: float


@dataclass(frozen=True)
class _LayerResult:
    layer: int
    x: np.ndarray  # [E, G]
    reports: list[SolveReport]
    objective: float
    hint_objective: float
    used_hint: bool


def _strong_pairs(coact: np.ndarray | None, per_expert: int) -> tuple[np.ndarray, np.ndarray]:
    """The `per_expert` strongest partners of every expert, as unique pairs with integer weights."""
    if coact is None or not np.any(coact > 0):
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64)
    E = coact.shape[0]
    c = coact.astype(np.float64).copy()
    np.fill_diagonal(c, 0)
    k = min(per_expert, E - 1)
    partners = np.argsort(-c, axis=1, kind="stable")[:, :k]
    a = np.repeat(np.arange(E), k)
    b = partners.ravel()
    keep = c[a, b] > 0
    pairs = np.unique(np.sort(np.stack([a[keep], b[keep]], 1), axis=1), axis=0)
    w = c[pairs[:, 0], pairs[:, 1]]
    weight = np.maximum(np.round(w * (_PAIR_UNITS / w.max())), 1).astype(np.int64)
    return pairs, weight


def _heuristic(pb: PartitionProblem, hint: np.ndarray | None) -> np.ndarray | None:
    """Local search from EPLB's arrangement, an affinity greedy and LPT packing (those that keep the cap);
    the best result, or None when no start keeps the cap."""
    starts = [x for x in (hint, greedy_partition(pb), _lpt(pb)) if x is not None and pb.feasible(x)]
    return min((improve_by_swaps(pb, x) for x in starts), key=pb.objective, default=None)


def _subproblem(pb: PartitionProblem, hint: np.ndarray | None, seed: int, budget: float,
                start: np.ndarray | None = None) -> tuple[np.ndarray, SolveReport]:
    """One partition: the heuristic's best (or `start`), then CP-SAT from it (it repairs LPT when no
    heuristic start keeps the cap)."""
    if start is None:
        start = _heuristic(pb, hint)
    return partition(pb, start if start is not None else _lpt(pb), seed, budget)


def _lpt(pb: PartitionProblem) -> np.ndarray:
    """Longest processing time first with equal counts (EPLB's packing), ignoring the cap."""
    n = len(pb.replicas)
    x = np.zeros((n, pb.num_parts), dtype=np.int64)
    part_load = np.zeros(pb.num_parts)
    items = np.repeat(np.arange(n), pb.replicas)
    for e in items[np.argsort(-pb.load[items], kind="stable")]:
        ok = (x.sum(0) < pb.slots) & (x[e] < pb.max_per_part)
        if not ok.any():
            ok = x.sum(0) < pb.slots
        p = np.flatnonzero(ok)[np.argmin(part_load[ok])]
        x[e, p] += 1
        part_load[p] += pb.load[e]
    return x


def _restrict_pairs(pairs: np.ndarray, weight: np.ndarray, members: np.ndarray):
    """The pairs among `members`, renumbered to positions in `members`."""
    if not len(pairs):
        return pairs, weight
    index = np.full(int(max(pairs.max(), members.max(initial=0))) + 1, -1)
    index[members] = np.arange(len(members))
    keep = (index[pairs[:, 0]] >= 0) & (index[pairs[:, 1]] >= 0)
    return index[pairs[keep]].reshape(-1, 2), weight[keep]


def _decomposed(job: _LayerJob, load: np.ndarray, cap: int, keep, common: dict):
    """Stage 1 on several nodes: replicas to nodes (a node is a part of G/N GPUs), then each node's
    replicas to its GPUs. Returns the assignment [E, G] (None if nothing kept the cap) and the reports."""
    E, G = job.hint.shape
    N, S = job.num_nodes, job.slots_per_gpu
    per_node = G // N
    gpus_of = [np.flatnonzero(np.arange(G) // per_node == n) for n in range(N)]
    node_hint = np.stack([job.hint[:, g].sum(1) for g in gpus_of], 1)
    node_keep = None if keep is None else np.stack([keep[:, g].any(1) for g in gpus_of], 1).astype(np.int64)
    hint_node_peak = int((load[:, None] * node_hint).sum(0).max())

    def node_problem(node_cap: int) -> PartitionProblem:
        return PartitionProblem(job.replicas, load, N, S * per_node, per_node, node_cap, keep=node_keep, **common)

    def gpu_problems(node_x: np.ndarray) -> list[tuple[np.ndarray, PartitionProblem]]:
        out = []
        for n in range(N):
            members = np.flatnonzero(node_x[:, n])
            pairs, weight = _restrict_pairs(job.pairs, job.pair_weight, members)
            sub_keep = None if keep is None else keep[np.ix_(members, gpus_of[n])]
            out.append((members, PartitionProblem(node_x[members, n], load[members], per_node, S, 1, cap, pairs,
                                                  weight, keep=sub_keep, keep_weight=job.keep_weight)))
        return out

    def pack(node_x: np.ndarray) -> list[np.ndarray] | None:
        """Heuristic GPU assignments for every node under the cap, or None if some node does not pack."""
        packed = []
        for n, (members, pb) in enumerate(gpu_problems(node_x)):
            sub = _heuristic(pb, job.hint[np.ix_(members, gpus_of[n])])
            if sub is None:
                return None
            packed.append(sub)
        return packed

    # A node's replicas must still pack onto its GPUs under the cap. Find, with the cheap heuristics
    # alone, the loosest node cap that packs, tightening toward EPLB's heaviest node (whose replicas are
    # known to pack), and at last keeping EPLB's node sets; then spend the solver budget once per
    # subproblem.
    for tighten in (1.0, 0.97, 0.93, 0.0, None):
        nodes_pb = node_problem(max(int(cap * per_node * (tighten or 0)), hint_node_peak))
        # Last resort: EPLB's own node sets, which pack by construction; only the GPU level then improves.
        node_x = _heuristic(nodes_pb, node_hint) if tighten is not None else node_hint
        packed = None if node_x is None else pack(node_x)
        if packed is not None:
            break
    else:
        return None, []
    reports = []
    solved, rep = _subproblem(nodes_pb, node_hint, job.seed, job.budget / 2, start=node_x)
    reports.append(rep)
    if not np.array_equal(solved, node_x) and nodes_pb.feasible(solved):
        repacked = pack(solved)
        if repacked is not None:
            node_x, packed = solved, repacked
    x = np.zeros((E, G), dtype=np.int64)
    for n, ((members, pb), start) in enumerate(zip(gpu_problems(node_x), packed, strict=True)):
        sub_x, rep = _subproblem(pb, None, job.seed, job.budget / (2 * N), start=start)
        reports.append(rep)
        x[np.ix_(members, gpus_of[n])] = sub_x if pb.feasible(sub_x) else start
    return x, reports


def _solve_layer(job: _LayerJob) -> _LayerResult:
    E, G = job.hint.shape
    N, S = job.num_nodes, job.slots_per_gpu
    per_node = G // N
    node_of_gpu = np.arange(G) // per_node

    # Integer loads and the cap that keeps balancedness within `slack` of EPLB's.
    scale = _LOAD_UNITS / max(float((job.load * job.replicas).sum()), 1e-12)
    load = np.round(job.load * scale).astype(np.int64)
    hint_loads = (load[:, None] * job.hint).sum(0)
    mean = hint_loads.sum() / G
    hint_bal = mean / max(hint_loads.max(), 1)
    cap = int(max(np.floor(mean / max(hint_bal - job.slack, 1e-9)), hint_loads.max()))
    keep = None if job.previous is None else (job.previous > 0).astype(np.int64)
    common = dict(pairs=job.pairs, pair_weight=job.pair_weight, keep_weight=job.keep_weight)
    whole = PartitionProblem(job.replicas, load, G, S, 1, cap, node_of_part=node_of_gpu,
                             node_penalty=job.node_penalty, keep=keep, **common)

    if N > 1 and job.decompose:
        x, reports = _decomposed(job, load, cap, keep, common)
    else:
        x, rep = _subproblem(whole, job.hint, job.seed, job.budget)
        reports = [rep]

    # Keep EPLB's arrangement unless ours is feasible and at least as good on the whole-layer objective.
    theirs = whole.objective(job.hint)
    ours = whole.objective(x) if x is not None and whole.feasible(x) else np.inf
    used_hint = bool(ours > theirs)
    if used_hint:
        x, ours = job.hint.copy(), theirs
    return _LayerResult(job.layer, x, reports, ours, theirs, used_hint)


def _share(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(x.sum(1, keepdims=True), 1)


def _map_groups(
    xs: list[np.ndarray], trans: np.ndarray, topology: Topology, seed: int, budget: float
) -> tuple[list[np.ndarray], list[SolveReport]]:
    """Stage 2 (token-follow): permute every layer's GPU columns so tokens find their next experts where
    they already are; hierarchical (nodes, then GPUs in a node) above 16 GPUs."""
    G, N = topology.num_gpus, topology.num_nodes
    per_node = G // N
    bw = topology.bandwidth_matrix()
    inverse_bw = np.where(np.isinf(bw), 0, np.round(bw[np.isfinite(bw)].max() / bw)).astype(np.int64)
    reports: list[SolveReport] = []
    out = [xs[0]]
    for layer in range(1, len(xs)):
        traffic = _share(out[-1]).T @ trans[layer - 1] @ _share(xs[layer])  # [G sources, G groups]
        traffic = np.round(traffic * (_PAIR_UNITS / max(traffic.max(), 1e-12))).astype(np.int64)
        if G <= 16:
            cost = traffic.sum(0)[:, None] - traffic.T  # group c on target h: all it receives but from h
            target, rep = assign(cost, np.arange(G), traffic, inverse_bw, G, seed, budget)
            reports.append(rep)
        else:
            # Nodes first: group blocks (stage 1's nodes) onto nodes, then groups onto the node's GPUs.
            block = np.arange(G) // per_node
            node_traffic = np.stack([traffic[:, block == b].sum(1) for b in range(N)], 1)  # [G, N]
            node_in = np.stack([node_traffic[block == n].sum(0) for n in range(N)], 0)  # [N src, N blocks]
            cost = node_in.sum(0)[:, None] - node_in.T
            node_target, rep = assign(cost, np.arange(N), seed=seed, budget=budget / 2)
            reports.append(rep)
            target = np.empty(G, dtype=np.int64)
            for b in range(N):
                groups = np.flatnonzero(block == b)
                gpus = np.arange(node_target[b] * per_node, (node_target[b] + 1) * per_node)
                sub = traffic[np.ix_(gpus, groups)]
                cost = sub.sum(0)[:, None] - sub.T
                local, rep = assign(cost, np.arange(per_node), seed=seed, budget=budget / (2 * N))
                reports.append(rep)
                target[groups] = gpus[local]
        mapped = np.empty_like(xs[layer])
        mapped[:, target] = xs[layer]
        out.append(mapped)
    return out, reports


def ilp(
    stats: RoutingStats,
    topology: Topology,
    num_slots: int,
    options: IlpOptions = IlpOptions(),
    progress: Callable[[int, int], None] | None = None,
) -> Placement:
    """Plan with CP-SAT (see the module docstring). `progress(done, total)` is called as layers finish."""
    start = time.perf_counter()
    L, E = stats.num_layers, stats.num_experts
    G, N = topology.num_gpus, topology.num_nodes
    S = topology.slots_per_gpu(num_slots)
    hint_plan = eplb(stats, topology, num_slots, options.eplb_policy)
    hint = hint_plan.replicas  # [L, E, G]
    replicas = hint_plan.logcnt  # EPLB's apportionment: it minimises the heaviest replica
    counts = stats.counts.astype(np.float64)

    previous = options.previous
    if previous is not None and (previous.num_layers, previous.num_experts, previous.num_gpus) != (L, E, G):
        raise ValueError(
            f"previous: plan has {previous.num_layers} layers x {previous.num_experts} experts on "
            f"{previous.num_gpus} GPUs, expected {L} x {E} on {G}"
        )
    horizon = options.interval_tokens if options.interval_tokens is not None else 100.0 * stats.tokens
    params = options.params

    def keep_weight_of(pair_scale: float, has_pairs: bool) -> int:
        """Reward for leaving one expert in place, in the layer's objective units. Moving an expert costs
        its weight bytes once; the objective is paid every window of the horizon."""
        if previous is None:
            return 0
        per_window = stats.tokens / max(horizon, 1.0)
        if has_pairs:  # objective = split pairs ~ token copies per window
            return int(round(params.expert_bytes / (params.hidden * params.dispatch_bytes) * per_window * pair_scale))
        # objective = the heaviest GPU's load in tokens per window: convert seconds of copying to tokens of compute
        move_s = params.expert_bytes / (topology.intra_node_gbps * 1e9)
        token_s = params.flops_per_assignment / (topology.gpu_tflops * 1e12)
        return int(round(move_s / token_s * per_window * _LOAD_UNITS / max(stats.tokens * stats.top_k, 1)))

    workers = options.workers or os.cpu_count() or 1
    stage1_budget = options.time_limit * (0.8 if options.dataflow == "follow" else 1.0)
    # CP-SAT's deterministic time runs ~2x slower than the wall clock here, and the local search and
    # process start-up take their share: give the solver a fifth of every layer's wall budget.
    layer_budget = 0.2 * stage1_budget * min(workers, L) / L
    node_penalty = int(round(topology.intra_node_gbps / topology.inter_node_gbps)) if N > 1 else 0
    decompose = options.decompose if options.decompose is not None else (N > 1 and G > 16)
    jobs = []
    for layer in range(L):
        coact = None if stats.coact is None else stats.coact[layer]
        pairs, weight = _strong_pairs(coact, options.pairs_per_expert)
        pair_scale = _PAIR_UNITS / float(coact.max()) if len(pairs) else 1.0
        jobs.append(_LayerJob(
            layer, counts[layer] / replicas[layer], replicas[layer], pairs, weight, hint[layer],
            None if previous is None else previous.replicas[layer], keep_weight_of(pair_scale, len(pairs) > 0),
            N, S, options.balance_slack, node_penalty, decompose, options.seed, layer_budget,
        ))

    results: list[_LayerResult] = []
    if workers == 1 or L == 1:
        for job in jobs:
            results.append(_solve_layer(job))
            if progress:
                progress(len(results), L)
    else:
        # fork: a spawned pool would re-import the caller's __main__ (scripts without a main guard break);
        # the parent holds no solver threads at this point, so forking is safe.
        context = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(min(workers, L), mp_context=context) as pool:
            for result in pool.map(_solve_layer, jobs):
                results.append(result)
                if progress:
                    progress(len(results), L)
    xs = [r.x for r in results]
    reports = [rep for r in results for rep in r.reports]

    if options.dataflow == "follow" and stats.trans is not None and L > 1 and previous is None:
        stage2_budget = 0.2 * options.time_limit * 0.2 / (L - 1)
        xs, stage2 = _map_groups(xs, stats.trans.astype(np.float64), topology, options.seed, stage2_budget)
        reports.extend(stage2)

    phy2log = np.stack([np.concatenate([np.repeat(np.arange(E), x[:, g]) for g in range(G)]) for x in xs])
    statuses = {r.status for r in reports}
    solved = [r for r in reports if r.has_solution]
    objective = float(sum(r.objective for r in solved))
    bound = float(sum(r.bound for r in solved))
    solver = {
        # Status, objective, bound and gap sum the CP-SAT subproblems; the loss from decomposing into
        # subproblems is not in the gap and is measured separately (bench/placement.py).
        "status": "OPTIMAL" if statuses <= {"OPTIMAL"} else ("FEASIBLE" if solved else "NO_SOLUTION"),
        "objective": objective,
        "bound": bound,
        "gap": (objective - bound) / abs(objective) if objective else 0.0,
        "subproblems": len(reports),
        "subproblems_optimal": sum(r.status == "OPTIMAL" for r in reports),
        "layer_cost": float(sum(r.objective for r in results)),
        "eplb_layer_cost": float(sum(r.hint_objective for r in results)),
        "layers_kept_eplb": sum(r.used_hint for r in results),
        "time_s": time.perf_counter() - start,
        "workers": min(workers, L),
    }
    return Placement(
        phy2log, G, N, E, "ilp", solver=solver,
        options={"dataflow": options.dataflow, "seed": options.seed, "time_limit": options.time_limit,
                 "balance_slack": options.balance_slack, "decompose": decompose},
    )
