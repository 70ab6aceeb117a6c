"""The window encoding: exact for every density and value width, and it refuses what is not ours."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from expertmesh.cluster.codec import BITMAP, COO, DENSE, CodecError, decode_window, encode_window
from expertmesh.cluster.window import WindowCounts, pair_count

HEADER = 4 + 1 + 1 + 2 + 4 * 3 + 8 + 4
ARRAY = struct.Struct("<BBBBBQQQ")


def window_with(L, E, k, density, peak, seed=0, hot=0):
    rng = np.random.default_rng(seed)

    def cells(shape):
        arr = np.where(rng.random(shape) < density, rng.integers(1, peak + 1, shape), 0).astype(np.int64)
        flat = arr.reshape(-1)
        flat[rng.choice(flat.size, min(hot, flat.size), replace=False)] = 10**9  # a few very hot cells
        return arr

    return WindowCounts(cells((L, E)), k, 123, cells((L, pair_count(E))), cells((L - 1, E * E)), deltas=3)


def layouts(blob):
    """(layout, value bits, overflow cells) of counts, coact, trans as written; checks the sizes add up."""
    out, offset = [], HEADER
    for _ in range(3):
        layout, bits, ib, kind, xb, n, nnz, n_over = ARRAY.unpack_from(blob, offset)
        offset += ARRAY.size
        m = n if layout == DENSE else nnz
        offset += {DENSE: 0, BITMAP: (n + 7) // 8, COO: nnz * ib}[layout] + (m * bits + 7) // 8 + n_over * (ib + xb)
        out.append((layout, bits, n_over))
    assert offset == len(blob)
    return out


@pytest.mark.parametrize(
    "density,peak,hot,expect",
    [
        (0.0, 1, 0, (COO, 4)),  # empty: nothing but headers
        (0.01, 3, 0, (COO, 4)),  # sparse: indices of the few non-zero cells, 4-bit values
        (0.3, 200, 0, (BITMAP, 8)),  # medium: bitmap + byte values
        (1.0, 60_000, 0, (DENSE, 16)),  # full: values only, 2 bytes each
        (1.0, 9, 5, (DENSE, 4)),  # small values, 5 huge ones: 4 bits per cell plus 5 patches
        (0.3, 2**40, 0, (BITMAP, 64)),  # huge counts keep full 64-bit width
    ],
)
def test_round_trip_picks_a_compact_exact_encoding(density, peak, hot, expect):
    w = window_with(5, 16, 2, density, peak, hot=hot)
    blob = encode_window(w)
    back = decode_window(blob, 5, 16, 2)
    for name in ("counts", "coact", "trans"):
        np.testing.assert_array_equal(getattr(back, name), getattr(w, name), err_msg=name)
        assert getattr(back, name).dtype == np.int64
    assert back.tokens == 123 and back.deltas == 3 and back.top_k == 2
    layout, bits, n_over = layouts(blob)[2]  # trans, the largest array
    assert (layout, bits) == expect
    assert n_over == (hot if bits == 4 else 0)
    assert len(blob) < w.trans.size * 8  # always smaller than raw int64 (the baseline)


def test_odd_cell_counts_pack_nibbles_exactly():
    rng = np.random.default_rng(5)
    w = WindowCounts(rng.integers(0, 15, (3, 7)), 2, 9, rng.integers(0, 15, (3, 21)), rng.integers(0, 15, (2, 49)))
    back = decode_window(encode_window(w), 3, 7, 2)
    for name in ("counts", "coact", "trans"):
        np.testing.assert_array_equal(getattr(back, name), getattr(w, name))


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
    with pytest.raises(CodecError, match="window shape layers=3 experts=8 top_k=2, expected layers=3 experts=16"):
        decode_window(blob, 3, 16, 2)
    with pytest.raises(CodecError, match="version 9"):
        decode_window(blob[:4] + b"\x09" + blob[5:], 3, 8, 2)
    float_blob = encode_window(WindowCounts(np.ones((3, 8)), 2, 0))
    from expertmesh.cluster.codec import add_window_into

    with pytest.raises(CodecError, match="float values where integer counts"):
        add_window_into(WindowCounts.zeros(3, 8, 2), float_blob)


@pytest.mark.parametrize("threads", [1, 3])
def test_sum_windows_is_the_exact_sum_on_any_number_of_threads(threads):
    from expertmesh.cluster.codec import sum_windows

    L, E, k = 3, 8, 2
    windows = [window_with(L, E, k, 0.7, 9 + 5 * i, seed=i, hot=i % 2) for i in range(5)]
    windows[2] = WindowCounts(windows[2].counts, k, 7)  # a window without pair statistics
    total, info = sum_windows([encode_window(w) for w in windows], L, E, k, threads=threads)
    assert np.array_equal(total.counts, sum(w.counts for w in windows))
    with_pairs = [w for w in windows if w.has_pairs]
    assert np.array_equal(total.coact, sum(w.coact for w in with_pairs))
    assert np.array_equal(total.trans, sum(w.trans for w in with_pairs))
    assert [had for _, _, had in info] == [True, True, False, True, True]
    assert [int(tok) for tok, _, _ in info] == [123, 123, 7, 123, 123]


def test_sum_windows_names_the_blob_it_could_not_read():
    from expertmesh.cluster.codec import sum_windows

    good = encode_window(window_with(3, 8, 2, 0.5, 9))
    with pytest.raises(CodecError) as err:
        sum_windows([good, good, b"GIF89a" + good[6:]], 3, 8, 2, threads=2)
    assert err.value.index == 2


@pytest.mark.parametrize("share", [2, 6, 64])
def test_dense_arrays_in_shares_encode_to_the_same_bytes(monkeypatch, share):
    """A large dense array is encoded in shares on threads: the bytes equal the one-piece encoding
    (overflow cells in every share, an odd cell count, values wider than the escape and than a byte)."""
    import expertmesh.cluster.codec as codec

    w = window_with(5, 16, 2, 0.97, 14, seed=4, hot=7)
    whole = encode_window(w)
    for layout, bits, n_over in layouts(whole)[1:]:  # coact and trans: dense nibbles with patches
        assert (layout, bits) == (DENSE, 4) and n_over > 0
    monkeypatch.setattr(codec, "_SHARE_CELLS", share)
    monkeypatch.setattr(codec.os, "cpu_count", lambda: 4)
    assert encode_window(w) == whole
    back = decode_window(whole, 5, 16, 2)
    for name in ("counts", "coact", "trans"):
        np.testing.assert_array_equal(getattr(back, name), getattr(w, name), err_msg=name)
