"""What a reader keeps between snapshots: encoded fields already seen and their exact running sum."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from .codec import CodecError, accumulator_for, add_window_into, sum_windows, value_bounds
from .keys import StoreHeader
from .window import WindowCounts

if TYPE_CHECKING:
    from .store import StatsStore

__all__ = ["SnapshotCache", "naming"]


class SnapshotCache:
    """Encoded fields seen by the last snapshot and their exact running sum (int64).

    A field's bytes never change once written, so a field name identifies its value for good. The sums of
    coact/trans run over the fields that have pairs; the result has pairs only when every field has them.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._reset()

    def _reset(self) -> None:
        self.blobs: dict[tuple[int, str], bytes] = {}
        self.deltas: dict[tuple[int, str], int] = {}
        self.total: WindowCounts | None = None
        self.shape: tuple[int, int, int] | None = None
        self.tokens = 0
        self.no_pairs = 0  # included fields without pair statistics
        self.no_top1 = 0  # included fields without trans_top1

    def update(
        self, store: StatsStore, header: StoreHeader, current: set, fetched: dict
    ) -> tuple[WindowCounts, dict[tuple[int, str], int]]:
        """(exact sum over the `current` fields, deltas per field), reusing what the last call summed.

        The result's coact is the cache's own array: turn it into RoutingStats before the next update.
        """
        shape = (header.layers, header.experts, header.top_k)
        blobs = {**self.blobs, **fetched}
        gone, new = set(self.deltas) - current, current - set(self.deltas)
        with store._errors("read snapshot"):
            if self.total is None or self.shape != shape or len(gone) + len(new) >= len(current):
                self._recompute(store, shape, current, blobs)
            else:
                for key in sorted(gone):
                    self._apply(store, key, blobs[key], sign=-1)
                for key in sorted(new):
                    self._apply(store, key, blobs[key], sign=+1)
        pairs = self.no_pairs == 0
        top1 = pairs and self.no_top1 == 0
        t = self.total
        # coact is not copied: the caller's to_stats expands it into a fresh [L, E, E] array anyway.
        result = WindowCounts(
            t.counts.copy(),
            header.top_k,
            self.tokens,
            t.coact if pairs else None,
            t.trans.copy() if pairs else None,
            deltas=sum(self.deltas.values()),
            trans_top1=t.trans_top1.copy() if top1 else None,
        )
        deltas = dict(self.deltas)
        kept = {key: blobs[key] for key in current}
        if sum(len(b) for b in kept.values()) <= self.max_bytes:
            self.blobs = kept
        else:
            self._reset()  # too big to keep: the next snapshot starts from scratch
        return result, deltas

    def _recompute(self, store: StatsStore, shape: tuple[int, int, int], current: set, blobs: dict) -> None:
        keys = sorted(current)
        with naming(store, keys):
            acc, info = sum_windows([blobs[key] for key in keys], *shape)
        self._reset()
        self.shape = shape
        for key, (tokens, n_deltas, had_pairs, had_top1) in zip(keys, info, strict=True):
            self.deltas[key] = n_deltas
            self.tokens += int(tokens)
            self.no_pairs += not had_pairs
            self.no_top1 += not had_top1
        self.total = WindowCounts(
            acc.counts.astype(np.int64), shape[2], 0, acc.coact.astype(np.int64), acc.trans.astype(np.int64),
            trans_top1=acc.trans_top1.astype(np.int64),
        )

    def _apply(self, store: StatsStore, key: tuple[int, str], blob: bytes, sign: int) -> None:
        with naming(store, [key]):
            part = accumulator_for(value_bounds(blob), *self.shape)
            tokens, n_deltas, had_pairs, had_top1 = add_window_into(part, blob)
        op = np.add if sign > 0 else np.subtract
        op(self.total.counts, part.counts, out=self.total.counts, casting="unsafe")
        if had_pairs:
            op(self.total.coact, part.coact, out=self.total.coact, casting="unsafe")
            op(self.total.trans, part.trans, out=self.total.trans, casting="unsafe")
        if had_top1:
            op(self.total.trans_top1, part.trans_top1, out=self.total.trans_top1, casting="unsafe")
        self.tokens += sign * int(tokens)
        self.no_pairs += sign * (not had_pairs)
        self.no_top1 += sign * (not had_top1)
        if sign > 0:
            self.deltas[key] = n_deltas
        else:
            del self.deltas[key]


@contextlib.contextmanager
def naming(store: StatsStore, keys: list[tuple[int, str]]) -> Iterator[None]:
    """Codec errors name the window key and field they came from (`keys[error.index]`, or the only one)."""
    try:
        yield
    except CodecError as exc:
        wid, field = keys[exc.index if exc.index is not None else 0]
        raise CodecError(f"{store.keys.window(wid)} field {field!r}: {exc}") from None
