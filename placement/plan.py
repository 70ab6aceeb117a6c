"""The placement plan: which logical expert sits in every physical slot, per layer (DeepSeek-EPLB shapes).

    phy2log  int64 [L, R]          logical expert in each physical slot; slot s lives on GPU s // S
    log2phy  int64 [L, E, maxcnt]  physical slots of each logical expert, -1 padded   (derived)
    logcnt   int64 [L, E]          replicas per logical expert                         (derived)
    replicas int64 [L, E, G]       replicas of expert e on GPU g                       (derived)

The JSON file carries `phy2log` plus the shape, strategy, solver report, metrics and a content hash
(`version`) that changes whenever the placement changes and nothing else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .solver_report import ReportError, SolverReport

__all__ = ["Placement", "PlanError", "load_plan", "save_plan", "FORMAT"]

FORMAT = "expertmesh.plan/v1"


class PlanError(ValueError):
    """A plan that does not match the contract; the message names the field."""


@dataclass(frozen=True)
class Placement:
    phy2log: np.ndarray  # int64 [L, R]
    num_gpus: int
    num_nodes: int = 1
    num_experts: int | None = None  # defaults to max(phy2log) + 1
    strategy: str = "unknown"
    solver: SolverReport | None = field(default=None, compare=False)  # ilp's report; None for the others
    metrics: dict = field(default_factory=dict, compare=False)
    options: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        p = np.asarray(self.phy2log)
        if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < 1:
            raise PlanError(f"phy2log: expected shape [L, R], got {list(p.shape)}")
        if not np.issubdtype(p.dtype, np.integer):
            raise PlanError(f"phy2log: expected integers, got dtype {p.dtype}")
        if self.num_gpus < 1 or p.shape[1] % self.num_gpus:
            raise PlanError(
                f"num_gpus: expected a positive divisor of the {p.shape[1]} slots per layer, got {self.num_gpus}"
            )
        if self.num_nodes < 1 or self.num_gpus % self.num_nodes:
            raise PlanError(f"num_nodes: expected a divisor of num_gpus={self.num_gpus}, got {self.num_nodes}")
        E = int(p.max()) + 1 if self.num_experts is None else int(self.num_experts)
        if p.min() < 0 or p.max() >= E:
            raise PlanError(f"phy2log: logical ids must lie in [0, {E}), found [{p.min()}, {p.max()}]")
        if p.shape[1] < E:
            raise PlanError(f"num_experts: {E} experts do not fit in {p.shape[1]} slots per layer")
        cnt = np.stack([np.bincount(row, minlength=E) for row in p])
        missing = np.argwhere(cnt == 0)
        if missing.size:
            layer, expert = missing[0]
            raise PlanError(f"phy2log: layer {layer} has no slot for expert {expert}; every expert needs one")
        object.__setattr__(self, "phy2log", p.astype(np.int64, copy=False))
        object.__setattr__(self, "num_experts", E)
        object.__setattr__(self, "num_gpus", int(self.num_gpus))
        object.__setattr__(self, "num_nodes", int(self.num_nodes))

    # ---- shape ----------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def slots_per_gpu(self) -> int:
        return self.num_slots // self.num_gpus

    @property
    def num_redundant(self) -> int:
        return self.num_slots - self.num_experts

    # ---- derived maps ---------------------------------------------------------------------------
    @property
    def logcnt(self) -> np.ndarray:
        return np.stack([np.bincount(row, minlength=self.num_experts) for row in self.phy2log])

    @property
    def log2phy(self) -> np.ndarray:
        L, E = self.num_layers, self.num_experts
        out = np.full((L, E, int(self.logcnt.max())), -1, dtype=np.int64)
        for layer in range(L):
            order = np.argsort(self.phy2log[layer], kind="stable")
            experts = self.phy2log[layer][order]
            starts = np.searchsorted(experts, np.arange(E))
            rank = np.arange(order.size) - starts[experts]
            out[layer, experts, rank] = order
        return out

    @property
    def replicas(self) -> np.ndarray:
        """int64 [L, E, G]: how many replicas of expert e sit on GPU g in layer l."""
        L, E, G = self.num_layers, self.num_experts, self.num_gpus
        gpu = np.arange(self.num_slots) // self.slots_per_gpu
        out = np.zeros((L, E, G), dtype=np.int64)
        layer = np.repeat(np.arange(L), self.num_slots)
        np.add.at(out, (layer, self.phy2log.ravel(), np.tile(gpu, L)), 1)
        return out

    @property
    def colocated_replicas(self) -> int:
        """Copies of an expert on a GPU that already holds one, over all layers: they serve no token."""
        return int(np.maximum(self.replicas - 1, 0).sum())

    @property
    def version(self) -> str:
        """Content hash of what the runtime acts on: the slot map and the GPU/node counts."""
        h = hashlib.sha256()
        h.update(f"{self.num_gpus}:{self.num_nodes}:{self.num_experts}:{self.phy2log.shape}".encode())
        h.update(np.ascontiguousarray(self.phy2log, dtype="<i8").tobytes())
        return h.hexdigest()[:16]

    def with_report(self, *, solver: SolverReport | None = None, metrics: dict | None = None) -> Placement:
        """The same plan with `solver` replacing its report (when given) and `metrics` merged into its own."""
        return Placement(
            self.phy2log, self.num_gpus, self.num_nodes, self.num_experts, self.strategy,
            solver or self.solver, {**self.metrics, **(metrics or {})}, dict(self.options),
        )

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": self.version,
            "strategy": self.strategy,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "num_slots": self.num_slots,
            "num_gpus": self.num_gpus,
            "num_nodes": self.num_nodes,
            "phy2log": self.phy2log.tolist(),
            "solver": {} if self.solver is None else self.solver.to_json(),
            "metrics": _jsonable(self.metrics),
            "options": _jsonable(self.options),
        }

    @classmethod
    def from_json(cls, doc: dict) -> Placement:
        if not isinstance(doc, dict):
            raise PlanError("plan: expected a JSON object at the top level")
        if doc.get("format") != FORMAT:
            raise PlanError(f"format: expected {FORMAT!r}, got {doc.get('format')!r}")
        for name in ("phy2log", "num_gpus", "num_nodes", "num_experts", "version"):
            if name not in doc:
                raise PlanError(f"plan: missing field {name!r}")
        for name in ("num_gpus", "num_nodes", "num_experts", "num_layers", "num_slots"):
            if name in doc and (not isinstance(doc[name], int) or isinstance(doc[name], bool)):
                raise PlanError(f"{name}: expected an integer, got {doc[name]!r}")
        phy2log = _phy2log_rows(doc["phy2log"], doc.get("num_slots"))
        try:
            solver = SolverReport.from_json(doc["solver"]) if doc.get("solver") else None
        except ReportError as exc:
            raise PlanError(str(exc)) from None
        plan = cls(
            phy2log, doc["num_gpus"], doc["num_nodes"], doc["num_experts"], str(doc.get("strategy", "unknown")),
            solver, dict(doc.get("metrics", {})), dict(doc.get("options", {})),
        )
        for name in ("num_layers", "num_slots"):
            want = getattr(plan, name)
            if name in doc and doc[name] != want:
                raise PlanError(f"{name}: file says {doc[name]}, phy2log has {want}")
        if doc["version"] != plan.version:
            raise PlanError(
                f"version: file says {doc['version']!r} but its content hashes to {plan.version!r} "
                "(edited or corrupted plan)"
            )
        return plan


def _phy2log_rows(rows, num_slots: int | None) -> np.ndarray:
    """The file's phy2log as int64 [L, R]: every row a list of `num_slots` integers (no coercion of 1.5 or
    "7"), or a PlanError naming the first row that is not."""
    if not isinstance(rows, list) or not rows or not all(isinstance(row, list) for row in rows):
        raise PlanError("phy2log: expected a non-empty list of rows, each a list of expert ids")
    width, what = (num_slots, "num_slots") if num_slots is not None else (len(rows[0]), "row 0")
    for i, row in enumerate(rows):
        if len(row) != width:
            raise PlanError(f"phy2log: row {i} has {len(row)} slots, expected {width} (as {what})")
        for value in row:
            if not isinstance(value, int) or isinstance(value, bool):
                raise PlanError(f"phy2log: row {i} holds {value!r}; expected integer expert ids")
    try:
        return np.array(rows, dtype=np.int64)
    except OverflowError:
        raise PlanError("phy2log: an expert id does not fit in 64 bits") from None


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def save_plan(plan: Placement, path: str | Path) -> None:
    Path(path).write_text(json.dumps(plan.to_json(), indent=1) + "\n")


def load_plan(path: str | Path) -> Placement:
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: no such plan file" if not path.exists() else f"{path}: not a file")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path}: not valid JSON ({exc})") from None
    except UnicodeDecodeError:
        raise PlanError(f"{path}: not a text (UTF-8 JSON) file") from None
    try:
        return Placement.from_json(doc)
    except PlanError as exc:
        raise PlanError(f"{path}: {exc}") from None
