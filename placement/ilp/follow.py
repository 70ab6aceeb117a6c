"""Stage 3 (token-follow): each layer re-assigned against its neighbours' placement, from several starts.

With its two neighbours fixed, a layer's follow objective is a value per (expert, GPU) (`follow_reward`),
so a layer is re-solved as an assignment under the cap. Red-black sweeps: even layers in parallel against
their odd neighbours, then odd layers against the refined even ones. Starts: stage 2's plan, the forward
chain (every layer in turn assigned to the tokens arriving from its re-assigned predecessor), then kicks of
the best plan so far; the plan keeping the most tokens on their GPU between layers wins.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..assignment import repair_cap
from ..partition import PartitionProblem, SolveReport
from ..solver_report import FollowStarts
from .layer import LayerJob, layer_problem, run_layers, solve_layer
from .stage2 import share

__all__ = ["FollowSetup", "stage3", "follow_value", "auto_follow_starts"]

_FOLLOW_SWEEPS = 3  # red-black sweeps per start (a fourth changed nothing)
_FOLLOW_CPSAT_SHARE = 0.6  # of the solver time, for CP-SAT in the last sweep
_LINEAR_CPSAT_CELLS = 2048  # experts x GPUs above which CP-SAT finds nothing in time: priced assignment only
_KICK_SHARE = 0.5  # of a layer's single-copy experts swapped in random pairs by a kick
_FOLLOW_START_CELLS = 64 * 8 * 16 * 3  # experts x GPUs x layers x starts per 10 s of time limit
_MAX_FOLLOW_STARTS = 4


@dataclass(frozen=True, kw_only=True)
class FollowSetup:
    """What every stage-3 re-solve needs: stage 1's jobs (loads, caps, migration rewards), the tokens
    between layers, the layers' pair scales, the solver time and the processes."""

    jobs: list[LayerJob]
    trans: np.ndarray  # [L-1, E, E] `RoutingStats.follow_trans()`
    pair_scales: list[float]
    solver_time: float
    workers: int

    @property
    def num_layers(self) -> int:
        return len(self.jobs)

    @property
    def small(self) -> bool:
        """Experts x GPUs small enough for CP-SAT in the last sweep."""
        return self.jobs[0].eplb.size <= _LINEAR_CPSAT_CELLS


@dataclass(frozen=True, kw_only=True)
class _Refined:
    xs: list[np.ndarray]
    reports: list[SolveReport]
    repaired: int
    resolved: int


def follow_reward(xs: list[np.ndarray], trans: np.ndarray, layer: int, scale: float) -> np.ndarray:
    """int [E, G]: tokens that reach expert e of `layer` from GPU g (layer-1's placement) plus tokens that
    leave e for layer+1's experts on g, in the layer's pair units."""
    reward = np.zeros_like(xs[layer], dtype=np.float64)
    if layer > 0:
        reward += trans[layer - 1].T @ share(xs[layer - 1])  # [E, G]: arrivals from g
    if layer + 1 < len(xs):
        reward += trans[layer] @ share(xs[layer + 1])  # [E, G]: departures to g
    return np.round(reward * scale).astype(np.int64)


def follow_value(xs: list[np.ndarray], trans: np.ndarray) -> float:
    """Tokens that stay on their GPU between consecutive layers (top-1 expert's GPU to a next expert's),
    summed over the transitions: what stage 3 maximises, per layer its reward."""
    return float(sum(np.sum(share(xs[layer]) * (trans[layer] @ share(xs[layer + 1])))
                     for layer in range(len(xs) - 1)))


def auto_follow_starts(E: int, G: int, L: int, time_limit: float) -> int:
    """Stage 3 starts by size and time limit, not by the clock, so plans stay deterministic under the seed."""
    return int(min(_MAX_FOLLOW_STARTS, max(1, _FOLLOW_START_CELLS * time_limit / 10 // (E * G * L))))


def _kick(x: np.ndarray, pb: PartitionProblem, rng: np.random.Generator) -> np.ndarray:
    """`x` with `_KICK_SHARE` of its single-copy experts swapped in random pairs across GPUs, each swap only
    where both GPUs stay under the cap."""
    x = x.copy()
    w = pb.copy_load()
    single = np.flatnonzero(x.sum(1) == 1)
    gpu = np.argmax(x, axis=1)
    loads = pb.part_loads(x).astype(np.float64)
    swaps = int(np.ceil(_KICK_SHARE * len(single) / 2))
    for _ in range(swaps):
        if len(single) < 2:
            break
        e, f = rng.choice(single, 2, replace=False)
        g, h = gpu[e], gpu[f]
        if g == h:
            continue
        new_g = loads[g] - w[e, g] + w[f, g]
        new_h = loads[h] - w[f, h] + w[e, h]
        if new_g > pb.cap or new_h > pb.cap:
            continue
        x[e, g], x[e, h], x[f, h], x[f, g] = 0, 1, 0, 1
        gpu[e], gpu[f] = h, g
        loads[g], loads[h] = new_g, new_h
    return x


def _refine_job(setup: FollowSetup, xs: list[np.ndarray], layer: int, last: bool = True) -> LayerJob:
    """Layer `layer` against its neighbours in `xs`: the follow reward (plus migration), no pairs, copy loads
    from the arriving tokens; CP-SAT time only in the last sweep of a small instance."""
    job = setup.jobs[layer]
    reward = follow_reward(xs, setup.trans, layer, setup.pair_scales[layer])
    if job.reward is not None:
        reward = reward + job.reward
    arrivals = setup.trans[layer - 1].T @ share(xs[layer - 1]) if layer else None
    budget = setup.solver_time * _FOLLOW_CPSAT_SHARE / setup.num_layers if setup.small and last else 0.0
    return replace(job, start=xs[layer], pairs=np.zeros((0, 2), dtype=np.int64), pair_weight=np.zeros(0, np.int64),
                   reward=reward, arrivals=arrivals, decompose=False, budget=budget)


def _refine(setup: FollowSetup, xs: list[np.ndarray]) -> _Refined:
    """Red-black sweeps, then a pass in layer order over layers whose copies break the cap behind their
    final predecessor (in layer order, each fix leaves the layers before it valid)."""
    xs, reports, L = list(xs), [], setup.num_layers
    for sweep in range(_FOLLOW_SWEEPS):
        last = sweep == _FOLLOW_SWEEPS - 1
        for parity in (0, 1):
            batch = [_refine_job(setup, xs, layer, last) for layer in range(parity, L, 2)]
            for refined in run_layers(batch, setup.workers, None):
                reports.extend(refined.reports)
                xs[refined.layer] = refined.x
    repaired = resolved = 0
    for layer in range(1, L):
        job = _refine_job(setup, xs, layer)
        pb = layer_problem(job)
        if not pb.feasible(xs[layer]):
            # Cheapest first: trade copies off the GPUs now over the cap; else re-solve the layer.
            fixed = repair_cap(xs[layer], pb.reward, pb.copy_load(), pb.cap, pb.group_mask(xs[layer]))
            if fixed is not None and pb.feasible(fixed):
                xs[layer] = fixed
                repaired += 1
                continue
            refined = solve_layer(job)
            reports.extend(refined.reports)
            xs[layer] = refined.x
            resolved += 1
    return _Refined(xs=xs, reports=reports, repaired=repaired, resolved=resolved)


def _keeps_cap(setup: FollowSetup, xs: list[np.ndarray]) -> bool:
    return all(layer_problem(_refine_job(setup, xs, layer)).feasible(xs[layer]) for layer in range(len(xs)))


def _forward_chain(setup: FollowSetup, xs: list[np.ndarray]) -> list[np.ndarray]:
    """Each layer in turn (from layer 1) re-assigned to the tokens arriving from its predecessor only,
    under the cap: a chain that follows the tokens forward, far from the sweeps' basin."""
    xs = list(xs)
    for layer in range(1, setup.num_layers):
        job = _refine_job(setup, xs, layer, last=False)
        arriving = setup.trans[layer - 1].T @ share(xs[layer - 1])
        reward = np.round(arriving * setup.pair_scales[layer]).astype(np.int64)
        if setup.jobs[layer].reward is not None:
            reward = reward + setup.jobs[layer].reward
        xs[layer] = solve_layer(replace(job, reward=reward)).x
    return xs


def stage3(setup: FollowSetup, xs: list[np.ndarray], starts: int, seed: int, chain_first: bool
           ) -> tuple[list[np.ndarray], list[SolveReport], FollowStarts]:
    """The best of `starts` refined starts (module docstring): stage 2's plan `xs` or, with `chain_first`,
    the forward chain from it; then the chain; then kicks seeded by (seed, start). A later start wins only
    if it keeps strictly more tokens on their GPU and keeps the cap on every layer."""
    best = _refine(setup, _forward_chain(setup, xs) if chain_first else xs)
    best_value = follow_value(best.xs, setup.trans)
    values, best_start = [best_value], 0
    for index in range(1, starts):
        if index == 1:
            kicked = _forward_chain(setup, best.xs)
        else:
            rng = np.random.default_rng([seed, index])
            kicked = [_kick(x, layer_problem(_refine_job(setup, best.xs, layer)), rng)
                      for layer, x in enumerate(best.xs)]
        candidate = _refine(setup, kicked)
        value = follow_value(candidate.xs, setup.trans)
        values.append(value)
        if value > best_value + 1e-9 * abs(best_value) and _keeps_cap(setup, candidate.xs):
            best, best_value, best_start = candidate, value, index
    report = FollowStarts(starts=starts, values=tuple(values), best=best_start, layers_repaired=best.repaired,
                          layers_resolved=best.resolved)
    return best.xs, best.reports, report
