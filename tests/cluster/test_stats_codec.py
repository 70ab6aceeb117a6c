"""The window encoding: exact for every density and value width, and it refuses what is not ours."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from expertmesh.cluster.codec import BITMAP, COO, DENSE, CodecError, decode_window, encode_window
from expertmesh.cluster.window import WindowCounts, pair_count

HEADER = 4 + 1 + 1 + 2 + 4 * 3 + 8 + 4
ARRAY = struct.Struct("<BBBBQQ")


def window_with(L, E, k, density, peak, seed=0):
    rng = np.random.default_rng(seed)

    def cells(shape):
        arr = np.where(rng.random(shape) < density, rng.integers(1, peak + 1, shape), 0).astype(np.int64)
        return arr

    return WindowCounts(cells((L, E)), k, 123, cells((L, pair_count(E))), cells((L - 1, E * E)), deltas=3)


def encodings(blob):
    """(encoding, value bytes) of counts, coact, trans as written."""
    out, offset = [], HEADER
    for _ in range(3):
        enc, vbytes, ibytes, _, n, nnz = ARRAY.unpack_from(blob, offset)
        offset += ARRAY.size
        size = {DENSE: n * vbytes, BITMAP: (n + 7) // 8 + nnz * vbytes, COO: nnz * (ibytes + vbytes)}[enc]
        offset += size
        out.append((enc, vbytes))
    assert offset == len(blob)
    return out


@pytest.mark.parametrize(
    "density,peak,expect_enc,expect_bytes",
    [
        (0.0, 1, COO, 1),  # empty: nothing but headers
        (0.01, 3, COO, 1),  # sparse: indices of the few non-zero cells
        (0.3, 200, BITMAP, 1),  # medium: bitmap + values
        (1.0, 60_000, DENSE, 2),  # full: values only, 2 bytes each
        (0.5, 2**40, BITMAP, 8),  # huge counts keep full 64-bit width
    ],
)
def test_round_trip_picks_the_smallest_exact_encoding(density, peak, expect_enc, expect_bytes):
    w = window_with(5, 16, 2, density, peak)
    blob = encode_window(w)
    back = decode_window(blob, 5, 16, 2)
    for name in ("counts", "coact", "trans"):
        np.testing.assert_array_equal(getattr(back, name), getattr(w, name), err_msg=name)
        assert getattr(back, name).dtype == np.int64
    assert back.tokens == 123 and back.deltas == 3 and back.top_k == 2
    encs = encodings(blob)
    assert encs[2] == (expect_enc, expect_bytes)  # trans, the largest array
    dense_bytes = w.trans.size * 8
    assert len(blob) < dense_bytes  # always smaller than raw int64 (the baseline)


def test_window_without_pairs_and_float_windows():
    w = WindowCounts(np.arange(12, dtype=np.int64).reshape(3, 4), 2, 7)
    back = decode_window(encode_window(w), 3, 4, 2)
    assert back.coact is None and back.trans is None
    np.testing.assert_array_equal(back.counts, w.counts)

    f = WindowCounts(np.full((3, 4), 0.25), 2, 0, np.full((3, 6), 1.5), np.zeros((2, 16)), deltas=0)
    back = decode_window(encode_window(f, tokens=2.75), 3, 4, 2)
    assert back.tokens == 2.75
    np.testing.assert_array_equal(back.coact, f.coact)


def test_refuses_foreign_truncated_and_mismatched_bytes():
    blob = encode_window(window_with(3, 8, 2, 0.5, 9))
    with pytest.raises(CodecError, match="not an expertmesh window: starts with b'GIF8'"):
        decode_window(b"GIF89a" + blob[6:], 3, 8, 2)
    with pytest.raises(CodecError, match="too short"):
        decode_window(b"EMW", 3, 8, 2)
    with pytest.raises(CodecError, match="truncated"):
        decode_window(blob[:-5], 3, 8, 2)
    with pytest.raises(CodecError, match="trailing bytes"):
        decode_window(blob + b"\0", 3, 8, 2)
    with pytest.raises(
        CodecError, match="window shape layers=3 experts=8 top_k=2, expected layers=3 experts=16"
    ):
        decode_window(blob, 3, 16, 2)
    with pytest.raises(CodecError, match="version 9"):
        decode_window(blob[:4] + b"\x09" + blob[5:], 3, 8, 2)
    float_blob = encode_window(WindowCounts(np.ones((3, 8)), 2, 0))
    from expertmesh.cluster.codec import add_window_into

    with pytest.raises(CodecError, match="float values where integer counts"):
        add_window_into(WindowCounts.zeros(3, 8, 2), float_blob)
