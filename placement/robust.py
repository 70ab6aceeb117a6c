"""Robust placement: a layer's arrangement kept balanced in every load scenario, not only the one it saw.

A placement that co-locates the experts a token uses together bets on the share of traffic of each such
group, and that share moves from sample to sample (scenarios.py). Here the balance rule must hold in
every scenario: a layer's copies are swapped between GPUs until no GPU carries more than the scenario's
cap in any scenario, giving up as little co-located pair weight as possible, then swapped while they gain
pair weight without breaking a cap. The caps come from a reference plan (EPLB's, in the same scenarios),
so "robust" means: in every scenario, balancedness within `slack` of the reference's.

The search, per layer (pure: arrays in, arrangement out):

- data: items (one per copy: its expert and GPU), the pair weight W [E, E] (tokens choosing both experts),
  every item's load in every scenario (its expert's count split evenly over the copies), the caps [S];
- a swap trades two items on different GPUs; it is legal when neither expert is on the other GPU already
  and copies of a replicated expert stay in their node (the replica rule's node preference needs them there);
- repair: while some GPU exceeds its cap in some scenario, apply the legal swap that removes the most
  excess per unit of pair weight given up (a swap that gains weight and removes excess is taken first);
- improve: apply the swap that gains the most pair weight among those that break no cap, until none gains.

`tighten_layer` is the load-only variant (eplb's): no pair weight, the caps lowered step by step below the
reference's own scenario peaks for as long as the repair meets them, which lowers the expected heaviest GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["RobustOptions", "robust_record", "robust_caps", "robust_layer", "tighten_layer"]

_EPS = 1e-9
_IMPROVE_CANDIDATES = 4096  # best-gain trades checked per improve step (the rest wait for the next step)
_MAX_STEPS_PER_ITEM = 20  # repair + improve swaps per copy in the layer (a bound; measured runs stop far below)
# Caps tried by `tighten_layer`, as fractions of the reference's: 0.5% steps (2% steps failed at the first on
# every layer of the 64-expert synthetic router, 0.5% steps reached 2-4% lower scenario peaks).
_TIGHTEN = (0.995, 0.99, 0.985, 0.98, 0.975, 0.97, 0.965, 0.96)


@dataclass(frozen=True, kw_only=True)
class RobustOptions:
    """How a placer plans for traffic it has not seen (scenarios.py, this module).

    resamples: bootstrap scenarios drawn from the trace (sequence level); seed: their draw;
    inflate: how far a scenario is pushed from the plan's own counts (sqrt(2): a held-out sample);
    slack: in every scenario, balancedness may fall this far below the reference plan's (EPLB's);
    scenarios: explicit counts [S, L, E] instead of resampling (e.g. from a controller's windows)."""

    resamples: int = 16
    seed: int = 0
    inflate: float = math.sqrt(2)
    slack: float = 0.01
    scenarios: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.resamples, bool) or not isinstance(self.resamples, int) or self.resamples < 1:
            raise ValueError(f"resamples: expected a whole number >= 1, got {self.resamples!r}")
        if self.seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {self.seed}")
        if not (math.isfinite(self.inflate) and self.inflate >= 0):
            raise ValueError(f"inflate: expected a finite number >= 0, got {self.inflate}")
        if not 0 <= self.slack < 1:
            raise ValueError(f"slack: expected a value in [0, 1), got {self.slack}")
        if self.scenarios is not None:
            s = np.asarray(self.scenarios, dtype=np.float64)
            if s.ndim != 3 or not np.all(np.isfinite(s)) or (s < 0).any():
                raise ValueError("scenarios: expected finite, non-negative counts of shape [S, L, E]")
            object.__setattr__(self, "scenarios", s)


def robust_record(robust: RobustOptions) -> dict:
    """What a plan file records of its robust options (JSON-friendly)."""
    return {"resamples": robust.resamples, "seed": robust.seed,
            "inflate": robust.inflate, "slack": robust.slack,
            "scenarios": None if robust.scenarios is None else int(robust.scenarios.shape[0])}


def robust_caps(scenario_counts: np.ndarray, reference: np.ndarray, slack: float) -> np.ndarray:
    """float [S]: per scenario, the heaviest GPU load allowed: balancedness within `slack` of the reference
    arrangement's there, and never below the reference's own heaviest GPU (so the reference is feasible).

    scenario_counts [S, E] one layer's counts; reference [E, G] copies of each expert on each GPU."""
    share = reference / np.maximum(reference.sum(1, keepdims=True), 1)
    loads = scenario_counts @ share  # [S, G]
    peak, mean = loads.max(1), loads.mean(1)
    balance = np.where(peak > 0, mean / np.where(peak > 0, peak, 1), 1.0)
    return np.maximum(mean / np.maximum(balance - slack, 1e-9), peak)


@dataclass
class _State:
    """Items (copies), their GPUs, pair weight between items, loads per scenario; updated as swaps apply."""

    expert: np.ndarray  # [m]
    part: np.ndarray  # [m]
    w: np.ndarray  # [m, m] pair weight per item pair (an expert's weight split over its copies' pairs)
    load: np.ndarray  # [S, m] every item's load in every scenario
    conn: np.ndarray  # [m, G] pair weight of every item to the items on every GPU
    part_load: np.ndarray  # [S, G]
    holds: np.ndarray  # [E, G] copies of every expert on every GPU
    locked: np.ndarray  # [m] bool: a copy of a replicated expert (stays in its node)


def _state(x: np.ndarray, weight: np.ndarray, scenario_counts: np.ndarray) -> _State:
    E, G = x.shape
    experts, parts = np.nonzero(x)
    reps = x[experts, parts]
    expert, part = np.repeat(experts, reps), np.repeat(parts, reps)
    copies = x.sum(1).astype(np.float64)
    w = weight[np.ix_(expert, expert)] / np.outer(copies[expert], copies[expert])
    w[expert[:, None] == expert[None, :]] = 0.0
    load = scenario_counts[:, expert] / copies[expert][None, :]
    conn = np.zeros((len(expert), G))
    np.add.at(conn.T, part, w)
    part_load = np.stack([np.bincount(part, weights=row, minlength=G) for row in load])
    return _State(expert, part.copy(), w, load, conn, part_load, x.copy(), copies[expert] > 1)


def _gain_legal(st: _State, node_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[m, m] each: pair weight gained by trading items i and j, and whether the trade is legal (i < j)."""
    m = len(st.expert)
    rows, part = np.arange(m), st.part
    own = st.conn[rows, part]
    moved = st.conn[:, part]  # [i, j]: i's weight to the items on j's GPU
    gain = moved - own[:, None] + (moved - own[:, None]).T - 2 * st.w
    room = st.holds[st.expert][:, part] == 0  # expert of i not yet on j's GPU
    same_node = node_of[part][:, None] == node_of[part][None, :]
    legal = (part[:, None] != part[None, :]) & room & room.T
    legal &= (~st.locked[:, None] | same_node) & (~st.locked[None, :] | same_node)
    return gain, legal | legal.T


def _excess_change(st: _State, caps: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """float [K]: change in the total excess over the caps (all scenarios, all GPUs) if items i[K] and j[K]
    trade GPUs (only their two GPUs change)."""
    d = st.load[:, j] - st.load[:, i]  # [S, K]: load j brings to i's GPU minus what i takes away
    lp, lq = st.part_load[:, st.part[i]], st.part_load[:, st.part[j]]
    cap = caps[:, None]

    def excess(a):
        return np.maximum(a - cap, 0.0)

    return (excess(lp + d) - excess(lp) + excess(lq - d) - excess(lq)).sum(0)


def _repair_step(st: _State, caps: np.ndarray, node_of: np.ndarray, tol: float) -> tuple[int, int] | None:
    """The trade that removes the most excess per unit of pair weight given up (one that gives up nothing:
    the most excess), among trades moving an item off a GPU over its cap; None when no trade removes any."""
    gain, legal = _gain_legal(st, node_of)
    hot = np.flatnonzero((st.part_load > caps[:, None] + tol).any(0))
    i, j = np.nonzero(legal & np.isin(st.part, hot)[:, None])
    if not len(i):
        return None
    delta, g = _excess_change(st, caps, i, j), gain[i, j]
    ok = delta < -tol
    if not ok.any():
        return None
    free = ok & (g >= 0)
    score = np.where(free, -delta, -np.inf) if free.any() else np.where(ok, delta / np.minimum(g, -_EPS), -np.inf)
    best = int(np.argmax(score))
    return int(i[best]), int(j[best])


def _improve_step(st: _State, caps: np.ndarray, node_of: np.ndarray, tol: float) -> list[tuple[int, int]]:
    """Trades that gain pair weight without adding excess, best first, on GPUs no earlier trade of the step
    touches (a trade's gain and excess depend on its two GPUs only, so each stays exact); empty when none."""
    gain, legal = _gain_legal(st, node_of)
    i, j = np.nonzero(np.triu(legal & (gain > _EPS), 1))
    order = np.argsort(-gain[i, j], kind="stable")[:_IMPROVE_CANDIDATES]
    i, j = i[order], j[order]
    fits = _excess_change(st, caps, i, j) <= tol
    chosen, touched = [], set()
    for a, b in zip(i[fits].tolist(), j[fits].tolist(), strict=True):
        p, q = int(st.part[a]), int(st.part[b])
        if p not in touched and q not in touched:
            chosen.append((a, b))
            touched |= {p, q}
    return chosen


def _apply(st: _State, i: int, j: int) -> None:
    p, q = int(st.part[i]), int(st.part[j])
    st.conn[:, p] += st.w[:, j] - st.w[:, i]
    st.conn[:, q] += st.w[:, i] - st.w[:, j]
    st.part_load[:, p] += st.load[:, j] - st.load[:, i]
    st.part_load[:, q] += st.load[:, i] - st.load[:, j]
    st.holds[st.expert[i], p] -= 1
    st.holds[st.expert[i], q] += 1
    st.holds[st.expert[j], q] -= 1
    st.holds[st.expert[j], p] += 1
    st.part[i], st.part[j] = q, p


def robust_layer(x: np.ndarray, weight: np.ndarray, scenario_counts: np.ndarray, caps: np.ndarray,
                 node_of_gpu: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """One layer's arrangement [E, G] moved by swaps until no scenario breaks its cap, then improved
    (module docstring). Returns the arrangement and whether every cap holds (False: the repair stalled;
    the caller falls back to the reference arrangement).

    x [E, G] copies per GPU (at most one copy of an expert per GPU); weight [E, E] pair weight (symmetric);
    scenario_counts [S, E]; caps [S]; node_of_gpu [G] (default: one node)."""
    G = x.shape[1]
    node_of = np.zeros(G, dtype=np.int64) if node_of_gpu is None else np.asarray(node_of_gpu)
    st = _state(x, np.asarray(weight, dtype=np.float64), np.asarray(scenario_counts, dtype=np.float64))
    tol = 1e-9 * max(float(caps.max(initial=0.0)), 1.0)
    repairing = True
    for _ in range(_MAX_STEPS_PER_ITEM * len(st.expert)):
        repairing = repairing and bool((st.part_load > caps[:, None] + tol).any())
        if repairing:
            move = _repair_step(st, caps, node_of, tol)
            moves = [] if move is None else [move]
        else:
            moves = _improve_step(st, caps, node_of, tol)
        if not moves:
            break
        for i, j in moves:
            _apply(st, i, j)
    out = np.zeros_like(x)
    np.add.at(out, (st.expert, st.part), 1)
    feasible = bool((st.part_load <= caps[:, None] + tol).all())
    return out, feasible


def tighten_layer(x: np.ndarray, scenario_counts: np.ndarray, node_of_gpu: np.ndarray | None = None
                  ) -> np.ndarray:
    """One layer's arrangement [E, G] with every scenario's heaviest GPU lowered together: the caps are the
    arrangement's own scenario peaks times each of `_TIGHTEN` in turn, kept while the repair meets them."""
    E = x.shape[0]
    base = robust_caps(scenario_counts, x, 0.0)
    best = x
    for factor in _TIGHTEN:
        moved, ok = robust_layer(best, np.zeros((E, E)), scenario_counts, base * factor, node_of_gpu)
        if not ok:
            break
        best = moved
    return best
