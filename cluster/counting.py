"""Local accumulation of routing decisions into one window, exactly as `stats_from_trace` counts them.

A writer calls `add(topk_ids)` once per step and `take()` when it closes a window. The counts live in the
store's layout (`WindowCounts`: coact as an upper triangle, trans flattened), so closing a window costs
no rearrangement, and each step costs one `bincount` per statistic and chunk of layers.
"""

from __future__ import annotations

import numpy as np

from .window import WindowCounts, pair_count

__all__ = ["WindowAccumulator", "check_topk_ids"]

# Index entries per bincount call: bounds the temporaries at ~64 MiB for DeepSeek-V3-sized steps.
_CHUNK_ENTRIES = 8 * 2**20
# No cell of a window exceeds its token count (a token adds at most 1 to any cell: its k experts of a layer
# are distinct), so up to this many tokens the counts fit in uint16: a quarter of the memory traffic of
# int64 for counting and for encoding. Past it, the window widens to int64.
_NARROW_TOKENS = np.iinfo(np.uint16).max


def check_topk_ids(topk_ids: np.ndarray, num_layers: int, num_experts: int, top_k: int) -> np.ndarray:
    """Validate one step's routing; returns int64 [T, L, k] sorted along k (for a < b pairs)."""
    ids = np.asarray(topk_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"topk_ids: expected an integer array, got dtype {ids.dtype}")
    if ids.ndim != 3 or ids.shape[1:] != (num_layers, top_k):
        raise ValueError(f"topk_ids: expected shape [T, {num_layers}, {top_k}], got {list(ids.shape)}")
    ids = np.sort(ids.astype(np.int64, copy=False), axis=2)
    if ids.size:
        lo, hi = ids[:, :, 0].min(), ids[:, :, -1].max()
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"topk_ids: expert ids must lie in [0, {num_experts}), found [{lo}, {hi}]")
        if top_k > 1 and (np.diff(ids, axis=2) == 0).any():
            t, layer = np.argwhere((np.diff(ids, axis=2) == 0).any(axis=2))[0]
            raise ValueError(f"topk_ids: token {t} selects the same expert twice in layer {layer}")
    return ids


class WindowAccumulator:
    """Counts of the current window of one writer (not thread-safe: one writer, one thread)."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int) -> None:
        if num_layers < 1 or num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ValueError(
                f"shape: expected layers >= 1, experts >= 1, 1 <= top_k <= experts; "
                f"got layers={num_layers}, experts={num_experts}, top_k={top_k}"
            )
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self._reset()

    def _reset(self) -> None:
        self._window = WindowCounts.zeros(self.num_layers, self.num_experts, self.top_k, dtype=np.uint16)
        self._tokens = 0

    def _widen(self) -> None:
        w = self._window
        self._window = WindowCounts(
            w.counts.astype(np.int64), w.top_k, 0, w.coact.astype(np.int64), w.trans.astype(np.int64), deltas=0
        )

    @property
    def tokens(self) -> int:
        return self._tokens

    def add(self, topk_ids: np.ndarray) -> None:
        """Count one step: topk_ids int [T, L, k], the experts each token chose in each layer."""
        L, E, k = self.num_layers, self.num_experts, self.top_k
        ids = check_topk_ids(topk_ids, L, E, k)
        T = ids.shape[0]
        if T == 0:
            return
        if self._tokens + T > _NARROW_TOKENS and self._window.counts.dtype != np.int64:
            self._widen()
        w = self._window

        def add(into: np.ndarray, counts: np.ndarray) -> None:
            # Exact: no cell exceeds the window's tokens, which the dtype holds (see _NARROW_TOKENS).
            np.add(into, counts.reshape(into.shape), out=into, casting="unsafe")

        layer = np.arange(L, dtype=np.int64)[None, :, None]
        add(w.counts, np.bincount((layer * E + ids).ravel(), minlength=L * E))

        # Layers in chunks so the index temporaries stay bounded; each chunk adds into its own slice.
        # Index arithmetic runs on the small [T, l, k] arrays first, so the big [T, l, pairs] ones cost one
        # gather and one add; int32 when the chunk's index space allows (half the memory traffic).
        P = pair_count(E)
        per_layer = T * max(k * (k - 1) // 2 + k * k, 1)
        step = max(1, _CHUNK_ENTRIES // per_layer)
        dt = np.int32 if step * max(P, E * E) < 2**31 else np.int64
        ids = ids.astype(dt)
        ii, jj = np.triu_indices(k, 1)
        for l0 in range(0, L, step):
            l1 = min(L, l0 + step)
            chunk = ids[:, l0:l1]
            if k > 1:
                # Pair (a, b), a < b, sits at a (2E - a - 1) / 2 + (b - a - 1) of its layer's triangle.
                rel = (np.arange(l1 - l0, dtype=dt) * P)[None, :, None]
                row = chunk * (2 * E - chunk - 1) // 2 - chunk - 1 + rel
                tri = row[:, :, ii] + chunk[:, :, jj]
                add(w.coact[l0:l1], np.bincount(tri.ravel(), minlength=(l1 - l0) * P))
            t1 = min(l1, L - 1)
            if t1 > l0:
                rel = (np.arange(t1 - l0, dtype=dt) * (E * E))[None, :, None]
                src = ids[:, l0:t1] * E + rel
                # [T, l, k, k]: every (i, j) pair of experts in layers l and l + 1, as stats_from_trace.
                flat = src[:, :, :, None] + ids[:, l0 + 1 : t1 + 1, None, :]
                add(w.trans[l0:t1], np.bincount(flat.ravel(), minlength=(t1 - l0) * E * E))
        self._tokens += T

    def take(self) -> WindowCounts:
        """Close the current window: its counts, and a fresh empty one behind it."""
        w = self._window
        done = WindowCounts(w.counts, self.top_k, self._tokens, w.coact, w.trans, deltas=1)
        self._reset()
        return done
