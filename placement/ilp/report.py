"""The plan's `SolverReport` from its subproblems' reports."""

from __future__ import annotations

from ..partition import SolveReport
from ..solver_report import FollowStarts, SolverReport
from .layer import LayerResult

__all__ = ["summarise"]


def summarise(reports: list[SolveReport], stage1: list[LayerResult], *, time_s: float, workers: int,
              stage_s: dict[str, float], follow_starts: FollowStarts | None) -> SolverReport:
    """Status, objective, bound and gap sum the subproblems (CP-SAT's, and the priced assignments' of
    token-follow stage 3 with their Lagrangian bounds; every stage and sweep counts); the loss from
    decomposing into subproblems is not in the gap and is measured separately (bench/placement.py)."""
    statuses = {r.status for r in reports}
    solved = [r for r in reports if r.has_solution]
    objective = float(sum(r.objective for r in solved))
    bound = float(sum(r.bound for r in solved))
    return SolverReport(
        status="OPTIMAL" if statuses <= {"OPTIMAL"} else ("FEASIBLE" if solved else "NO_SOLUTION"),
        objective=objective,
        bound=bound,
        gap=(objective - bound) / abs(objective) if objective else 0.0,
        method="per-layer partitions (CP-SAT from local search)" + (", token-follow stages 2-3"
                                                                     if follow_starts else ""),
        subproblems=len(reports),
        subproblems_optimal=sum(r.status == "OPTIMAL" for r in reports),
        layer_cost=float(sum(r.objective for r in stage1)),
        eplb_layer_cost=float(sum(r.start_objective for r in stage1)),
        layers_kept_eplb=sum(r.kept_start for r in stage1),
        time_s=time_s,
        workers=workers,
        stage_s=stage_s,
        follow_starts=follow_starts,
    )
