"""Co-located replicas: two copies of one expert on one GPU serve no more tokens than one copy there (every
token that reaches that GPU for the expert is served by either), so the second copy's slot is wasted.

`spread_replicas` moves such copies apart, swapping slots only between GPUs of the same group (a node, where
a placer keeps an expert's copies in one node), until no GPU holds an expert twice or no swap is left. An
expert with more copies than its group has GPUs keeps the copies that cannot be spread.
"""

from __future__ import annotations

import numpy as np

__all__ = ["spread_replicas"]


def spread_replicas(phy2log: np.ndarray, num_gpus: int, gpus_per_group: int | None = None,
                    copy_load: np.ndarray | None = None) -> np.ndarray:
    """phy2log [L, R] with co-located copies swapped apart, layer by layer.

    Each swap trades a second copy of expert e on GPU g for a slot on GPU h (same group, h without e) whose
    expert f is not on g: it removes a co-location and creates none. Preferred: a swap that also removes one
    on h; then, with copy_load [L, E] (the load of one copy of each expert), the lightest heavier GPU of the
    two afterwards; then the lowest slot. Deterministic.
    """
    out = np.array(phy2log, dtype=np.int64, copy=True)
    for layer in range(out.shape[0]):
        load = None if copy_load is None else np.asarray(copy_load[layer], dtype=np.float64)
        out[layer] = _spread_row(out[layer], num_gpus, gpus_per_group or num_gpus, load)
    return out


def _spread_row(row: np.ndarray, G: int, per_group: int, load: np.ndarray | None) -> np.ndarray:
    R = len(row)
    S = R // G
    gpu = np.arange(R) // S
    E = int(row.max()) + 1
    held = np.zeros((E, G), dtype=np.int64)
    np.add.at(held, (row, gpu), 1)
    gpu_load = None if load is None else np.bincount(gpu, weights=load[row], minlength=G)
    for _ in range(R):  # every swap removes at least one co-location of a spreadable expert
        swap = _best_swap(row, gpu, held, per_group, load, gpu_load)
        if swap is None:
            break
        s, t = swap
        e, f, g, h = row[s], row[t], gpu[s], gpu[t]
        row[s], row[t] = f, e
        held[e, g] -= 1
        held[e, h] += 1
        held[f, h] -= 1
        held[f, g] += 1
        if gpu_load is not None:
            gpu_load[g] += load[f] - load[e]
            gpu_load[h] += load[e] - load[f]
    return row


def _best_swap(row, gpu, held, per_group, load, gpu_load) -> tuple[int, int] | None:
    """(slot of a second copy, slot to trade it with) by the preferences of `spread_replicas`, or None.
    Experts with more copies than a group has GPUs cannot be spread: they may move onto a GPU holding them."""
    best, best_key = None, None
    group = gpu // per_group
    crowded = held.sum(1) > per_group  # [E]
    for s in np.flatnonzero((held[row, gpu] > 1) & ~crowded[row]):
        e, g = row[s], gpu[s]
        ok = (group == group[s]) & (gpu != g) & (held[e, gpu] == 0) & ((held[row, g] == 0) | crowded[row])
        for t in np.flatnonzero(ok):
            f, h = row[t], gpu[t]
            fixes_two = held[f, h] > 1 and not crowded[f]
            peak = 0.0 if gpu_load is None else max(gpu_load[g] - load[e] + load[f], gpu_load[h] - load[f] + load[e])
            key = (not fixes_two, bool(held[f, g]), peak, s, t)
            if best_key is None or key < best_key:
                best, best_key = (int(s), int(t)), key
    return best
