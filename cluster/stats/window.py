"""One window of routing statistics as the store keeps it: exact integers, coact as its upper triangle.

    counts  int64 [L, E]             token-expert assignments per expert
    coact   int64 [L, P]             P = E (E - 1) / 2 same-layer pairs (a < b), row-major upper triangle
    trans   int64 [L-1, E * E]       layer l expert a -> layer l+1 expert b, flat index a * E + b
    trans_top1 int64 [L-1, E * E]    the same, from a token's top-1 expert of layer l only (what the
                                     token-follow dataflow moves); None where a writer did not record it
    tokens  int                      tokens counted
    deltas  int                      writer flushes summed into this window (1 for a single flush)

`RoutingStats.coact` is symmetric with a zero diagonal (two different experts of one token), so its upper
triangle holds all of it: half the cells, and the full matrix comes back exactly (`to_stats`).
`coact` and `trans` are both None for sources without per-token data (aggregate count matrices).
Windows are additive: `a + b` sums every statistic, which is how writer flushes merge.

A *layer share* holds layers [first_layer, first_layer + n) of a model of `model_layers` layers: counts and
coact have its n rows, trans and trans_top1 the transitions that leave them (n rows, one fewer where the
share ends at the last layer). The workers of an EP group sum their counts once per window (one collective
on arrays they already hold) and each flushes one share: a writer encodes and sends 1/W of a window, and a
reader fetches one group window instead of W writer windows (DESIGN.md §3 deviation, see `layer_shares`).
`tokens` of a share are the tokens behind its counts; a window's tokens come from the share with layer 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from expertmesh.placement.stats import RoutingStats

__all__ = ["WindowCounts", "pair_count", "triu_pairs", "layer_shares", "transition_rows"]


def pair_count(num_experts: int) -> int:
    """P: unordered pairs of distinct experts of one layer."""
    return num_experts * (num_experts - 1) // 2


def layer_shares(num_layers: int, parts: int) -> list[tuple[int, int]]:
    """[first, stop) of each of `parts` contiguous shares of the layers, sizes differing by at most one
    (a share is empty where there are more parts than layers)."""
    if parts < 1:
        raise ValueError(f"parts: expected >= 1, got {parts}")
    bounds = [num_layers * p // parts for p in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def transition_rows(first_layer: int, share_layers: int, model_layers: int) -> int:
    """Transitions leaving layers [first, first + n): n, or n - 1 where the share holds the last layer."""
    return max(min(first_layer + share_layers, model_layers - 1) - first_layer, 0)


@lru_cache(maxsize=8)
def triu_pairs(num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) int64 [P] each: the pair behind every upper-triangle index, a < b, row-major."""
    a, b = np.triu_indices(num_experts, k=1)
    a.setflags(write=False)
    b.setflags(write=False)
    return a, b


@dataclass(frozen=True)
class WindowCounts:
    counts: np.ndarray  # int64 [L, E]
    top_k: int
    tokens: int
    coact: np.ndarray | None = None  # int64 [L, P]
    trans: np.ndarray | None = None  # int64 [L-1, E*E]
    deltas: int = 1
    meta: dict = field(default_factory=dict, compare=False)
    trans_top1: np.ndarray | None = None  # int64 [L-1, E*E], only with pairs
    first_layer: int = 0  # a layer share: its first layer of the model's
    model_layers: int | None = None  # a layer share: the model's layers (None: this window's, a whole one)

    def __post_init__(self) -> None:
        counts = np.asarray(self.counts)
        if counts.ndim != 2:
            raise ValueError(f"counts: expected shape [L, E], got {list(counts.shape)}")
        L, E = counts.shape
        if self.first_layer < 0 or self.first_layer + L > self.total_layers:
            raise ValueError(f"first_layer: expected a share inside the model's {self.total_layers} layers, "
                             f"got layers [{self.first_layer}, {self.first_layer + L})")
        rows = transition_rows(self.first_layer, L, self.total_layers)
        expect = {"coact": (L, pair_count(E)), "trans": (rows, E * E)}
        if (self.coact is None) != (self.trans is None):
            raise ValueError("coact/trans: expected both or neither")
        if self.trans_top1 is not None and self.coact is None:
            raise ValueError("trans_top1: expected only with coact and trans")
        expect["trans_top1"] = expect["trans"]
        for name, shape in expect.items():
            arr = getattr(self, name)
            if arr is not None and np.asarray(arr).shape != shape:
                raise ValueError(f"{name}: expected shape {list(shape)}, got {list(np.asarray(arr).shape)}")

    @property
    def num_layers(self) -> int:
        return self.counts.shape[0]

    @property
    def total_layers(self) -> int:
        """The model's layers: this window's own unless it is a layer share."""
        return self.counts.shape[0] if self.model_layers is None else self.model_layers

    @property
    def is_share(self) -> bool:
        return self.num_layers != self.total_layers

    @property
    def num_experts(self) -> int:
        return self.counts.shape[1]

    @property
    def has_pairs(self) -> bool:
        return self.coact is not None

    @property
    def has_top1(self) -> bool:
        return self.trans_top1 is not None

    def __add__(self, other: WindowCounts) -> WindowCounts:
        share, other_share = (self.first_layer, self.total_layers), (other.first_layer, other.total_layers)
        if self.counts.shape != other.counts.shape or self.top_k != other.top_k or share != other_share:
            raise ValueError(
                f"windows do not match: [L, E]={list(self.counts.shape)}, k={self.top_k} "
                f"vs [L, E]={list(other.counts.shape)}, k={other.top_k}"
            )
        both = self.has_pairs and other.has_pairs

        def plus(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # integers add in int64: no narrow overflow
            wide = np.result_type(a, b, np.int64)
            return np.add(a, b, dtype=wide)

        return WindowCounts(
            plus(self.counts, other.counts),
            self.top_k,
            self.tokens + other.tokens,
            plus(self.coact, other.coact) if both else None,
            plus(self.trans, other.trans) if both else None,
            self.deltas + other.deltas,
            trans_top1=plus(self.trans_top1, other.trans_top1) if self.has_top1 and other.has_top1 else None,
            first_layer=self.first_layer,
            model_layers=self.model_layers,
        )

    def share(self, first: int, stop: int) -> WindowCounts:
        """Layers [first, stop) of this whole window as a layer share (views, no copy); tokens stay."""
        if self.is_share or not 0 <= first < stop <= self.num_layers:
            raise ValueError(f"share: expected 0 <= first < stop <= {self.num_layers} of a whole window, "
                             f"got [{first}, {stop})")
        moves = slice(first, first + transition_rows(first, stop - first, self.num_layers))
        return WindowCounts(
            self.counts[first:stop], self.top_k, self.tokens,
            None if not self.has_pairs else self.coact[first:stop],
            None if not self.has_pairs else self.trans[moves],
            self.deltas, trans_top1=None if not self.has_top1 else self.trans_top1[moves],
            first_layer=first, model_layers=self.num_layers,
        )

    @classmethod
    def zeros(cls, num_layers: int, num_experts: int, top_k: int, pairs: bool = True, dtype=np.int64,
              first_layer: int = 0, model_layers: int | None = None) -> WindowCounts:
        """Zeros of a whole window of `num_layers`, or of the share of that many layers from `first_layer`
        of a `model_layers` model."""
        L, E = num_layers, num_experts
        rows = transition_rows(first_layer, L, L if model_layers is None else model_layers)
        return cls(
            np.zeros((L, E), dtype),
            top_k,
            0,
            np.zeros((L, pair_count(E)), dtype) if pairs else None,
            np.zeros((rows, E * E), dtype) if pairs else None,
            deltas=0,
            trans_top1=np.zeros((rows, E * E), dtype) if pairs else None,
            first_layer=first_layer,
            model_layers=model_layers,
        )

    @classmethod
    def from_stats(cls, stats: RoutingStats) -> WindowCounts:
        """The window of an in-memory `RoutingStats`; refuses what the store cannot hold exactly."""
        L, E = stats.counts.shape
        arrays = {"counts": stats.counts, "coact": stats.coact, "trans": stats.trans, "trans_top1": stats.trans_top1}
        for name, arr in arrays.items():
            integral = arr is None or np.issubdtype(np.asarray(arr).dtype, np.integer)
            if not integral and not np.array_equal(arr, np.round(arr)):
                raise ValueError(f"{name}: expected integer counts, got non-integral values (decayed stats?)")
        coact = trans = top1 = None
        if stats.has_pairs:
            full = np.asarray(stats.coact, dtype=np.int64)
            diag = np.einsum("lii->li", full)
            if diag.any():
                layer, expert = np.argwhere(diag)[0]
                raise ValueError(
                    f"coact: expected a zero diagonal (pairs of distinct experts), "
                    f"layer {layer} expert {expert} has {diag[layer, expert]}"
                )
            a, b = triu_pairs(E)
            coact = full[:, a, b]
            trans = np.asarray(stats.trans, dtype=np.int64).reshape(max(L - 1, 0), E * E)
            if stats.trans_top1 is not None:
                top1 = np.asarray(stats.trans_top1, dtype=np.int64).reshape(max(L - 1, 0), E * E)
        return cls(np.asarray(stats.counts, dtype=np.int64), stats.top_k, stats.tokens, coact, trans,
                   trans_top1=top1)

    def to_stats(self, meta: dict | None = None) -> RoutingStats:
        """The `RoutingStats` of this window: same integers as `stats_from_trace` on the same tokens
        (float arrays stay float: the decayed aggregate)."""
        if self.is_share:
            raise ValueError(f"a layer share (layers [{self.first_layer}, {self.first_layer + self.num_layers}) "
                             f"of {self.total_layers}) is not a whole window: sum the group's shares first")
        L, E = self.counts.shape
        # Integers come out as int64 whatever the accumulator used; floats (decayed) stay float.
        wide = np.float64 if np.issubdtype(self.counts.dtype, np.floating) else np.int64
        coact = trans = top1 = None
        if self.has_pairs:
            upper = np.triu(np.ones((E, E), bool), k=1)  # row-major order: the same as triu_pairs
            coact = np.zeros((L, E, E), wide)
            for layer in range(L):  # one E x E layer at a time stays in cache: ~5x faster than fancy indexing
                full = coact[layer]
                full[upper] = self.coact[layer]
                full += full.T
            trans = np.asarray(self.trans, dtype=wide).reshape(max(L - 1, 0), E, E)
            if self.has_top1:
                top1 = np.asarray(self.trans_top1, dtype=wide).reshape(max(L - 1, 0), E, E)
        counts = np.asarray(self.counts, dtype=wide)
        return RoutingStats(counts, self.top_k, self.tokens, coact, trans, dict(meta or {}), top1)
