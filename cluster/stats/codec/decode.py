"""Decoding windows: each array added into an accumulator of the narrowest type its bound fits, and sums of
many windows over threads.

`codec/__init__.py` describes the layout.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..window import WindowCounts, pair_count, transition_rows
from .format import (
    ARRAY,
    BITMAP,
    CONTAINER,
    COO,
    DENSE,
    EXCESS,
    FLAG_FLOAT,
    FLAG_PAIRS,
    FLAG_TOP1,
    GROUP,
    GROUPS,
    KIND_FLOAT,
    KIND_UINT,
    LAYOUTS,
    CodecError,
    encoded_header,
)

__all__ = ["decode_window", "add_window_into", "sum_windows", "value_bound", "value_bounds", "accumulator_for"]

# Below this many cells to add, threads cost more than they save.
_THREADED_CELLS = 1 << 22


def value_bound(blob: bytes) -> int:
    """An upper bound on every value in an encoded integer window, from its array headers alone."""
    return max(value_bounds(blob))


def value_bounds(blob: bytes) -> list[int]:
    """Upper bounds on the values of each array of an encoded integer window (counts, then coact and
    trans when it has pairs, then trans_top1 when it has it), from its array headers alone.

    Summing windows can then run each array in the narrowest accumulator its summed bounds fit (uint16 for
    the pair arrays of a few DeepSeek-V3 writer windows, whose counts need uint32), a quarter of int64's
    memory traffic, and widen once at the end.
    """
    h = encoded_header(blob)
    if h["flags"] & FLAG_FLOAT:
        raise CodecError("float window where integer counts are expected")
    offset, bounds = h["size"], []
    pairs = bool(h["flags"] & FLAG_PAIRS)
    for _ in range(1 + 2 * pairs + (pairs and bool(h["flags"] & FLAG_TOP1))):
        if offset + ARRAY.size > len(blob):
            raise CodecError(f"window truncated at byte {offset}")
        layout, bits, ibytes, _, xbytes, n, nnz, n_over = ARRAY.unpack_from(blob, offset)
        if layout not in LAYOUTS or bits not in CONTAINER:
            raise CodecError(f"unknown layout {layout} or width {bits}")
        offset += ARRAY.size
        top = (1 << min(bits, 63)) - 1
        if layout == GROUPS:  # a cell is its nibble (at most 15) or its hot group's value
            groups = -(-n // GROUP)
            offset += 2 * groups + n_over * ibytes + n_over * GROUP * bits // 8
            top += 15
        else:
            m = n if layout == DENSE else nnz
            offset += {DENSE: 0, BITMAP: (n + 7) // 8, COO: nnz * ibytes}[layout]
            offset += (m * bits + 7) // 8 + n_over * (ibytes + xbytes)
            if n_over:
                top += (1 << min(8 * xbytes, 63)) - 1
        bounds.append(top)
    return bounds


def accumulator_for(bounds: Sequence[int], layers: int, experts: int, top_k: int) -> WindowCounts:
    """Zeros to add windows into, each array in the narrowest type its bound (a summed `value_bounds`) fits;
    pair arrays take the counts' bound when no bound is given for them."""

    def narrow(bound: int):
        return np.uint16 if bound < 2**16 else np.uint32 if bound < 2**32 else np.int64

    counts, coact, trans, top1 = (list(bounds) + [bounds[0]] * 3)[:4]
    L, E = layers, experts
    return WindowCounts(
        np.zeros((L, E), narrow(counts)),
        top_k,
        0,
        np.zeros((L, pair_count(E)), narrow(coact)),
        np.zeros((max(L - 1, 0), E * E), narrow(trans)),
        deltas=0,
        trans_top1=np.zeros((max(L - 1, 0), E * E), narrow(top1)),
    )


def _unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """uint8 [count]: the cells of `_pack_nibbles`, low nibble first."""
    if sys.byteorder == "little":
        # Byte p = a | b << 4 becomes the uint16 a | b << 8, whose two bytes are the cells a, b: three
        # contiguous passes instead of two strided stores.
        x = packed.astype(np.uint16)
        y = x << 4
        np.bitwise_or(y, x, out=y)
        np.bitwise_and(y, 0x0F0F, out=y)
        return y.view(np.uint8)[:count]
    v = np.empty(2 * packed.size, np.uint8)
    v[0::2] = packed & 0x0F
    v[1::2] = packed >> 4
    return v[:count]


def _decode_array_into(blob, offset: int, out: np.ndarray, name: str) -> int:
    """Add one encoded array into `out` (flat view of the right size); returns the next offset."""
    if offset + ARRAY.size > len(blob):
        raise CodecError(f"{name}: window truncated at byte {offset}")
    layout, bits, ibytes, kind, xbytes, n, nnz, n_over = ARRAY.unpack_from(blob, offset)
    offset += ARRAY.size
    if layout not in LAYOUTS:
        raise CodecError(f"{name}: unknown layout {layout}")
    if n != out.size:
        raise CodecError(f"{name}: {n} cells stored, expected {out.size}")
    if kind == KIND_FLOAT and bits == 64:
        if not np.issubdtype(out.dtype, np.floating):
            raise CodecError(f"{name}: float values where integer counts are expected")
        vtype = np.float64
    elif kind == KIND_UINT and bits in CONTAINER:
        vtype = CONTAINER[bits]
    else:
        raise CodecError(f"{name}: unknown value type (kind {kind}, {bits} bits)")
    if ibytes not in ((1, 2, 4, 8) if layout == GROUPS else (2, 4, 8)) or nnz > n or n_over > n:
        raise CodecError(f"{name}: corrupt array header (index bytes {ibytes}, nnz {nnz}, overflow {n_over})")
    itype = CONTAINER[8 * ibytes] if ibytes < 8 else np.int64

    def take(count: int, dtype, nbytes: int | None = None) -> np.ndarray:
        nonlocal offset
        size = count * np.dtype(dtype).itemsize if nbytes is None else nbytes
        if offset + size > len(blob):
            raise CodecError(f"{name}: window truncated (needs {size} bytes at {offset}, has {len(blob) - offset})")
        arr = np.frombuffer(blob, dtype=dtype, count=size // np.dtype(dtype).itemsize, offset=offset)
        offset += size
        return arr

    def values(count: int) -> np.ndarray:
        if bits != 4:
            return take(count, vtype)
        return _unpack_nibbles(take((count + 1) // 2, np.uint8), count)

    # Adds cast "unsafe" into narrow accumulators: callers size them from value_bound(), so nothing wraps.
    if layout == DENSE:
        np.add(out, values(n), out=out, casting="unsafe")
    elif layout == BITMAP:
        mask = np.unpackbits(take((n + 7) // 8, np.uint8), count=n).view(bool)
        if int(np.count_nonzero(mask)) != nnz:
            raise CodecError(f"{name}: bitmap marks {np.count_nonzero(mask)} cells, header says {nnz}")
        # Scatter into a dense array of the narrow type, then one add: ~4x faster than out[mask] += values;
        # put at the set bits' indices is ~3x faster again than dense[mask] = values (5.5 vs 15 ms, 3.7 M cells).
        dense = np.zeros(n, vtype)
        dense.put(np.flatnonzero(mask), values(nnz))
        np.add(out, dense, out=out, casting="unsafe")
    elif layout == COO:
        idx = take(nnz, itype)
        if nnz and int(idx.max()) >= n:
            raise CodecError(f"{name}: index {int(idx.max())} outside {n} cells")
        out[idx.astype(np.intp)] += values(nnz)
    elif layout == GROUPS:
        if kind != KIND_UINT or bits not in (8, 16):
            raise CodecError(f"{name}: groups with kind {kind} and {bits}-bit values (expected uint, 8 or 16)")
        _add_groups(out, take, n, n_over, ibytes, vtype, name)
        return offset
    else:
        raise CodecError(f"{name}: unknown layout {layout}")
    if n_over:
        if kind == KIND_FLOAT:
            raise CodecError(f"{name}: overflow list on float values")
        cells = take(n_over, itype)
        if int(cells.max()) >= n:
            raise CodecError(f"{name}: overflow cell {int(cells.max())} outside {n} cells")
        if xbytes not in EXCESS:
            raise CodecError(f"{name}: unknown overflow width {xbytes}")
        out[cells.astype(np.intp)] += take(n_over, EXCESS[xbytes])
    return offset


def _add_groups(out: np.ndarray, take, n: int, n_hot: int, gap_bytes: int, vtype, name: str) -> None:
    """Add a GROUPS array into `out`: every cell's nibble, then the hot groups' cells over their zeros."""
    groups = -(-n // GROUP)
    plane = _unpack_nibbles(take(2 * groups, np.uint8), GROUP * groups)
    if plane[n:].any():
        raise CodecError(f"{name}: padding cells after cell {n} are not zero")
    np.add(out, plane[:n], out=out, casting="unsafe")
    if gap_bytes not in EXCESS:
        raise CodecError(f"{name}: hot group gaps of {gap_bytes} bytes (expected 1, 2, 4 or 8)")
    gaps = take(n_hot, EXCESS[gap_bytes])
    cells = take(n_hot * GROUP, vtype).reshape(n_hot, GROUP)
    if n_hot == 0:
        return
    if (gaps[1:] == 0).any():
        raise CodecError(f"{name}: hot groups not in increasing order")
    index = np.cumsum(gaps, dtype=np.intp)
    if index[-1] >= groups:
        raise CodecError(f"{name}: hot group {index[-1]} outside {groups} groups")
    if n % GROUP == 0 and out.dtype in (np.uint16, np.uint32, np.int64):
        # A group is 8 (uint16 cells), 16 or 32 bytes of `out`: one, two or four 64-bit words, and one
        # 64-bit add per word adds its cells at once. No cell carries into the next: value_bound() sized
        # the accumulator for the whole sum (and int64 cells are whole words).
        words = out.view(np.uint64)
        per_group = GROUP * out.itemsize // 8
        if per_group > 1:
            index = (index[:, None] * per_group + np.arange(per_group)).reshape(-1)
        words[index] += cells.astype(out.dtype, copy=False).reshape(-1).view(np.uint64)
        return
    if n % GROUP == 0:
        rows = out.reshape(-1, GROUP)
        rows[index] += cells  # rows are distinct: a fancy-index add is exact
        return
    flat = (index[:, None] * GROUP + np.arange(GROUP)).reshape(-1)
    inside = flat < n
    if cells.reshape(-1)[~inside].any():
        raise CodecError(f"{name}: padding cells after cell {n} are not zero")
    out[flat[inside]] += cells.reshape(-1)[inside]


def add_window_into(acc: WindowCounts, blob: bytes) -> tuple[float, int, bool, bool]:
    """Add an encoded window into the accumulator `acc` (in place; a whole window's, also for a layer
    share, which adds into its own rows); returns (tokens, deltas, had pairs, had trans_top1). A share's
    tokens count only where it holds layer 0 (every share of a group window counts the same tokens). A
    window without trans_top1 adds nothing to the accumulator's (the caller drops it).

    Refuses a window of another shape: the message names what is stored and what was expected.
    """
    h = encoded_header(blob)
    L, E = acc.counts.shape
    if (h["layers"], h["experts"], h["top_k"]) != (L, E, acc.top_k) or acc.is_share:
        raise CodecError(
            f"window shape layers={h['layers']} experts={h['experts']} top_k={h['top_k']}, "
            f"expected layers={L} experts={E} top_k={acc.top_k}"
        )
    first, n = h["first_layer"], h["share_layers"]
    rows = slice(first, first + n)
    moves = slice(first, first + transition_rows(first, n, L))
    # Rows of a C-contiguous [L, X] array are contiguous: each share adds into a flat view.
    offset = _decode_array_into(blob, h["size"], acc.counts[rows].reshape(-1), "counts")
    pairs = bool(h["flags"] & FLAG_PAIRS)
    top1 = pairs and bool(h["flags"] & FLAG_TOP1)
    tokens = h["tokens"] if first == 0 else 0.0
    if not pairs or not acc.has_pairs:
        # Without pairs on both sides only counts merge (as RoutingStats.merge); the caller drops pairs.
        return tokens, h["deltas"], pairs, top1
    offset = _decode_array_into(blob, offset, acc.coact[rows].reshape(-1), "coact")
    offset = _decode_array_into(blob, offset, acc.trans[moves].reshape(-1), "trans")
    if top1:
        into = acc.trans_top1[moves] if acc.has_top1 else np.zeros_like(acc.trans[moves])
        offset = _decode_array_into(blob, offset, into.reshape(-1), "trans_top1")
    if offset != len(blob):
        raise CodecError(f"window has {len(blob) - offset} trailing bytes")
    return tokens, h["deltas"], pairs, top1


def decode_window(blob: bytes, num_layers: int, num_experts: int, top_k: int) -> WindowCounts:
    """The integer window stored in `blob` (expected shape given; float windows: see `add_window_into`)."""
    h = encoded_header(blob)
    pairs = bool(h["flags"] & FLAG_PAIRS)
    is_float = bool(h["flags"] & FLAG_FLOAT)
    acc = WindowCounts.zeros(num_layers, num_experts, top_k, pairs=pairs)
    if is_float:
        acc = WindowCounts(
            acc.counts.astype(np.float64),
            top_k,
            0,
            None if not pairs else np.zeros((num_layers, pair_count(num_experts))),
            None if not pairs else np.zeros((max(num_layers - 1, 0), num_experts * num_experts)),
            deltas=0,
            trans_top1=None if not pairs else np.zeros((max(num_layers - 1, 0), num_experts * num_experts)),
        )
    tokens, deltas, _, top1 = add_window_into(acc, blob)
    tok = tokens if is_float else int(tokens)
    return WindowCounts(acc.counts, top_k, tok, acc.coact, acc.trans, deltas=deltas,
                        trans_top1=acc.trans_top1 if top1 else None)


def sum_windows(
    blobs: Sequence[bytes], layers: int, experts: int, top_k: int, threads: int | None = None
) -> tuple[WindowCounts, list[tuple[float, int, bool, bool]]]:
    """The exact sum of encoded integer windows, and each one's (tokens, deltas, had pairs, had trans_top1).

    Each array's accumulator is the narrowest unsigned type its summed value bounds fit (uint16 for the pair
    arrays of 16 DeepSeek-V3 writer windows, a quarter of int64's memory traffic). A large sum is split over
    threads, each adding a share of the windows into its own accumulator (numpy releases the GIL in its
    adds), and the shares are added at the end: decoding is most of a cold snapshot's time, and a reader
    has cores to spare.
    Pair statistics of a window without them are not added (its `had pairs` says so), nor trans_top1.
    """
    bounds = [0, 0, 0, 0]
    for i, blob in enumerate(blobs):
        try:
            for a, top in enumerate(value_bounds(blob)):
                bounds[a] += top
        except CodecError as exc:
            exc.index = i
            raise
    cells = len(blobs) * (layers * experts + layers * pair_count(experts) + 2 * max(layers - 1, 0) * experts * experts)
    if threads is None:
        threads = min(len(blobs), os.cpu_count() or 1, 4) if cells >= _THREADED_CELLS else 1
    threads = max(1, min(threads, len(blobs)))
    shares = [range(len(blobs))[t::threads] for t in range(threads)]

    def add_share(share: range) -> tuple[WindowCounts, list[tuple[int, tuple[float, int, bool, bool]]]]:
        acc = accumulator_for(bounds, layers, experts, top_k)
        info = []
        for i in share:
            try:
                info.append((i, add_window_into(acc, blobs[i])))
            except CodecError as exc:
                exc.index = i
                raise
        return acc, info

    if threads == 1:
        parts = [add_share(shares[0])]
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="expertmesh-decode") as pool:
            parts = list(pool.map(add_share, shares))
    total = parts[0][0]
    for acc, _ in parts[1:]:  # exact: the bound above covers the whole sum
        for name in ("counts", "coact", "trans", "trans_top1"):
            np.add(getattr(total, name), getattr(acc, name), out=getattr(total, name))
    info = dict(i_info for _, share_info in parts for i_info in share_info)
    return total, [info[i] for i in range(len(blobs))]

