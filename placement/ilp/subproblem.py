"""One partition subproblem: the best of the cheap starts (local search from the hint, an affinity greedy,
LPT packing; the priced assignment for linear objectives), then CP-SAT from it on a deterministic budget."""

from __future__ import annotations

import time

import numpy as np

from ..assignment import assign_under_cap, repair_cap
from ..cpsat_models import partition
from ..local_search import greedy_partition, improve_by_swaps, lpt_partition
from ..partition import PartitionProblem, SolveReport

__all__ = ["MIN_BUDGET", "heuristic", "linear_solve", "subproblem"]

MIN_BUDGET = 0.05  # CP-SAT runs below this deterministic time never beat the local search's answer
_POLISH_ROUNDS = 50  # swap rounds polishing a priced assignment (more gave the same plans)


def linear_solve(pb: PartitionProblem, hint: np.ndarray) -> tuple[np.ndarray | None, SolveReport]:
    """A linear problem solved as a priced min-cost-flow assignment from `hint` (assignment.py), polished by
    swaps; None when nothing keeps the cap (the hint may break it: with replicas a copy's load moves with its
    neighbour's placement). Copies of a bound expert stay in the replica group the hint gives them. The
    report carries the Lagrangian bound, so the plan's gap covers these layers too."""
    start = time.perf_counter()
    result = assign_under_cap(pb.reward, pb.copy_load(), pb.replicas, pb.slots, pb.cap, hint, pb.group_mask(hint))
    x = None if result.x is None else improve_by_swaps(pb, result.x, max_rounds=_POLISH_ROUNDS)
    objective = pb.objective(x) if x is not None else float("nan")
    # Minimising -value: the bound on value is a lower bound on the objective. OPTIMAL when they meet.
    bound = -result.bound
    status = "NO_SOLUTION" if x is None else ("OPTIMAL" if objective <= bound + 1e-6 * abs(bound) else "FEASIBLE")
    return x, SolveReport(status, objective, bound, pb.objective(hint), time.perf_counter() - start)


def heuristic(pb: PartitionProblem, hint: np.ndarray | None) -> np.ndarray | None:
    """Local search from the hint and from an affinity greedy (from LPT packing when neither keeps the
    cap); the best result, or None when no start keeps the cap."""
    starts = [x for x in (hint, greedy_partition(pb)) if x is not None and pb.feasible(x)]
    if not starts:  # LPT packs tightest: the start of last resort when the others break the cap...
        packed = lpt_partition(pb)
        one_copy = pb.max_per_part == 1 or (pb.replicas == 1).all()  # (repair_cap moves single copies)
        if not pb.feasible(packed) and one_copy:  # ...repaired by swaps where it still does
            packed = repair_cap(packed, np.zeros(packed.shape), pb.copy_load(), pb.cap, pb.group_mask(packed))
        starts = [x for x in (packed,) if x is not None and pb.feasible(x)]
    return min((improve_by_swaps(pb, x) for x in starts), key=pb.objective, default=None)


def subproblem(pb: PartitionProblem, hint: np.ndarray | None, seed: int, budget: float,
               start: np.ndarray | None = None) -> tuple[np.ndarray, list[SolveReport]]:
    """The heuristic's best (or `start`), then CP-SAT from it (CP-SAT repairs LPT when nothing keeps the cap).
    Below `MIN_BUDGET` CP-SAT is skipped when the start keeps the cap (no report)."""
    reports = []
    if start is None and hint is not None and pb.is_linear:
        start, report = linear_solve(pb, hint)
        reports.append(report)
    if start is None:
        start = heuristic(pb, hint)
    if start is not None and budget < MIN_BUDGET:
        return start, reports
    x, report = partition(pb, start if start is not None else lpt_partition(pb), seed, budget)
    if reports and report.has_solution:  # one subproblem, two solvers: the better answer, the tighter bound
        first = reports[0]
        objective = min(report.objective, first.objective) if first.has_solution else report.objective
        bound = max(report.bound, first.bound)
        status = "OPTIMAL" if objective <= bound + 1e-6 * abs(bound) else "FEASIBLE"
        return x, [SolveReport(status, objective, bound, first.hint_objective, first.wall_s + report.wall_s)]
    return x, [*reports, report]
