"""Load scenarios: what a layer's expert counts may look like on traffic the plan was not made on.

A plan is made on one sample of a router and meets another. Tokens of one sequence share their topic, so
their experts move together: the unit of sampling is the sequence, not the token. A scenario is a
sequence-level bootstrap of the planning trace, pushed out by `inflate`:

    scenario = counts + inflate x (resampled counts - counts)

Why `inflate` = sqrt(2) by default: a held-out sample B differs from the planning sample A by two draws of
noise (A's, which the plan fitted, and B's own), so B - A has twice the variance of one draw; a bootstrap
resample A* - A has about the variance of one draw. Measured on the benchmark's synthetic routers, the
expected held-out balancedness from these scenarios tracks the real held-out figure (placement.notes.md).

Traces with few sequences (the Mixtral files hold two) are resampled in blocks of consecutive tokens of one
sequence instead (`block_tokens`), so the resample still has enough units to vary.
"""

from __future__ import annotations

import math

import numpy as np

from .plan import Placement
from .trace import Trace

__all__ = ["MIN_UNITS", "sampling_units", "unit_counts", "scenario_counts", "scenario_balance"]

MIN_UNITS = 16  # below this many sequences, resample blocks of tokens (a bootstrap of 2 units barely varies)


def sampling_units(trace: Trace, block_tokens: int | None = None) -> np.ndarray:
    """int64 [T]: the resampling unit of every token: its sequence, or with fewer than `MIN_UNITS`
    sequences (or `block_tokens` given) a block of `block_tokens` consecutive tokens of one sequence."""
    _, seq = np.unique(trace.seq_ids, return_inverse=True)
    seq = seq.astype(np.int64)
    if block_tokens is None:
        if seq.max(initial=-1) + 1 >= MIN_UNITS:
            return seq
        block_tokens = max(1, trace.num_tokens // (4 * MIN_UNITS))
    if block_tokens < 1:
        raise ValueError(f"block_tokens: expected >= 1, got {block_tokens}")
    # Position of each token within its sequence, in trace order.
    order = np.argsort(seq, kind="stable")
    starts = np.searchsorted(seq[order], np.arange(seq.max(initial=-1) + 1))
    position = np.empty_like(seq)
    position[order] = np.arange(seq.size) - starts[seq[order]]
    _, units = np.unique(seq * (trace.num_tokens + 1) + position // block_tokens, return_inverse=True)
    return units.astype(np.int64)


def unit_counts(trace: Trace, units: np.ndarray) -> np.ndarray:
    """float64 [U, L, E]: token-expert assignments per sampling unit, layer and expert."""
    U, L, E = int(units.max(initial=-1)) + 1, trace.num_layers, trace.num_experts
    ids = trace.topk_ids.astype(np.int64)
    key = (units[:, None, None] * L + np.arange(L)[None, :, None]) * E + ids
    return np.bincount(key.ravel(), minlength=U * L * E).reshape(U, L, E).astype(np.float64)


def scenario_counts(trace: Trace, resamples: int, seed: int = 0, inflate: float = math.sqrt(2),
                    block_tokens: int | None = None) -> np.ndarray:
    """float64 [S, L, E]: `resamples` scenarios of the trace's expert counts (module docstring)."""
    if resamples < 1:
        raise ValueError(f"resamples: expected >= 1, got {resamples}")
    if not (math.isfinite(inflate) and inflate >= 0):
        raise ValueError(f"inflate: expected a finite number >= 0, got {inflate}")
    per_unit = unit_counts(trace, sampling_units(trace, block_tokens))
    U = per_unit.shape[0]
    counts = per_unit.sum(0)
    rng = np.random.default_rng([seed, 17])
    draws = rng.multinomial(U, np.full(U, 1.0 / U), size=resamples).astype(np.float64)  # [S, U]
    resampled = np.einsum("su,ule->sle", draws, per_unit)
    return np.maximum(counts[None] + inflate * (resampled - counts[None]), 0.0)


def scenario_balance(plan: Placement, scenarios: np.ndarray) -> np.ndarray:
    """float [S, L]: balancedness (mean / max GPU load) of `plan` in every scenario, an expert's count split
    evenly over its replicas (the cost model's statistics rule). The mean over scenarios is the expected
    held-out balancedness."""
    scenarios = np.asarray(scenarios, dtype=np.float64)
    if scenarios.ndim != 3 or scenarios.shape[1:] != (plan.num_layers, plan.num_experts):
        raise ValueError(f"scenarios: expected shape [S, {plan.num_layers}, {plan.num_experts}], "
                         f"got {list(scenarios.shape)}")
    replicas = plan.replicas.astype(np.float64)  # [L, E, G]
    share = replicas / np.maximum(replicas.sum(-1, keepdims=True), 1.0)
    load = np.einsum("sle,leg->slg", scenarios, share)
    peak = load.max(-1)
    return np.where(peak > 0, load.mean(-1) / np.where(peak > 0, peak, 1.0), 1.0)
