"""What a solving placer says about its plan: one typed record, the `solver` section of a plan file.

Only `ilp` solves; the other placers' plans carry no report (None). Status, objective, bound and gap sum
the plan's subproblems, each in its own units (see `gap`): they say how far the solver got on the problems
it was given, not how good the plan is (that is the cost model's job).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

__all__ = ["FollowStarts", "StepChoice", "SolverReport", "ReportError"]


class ReportError(ValueError):
    """A plan file's `solver` section that does not match this record; the message names the field."""


@dataclass(frozen=True, kw_only=True)
class FollowStarts:
    """Token-follow stage 3's starts: tokens kept on their GPU between layers by each start, the winner,
    and the layers of the winner that its last pass repaired by swaps or re-solved."""

    starts: int
    values: tuple[float, ...]
    best: int
    layers_repaired: int = 0
    layers_resolved: int = 0


@dataclass(frozen=True, kw_only=True)
class StepChoice:
    """`ilp`'s default objective: the layers taken from EPLB's plan so that the cost model predicts a step
    time no slower than EPLB's, and the predicted step times of the plan returned, the solver's and EPLB's."""

    layers_from_eplb: tuple[int, ...]
    step_ms: float
    solver_step_ms: float
    eplb_step_ms: float


_NESTED = {"follow_starts": FollowStarts, "step_choice": StepChoice}


@dataclass(frozen=True, kw_only=True)
class SolverReport:
    status: str  # OPTIMAL when every subproblem is; FEASIBLE when all have an answer; else NO_SOLUTION
    objective: float  # sum of the subproblems' objectives, each in its own integer units
    bound: float  # sum of their lower bounds (CP-SAT's, or the priced assignments' Lagrangian bounds)
    gap: float  # (objective - bound) / |objective|: 0 proves every subproblem optimal; not a plan quality
    method: str
    subproblems: int
    subproblems_optimal: int
    time_s: float
    workers: int = 1
    stage_s: dict[str, float] = field(default_factory=dict)  # wall seconds per stage ("stage1" ...)
    layer_cost: float | None = None  # stage 1's objective summed over layers...
    eplb_layer_cost: float | None = None  # ...and EPLB's arrangement's on the same layers
    layers_kept_eplb: int | None = None  # layers where no solver answer beat EPLB's arrangement
    follow_starts: FollowStarts | None = None
    staying_tokens: float | None = None  # exact token-follow: tokens kept on their GPU between layers
    step_choice: StepChoice | None = None  # None: the solver's own plan (objective "traffic", or no trace)

    def to_json(self) -> dict:
        """JSON-ready dict: every set field, non-finite numbers as null."""
        doc = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, FollowStarts | StepChoice):
                value = {g.name: list(v) if isinstance(v := getattr(value, g.name), tuple) else v
                         for g in fields(value)}
            elif isinstance(value, float) and not math.isfinite(value):
                value = None
            doc[f.name] = dict(value) if isinstance(value, dict) else value
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> SolverReport:
        if not isinstance(doc, dict):
            raise ReportError(f"solver: expected a JSON object, got {type(doc).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ReportError(f"solver: unknown field(s) {unknown}; expected some of {sorted(known)}")
        values = {k: (float("nan") if v is None and k in ("objective", "bound", "gap") else v)
                  for k, v in doc.items()}
        try:
            for name, kind in _NESTED.items():
                if values.get(name) is not None:
                    nested = values[name]
                    if not isinstance(nested, dict):
                        raise ReportError(f"solver: {name}: expected a JSON object, got {nested!r}")
                    values[name] = kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in nested.items()})
            return cls(**values)
        except TypeError as exc:
            raise ReportError(f"solver: {exc}") from None
