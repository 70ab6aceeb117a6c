"""The binary form of one window in Redis: a small header, then each statistic in a compact exact encoding.

Layout (little endian):

    header  "EMW1" | u8 version (4) | u8 flags | u16 0 | u32 L | u32 E | u32 k | f64 tokens | u32 deltas
            [ | u32 first layer | u32 share layers ]   (when flags has SHARE: a layer share)
    array   u8 layout | u8 value bits | u8 index bytes | u8 value kind | u8 excess bytes | u64 cells | u64 nnz
            | u64 overflow | layout part | packed values | overflow cell indices | overflow excess
            (counts, then coact and trans when flags has PAIRS, then trans_top1 when it also has TOP1)

Layouts of an array of `n` non-negative cells with `nnz` non-zeros:

    DENSE   every cell's value                                                 n values
    BITMAP  one bit per cell (is it non-zero), then the non-zero values        n / 8 bytes + nnz values
    COO     the flat index of each non-zero cell (u16/u32/u64), then values    nnz * index + nnz values
    GROUPS  cells in groups of 4, G = ceil(n / 4), the last one padded with zeros: every
            cell's 4-bit value (0 in hot groups), then for the `overflow` hot groups (a cell above 15)
            the gap from the previous hot group (the first from group 0) in `index bytes` (1/2/4/8),
            then their 4 cells each in `value bits` (8 or 16)        2G + hot x (index + 4 values)

Values are packed in 4, 8, 16, 32 or 64 bits. In DENSE, BITMAP and COO a value too large for the width is
written as the width's all-ones escape and patched from the overflow list (cell index, excess over the
escape in the narrowest unsigned type), so a few hot cells do not widen every cell. The encoder picks the
width and layout with the fewest bytes, but keeps the fastest to write (GROUPS where it applies, else
DENSE, also the fastest to read) unless another layout saves a quarter of them.

Why this form: co-activation and transition matrices are sparse for short windows and small top-k (most of
the E^2 cells are zero: COO or BITMAP win), but a DeepSeek-V3 writer window (4096 tokens x 28 pairs into
32,640 cells per layer) fills 85-97% of them, where any index costs more than the value it locates: there,
4-bit values (a writer's counts per cell are mostly below 15) take half a byte per cell, 1/128 of the int64
arrays. About 3% of a writer window's cells exceed 4 bits. Patching each from a list of cell indices needs
a search over every cell (np.nonzero, the largest part of a flush's encoding); GROUPS finds hot groups with
one 64-bit test per four uint16 cells and searches only the groups, and its gap-coded group list is smaller
than a cell list (3.46 vs 3.62 MB a writer window).
Float arrays (the decayed aggregate) use DENSE, BITMAP or COO with f8 values. The header names the shape and
the version, so a window of another model, of another format version, or bytes that are not ours, are
refused before any arithmetic. One version is written and read: 4 (earlier ones were never released).

A layer share (`window.WindowCounts`) names the model's L in the header, then its own first layer
and layer count; its arrays have the share's rows and add into those rows of a whole window's accumulator.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .window import WindowCounts, pair_count, transition_rows

__all__ = [
    "encode_window",
    "decode_window",
    "add_window_into",
    "sum_windows",
    "value_bound",
    "value_bounds",
    "accumulator_for",
    "CodecError",
    "MAGIC",
    "encoded_header",
]

MAGIC = b"EMW1"
VERSION = 4
FLAG_PAIRS = 1
FLAG_FLOAT = 2
FLAG_TOP1 = 4
FLAG_SHARE = 8
_HEADER = struct.Struct("<4sBBHIIIdI")
_SHARE = struct.Struct("<II")
_ARRAY = struct.Struct("<BBBBBQQQ")
DENSE, BITMAP, COO, GROUPS = 0, 1, 2, 3
_LAYOUTS = (DENSE, BITMAP, COO, GROUPS)
# GROUPS: cells in groups of 4 (one uint64 of four uint16 cells); a group is hot when a cell exceeds 15.
_GROUP = 4
_HOT_BITS = 0xFFF0_FFF0_FFF0_FFF0  # the bits above 15 of each of a group's four uint16 cells
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


def _uint_bytes(maximum: int) -> int:
    return next(b for b in (1, 2, 4, 8) if maximum < 1 << (8 * b - (b == 8)))


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
    itype = _CONTAINER[8 * ibytes] if ibytes < 8 else np.int64
    clip = n_over > 0

    def share(start: int, stop: int) -> tuple[bytes, bytes, bytes]:
        part = flat[start:stop]
        packed = _pack(part, bits, clip)
        if not clip:
            return packed, b"", b""
        local = np.flatnonzero(part >= _escape(bits))
        cells = (local + start).astype(itype, copy=False).tobytes()
        return packed, cells, (part[local] - _escape(bits)).astype(_EXCESS[xbytes]).tobytes()

    shares = _in_shares(flat.size, share)
    return [b"".join(p for p, _, _ in shares), b"".join(c for _, c, _ in shares), b"".join(x for _, _, x in shares)]


def _as_groups(flat: np.ndarray, peak: int) -> np.ndarray | None:
    """uint16 cells padded with zeros to whole groups (None when a value needs more than 16 bits)."""
    if peak >= 1 << 16:
        return None
    cells = flat.astype(np.uint16, copy=False)
    pad = -cells.size % _GROUP
    return np.concatenate([cells, np.zeros(pad, np.uint16)]) if pad else cells


def _hot_groups(cells: np.ndarray) -> np.ndarray:
    """bool [G]: the groups with a cell above 15 (one 64-bit and per group of four uint16 cells)."""
    words = cells.view(np.uint64)
    return np.bitwise_and(words, np.uint64(_HOT_BITS)) != 0


def _groups_parts(cells: np.ndarray, hot: np.ndarray, bits: int) -> tuple[int, list[bytes]]:
    """The GROUPS layout: (gap bytes, [nibbles of every cell (0 in hot groups), gaps between hot groups,
    hot groups' cells]).

    No pass looks for single cells: hot groups come from one 64-bit test per group, and the only index
    search runs over the groups (a quarter of the cells), unlike DENSE's overflow list. Hot groups are
    stored as gaps from the previous one (the first from group 0) in the narrowest unsigned type that
    holds the largest: 2 bytes a group for a writer window, and the reader gets them back with a cumsum.
    """
    words = cells.view(np.uint64)
    vtype = _CONTAINER[bits]

    def share(start: int, stop: int) -> tuple[bytes, np.ndarray, bytes]:
        g0, g1 = start // _GROUP, -(-stop // _GROUP)
        part, hot_part = cells[start:stop], hot[g0:g1]
        v = part.astype(np.uint8)  # a narrowing cast: cells above 15 are in hot groups, zeroed next
        np.bitwise_and(v, 15, out=v)
        np.multiply(v.view(np.uint32), ~hot_part, out=v.view(np.uint32), casting="unsafe")
        index = g0 + np.flatnonzero(hot_part)
        return _pack_nibbles(v, clip=False), index, words[index].view(np.uint16).astype(vtype, copy=False).tobytes()

    shares = _in_shares(cells.size, share)
    index = np.concatenate([i for _, i, _ in shares])
    gaps = np.diff(index, prepend=0)
    gbytes = _uint_bytes(int(gaps.max()) if gaps.size else 0)
    gap_bytes = gaps.astype(_EXCESS[gbytes]).tobytes()
    return gbytes, [b"".join(p for p, _, _ in shares), gap_bytes, b"".join(h for _, _, h in shares)]


def _encode_array(arr: np.ndarray, parts: list[bytes]) -> None:
    flat = np.ascontiguousarray(arr).reshape(-1)
    n = flat.size
    ibytes = _index_bytes(n)
    itype = _CONTAINER[8 * ibytes] if ibytes < 8 else np.int64
    nnz = int(np.count_nonzero(flat))
    groups = hot = None
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
        G = groups.size // _GROUP
        # Gaps between hot groups estimated at 2 bytes (the exact width is known once they are found).
        costs[(GROUPS, hot_bits)] = 2 * G + n_hot * 2 + n_hot * _GROUP * hot_bits // 8
    layout, bits = min(costs, key=lambda lb: (costs[lb], lb))
    # The fastest layout to write stays unless another saves a quarter of the bytes: GROUPS where it
    # applies (no search over single cells), else DENSE (every cell in place, also the fastest to read).
    fast = (GROUPS, hot_bits) if groups is not None else min(((DENSE, b) for b in overflow), key=costs.get)
    if costs[(layout, bits)] > 0.75 * costs[fast]:
        layout, bits = fast
    if layout == GROUPS:
        gap_bytes, group_parts = _groups_parts(groups, hot, bits)
        parts.append(_ARRAY.pack(GROUPS, bits, gap_bytes, kind, 0, n, nnz, n_hot))
        parts.extend(group_parts)
        return
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
        cells = np.flatnonzero(flat >= _escape(bits))
        parts.append(cells.astype(itype, copy=False).tobytes())
        parts.append((flat[cells] - _escape(bits)).astype(_EXCESS[xbytes]).tobytes())


def encode_window(window: WindowCounts, tokens: float | None = None) -> bytes:
    """bytes: the window in the layout above (float arrays allowed: the decayed aggregate)."""
    n, E = window.counts.shape
    is_float = np.issubdtype(window.counts.dtype, np.floating)
    flags = (FLAG_PAIRS if window.has_pairs else 0) | (FLAG_FLOAT if is_float else 0)
    flags |= FLAG_TOP1 if window.has_top1 else 0
    flags |= FLAG_SHARE if window.is_share else 0
    tok = float(window.tokens if tokens is None else tokens)
    parts = [_HEADER.pack(MAGIC, VERSION, flags, 0, window.total_layers, E, window.top_k, tok, window.deltas)]
    if window.is_share:
        parts.append(_SHARE.pack(window.first_layer, n))
    _encode_array(window.counts, parts)
    if window.has_pairs:
        _encode_array(window.coact, parts)
        _encode_array(window.trans, parts)
        if window.has_top1:
            _encode_array(window.trans_top1, parts)
    return b"".join(parts)


def encoded_header(blob: bytes) -> dict:
    """The header fields of an encoded window, checked for our magic and version."""
    if not isinstance(blob, bytes | bytearray | memoryview) or len(blob) < _HEADER.size:
        raise CodecError(f"not an expertmesh window: {len(blob) if blob is not None else 0} bytes, too short")
    magic, version, flags, _, L, E, k, tokens, deltas = _HEADER.unpack_from(blob, 0)
    if magic != MAGIC:
        raise CodecError(f"not an expertmesh window: starts with {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CodecError(f"window format version {version}: this expertmesh reads version {VERSION} only")
    first, n, size = 0, L, _HEADER.size
    if flags & FLAG_SHARE:
        if len(blob) < size + _SHARE.size:
            raise CodecError(f"layer share header truncated: a window of {len(blob)} bytes")
        first, n = _SHARE.unpack_from(blob, size)
        size += _SHARE.size
        if first + n > L:
            raise CodecError(f"layer share [{first}, {first + n}) outside the window's {L} layers")
    return {
        "version": version,
        "flags": flags,
        "layers": L,
        "experts": E,
        "top_k": k,
        "tokens": tokens,
        "deltas": deltas,
        "first_layer": first,
        "share_layers": n,
        "size": size,  # of the header: the first array starts here
    }


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
        if offset + _ARRAY.size > len(blob):
            raise CodecError(f"window truncated at byte {offset}")
        layout, bits, ibytes, _, xbytes, n, nnz, n_over = _ARRAY.unpack_from(blob, offset)
        if layout not in _LAYOUTS or bits not in _CONTAINER:
            raise CodecError(f"unknown layout {layout} or width {bits}")
        offset += _ARRAY.size
        top = (1 << min(bits, 63)) - 1
        if layout == GROUPS:  # a cell is its nibble (at most 15) or its hot group's value
            groups = -(-n // _GROUP)
            offset += 2 * groups + n_over * ibytes + n_over * _GROUP * bits // 8
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
    if offset + _ARRAY.size > len(blob):
        raise CodecError(f"{name}: window truncated at byte {offset}")
    layout, bits, ibytes, kind, xbytes, n, nnz, n_over = _ARRAY.unpack_from(blob, offset)
    offset += _ARRAY.size
    if layout not in _LAYOUTS:
        raise CodecError(f"{name}: unknown layout {layout}")
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
    if ibytes not in ((1, 2, 4, 8) if layout == GROUPS else (2, 4, 8)) or nnz > n or n_over > n:
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
        if xbytes not in _EXCESS:
            raise CodecError(f"{name}: unknown overflow width {xbytes}")
        out[cells.astype(np.intp)] += take(n_over, _EXCESS[xbytes])
    return offset


def _add_groups(out: np.ndarray, take, n: int, n_hot: int, gap_bytes: int, vtype, name: str) -> None:
    """Add a GROUPS array into `out`: every cell's nibble, then the hot groups' cells over their zeros."""
    groups = -(-n // _GROUP)
    plane = _unpack_nibbles(take(2 * groups, np.uint8), _GROUP * groups)
    if plane[n:].any():
        raise CodecError(f"{name}: padding cells after cell {n} are not zero")
    np.add(out, plane[:n], out=out, casting="unsafe")
    if gap_bytes not in _EXCESS:
        raise CodecError(f"{name}: hot group gaps of {gap_bytes} bytes (expected 1, 2, 4 or 8)")
    gaps = take(n_hot, _EXCESS[gap_bytes])
    cells = take(n_hot * _GROUP, vtype).reshape(n_hot, _GROUP)
    if n_hot == 0:
        return
    if (gaps[1:] == 0).any():
        raise CodecError(f"{name}: hot groups not in increasing order")
    index = np.cumsum(gaps, dtype=np.intp)
    if index[-1] >= groups:
        raise CodecError(f"{name}: hot group {index[-1]} outside {groups} groups")
    if n % _GROUP == 0 and out.dtype in (np.uint16, np.uint32, np.int64):
        # A group is 8 (uint16 cells), 16 or 32 bytes of `out`: one, two or four 64-bit words, and one
        # 64-bit add per word adds its cells at once. No cell carries into the next: value_bound() sized
        # the accumulator for the whole sum (and int64 cells are whole words).
        words = out.view(np.uint64)
        per_group = _GROUP * out.itemsize // 8
        if per_group > 1:
            index = (index[:, None] * per_group + np.arange(per_group)).reshape(-1)
        words[index] += cells.astype(out.dtype, copy=False).reshape(-1).view(np.uint64)
        return
    if n % _GROUP == 0:
        rows = out.reshape(-1, _GROUP)
        rows[index] += cells  # rows are distinct: a fancy-index add is exact
        return
    flat = (index[:, None] * _GROUP + np.arange(_GROUP)).reshape(-1)
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
