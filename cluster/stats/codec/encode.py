"""Encoding a window: the layout and value width with the fewest bytes, unless the fastest is close.

`codec/__init__.py` describes the layout. A large array is encoded in shares on a thread pool.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..window import WindowCounts
from .format import (
    ARRAY,
    BITMAP,
    CONTAINER,
    COO,
    DENSE,
    EXCESS,
    FLAG_FLOAT,
    FLAG_PAIRS,
    FLAG_SHARE,
    FLAG_TOP1,
    GROUP,
    GROUPS,
    HEADER,
    HOT_BITS,
    KIND_FLOAT,
    KIND_UINT,
    MAGIC,
    SHARE_HEADER,
    VERSION,
    WIDTHS,
    escape,
    index_bytes,
    uint_bytes,
)

__all__ = ["encode_window"]


def _pack(values: np.ndarray, bits: int, clip: bool) -> bytes:
    """Values in `bits` bits (clipped to the escape first when `clip`); 4-bit two to a byte, low nibble first."""
    if bits == 4:
        return _pack_nibbles(values, clip)
    v = np.empty(values.size, CONTAINER[bits])
    if clip:
        np.minimum(values, escape(bits), out=v, casting="unsafe")
    else:
        v[:] = values
    return v.tobytes()


def _pack_nibbles(values: np.ndarray, clip: bool) -> bytes:
    """Unsigned values (< 15, or any when `clip`: those >= 15 become the escape 15), two to a byte."""
    n = values.size
    if not clip and n % 2 == 0 and values.dtype == np.uint8:
        v = values  # read only below
    else:
        v = np.zeros(n + n % 2, np.uint8)
        v[:n] = values  # a plain narrowing cast: values >= 256 wrap here, and are clipped just below
    if clip:
        # v = min(value, 15) without np.minimum (a slow loop for a scalar bound): the low nibble of
        # every cell, then all four bits set where the value is at or above the escape.
        escaped = (values >= 15).view(np.uint8) * np.uint8(15)
        np.bitwise_and(v[:n], 15, out=v[:n])
        np.bitwise_or(v[:n], escaped, out=v[:n])
    if sys.byteorder == "little":
        # Cells a, b (each < 16) are the two bytes of the uint16 x = a | b << 8, so the low byte of
        # x | x >> 4 is a | b << 4: two contiguous passes, about twice as fast as strided nibble stores.
        x = v.view(np.uint16)
        y = x >> 4
        np.bitwise_or(y, x, out=y)
        return y.astype(np.uint8).tobytes()
    high = v[1::2] << 4
    np.bitwise_or(high, v[0::2], out=high)
    return high.tobytes()


# Cells per share of a dense array encoded on a thread (a multiple of 32 cells: every share starts on a
# whole byte of nibbles and of the hot-group bitmap). Each share's passes run in numpy with the GIL released.
_SHARE_CELLS = 1 << 20
_THREADED_ENCODE_CPUS = 4
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _encode_pool() -> ThreadPoolExecutor:
    """One pool per process, shared by every encode (a sender thread encodes one window at a time)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(min(4, (os.cpu_count() or 1) // 2), thread_name_prefix="expertmesh-encode")
        return _pool


def _in_shares(n: int, encode_share) -> list[tuple]:
    """encode_share(start, stop) over the cells [0, n) in shares, on the pool when there are several and
    the machine has cores to spare (on 2 cores, measured: the shares on threads were slower than one pass,
    as the writer's other threads and processes keep both busy)."""
    step = max(32, _SHARE_CELLS - _SHARE_CELLS % 32)
    bounds = [(start, min(n, start + step)) for start in range(0, n, step)]
    if len(bounds) < 2 or (os.cpu_count() or 1) < _THREADED_ENCODE_CPUS:
        return [encode_share(a, b) for a, b in bounds]
    return list(_encode_pool().map(lambda ab: encode_share(*ab), bounds))


def _dense_parts(flat: np.ndarray, bits: int, n_over: int, ibytes: int, xbytes: int) -> list[bytes]:
    """The DENSE layout's values, overflow cells and excess, in shares on threads for a large array.

    Byte-identical to encoding the array in one piece: shares start on whole bytes, and each share's
    overflow cells come out in ascending order, shifted by where the share starts.
    """
    itype = CONTAINER[8 * ibytes] if ibytes < 8 else np.int64
    clip = n_over > 0

    def share(start: int, stop: int) -> tuple[bytes, bytes, bytes]:
        part = flat[start:stop]
        packed = _pack(part, bits, clip)
        if not clip:
            return packed, b"", b""
        local = np.flatnonzero(part >= escape(bits))
        cells = (local + start).astype(itype, copy=False).tobytes()
        return packed, cells, (part[local] - escape(bits)).astype(EXCESS[xbytes]).tobytes()

    shares = _in_shares(flat.size, share)
    return [b"".join(p for p, _, _ in shares), b"".join(c for _, c, _ in shares), b"".join(x for _, _, x in shares)]


def _as_groups(flat: np.ndarray, peak: int) -> np.ndarray | None:
    """uint16 cells padded with zeros to whole groups (None when a value needs more than 16 bits)."""
    if peak >= 1 << 16:
        return None
    cells = flat.astype(np.uint16, copy=False)
    pad = -cells.size % GROUP
    return np.concatenate([cells, np.zeros(pad, np.uint16)]) if pad else cells


def _hot_groups(cells: np.ndarray) -> np.ndarray:
    """bool [G]: the groups with a cell above 15 (one 64-bit and per group of four uint16 cells)."""
    words = cells.view(np.uint64)
    return np.bitwise_and(words, np.uint64(HOT_BITS)) != 0


def _groups_parts(cells: np.ndarray, hot: np.ndarray, bits: int) -> tuple[int, list[bytes]]:
    """The GROUPS layout: (gap bytes, [nibbles of every cell (0 in hot groups), gaps between hot groups,
    hot groups' cells]).

    No pass looks for single cells: hot groups come from one 64-bit test per group, and the only index
    search runs over the groups (a quarter of the cells), unlike DENSE's overflow list. Hot groups are
    stored as gaps from the previous one (the first from group 0) in the narrowest unsigned type that
    holds the largest: 2 bytes a group for a writer window, and the reader gets them back with a cumsum.
    """
    words = cells.view(np.uint64)
    vtype = CONTAINER[bits]

    def share(start: int, stop: int) -> tuple[bytes, np.ndarray, bytes]:
        g0, g1 = start // GROUP, -(-stop // GROUP)
        part, hot_part = cells[start:stop], hot[g0:g1]
        v = part.astype(np.uint8)  # a narrowing cast: cells above 15 are in hot groups, zeroed next
        np.bitwise_and(v, 15, out=v)
        np.multiply(v.view(np.uint32), ~hot_part, out=v.view(np.uint32), casting="unsafe")
        index = g0 + np.flatnonzero(hot_part)
        return _pack_nibbles(v, clip=False), index, words[index].view(np.uint16).astype(vtype, copy=False).tobytes()

    shares = _in_shares(cells.size, share)
    index = np.concatenate([i for _, i, _ in shares])
    gaps = np.diff(index, prepend=0)
    gbytes = uint_bytes(int(gaps.max()) if gaps.size else 0)
    gap_bytes = gaps.astype(EXCESS[gbytes]).tobytes()
    return gbytes, [b"".join(p for p, _, _ in shares), gap_bytes, b"".join(h for _, _, h in shares)]


def _encode_array(arr: np.ndarray, parts: list[bytes]) -> None:
    flat = np.ascontiguousarray(arr).reshape(-1)
    n = flat.size
    ibytes = index_bytes(n)
    itype = CONTAINER[8 * ibytes] if ibytes < 8 else np.int64
    nnz = int(np.count_nonzero(flat))
    groups = hot = None
    if np.issubdtype(flat.dtype, np.floating):
        kind, overflow, excess_bytes = KIND_FLOAT, {64: 0}, {64: 0}
    else:
        # Counts are non-negative: a WindowCounts comes from the accumulator or a validated RoutingStats.
        kind = KIND_UINT
        peak = int(flat.max()) if n else 0
        overflow = {}
        for b in WIDTHS:  # cells at or above each width's escape value (none when the largest value fits)
            overflow[b] = int(np.count_nonzero(flat >= escape(b))) if b < 64 and peak >= escape(b) else 0
        excess_bytes = {b: uint_bytes(max(peak - escape(b), 0)) for b in WIDTHS}
        if peak > 15 and nnz > n // 2:  # GROUPS only pays where most cells are kept and some exceed 4 bits
            groups = _as_groups(flat, peak)
    values = {DENSE: n, BITMAP: nnz, COO: nnz}
    base = {DENSE: 0, BITMAP: (n + 7) // 8, COO: nnz * ibytes}

    def cost(layout: int, bits: int) -> int:
        patch = overflow[bits] * (ibytes + excess_bytes[bits]) if overflow[bits] else 0
        return base[layout] + (values[layout] * bits + 7) // 8 + patch

    costs = {(layout, b): cost(layout, b) for layout in values for b in overflow}
    if groups is not None:
        hot = _hot_groups(groups)
        n_hot = int(np.count_nonzero(hot))
        hot_bits = 8 if peak < 256 else 16
        G = groups.size // GROUP
        # Gaps between hot groups estimated at 2 bytes (the exact width is known once they are found).
        costs[(GROUPS, hot_bits)] = 2 * G + n_hot * 2 + n_hot * GROUP * hot_bits // 8
    layout, bits = min(costs, key=lambda lb: (costs[lb], lb))
    # The fastest layout to write stays unless another saves a quarter of the bytes: GROUPS where it
    # applies (no search over single cells), else DENSE (every cell in place, also the fastest to read).
    fast = (GROUPS, hot_bits) if groups is not None else min(((DENSE, b) for b in overflow), key=costs.get)
    if costs[(layout, bits)] > 0.75 * costs[fast]:
        layout, bits = fast
    if layout == GROUPS:
        gap_bytes, group_parts = _groups_parts(groups, hot, bits)
        parts.append(ARRAY.pack(GROUPS, bits, gap_bytes, kind, 0, n, nnz, n_hot))
        parts.extend(group_parts)
        return
    n_over = overflow[bits]
    xbytes = excess_bytes[bits] if n_over else 0
    parts.append(ARRAY.pack(layout, bits, ibytes, kind, xbytes, n, nnz, n_over))
    if kind == KIND_UINT and layout == DENSE:
        parts.extend(_dense_parts(flat, bits, n_over, ibytes, xbytes))
        return
    if layout == DENSE:
        vals = flat
    elif layout == BITMAP:
        mask = flat != 0
        parts.append(np.packbits(mask).tobytes())
        vals = np.compress(mask, flat)  # 6x faster than flat[mask] (2.8 vs 17 ms for 3.7 M cells at 40%)
    else:
        idx = np.flatnonzero(flat)
        parts.append(idx.astype(itype, copy=False).tobytes())
        vals = flat[idx]
    if kind == KIND_FLOAT:
        parts.append(vals.astype(np.float64, copy=False).tobytes())
        return
    parts.append(_pack(vals, bits, clip=n_over > 0))
    if n_over:
        cells = np.flatnonzero(flat >= escape(bits))
        parts.append(cells.astype(itype, copy=False).tobytes())
        parts.append((flat[cells] - escape(bits)).astype(EXCESS[xbytes]).tobytes())


def encode_window(window: WindowCounts, tokens: float | None = None) -> bytes:
    """bytes: the window in the layout above (float arrays allowed: the decayed aggregate)."""
    n, E = window.counts.shape
    is_float = np.issubdtype(window.counts.dtype, np.floating)
    flags = (FLAG_PAIRS if window.has_pairs else 0) | (FLAG_FLOAT if is_float else 0)
    flags |= FLAG_TOP1 if window.has_top1 else 0
    flags |= FLAG_SHARE if window.is_share else 0
    tok = float(window.tokens if tokens is None else tokens)
    parts = [HEADER.pack(MAGIC, VERSION, flags, 0, window.total_layers, E, window.top_k, tok, window.deltas)]
    if window.is_share:
        parts.append(SHARE_HEADER.pack(window.first_layer, n))
    _encode_array(window.counts, parts)
    if window.has_pairs:
        _encode_array(window.coact, parts)
        _encode_array(window.trans, parts)
        if window.has_top1:
            _encode_array(window.trans_top1, parts)
    return b"".join(parts)

