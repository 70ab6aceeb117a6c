"""Routing statistics: the additive summary of a trace that every placer and the controller consume.

    counts  int64 [L, E]         token-expert assignments per expert
    coact   int64 [L, E, E]      tokens that chose both e and e' in the same layer (symmetric, zero diagonal)
    trans   int64 [L-1, E, E]    tokens that chose e in layer l and e' in layer l+1 (all k x k pairs)
    tokens  int                  T, tokens summarised
    trans_top1 int64 [L-1, E, E] (optional) tokens whose top-1 expert in layer l is e and that chose e' in
                                 layer l+1 (k pairs per token): in the token-follow dataflow a token sits on its
                                 top-1 expert's GPU, so this, not `trans`, is the traffic between layers

`coact` and `trans` are None when the source has no per-token data (aggregate count matrices).
Statistics are additive: windows merge by summing and decay by scaling (see `merge`, `scaled`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .trace import Trace, TraceError, open_npz, read_array

__all__ = ["RoutingStats", "stats_from_trace", "load_stats", "save_stats"]


def _is_real(a: np.ndarray) -> bool:
    return a.dtype != bool and (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating))


@dataclass(frozen=True)
class RoutingStats:
    counts: np.ndarray  # [L, E]
    top_k: int
    tokens: int
    coact: np.ndarray | None = None  # [L, E, E]
    trans: np.ndarray | None = None  # [L-1, E, E]
    # Provenance: model name, window ids, wall time, source; never affects placement.
    meta: dict = field(default_factory=dict, compare=False)
    # Optional (sources without it plan token-follow with trans / top_k, the expectation when every one of a
    # token's k experts is equally likely to be its top-1).
    trans_top1: np.ndarray | None = None

    def __post_init__(self) -> None:
        counts = np.asarray(self.counts)
        if not _is_real(counts):
            raise TraceError(f"counts: expected numbers, got dtype {counts.dtype}")
        if counts.ndim != 2 or counts.shape[0] < 1 or counts.shape[1] < 1:
            raise TraceError(f"counts: expected shape [L, E] with L, E >= 1, got {counts.shape}")
        if not np.all(np.isfinite(counts)) or (counts < 0).any():
            raise TraceError("counts: expected finite, non-negative values")
        L, E = counts.shape
        if not 1 <= int(self.top_k) <= E:
            raise TraceError(f"top_k: expected 1..{E}, got {self.top_k}")
        if int(self.tokens) < 0:
            raise TraceError(f"tokens: expected a non-negative integer, got {self.tokens}")
        for name, expect in (("coact", (L, E, E)), ("trans", (L - 1, E, E)), ("trans_top1", (L - 1, E, E))):
            arr = getattr(self, name)
            if arr is None:
                continue
            arr = np.asarray(arr)
            if not _is_real(arr):
                raise TraceError(f"{name}: expected numbers, got dtype {arr.dtype}")
            if arr.shape != expect:
                raise TraceError(f"{name}: expected shape {list(expect)}, got {list(arr.shape)}")
            if (arr < 0).any():
                raise TraceError(f"{name}: expected non-negative values")
            object.__setattr__(self, name, arr)
        if self.coact is not None and not np.array_equal(self.coact, self.coact.transpose(0, 2, 1)):
            raise TraceError("coact: expected a symmetric matrix per layer")
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "tokens", int(self.tokens))

    @property
    def num_layers(self) -> int:
        return self.counts.shape[0]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[1]

    @property
    def is_empty(self) -> bool:
        """No token recorded: nothing to plan from or to score."""
        return self.tokens == 0 or not np.any(self.counts)

    @property
    def has_pairs(self) -> bool:
        return self.coact is not None and self.trans is not None

    def follow_trans(self) -> np.ndarray | None:
        """float [L-1, E, E]: tokens sitting on expert e's GPU after layer l (their top-1) that want e' in
        layer l+1; `trans_top1` when recorded, else its expectation trans / top_k. None without pairs."""
        if self.trans_top1 is not None:
            return self.trans_top1.astype(np.float64)
        return None if self.trans is None else self.trans.astype(np.float64) / self.top_k

    def check_compatible(self, other: RoutingStats) -> None:
        if self.counts.shape != other.counts.shape or self.top_k != other.top_k:
            raise TraceError(
                f"statistics do not match: [L, E]={list(self.counts.shape)}, k={self.top_k} "
                f"vs [L, E]={list(other.counts.shape)}, k={other.top_k}"
            )

    def merge(self, other: RoutingStats) -> RoutingStats:
        """Sum two windows of the same model. Pairs survive only if both sides have them."""
        self.check_compatible(other)
        both = self.has_pairs and other.has_pairs
        return RoutingStats(
            self.counts + other.counts,
            self.top_k,
            self.tokens + other.tokens,
            self.coact + other.coact if both else None,
            self.trans + other.trans if both else None,
            {**self.meta, "merged": True},
            self.trans_top1 + other.trans_top1 if both and self.trans_top1 is not None
            and other.trans_top1 is not None else None,
        )

    def scaled(self, factor: float) -> RoutingStats:
        """Exponential decay: every statistic times `factor` (floating point from here on)."""
        return RoutingStats(
            self.counts * factor,
            self.top_k,
            int(round(self.tokens * factor)),
            None if self.coact is None else self.coact * factor,
            None if self.trans is None else self.trans * factor,
            dict(self.meta),
            None if self.trans_top1 is None else self.trans_top1 * factor,
        )


def stats_from_trace(trace: Trace) -> RoutingStats:
    """Count experts, same-layer pairs and layer-to-layer transitions of a trace (exact, vectorised)."""
    ids = trace.topk_ids.astype(np.int64)
    T, L, k = ids.shape
    E = trace.num_experts
    layer = np.arange(L, dtype=np.int64)[None, :, None]
    counts = np.bincount((layer * E + ids).ravel(), minlength=L * E).reshape(L, E)

    coact = np.zeros(L * E * E, dtype=np.int64)
    for i in range(k):
        for j in range(i + 1, k):
            a, b = ids[:, :, i], ids[:, :, j]
            base = np.arange(L, dtype=np.int64)[None, :] * E * E
            coact += np.bincount((base + a * E + b).ravel(), minlength=L * E * E)
            coact += np.bincount((base + b * E + a).ravel(), minlength=L * E * E)
    coact = coact.reshape(L, E, E)

    trans = np.zeros((max(L - 1, 0)) * E * E, dtype=np.int64)
    if L > 1:
        base = np.arange(L - 1, dtype=np.int64)[None, :] * E * E
        for i in range(k):
            for j in range(k):
                src, dst = ids[:, :-1, i], ids[:, 1:, j]
                trans += np.bincount((base + src * E + dst).ravel(), minlength=(L - 1) * E * E)
    trans = trans.reshape(L - 1, E, E)
    top1 = np.zeros((max(L - 1, 0)) * E * E, dtype=np.int64)
    if L > 1:  # column 0 is the top-1 expert (the cost model's token-follow convention)
        for j in range(k):
            top1 += np.bincount((base + ids[:, :-1, 0] * E + ids[:, 1:, j]).ravel(), minlength=(L - 1) * E * E)
    meta = {**trace.meta, "created": time.time()}
    return RoutingStats(counts, k, T, coact, trans, meta, top1.reshape(L - 1, E, E))


def save_stats(stats: RoutingStats, path: str | Path) -> None:
    arrays = {"counts": stats.counts, "top_k": np.int64(stats.top_k), "tokens": np.int64(stats.tokens)}
    if stats.coact is not None:
        arrays["coact"] = stats.coact
    if stats.trans is not None:
        arrays["trans"] = stats.trans
    if stats.trans_top1 is not None:
        arrays["trans_top1"] = stats.trans_top1
    np.savez_compressed(path, **arrays)


def load_stats(path: str | Path) -> RoutingStats:
    path = Path(path)
    with open_npz(path, "statistics") as data:
        for name in ("counts", "top_k", "tokens"):
            if name not in data.files:
                raise TraceError(f"{path}: missing field {name!r} (have {sorted(data.files)})")
        arrays = {name: read_array(data, name, path) if name in data.files else None
                  for name in ("counts", "top_k", "tokens", "coact", "trans", "trans_top1")}
    for name in ("top_k", "tokens"):
        if arrays[name].shape != () or not np.issubdtype(arrays[name].dtype, np.integer):
            raise TraceError(f"{path}: {name}: expected an integer scalar, got {arrays[name]!r}")
    return RoutingStats(
        arrays["counts"], int(arrays["top_k"]), int(arrays["tokens"]), arrays["coact"], arrays["trans"],
        {"source": str(path)}, arrays["trans_top1"],
    )
