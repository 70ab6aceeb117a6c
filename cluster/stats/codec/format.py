"""The window format's constants and header: what the encoder writes and the decoder checks.

`codec/__init__.py` describes the layout; the names outside `__all__` are shared by `encode` and `decode`.
"""

from __future__ import annotations

import struct

import numpy as np

__all__ = ["CodecError", "MAGIC", "VERSION", "DENSE", "BITMAP", "COO", "GROUPS", "encoded_header"]

MAGIC = b"EMW1"
VERSION = 4
FLAG_PAIRS = 1
FLAG_FLOAT = 2
FLAG_TOP1 = 4
FLAG_SHARE = 8
HEADER = struct.Struct("<4sBBHIIIdI")
SHARE_HEADER = struct.Struct("<II")
ARRAY = struct.Struct("<BBBBBQQQ")
DENSE, BITMAP, COO, GROUPS = 0, 1, 2, 3
LAYOUTS = (DENSE, BITMAP, COO, GROUPS)
# GROUPS: cells in groups of 4 (one uint64 of four uint16 cells); a group is hot when a cell exceeds 15.
GROUP = 4
HOT_BITS = 0xFFF0_FFF0_FFF0_FFF0  # the bits above 15 of each of a group's four uint16 cells
KIND_UINT, KIND_FLOAT = 0, 1
WIDTHS = (4, 8, 16, 32, 64)
# Container of each width. 64-bit values are int64: they come from int64 arrays, and adding uint64 to int64
# would go through float.
CONTAINER = {4: np.uint8, 8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.int64}
EXCESS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.int64}


class CodecError(ValueError):
    """Bytes that are not an expertmesh window, or a window of another shape.

    `index`: which of the blobs given to `sum_windows` it was (None elsewhere).
    """

    index: int | None = None


def index_bytes(n: int) -> int:
    return 2 if n <= 1 << 16 else 4 if n <= 1 << 32 else 8


def escape(bits: int) -> int:
    return (1 << bits) - 1


def uint_bytes(maximum: int) -> int:
    return next(b for b in (1, 2, 4, 8) if maximum < 1 << (8 * b - (b == 8)))


def encoded_header(blob: bytes) -> dict:
    """The header fields of an encoded window, checked for our magic and version."""
    if not isinstance(blob, bytes | bytearray | memoryview) or len(blob) < HEADER.size:
        raise CodecError(f"not an expertmesh window: {len(blob) if blob is not None else 0} bytes, too short")
    magic, version, flags, _, L, E, k, tokens, deltas = HEADER.unpack_from(blob, 0)
    if magic != MAGIC:
        raise CodecError(f"not an expertmesh window: starts with {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CodecError(f"window format version {version}: this expertmesh reads version {VERSION} only")
    first, n, size = 0, L, HEADER.size
    if flags & FLAG_SHARE:
        if len(blob) < size + SHARE_HEADER.size:
            raise CodecError(f"layer share header truncated: a window of {len(blob)} bytes")
        first, n = SHARE_HEADER.unpack_from(blob, size)
        size += SHARE_HEADER.size
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

