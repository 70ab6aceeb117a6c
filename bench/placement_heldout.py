"""The held-out side of the placement benchmark (issue 17), used by bench/placement.py.

- `score`: the one place a plan meets traffic (in-sample and held-out alike). A run-time replica-choice
  rule goes here when the cost model takes one: every figure of the benchmark then follows it.
- `held_out_sample`: a second sample of a synthetic router (same clusters and popularity, other tokens).
- `bootstrap`: what ~300 tokens a side allow to conclude: block-bootstrap intervals of held-out balancedness,
  and of each placer's difference from eplb on the same resampled tokens.
- `acceptance_lines`, `mixtral_lines`: the markdown tables of the acceptance rows and the Mixtral split.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from expertmesh.placement.cost import CostParams, evaluate, expected_balance
from expertmesh.placement.plan import Placement
from expertmesh.placement.scenarios import sampling_units, scenario_balance, unit_counts
from expertmesh.placement.synthetic import SyntheticSpec, synthetic_trace
from expertmesh.placement.topology import Topology
from expertmesh.placement.trace import Trace

__all__ = ["score", "held_out_sample", "held_out_columns", "bootstrap", "acceptance_lines", "mixtral_lines",
           "HELD_OUT_COLUMNS", "BLOCK_TOKENS", "BOOTSTRAP_RESAMPLES"]

HELD_OUT_COLUMNS = ["expected_balancedness", "heldout_balancedness", "heldout_copies", "heldout_step_ms"]
BLOCK_TOKENS = 16  # Mixtral: blocks of 16 consecutive decode tokens are the resampling unit (2 sequences a side)
BOOTSTRAP_RESAMPLES = 2000
# Acceptance (issue 17): held-out balancedness within 0.02 of eplb's, >= 80% of the in-sample copies cut kept
# on held-out traffic, predicted held-out step time no worse than eplb's.
BALANCE_WITHIN, CUT_KEPT = 0.02, 0.80
STEP_TOLERANCE = 1e-3  # step times within 0.1% count as equal (the table shows 3 digits)
MIN_CUT = 0.01  # ilp's in-sample cut below this share of eplb's copies: nothing to keep, the copies part is n/a


def score(source, plan: Placement, topo: Topology, params: CostParams, dataflow: str) -> dict:
    """The cost model's figures of `plan` on `source` (a trace or statistics)."""
    return evaluate(source, plan, topo, params, dataflow).summary()


def held_out_sample(spec: SyntheticSpec) -> Trace:
    """The same router as `spec` (its model seed), other tokens (the next seed)."""
    model = spec.seed if spec.model_seed is None else spec.model_seed
    return synthetic_trace(replace(spec, seed=spec.seed + 1, model_seed=model))


def held_out_columns(source, held: Trace | None, plan: Placement, topo: Topology, params: CostParams,
                     dataflow: str) -> dict:
    """Expected held-out balancedness (from the planning trace's resamples) and the figures on `held`."""
    out = {"expected_balancedness": expected_balance(source, plan) if isinstance(source, Trace) else float("nan")}
    if held is not None:
        m = score(held, plan, topo, params, dataflow)
        out.update(heldout_balancedness=m["balancedness"], heldout_copies=m["copies"], heldout_step_ms=m["step_ms"])
    return out


def bootstrap(plans: dict[str, Placement], held: Trace, seed: int = 0) -> dict[str, dict]:
    """Per plan: held-out balancedness with a 90% block-bootstrap interval, and the interval of its
    difference from eplb's on the same resampled tokens (a paired difference: it cancels the tokens' own
    noise). Loads split over replicas evenly (exact without replicas, as in the Mixtral rows)."""
    per_unit = unit_counts(held, sampling_units(held, BLOCK_TOKENS))
    U = per_unit.shape[0]
    draws = np.random.default_rng([seed, 31]).multinomial(U, np.full(U, 1.0 / U), size=BOOTSTRAP_RESAMPLES)
    counts = np.einsum("su,ule->sle", draws.astype(np.float64), per_unit)
    bal = {name: scenario_balance(p, counts).mean(1) for name, p in plans.items()}
    out = {}
    for name, b in bal.items():
        d = b - bal["eplb"]
        out[name] = {"units": U, "lo": float(np.quantile(b, 0.05)), "hi": float(np.quantile(b, 0.95)),
                     "diff_lo": float(np.quantile(d, 0.05)), "diff_hi": float(np.quantile(d, 0.95))}
    return out


def _f(value, digits=3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _verdict(row: dict, eplb: dict, cut_in: float) -> tuple[float, str]:
    """(share of ilp's in-sample copies cut kept on held-out traffic, verdict on the three targets)."""
    vacuous = cut_in < MIN_CUT * eplb["copies"]
    kept = float("nan") if vacuous else (eplb["heldout_copies"] - row["heldout_copies"]) / cut_in
    fails = []
    if row["heldout_balancedness"] < eplb["heldout_balancedness"] - BALANCE_WITHIN:
        fails.append("balance")
    if not vacuous and not kept >= CUT_KEPT:
        fails.append("copies")
    if row["heldout_step_ms"] > eplb["heldout_step_ms"] * (1 + STEP_TOLERANCE):
        fails.append("step")
    verdict = "met" if not fails else "missed (" + ", ".join(fails) + ")"
    return kept, verdict + (" (no copies cut in-sample)" if vacuous else "")


def acceptance_lines(groups: list[dict]) -> list[str]:
    """Issue 17's acceptance on the synthetic routers' held-out samples, ilp and ilp robust against eplb."""
    lines = ["## Held out (issue 17): acceptance on the synthetic routers", "",
             f"Planned on one sample (seed 0), scored on another of the same router (seed 1). Target: held-out "
             f"balancedness within {BALANCE_WITHIN} of eplb's, held-out copies cut vs eplb >= {CUT_KEPT:.0%} of "
             "ilp's in-sample cut (ilp's, the plain plan), held-out step ms no worse than eplb's. `exp` = the "
             "cost model's expected held-out balancedness (sequence resamples of the planning sample).", "",
             "| case | placer | balance in / held-out / exp | copies in / held-out | cut kept | step ms held-out "
             "(x eplb) | verdict |", "|---|---|---|---|---|---|---|"]
    for g in groups:
        if not g["label"].startswith("synthetic") or "heldout" not in g:
            continue
        by = {r["strategy"]: r for r in g["rows"] if "infeasible" not in r}
        eplb = by["eplb"]
        cut_in = eplb["copies"] - by["ilp"]["copies"]
        for name in ("eplb", "eplb robust", "ilp", "ilp robust"):
            if name not in by:
                continue
            r = by[name]
            kept, verdict = _verdict(r, eplb, cut_in) if name.startswith("ilp") else (float("nan"), "")
            step = f"{_f(r['heldout_step_ms'], 2)} (x{_f(r['heldout_step_ms'] / eplb['heldout_step_ms'])})"
            lines.append(f"| {g['label']} | {name} | {_f(r['balancedness'])} / {_f(r['heldout_balancedness'])} / "
                         f"{_f(r['expected_balancedness'])} | {_f(r['copies'])} / {_f(r['heldout_copies'])} | "
                         f"{_f(kept, 2)} | {step} | {verdict} |")
    return lines + [""]


def mixtral_lines(groups: list[dict]) -> list[str]:
    """The real Mixtral split by dataset, both ways, every placer, with the bootstrap intervals."""
    lines = ["## Held out: Mixtral-8x7B split by dataset (4 GPUs, home)", "",
             f"Planned on one dataset's decode tokens, scored on the other's. Interval: 90% block bootstrap "
             f"({BLOCK_TOKENS}-token blocks, {BOOTSTRAP_RESAMPLES} resamples) of the held-out tokens; `vs eplb`: "
             "the paired difference's interval (an interval holding 0 means this sample cannot tell the two "
             "apart).", "",
             "| plan on -> held out | placer | balance in | held-out | 90% interval | vs eplb 90% | copies in / "
             "held-out | step ms in / held-out |", "|---|---|---|---|---|---|---|---|"]
    for g in groups:
        if "bootstrap" not in g:
            continue
        for r in g["rows"]:
            b = g["bootstrap"].get(r["strategy"])
            if b is None:
                continue
            lines.append(f"| {g['heldout']} | {r['strategy']} | {_f(r['balancedness'])} | "
                         f"{_f(r['heldout_balancedness'])} | [{_f(b['lo'])}, {_f(b['hi'])}] | "
                         f"[{b['diff_lo']:+.3f}, {b['diff_hi']:+.3f}] | {_f(r['copies'])} / "
                         f"{_f(r['heldout_copies'])} | {_f(r['step_ms'], 2)} / {_f(r['heldout_step_ms'], 2)} |")
    return lines + [""]
