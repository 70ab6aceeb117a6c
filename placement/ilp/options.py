"""`IlpOptions`: everything the `ilp` placer takes besides the statistics, the topology and the slot count."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..cost import DATAFLOWS, CostParams
from ..eplb import EPLB_POLICIES
from ..plan import Placement
from ..robust import RobustOptions

__all__ = ["IlpOptions", "OBJECTIVES"]

# "step": the solver's plan with as few of EPLB's layers as the cost model needs to predict a step time no
# slower than EPLB's (needs a trace; selection.py). "traffic": the solver's own plan, the least traffic.
OBJECTIVES = ("step", "traffic")


@dataclass(frozen=True, kw_only=True)
class IlpOptions:
    dataflow: str = "home"
    objective: str = "step"
    time_limit: float = 10.0  # wall-clock seconds the whole plan may take (approximately)
    seed: int = 0
    workers: int = 0  # processes solving layers in parallel; 0 = one per CPU core
    balance_slack: float = 0.01  # balancedness may fall at most this far below EPLB's, per layer
    # ...on layers with replicas where tokens start from their home GPU: a replica serves the tokens homed on
    # its GPU first (routing.py, rule 1), which statistics do not record, so measured balance falls below the
    # planned one there; no allowance is planned (bench/results/placement.notes.md has the figures).
    replica_balance_slack: float = 0.0
    pairs_per_expert: int = 8  # strongest co-activation partners kept per expert (sparsifies the model)
    eplb_policy: str = "auto"  # of the EPLB plan that sets the balance cap and seeds every subproblem
    previous: Placement | None = None
    interval_tokens: float | None = None  # tokens over which a re-placement must pay for its migration
    params: CostParams = field(default_factory=CostParams)
    # Stage 1 over nodes, then GPUs (True), or in one model over all GPUs with a node penalty (False).
    # None decides: decompose above 16 GPUs on several nodes. Forcing False measures the decomposition's loss.
    decompose: bool | None = None
    # Token-follow stage 3 starts (None: by size and time limit); the first is stage 2's plan, the second the
    # forward chain, later ones kicks of the best so far; a single start is the chain alone.
    follow_starts: int | None = None
    # Keep balance under traffic the plan was not made on (robust.py): None plans for the trace alone.
    # Home dataflow only (the repair keeps co-activation pairs together, which is the home objective).
    robust: RobustOptions | None = None

    def __post_init__(self) -> None:
        if self.dataflow not in DATAFLOWS:
            raise ValueError(f"dataflow: expected one of {DATAFLOWS}, got {self.dataflow!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {OBJECTIVES}, got {self.objective!r}")
        if not (math.isfinite(self.time_limit) and self.time_limit > 0):
            raise ValueError(f"time_limit: expected a positive, finite number of seconds, got {self.time_limit}")
        if self.interval_tokens is not None and not (math.isfinite(self.interval_tokens) and self.interval_tokens > 0):
            raise ValueError(f"interval_tokens: expected a positive, finite number, got {self.interval_tokens}")
        for name in ("balance_slack", "replica_balance_slack"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a value in [0, 1), got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {self.seed}")
        if self.workers < 0:
            raise ValueError(f"workers: expected >= 0, got {self.workers}")
        if self.follow_starts is not None and self.follow_starts < 1:
            raise ValueError(f"follow_starts: expected >= 1, got {self.follow_starts}")
        if self.pairs_per_expert < 1:
            raise ValueError(f"pairs_per_expert: expected >= 1, got {self.pairs_per_expert}")
        if self.robust is not None and not isinstance(self.robust, RobustOptions):
            raise ValueError(f"robust: expected RobustOptions or None, got {type(self.robust).__name__}")
        if self.robust is not None and self.dataflow != "home":
            raise ValueError("robust: plans the home dataflow only (its repair keeps co-activated pairs "
                             "together); drop it or use --dataflow home")
        if self.eplb_policy not in EPLB_POLICIES:
            raise ValueError(f"eplb_policy: expected one of {EPLB_POLICIES}, got {self.eplb_policy!r}")
