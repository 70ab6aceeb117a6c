"""The binary form of one window in Redis: a small header, then each statistic in its smallest exact encoding.

Layout (little endian):

    header  "EMW1" | u8 version | u8 flags | u16 0 | u32 L | u32 E | u32 k | f64 tokens | u32 deltas
    array   u8 encoding | u8 value bytes | u8 index bytes | u8 value kind | u64 cells | u64 nnz | payload
            (counts, then coact and trans when flags has PAIRS)

Encodings of an array of `n` non-negative cells with `nnz` non-zeros (the encoder picks the smallest, but
keeps DENSE, the fastest to write and read, unless another form saves at least a quarter of its bytes):

    DENSE   every cell, in the narrowest unsigned type that holds the largest value      n * v bytes
    BITMAP  one bit per cell (is it non-zero), then only the non-zero values           n / 8 + nnz * v
    COO     the flat index of each non-zero cell (u16/u32/u64), then its value         nnz * (i + v)

Why this form: co-activation and transition matrices are sparse for short windows and small top-k (most of
the E^2 cells are zero, COO wins), but a DeepSeek-V3 writer window (4096 tokens x 28 pairs into 32,640 cells
per layer) fills ~97% of them, where any index costs more than the value it locates; there, plain dense
values in one byte each are smallest. Counts per cell stay small, so one or two bytes per value instead of
eight is most of the saving, and it costs only a max() and a cast, keeping a flush under a few milliseconds
of encoding. Float arrays (the decayed aggregate) use the same encodings with f8 values. The header names
the shape, so a window of another model, or bytes that are not ours, are refused before any arithmetic.
"""

from __future__ import annotations

import struct

import numpy as np

from .window import WindowCounts, pair_count

__all__ = ["encode_window", "decode_window", "add_window_into", "CodecError", "MAGIC", "encoded_header"]

MAGIC = b"EMW1"
VERSION = 1
FLAG_PAIRS = 1
FLAG_FLOAT = 2
_HEADER = struct.Struct("<4sBBHIIIdI")
_ARRAY = struct.Struct("<BBBBQQ")
DENSE, BITMAP, COO = 0, 1, 2
# Values are counts from int64 arrays, so 8-byte values are int64 (adding uint64 to int64 would go via float).
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.int64}
KIND_UINT, KIND_FLOAT = 0, 1


class CodecError(ValueError):
    """Bytes that are not an expertmesh window, or a window of another shape."""


def _uint_bytes(maximum: int) -> int:
    for nbytes in (1, 2, 4, 8):
        if maximum < 1 << (8 * nbytes):
            return nbytes
    raise CodecError(f"value {maximum} does not fit in 64 bits")


def _encode_array(arr: np.ndarray, parts: list[bytes]) -> None:
    flat = np.ascontiguousarray(arr).reshape(-1)
    n = flat.size
    is_float = np.issubdtype(flat.dtype, np.floating)
    if is_float:
        vbytes, vtype, kind = 8, np.float64, KIND_FLOAT
    else:
        maximum = int(flat.max()) if n else 0
        if n and int(flat.min()) < 0:
            raise CodecError("counts must be non-negative")
        vbytes, kind = _uint_bytes(maximum), KIND_UINT
        vtype = _UINT[vbytes]
    nnz = int(np.count_nonzero(flat))
    ibytes = 2 if n <= 1 << 16 else 4 if n <= 1 << 32 else 8
    sizes = {DENSE: n * vbytes, BITMAP: (n + 7) // 8 + nnz * vbytes, COO: nnz * (ibytes + vbytes)}
    enc = min(sizes, key=lambda e: (sizes[e], e))
    # Dense is the fastest to write and read: it stays unless a sparse form saves a quarter of the bytes.
    if sizes[enc] > 0.75 * sizes[DENSE]:
        enc = DENSE
    parts.append(_ARRAY.pack(enc, vbytes, ibytes, kind, n, nnz))
    if enc == DENSE:
        parts.append(flat.astype(vtype, copy=False).tobytes())
    elif enc == BITMAP:
        mask = flat != 0
        parts.append(np.packbits(mask).tobytes())
        parts.append(flat[mask].astype(vtype, copy=False).tobytes())
    else:
        idx = np.flatnonzero(flat)
        parts.append(idx.astype(_UINT[ibytes], copy=False).tobytes())
        parts.append(flat[idx].astype(vtype, copy=False).tobytes())


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


def _decode_array_into(blob, offset: int, out: np.ndarray, name: str) -> int:
    """Add one encoded array into `out` (flat view of the right size); returns the next offset."""
    if offset + _ARRAY.size > len(blob):
        raise CodecError(f"{name}: window truncated at byte {offset}")
    enc, vbytes, ibytes, kind, n, nnz = _ARRAY.unpack_from(blob, offset)
    offset += _ARRAY.size
    if n != out.size:
        raise CodecError(f"{name}: {n} cells stored, expected {out.size}")
    if kind == KIND_FLOAT and vbytes == 8:
        vtype = np.float64
    elif kind == KIND_UINT and vbytes in _UINT:
        vtype = _UINT[vbytes]
    else:
        raise CodecError(f"{name}: unknown value type (kind {kind}, {vbytes} bytes)")
    if kind == KIND_FLOAT and not np.issubdtype(out.dtype, np.floating):
        raise CodecError(f"{name}: float values where integer counts are expected")

    def take(count: int, dtype) -> np.ndarray:
        nonlocal offset
        size = count * np.dtype(dtype).itemsize
        if offset + size > len(blob):
            raise CodecError(f"{name}: window truncated (needs {size} bytes at {offset}, has {len(blob) - offset})")
        arr = np.frombuffer(blob, dtype=dtype, count=count, offset=offset)
        offset += size
        return arr

    if enc == DENSE:
        np.add(out, take(n, vtype), out=out)
    elif enc == BITMAP:
        bits = take((n + 7) // 8, np.uint8)
        mask = np.unpackbits(bits, count=n).view(bool)
        values = take(nnz, vtype)
        if int(np.count_nonzero(mask)) != nnz:
            raise CodecError(f"{name}: bitmap marks {np.count_nonzero(mask)} cells, header says {nnz}")
        # Scatter into a dense array of the narrow type, then one add: ~4x faster than out[mask] += values.
        dense = np.zeros(n, vtype)
        dense[mask] = values
        np.add(out, dense, out=out)
    elif enc == COO:
        if ibytes not in _UINT:
            raise CodecError(f"{name}: unknown index width {ibytes}")
        idx = take(nnz, _UINT[ibytes])
        values = take(nnz, vtype)
        if nnz and int(idx.max()) >= n:
            raise CodecError(f"{name}: index {int(idx.max())} outside {n} cells")
        out[idx.astype(np.intp)] += values
    else:
        raise CodecError(f"{name}: unknown encoding {enc}")
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
