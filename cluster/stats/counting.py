"""Local accumulation of routing decisions into one window, exactly as `stats_from_trace` counts them.

A writer calls `add(topk_ids)` once per step and `take()` when it closes a window. The counts live in the
store's layout (`WindowCounts`: coact as an upper triangle, trans flattened), so closing a window costs
no rearrangement.

A step is counted one layer at a time with `np.bincount` into that layer's E x E cells: a layer's indices
(T x 28 pairs, T x 64 transitions for top-8) and its bins (512 KiB for 256 experts) stay in the CPU's
caches, where one bincount over the whole step scatters into tens of MiB and misses on nearly every add.
Same-layer pairs are counted in the order the router gave them (slot i < slot j, k (k - 1) / 2 a token, no
sort), so pair {a, b} lands in cell (a, b) or (b, a); folding the two into the triangle costs two gathers
of P cells a layer, and the diagonal collects an expert chosen twice by one token: that is the
duplicate check, for free.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .window import WindowCounts, pair_count

__all__ = ["WindowAccumulator", "check_topk_ids"]

# Tokens counted per pass over the layers: bounds the per-layer index arrays (T x k^2 intp, 2 MiB for
# 4096 tokens at top-8) and keeps every per-block count below 2^16, so a block's bins fold in uint16.
_TOKEN_BLOCK = 8192
# No cell of a window exceeds its token count (a token adds at most 1 to any cell: its k experts of a layer
# are distinct), so up to this many tokens the counts fit in uint16: a quarter of the memory traffic of
# int64 for counting and for encoding. Past it, the window widens to int64.
_NARROW_TOKENS = np.iinfo(np.uint16).max


def check_topk_ids(topk_ids: np.ndarray, num_layers: int, num_experts: int, top_k: int) -> np.ndarray:
    """Validate one step's dtype, shape and id range (not duplicates: `add` finds those while counting)."""
    ids = np.asarray(topk_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"topk_ids: expected an integer array, got dtype {ids.dtype}")
    if ids.ndim != 3 or ids.shape[1:] != (num_layers, top_k):
        raise ValueError(f"topk_ids: expected shape [T, {num_layers}, {top_k}], got {list(ids.shape)}")
    if ids.size:
        lo, hi = ids.min(), ids.max()
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"topk_ids: expert ids must lie in [0, {num_experts}), found [{lo}, {hi}]")
    return ids


@lru_cache(maxsize=8)
def _fold_indices(num_experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(upper, lower, diagonal) flat indices into an E x E layer: a < b as (a, b) and (b, a), in the
    triangle's row-major order, and (a, a)."""
    E = num_experts
    a, b = np.triu_indices(E, k=1)
    out = (a * E + b, b * E + a, np.arange(E) * (E + 1))
    for arr in out:
        arr.setflags(write=False)
    return out


def _duplicate(ids: np.ndarray, layer: int) -> ValueError:
    """The error for a step where some token chose one expert twice in `layer` (found by the counting)."""
    chosen = np.sort(ids[:, layer], axis=1)
    token = int(np.argwhere((np.diff(chosen, axis=1) == 0).any(axis=1))[0, 0])
    return ValueError(f"topk_ids: token {token} selects the same expert twice in layer {layer}")


class WindowAccumulator:
    """Counts of the current window of one writer (not thread-safe: one writer, one thread)."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, top1: bool = True,
                 layers: tuple[int, int] | None = None) -> None:
        """top1: also count trans_top1 (the top-1 expert's transitions, what token-follow plans read). A
        DeepSeek-V3-size window then encodes ~40% larger and ~15 ms slower; live writers opt in.
        layers: count only the share [first, stop) of the model's layers (`window.layer_shares`); steps
        still bring every layer's ids (the transitions of a share's last layer read the next one's)."""
        if num_layers < 1 or num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ValueError(
                f"shape: expected layers >= 1, experts >= 1, 1 <= top_k <= experts; "
                f"got layers={num_layers}, experts={num_experts}, top_k={top_k}"
            )
        first, stop = (0, num_layers) if layers is None else layers
        if not 0 <= first < stop <= num_layers:
            raise ValueError(f"layers: expected a share [first, stop) with 0 <= first < stop <= {num_layers}, "
                             f"got {layers}")
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.first, self.stop = first, stop
        self.top1 = top1
        self._slots = np.triu_indices(top_k, 1)  # slot pairs i < j of one token's k choices
        self._reset()

    def _reset(self) -> None:
        share = self.stop - self.first
        self._window = WindowCounts.zeros(share, self.num_experts, self.top_k, dtype=np.uint16,
                                          first_layer=self.first, model_layers=self.num_layers)
        self._tokens = 0
        self._no_top1 = False  # some steps came without trans_top1: the window carries none

    def _widen(self) -> None:
        w = self._window
        self._window = WindowCounts(
            w.counts.astype(np.int64), w.top_k, 0, w.coact.astype(np.int64), w.trans.astype(np.int64), deltas=0,
            trans_top1=w.trans_top1.astype(np.int64), first_layer=w.first_layer, model_layers=w.model_layers,
        )

    @property
    def tokens(self) -> int:
        return self._tokens

    def add(self, topk_ids: np.ndarray) -> None:
        """Count one step: topk_ids int [T, L, k], the experts each token chose in each layer.

        Raises ValueError for malformed input, and then counts nothing of the step.
        """
        E, k = self.num_experts, self.top_k
        ids = check_topk_ids(topk_ids, self.num_layers, E, k)
        T = ids.shape[0]
        if T == 0:
            return
        # The share's layers, and the next one where its last layer's transitions lead.
        n = self.stop - self.first
        moves = self._window.trans.shape[0]
        span = slice(self.first, self.first + max(n, moves + 1))
        starts = range(0, T, _TOKEN_BLOCK)
        # Pairs first, for every block: they find duplicates, and nothing is added to the window before
        # the whole step is known to be valid.
        pairs = np.zeros((n, pair_count(E)), np.uint16 if T <= _NARROW_TOKENS else np.int64)
        x = None
        for t in starts:
            x = _layer_major(ids[t : t + _TOKEN_BLOCK, span])
            bad = self._count_pairs(x, pairs)
            if bad is not None:
                raise _duplicate(ids, self.first + bad)
        if self._tokens + T > _NARROW_TOKENS and self._window.counts.dtype != np.int64:
            self._widen()
        w = self._window
        _add(w.coact, pairs)
        layer_rows = (np.arange(n) * E)[:, None, None]
        for t in starts:
            if len(starts) > 1:  # one block (the usual step) reuses its layout from the pair pass
                x = _layer_major(ids[t : t + _TOKEN_BLOCK, span])
            _add(w.counts.reshape(-1), np.bincount((x[:n] + layer_rows).ravel(), minlength=n * E))
            x_rows = x * E  # expert a of layer l as the row a * E of the E x E transition cells
            for layer in range(moves):
                # [k, k, T]: every (i, j) pair of experts in layers l and l + 1, as stats_from_trace.
                flat = x_rows[layer][:, None, :] + x[layer + 1][None, :, :]
                _add(w.trans[layer], np.bincount(flat.ravel(), minlength=E * E))
                if self.top1:  # row 0 of those pairs: from the top-1 expert (slot 0, the router's first choice)
                    _add(w.trans_top1[layer], np.bincount(flat[0].ravel(), minlength=E * E))
        self._tokens += T

    def add_dense(self, counts: np.ndarray, pairs: np.ndarray, trans: np.ndarray, tokens: int,
                  trans_top1: np.ndarray | None = None) -> None:
        """Add counts a writer made elsewhere (e.g. on its GPU) in the plain E x E layout of this module.

        counts [L, E]; pairs [L, E, E] where a token's slots i < j add one to (id_i, id_j), in the
        router's order (folded here into the triangle; a diagonal cell is a token that chose one expert
        twice); trans [L-1, E, E]; tokens = tokens counted; trans_top1 [L-1, E, E] from slot 0 only (None:
        not counted, and the window then carries none). For a layer share, L is the share's layers and the
        transitions are those leaving them (`window.transition_rows`). Raises ValueError naming the field
        for anything else, and then adds nothing.
        """
        L, E = self.stop - self.first, self.num_experts  # a share's layers: its own rows only
        moves = self._window.trans.shape[0]
        if not self.top1:
            trans_top1 = None
        want = {"counts": (counts, (L, E)), "pairs": (pairs, (L, E, E)), "trans": (trans, (moves, E, E))}
        if trans_top1 is not None:
            want["trans_top1"] = (trans_top1, (moves, E, E))
        arrays = {}
        for name, (arr, shape) in want.items():
            a = np.asarray(arr)
            if a.shape != shape or not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"{name}: expected an integer array of shape {list(shape)}, "
                                 f"got {a.dtype} {list(a.shape)}")
            if a.size and a.min() < 0:
                raise ValueError(f"{name}: expected counts >= 0, found {a.min()}")
            # 32 bits or more as given (a GPU's int32 counts: no int64 copy): a folded pair cell, the widest
            # sum here, stays below the window's tokens (< 2^31).
            arrays[name] = a if a.dtype.itemsize >= 4 else a.astype(np.int64)
        if not isinstance(tokens, (int, np.integer)) or tokens < 0:
            raise ValueError(f"tokens: expected an integer >= 0, got {tokens!r}")
        upper, lower, diagonal = _fold_indices(E)
        flat = arrays["pairs"].reshape(L, E * E)
        doubled = np.flatnonzero(flat[:, diagonal].any(axis=1))
        if doubled.size:
            raise ValueError(f"pairs: a token selected the same expert twice in layer {self.first + int(doubled[0])}")
        if self._tokens + int(tokens) > _NARROW_TOKENS and self._window.counts.dtype != np.int64:
            self._widen()
        w = self._window
        _add(w.counts, arrays["counts"])
        _add(w.coact, flat[:, upper] + flat[:, lower])
        _add(w.trans, arrays["trans"].reshape(moves, E * E))
        if trans_top1 is None:
            self._no_top1 = True
        else:
            _add(w.trans_top1, arrays["trans_top1"].reshape(moves, E * E))
        self._tokens += int(tokens)

    def _count_pairs(self, x: np.ndarray, into: np.ndarray) -> int | None:
        """Add a block's same-layer pairs (x: intp [L, k, T]) into `into` [L, P]; returns the first layer
        where a token chose one expert twice (then `into` is partly added: the caller drops it)."""
        E = self.num_experts
        first, second = self._slots
        if first.size == 0:  # top-1: no pairs, no duplicates
            return None
        upper, lower, diagonal = _fold_indices(E)
        for layer in range(into.shape[0]):
            xl = x[layer]
            flat = xl[first] * E  # [pairs, T]: row gathers, contiguous copies
            flat += xl[second]
            bins = np.bincount(flat.ravel(), minlength=E * E)
            if bins[diagonal].any():
                return layer
            cells = bins[upper]
            cells += bins[lower]
            _add(into[layer], cells)
        return None

    def take(self) -> WindowCounts:
        """Close the current window: its counts, and a fresh empty one behind it."""
        w = self._window
        done = WindowCounts(w.counts, self.top_k, self._tokens, w.coact, w.trans, deltas=1,
                            trans_top1=None if self._no_top1 or not self.top1 else w.trans_top1,
                            first_layer=w.first_layer, model_layers=w.model_layers)
        self._reset()
        return done


def _layer_major(block: np.ndarray) -> np.ndarray:
    """[T, L, k] ids as intp [L, k, T]: each layer's k slots are contiguous rows (bincount counts intp)."""
    T, L, k = block.shape
    x = np.empty((L, k, T), np.intp)
    x[...] = block.transpose(1, 2, 0)
    return x


def _add(into: np.ndarray, counts: np.ndarray) -> None:
    """into += counts, exactly: no cell exceeds the window's tokens, which into's dtype holds."""
    if into.dtype == counts.dtype:
        into += counts
    else:  # a plain cast then a same-type add: a mixed-type add with casting goes through slow buffers
        into += counts.astype(into.dtype)
