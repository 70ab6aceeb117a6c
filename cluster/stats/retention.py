"""Retention: the decayed aggregate of every window, and compaction (merging deltas, folding old windows).

The last `keep` windows by id are kept as they are. `compact()` (the controller calls it each loop;
`expertmesh stats compact` by hand) sums each window's deltas into one field, and folds windows that fell out
of the last `keep` into the aggregate, weighting window w by decay ** (ref - w). Window keys expire after
`ttl_s` whether or not anyone compacts, so old windows never pile up.

These are functions of `StatsStore` (its `decayed` and `compact` call them), in a module of their own.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

import numpy as np

from expertmesh.placement.stats import RoutingStats

from . import scripts
from .codec import add_window_into, encode_window
from .connect import StatsStoreError
from .keys import STAGE_TTL_S, StoreHeader, text
from .window import WindowCounts, pair_count

if TYPE_CHECKING:
    from .store import StatsStore

__all__ = ["decayed", "compact"]


def decayed(store: StatsStore) -> RoutingStats:
    """The exponentially decayed aggregate as of the newest window (floating point counts).

    sum over every window ever written of decay ** (head - id) * window: kept windows are read as
    they are, older ones through the folded aggregate, so it is exact whether or not compaction ran.
    """
    header, agg, found = store._read(-1, with_agg=True)
    L, E, k = header.layers, header.experts, header.top_k
    total = _float_zeros(L, E, k)
    tokens, pairs, top1 = 0.0, True, True
    with store._errors("read decayed aggregate"):
        for wid, fields in found:
            win, _ = store._sum(header, [(wid, fields)], "read decayed aggregate")
            factor = header.decay ** (header.head - wid)
            _axpy(total, win, factor)
            tokens += factor * win.tokens
            pairs &= win.has_pairs
            top1 &= win.has_top1
        if agg.get("blob"):
            ref = int(text(agg["ref"]))
            part = _float_zeros(L, E, k)
            tok, _, had, had_top1 = add_window_into(part, agg["blob"])
            factor = header.decay ** max(header.head - ref, 0)
            _axpy(total, part, factor)
            tokens += factor * tok
            pairs &= had
            top1 &= had_top1
    if not found and not agg.get("blob"):
        raise StatsStoreError(f"no windows under {store.where}")
    window = WindowCounts(
        total.counts,
        k,
        int(round(tokens)),
        total.coact if pairs else None,
        total.trans if pairs else None,
        trans_top1=total.trans_top1 if pairs and top1 else None,
    )
    stats = window.to_stats(
        {
            "model": store.keys.model,
            "run": store.keys.run,
            "source": store.display,
            "decay": header.decay,
            "head": header.head,
            "decayed": True,
        }
    )
    return stats


def compact(store: StatsStore) -> dict:
    """Merge each window's deltas into one field; fold windows older than the last `keep` into the sum.

    Safe to run from several processes and while writers flush: every change is a compare-and-set
    script that gives up (and is retried at the next call) when what it read has changed.
    Returns counts of merged windows, folded windows and conflicts.
    """
    header = store.header()
    if header is None:
        return {"merged": 0, "folded": 0, "conflicts": 0}
    first_kept = header.head - header.keep + 1
    report = {"merged": 0, "folded": 0, "conflicts": 0}
    to_fold: list[tuple[int, list[str], WindowCounts]] = []
    for wid in store.window_ids():
        with store._errors(f"compact window {wid}"):
            names = sorted(text(n) for n in store.client.hkeys(store.keys.window(wid)))
        blobs = store._fetch([(wid, name) for name in names], f"compact window {wid}")
        if any(b is None for b in blobs):
            report["conflicts"] += 1  # a field went away between listing and reading: next time
            continue
        fields = dict(zip(names, blobs, strict=True))
        if wid < first_kept:
            win, _ = store._sum(header, [(wid, fields)], f"compact window {wid}") if fields else (None, None)
            to_fold.append((wid, sorted(fields), win))
            continue
        if len(fields) < 2:
            continue
        win, _ = store._sum(header, [(wid, fields)], f"compact window {wid}")
        name = f"m:{secrets.token_hex(8)}"
        stage = store.keys.stage(name)
        with store._errors(f"compact window {wid}"):
            pipe = store.client.pipeline(transaction=False)
            pipe.set(stage, encode_window(win), ex=STAGE_TTL_S)
            pipe.eval(scripts.MERGE, 2, store.keys.window(wid), stage, store.keys.blob(wid, ""), name, *names)
            ok = pipe.execute()[1]
        report["merged" if ok else "conflicts"] += 1
    if to_fold:
        report["folded"], report["conflicts"] = _fold(store, header, to_fold), report["conflicts"]
        if report["folded"] == 0:
            report["conflicts"] += 1
    return report


def _fold(store: StatsStore, header: StoreHeader, to_fold: list[tuple[int, list[str], WindowCounts | None]]) -> int:
    L, E, k = header.layers, header.experts, header.top_k
    with store._errors("fold windows"):
        agg = {text(n): v for n, v in store.client.hgetall(store.keys.agg).items()}
    ver = text(agg.get("ver", b""))
    total = _float_zeros(L, E, k)
    tokens, pairs, top1, ref = 0.0, True, True, None
    if agg.get("blob"):
        with store._errors("fold windows"):
            tokens, _, pairs, top1 = add_window_into(total, agg["blob"])
        ref = int(text(agg["ref"]))
    newest = max(wid for wid, _, _ in to_fold)
    new_ref = newest if ref is None else max(ref, newest)
    if ref is not None and new_ref != ref:
        _scale(total, header.decay ** (new_ref - ref))
        tokens *= header.decay ** (new_ref - ref)
    for wid, _, win in to_fold:
        if win is None:
            continue
        factor = header.decay ** (new_ref - wid)
        _axpy(total, win, factor)
        tokens += factor * win.tokens
        pairs &= win.has_pairs
        top1 &= win.has_top1
    blob = encode_window(
        WindowCounts(total.counts, k, 0, total.coact if pairs else None, total.trans if pairs else None, deltas=0,
                     trans_top1=total.trans_top1 if pairs and top1 else None),
        tokens=tokens,
    )
    folded = int(text(agg.get("folded", b"0"))) + len(to_fold)
    args = [ver, blob, new_ref, folded, store.keys.window_prefix, store.keys.blob_prefix]
    for wid, names, _ in to_fold:
        args += [wid, len(names), *names]
    with store._errors("fold windows"):
        ok = store.client.eval(scripts.FOLD, 2, store.keys.agg, store.keys.index, *args)
    return len(to_fold) if ok else 0


def _float_zeros(L: int, E: int, k: int) -> WindowCounts:
    trans = (max(L - 1, 0), E * E)
    return WindowCounts(
        np.zeros((L, E)), k, 0, np.zeros((L, pair_count(E))), np.zeros(trans), deltas=0, trans_top1=np.zeros(trans)
    )


def _axpy(total: WindowCounts, win: WindowCounts, factor: float) -> None:
    """total += factor * win, in place (float accumulators)."""
    total.counts[:] += factor * win.counts
    if total.has_pairs and win.has_pairs:
        total.coact[:] += factor * win.coact
        total.trans[:] += factor * win.trans
    if total.has_top1 and win.has_top1:
        total.trans_top1[:] += factor * win.trans_top1


def _scale(total: WindowCounts, factor: float) -> None:
    total.counts[:] *= factor
    if total.has_pairs:
        total.coact[:] *= factor
        total.trans[:] *= factor
    if total.has_top1:
        total.trans_top1[:] *= factor

