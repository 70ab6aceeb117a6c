"""The binary form of one window in Redis: a small header, then each statistic in a compact exact encoding.

Layout (little endian):

    header  "EMW1" | u8 version | u8 flags | u16 0 | u32 L | u32 E | u32 k | f64 tokens | u32 deltas
    array   u8 layout | u8 value bits | u8 index bytes | u8 value kind | u8 excess bytes | u64 cells | u64 nnz
            | u64 overflow | layout part | packed values | overflow cell indices | overflow excess
            (counts, then coact and trans when flags has PAIRS)

Layouts of an array of `n` non-negative cells with `nnz` non-zeros:

    DENSE   every cell's value                                                 n values
    BITMAP  one bit per cell (is it non-zero), then the non-zero values        n / 8 bytes + nnz values
    COO     the flat index of each non-zero cell (u16/u32/u64), then values    nnz * index + nnz values

Values are packed in 4, 8, 16, 32 or 64 bits. A value too large for the width is written as the width's
all-ones escape and patched from the overflow list (cell index, excess over the escape in the narrowest
unsigned type), so a few hot cells do not widen every cell. The encoder picks the width and layout with the
fewest bytes, but keeps DENSE, the fastest to write and read, unless another layout saves a quarter of them.

Why this form: co-activation and transition matrices are sparse for short windows and small top-k (most of
the E^2 cells are zero: COO or BITMAP win), but a DeepSeek-V3 writer window (4096 tokens x 28 pairs into
32,640 cells per layer) fills 85-97% of them, where any index costs more than the value it locates: there,
dense 4-bit values (a writer's counts per cell are mostly below 15) take half a byte per cell, 1/128 of the
int64 arrays. Encoding is a few vectorised passes (max, counts above the escapes, a cast, a nibble pack).
Float arrays (the decayed aggregate) use the same layouts with f8 values. The header names the shape, so a
window of another model, or bytes that are not ours, are refused before any arithmetic.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .window import WindowCounts, pair_count

__all__ = [
    "encode_window",
    "decode_window",
    "add_window_into",
    "sum_windows",
    "value_bound",
    "CodecError",
    "MAGIC",
    "encoded_header",
]

MAGIC = b"EMW1"
VERSION = 1
FLAG_PAIRS = 1
FLAG_FLOAT = 2
_HEADER = struct.Struct("<4sBBHIIIdI")
_ARRAY = struct.Struct("<BBBBBQQQ")
DENSE, BITMAP, COO = 0, 1, 2
KIND_UINT, KIND_FLOAT = 0, 1
_WIDTHS = (4, 8, 16, 32, 64)
# Container of each width. 64-bit values are int64: they come from int64 arrays, and adding uint64 to int64
# would go through float.
_CONTAINER = {4: np.uint8, 8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.int64}
_EXCESS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.int64}
# Below this many cells to add, threads cost more than they save.
_THREADED_CELLS = 1 << 22


class CodecError(ValueError):
    """Bytes that are not an expertmesh window, or a window of another shape.

    `index`: which of the blobs given to `sum_windows` it was (None elsewhere).
    """

    index: int | None = None


def _index_bytes(n: int) -> int:
    return 2 if n <= 1 << 16 else 4 if n <= 1 << 32 else 8


def _escape(bits: int) -> int:
    return (1 << bits) - 1


def _pack(values: np.ndarray, bits: int, clip: bool) -> bytes:
    """Values in `bits` bits (clipped to the escape first when `clip`); 4-bit two to a byte, low nibble first."""
    if bits == 4:
        return _pack_nibbles(values, clip)
    v = np.empty(values.size, _CONTAINER[bits])
    if clip:
        np.minimum(values, _escape(bits), out=v, casting="unsafe")
    else:
        v[:] = values
    return v.tobytes()


def _pack_nibbles(values: np.ndarray, clip: bool) -> bytes:
    """Unsigned values (< 15, or any when `clip`: those >= 15 become the escape 15), two to a byte."""
    n = values.size
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


def _uint_bytes(maximum: int) -> int:
    return next(b for b in (1, 2, 4, 8) if maximum < 1 << (8 * b - (b == 8)))


# Cells per share of a dense array encoded on a thread (even, so every share starts on a whole byte of
# nibbles). Each share's passes run in numpy with the GIL released; below two shares, no threads.
_SHARE_CELLS = 1 << 20
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _encode_pool() -> ThreadPoolExecutor:
    """One pool per process, shared by every encode (a sender thread encodes one window at a time)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="expertmesh-encode")
        return _pool


def _dense_share(flat: np.ndarray, start: int, bits: int, clip: bool, itype, xtype) -> tuple[bytes, bytes, bytes]:
    """Packed values of one share of a dense array, and its overflow cells (global indices) and excess."""
    packed = _pack(flat, bits, clip)
    if not clip:
        return packed, b"", b""
    local = np.flatnonzero(flat >= _escape(bits))
    cells = (local + start).astype(itype, copy=False).tobytes()
    excess = (flat[local] - _escape(bits)).astype(xtype).tobytes()
    return packed, cells, excess


def _dense_parts(flat: np.ndarray, bits: int, n_over: int, ibytes: int, xbytes: int) -> list[bytes]:
    """The DENSE layout's values, overflow cells and excess, in shares on threads for a large array.

    Byte-identical to encoding the array in one piece: shares start on even cells, and each share's
    overflow cells come out in ascending order, shifted by where the share starts.
    """
    itype = _CONTAINER[8 * ibytes] if ibytes < 8 else np.int64
    xtype = _EXCESS[xbytes] if n_over else None
    starts = list(range(0, flat.size, _SHARE_CELLS))
    clip = n_over > 0

    def share(start: int) -> tuple[bytes, bytes, bytes]:
        return _dense_share(flat[start : start + _SHARE_CELLS], start, bits, clip, itype, xtype)

    if len(starts) < 2 or (os.cpu_count() or 1) < 2:
        shares = [share(s) for s in starts]
    else:
        shares = list(_encode_pool().map(share, starts))
    return [b"".join(p for p, _, _ in shares), b"".join(c for _, c, _ in shares), b"".join(x for _, _, x in shares)]


def _encode_array(arr: np.ndarray, parts: list[bytes]) -> None:
    flat = np.ascontiguousarray(arr).reshape(-1)
    n = flat.size
    ibytes = _index_bytes(n)
    itype = _CONTAINER[8 * ibytes] if ibytes < 8 else np.int64
    nnz = int(np.count_nonzero(flat))
    if np.issubdtype(flat.dtype, np.floating):
        kind, overflow, excess_bytes = KIND_FLOAT, {64: 0}, {64: 0}
    else:
        # Counts are non-negative: a WindowCounts comes from the accumulator or a validated RoutingStats.
        kind = KIND_UINT
        peak = int(flat.max()) if n else 0
        overflow = {}
        for b in _WIDTHS:  # cells at or above each width's escape value (none when the largest value fits)
            overflow[b] = int(np.count_nonzero(flat >= _escape(b))) if b < 64 and peak >= _escape(b) else 0
        excess_bytes = {b: _uint_bytes(max(peak - _escape(b), 0)) for b in _WIDTHS}
    values = {DENSE: n, BITMAP: nnz, COO: nnz}
    base = {DENSE: 0, BITMAP: (n + 7) // 8, COO: nnz * ibytes}

    def cost(layout: int, bits: int) -> int:
        patch = overflow[bits] * (ibytes + excess_bytes[bits]) if overflow[bits] else 0
        return base[layout] + (values[layout] * bits + 7) // 8 + patch

    best = {layout: min(overflow, key=lambda b, lo=layout: (cost(lo, b), b)) for layout in values}
    layout = min(best, key=lambda lo: (cost(lo, best[lo]), lo))
    # Dense is the fastest to write and read: it stays unless another layout saves a quarter of the bytes.
    if cost(layout, best[layout]) > 0.75 * cost(DENSE, best[DENSE]):
        layout = DENSE
    bits = best[layout]
    n_over = overflow[bits]
    xbytes = excess_bytes[bits] if n_over else 0
    parts.append(_ARRAY.pack(layout, bits, ibytes, kind, xbytes, n, nnz, n_over))
    if kind == KIND_UINT and layout == DENSE:
        parts.extend(_dense_parts(flat, bits, n_over, ibytes, xbytes))
        return
    if layout == DENSE:
        vals = flat
    elif layout == BITMAP:
        mask = flat != 0
        parts.append(np.packbits(mask).tobytes())
        vals = flat[mask]
    else:
        idx = np.flatnonzero(flat)
        parts.append(idx.astype(itype, copy=False).tobytes())
        vals = flat[idx]
    if kind == KIND_FLOAT:
        parts.append(vals.astype(np.float64, copy=False).tobytes())
        return
    parts.append(_pack(vals, bits, clip=n_over > 0))
    if n_over:
        cells = np.flatnonzero(flat >= _escape(bits))
        parts.append(cells.astype(itype, copy=False).tobytes())
        parts.append((flat[cells] - _escape(bits)).astype(_EXCESS[xbytes]).tobytes())


def encode_window(window: WindowCounts, tokens: float | None = None) -> bytes:
    """bytes: the window in the layout above (float arrays allowed: the decayed aggregate)."""
    L, E = window.counts.shape
    is_float = np.issubdtype(window.counts.dtype, np.floating)
    flags = (FLAG_PAIRS if window.has_pairs else 0) | (FLAG_FLOAT if is_float else 0)
    tok = float(window.tokens if tokens is None else tokens)
    parts = [_HEADER.pack(MAGIC, VERSION, flags, 0, L, E, window.top_k, tok, window.deltas)]
    _encode_array(window.counts, parts)
    if window.has_pairs:
        _encode_array(window.coact, parts)
        _encode_array(window.trans, parts)
    return b"".join(parts)


def encoded_header(blob: bytes) -> dict:
    """The header fields of an encoded window, checked for our magic and version."""
    if not isinstance(blob, bytes | bytearray | memoryview) or len(blob) < _HEADER.size:
        raise CodecError(f"not an expertmesh window: {len(blob) if blob is not None else 0} bytes, too short")
    magic, version, flags, _, L, E, k, tokens, deltas = _HEADER.unpack_from(blob, 0)
    if magic != MAGIC:
        raise CodecError(f"not an expertmesh window: starts with {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CodecError(f"window format version {version}, this expertmesh reads {VERSION}")
    return {"flags": flags, "layers": L, "experts": E, "top_k": k, "tokens": tokens, "deltas": deltas}


def value_bound(blob: bytes) -> int:
    """An upper bound on every value in an encoded integer window, from its array headers alone.

    Summing windows can then run in the narrowest accumulator the summed bounds fit (uint16 for a few
    DeepSeek-V3 writer windows), a quarter of int64's memory traffic, and widen once at the end.
    """
    h = encoded_header(blob)
    if h["flags"] & FLAG_FLOAT:
        raise CodecError("float window where integer counts are expected")
    offset, bound = _HEADER.size, 0
    for _ in range(3 if h["flags"] & FLAG_PAIRS else 1):
        if offset + _ARRAY.size > len(blob):
            raise CodecError(f"window truncated at byte {offset}")
        layout, bits, ibytes, _, xbytes, n, nnz, n_over = _ARRAY.unpack_from(blob, offset)
        if layout not in (DENSE, BITMAP, COO) or bits not in _CONTAINER:
            raise CodecError(f"unknown layout {layout} or width {bits}")
        m = n if layout == DENSE else nnz
        offset += _ARRAY.size + {DENSE: 0, BITMAP: (n + 7) // 8, COO: nnz * ibytes}[layout]
        offset += (m * bits + 7) // 8 + n_over * (ibytes + xbytes)
        top = (1 << min(bits, 63)) - 1
        if n_over:
            top += (1 << min(8 * xbytes, 63)) - 1
        bound = max(bound, top)
    return bound


def _decode_array_into(blob, offset: int, out: np.ndarray, name: str) -> int:
    """Add one encoded array into `out` (flat view of the right size); returns the next offset."""
    if offset + _ARRAY.size > len(blob):
        raise CodecError(f"{name}: window truncated at byte {offset}")
    layout, bits, ibytes, kind, xbytes, n, nnz, n_over = _ARRAY.unpack_from(blob, offset)
    offset += _ARRAY.size
    if n != out.size:
        raise CodecError(f"{name}: {n} cells stored, expected {out.size}")
    if kind == KIND_FLOAT and bits == 64:
        if not np.issubdtype(out.dtype, np.floating):
            raise CodecError(f"{name}: float values where integer counts are expected")
        vtype = np.float64
    elif kind == KIND_UINT and bits in _CONTAINER:
        vtype = _CONTAINER[bits]
    else:
        raise CodecError(f"{name}: unknown value type (kind {kind}, {bits} bits)")
    if ibytes not in (2, 4, 8) or nnz > n or n_over > n:
        raise CodecError(f"{name}: corrupt array header (index bytes {ibytes}, nnz {nnz}, overflow {n_over})")
    itype = _CONTAINER[8 * ibytes] if ibytes < 8 else np.int64

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
        packed = take((count + 1) // 2, np.uint8)
        v = np.empty(2 * packed.size, np.uint8)
        v[0::2] = packed & 0x0F
        v[1::2] = packed >> 4
        return v[:count]

    # Adds cast "unsafe" into narrow accumulators: callers size them from value_bound(), so nothing wraps.
    if layout == DENSE:
        np.add(out, values(n), out=out, casting="unsafe")
    elif layout == BITMAP:
        mask = np.unpackbits(take((n + 7) // 8, np.uint8), count=n).view(bool)
        if int(np.count_nonzero(mask)) != nnz:
            raise CodecError(f"{name}: bitmap marks {np.count_nonzero(mask)} cells, header says {nnz}")
        # Scatter into a dense array of the narrow type, then one add: ~4x faster than out[mask] += values.
        dense = np.zeros(n, vtype)
        dense[mask] = values(nnz)
        np.add(out, dense, out=out, casting="unsafe")
    elif layout == COO:
        idx = take(nnz, itype)
        if nnz and int(idx.max()) >= n:
            raise CodecError(f"{name}: index {int(idx.max())} outside {n} cells")
        out[idx.astype(np.intp)] += values(nnz)
    else:
        raise CodecError(f"{name}: unknown layout {layout}")
    if n_over:
        if kind == KIND_FLOAT:
            raise CodecError(f"{name}: overflow list on float values")
        cells = take(n_over, itype)
        if int(cells.max()) >= n:
            raise CodecError(f"{name}: overflow cell {int(cells.max())} outside {n} cells")
        if xbytes not in _EXCESS:
            raise CodecError(f"{name}: unknown overflow width {xbytes}")
        out[cells.astype(np.intp)] += take(n_over, _EXCESS[xbytes])
    return offset


def add_window_into(acc: WindowCounts, blob: bytes) -> tuple[float, int, bool]:
    """Add an encoded window into the accumulator `acc` (in place); returns (tokens, deltas, had pairs).

    Refuses a window of another shape: the message names what is stored and what was expected.
    """
    h = encoded_header(blob)
    L, E = acc.counts.shape
    if (h["layers"], h["experts"], h["top_k"]) != (L, E, acc.top_k):
        raise CodecError(
            f"window shape layers={h['layers']} experts={h['experts']} top_k={h['top_k']}, "
            f"expected layers={L} experts={E} top_k={acc.top_k}"
        )
    offset = _decode_array_into(blob, _HEADER.size, acc.counts.reshape(-1), "counts")
    pairs = bool(h["flags"] & FLAG_PAIRS)
    if not pairs or not acc.has_pairs:
        # Without pairs on both sides only counts merge (as RoutingStats.merge); the caller drops pairs.
        return h["tokens"], h["deltas"], pairs
    offset = _decode_array_into(blob, offset, acc.coact.reshape(-1), "coact")
    offset = _decode_array_into(blob, offset, acc.trans.reshape(-1), "trans")
    if offset != len(blob):
        raise CodecError(f"window has {len(blob) - offset} trailing bytes")
    return h["tokens"], h["deltas"], pairs


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
        )
    tokens, deltas, _ = add_window_into(acc, blob)
    tok = tokens if is_float else int(tokens)
    return WindowCounts(acc.counts, top_k, tok, acc.coact, acc.trans, deltas=deltas)


def sum_windows(
    blobs: Sequence[bytes], layers: int, experts: int, top_k: int, threads: int | None = None
) -> tuple[WindowCounts, list[tuple[float, int, bool]]]:
    """The exact sum of encoded integer windows, and each one's (tokens, deltas, had pairs).

    The accumulator is the narrowest unsigned type the summed value bounds fit (uint16 for a few DeepSeek-V3
    writer windows, a quarter of int64's memory traffic). A large sum is split over threads, each adding a
    share of the windows into its own accumulator (numpy releases the GIL in its adds), and the shares are
    added at the end: decoding is most of a cold snapshot's time, and a reader has cores to spare.
    Pair statistics of a window without them are not added (its `had pairs` says so).
    """
    bound = 0
    for i, blob in enumerate(blobs):
        try:
            bound += value_bound(blob)
        except CodecError as exc:
            exc.index = i
            raise
    dtype = np.uint16 if bound < 2**16 else np.uint32 if bound < 2**32 else np.int64
    cells = len(blobs) * (layers * experts + layers * pair_count(experts) + max(layers - 1, 0) * experts * experts)
    if threads is None:
        threads = min(len(blobs), os.cpu_count() or 1, 4) if cells >= _THREADED_CELLS else 1
    threads = max(1, min(threads, len(blobs)))
    shares = [range(len(blobs))[t::threads] for t in range(threads)]

    def add_share(share: range) -> tuple[WindowCounts, list[tuple[int, tuple[float, int, bool]]]]:
        acc = WindowCounts.zeros(layers, experts, top_k, dtype=dtype)
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
        for name in ("counts", "coact", "trans"):
            np.add(getattr(total, name), getattr(acc, name), out=getattr(total, name))
    info = dict(i_info for _, share_info in parts for i_info in share_info)
    return total, [info[i] for i in range(len(blobs))]
