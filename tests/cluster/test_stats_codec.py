"""The window encoding: exact for every density and value width, and it refuses what is not ours.

    .venv/bin/python -m pytest -q tests/cluster/test_stats_codec.py
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from expertmesh.cluster.stats.codec import BITMAP, COO, DENSE, GROUPS, CodecError, decode_window, encode_window
from expertmesh.cluster.stats.window import WindowCounts, pair_count

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
        if layout == GROUPS:  # nibbles of 4-cell groups, gaps between hot groups, their cells
            groups = -(-n // 4)
            offset += 2 * groups + n_over * ib + n_over * 4 * bits // 8
        else:
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
    float_blob = encode_window(WindowCounts(np.ones((3, 8)), 2, 0))
    from expertmesh.cluster.stats.codec import add_window_into

    with pytest.raises(CodecError, match="float values where integer counts"):
        add_window_into(WindowCounts.zeros(3, 8, 2), float_blob)


@pytest.mark.parametrize("threads", [1, 3])
def test_sum_windows_is_the_exact_sum_on_any_number_of_threads(threads):
    from expertmesh.cluster.stats.codec import sum_windows

    L, E, k = 3, 8, 2
    windows = [window_with(L, E, k, 0.7, 9 + 5 * i, seed=i, hot=i % 2) for i in range(5)]
    windows[2] = WindowCounts(windows[2].counts, k, 7)  # a window without pair statistics
    for i in (0, 1, 4):  # with trans_top1; window 3 without (as a writer that does not record it)
        w = windows[i]
        windows[i] = WindowCounts(w.counts, k, w.tokens, w.coact, w.trans, w.deltas, trans_top1=w.trans // 2)
    total, info = sum_windows([encode_window(w) for w in windows], L, E, k, threads=threads)
    assert np.array_equal(total.counts, sum(w.counts for w in windows))
    with_pairs = [w for w in windows if w.has_pairs]
    assert np.array_equal(total.coact, sum(w.coact for w in with_pairs))
    assert np.array_equal(total.trans, sum(w.trans for w in with_pairs))
    assert np.array_equal(total.trans_top1, sum(w.trans_top1 for w in windows if w.has_top1))
    assert [(had, top1) for _, _, had, top1 in info] == [(True, True), (True, True), (False, False),
                                                         (True, False), (True, True)]
    assert [int(tok) for tok, _, _, _ in info] == [123, 123, 7, 123, 123]
    assert np.array_equal(decode_window(encode_window(windows[0]), L, E, k).trans_top1, windows[0].trans_top1)
    assert {encode_window(w)[4] for w in windows} == {4}  # one format version, whatever the window holds


def test_sum_windows_names_the_blob_it_could_not_read():
    from expertmesh.cluster.stats.codec import sum_windows

    good = encode_window(window_with(3, 8, 2, 0.5, 9))
    with pytest.raises(CodecError) as err:
        sum_windows([good, good, b"GIF89a" + good[6:]], 3, 8, 2, threads=2)
    assert err.value.index == 2


def dense_window(L, E, k, seed=0, hot=0.03, wide=0):
    """A writer-like window: nearly every cell in use, most below 16, `hot` of them 16-255, `wide` above 255."""
    rng = np.random.default_rng(seed)

    def cells(shape):
        arr = rng.integers(0, 15, shape)
        flat = arr.reshape(-1)
        flat[rng.choice(flat.size, max(2, int(hot * flat.size)), replace=False)] = rng.integers(16, 256)
        flat[rng.choice(flat.size, min(wide, flat.size), replace=False)] = 40_000
        return arr

    return WindowCounts(cells((L, E)), k, 77, cells((L, pair_count(E))), cells((L - 1, E * E)), deltas=1)


@pytest.mark.parametrize("E,wide", [(16, 0), (16, 3), (7, 0), (7, 2)])  # cells a multiple of 4 or not
def test_dense_windows_with_hot_groups_round_trip_exactly(E, wide):
    """Version 2's GROUPS layout (a writer window): nibbles, plus whole 4-cell groups where a cell > 15."""
    from expertmesh.cluster.stats.codec import sum_windows

    w = dense_window(4, E, 2, seed=E + wide, wide=wide)
    blob = encode_window(w)
    for layout, bits, n_hot in layouts(blob)[1:]:
        assert layout == GROUPS and bits == (16 if wide else 8) and n_hot > 0
    back = decode_window(blob, 4, E, 2)
    for name in ("counts", "coact", "trans"):
        np.testing.assert_array_equal(getattr(back, name), getattr(w, name), err_msg=name)
    # Summed in narrow accumulators (one 64-bit add per hot group where the cells allow it), and in threads.
    others = [dense_window(4, E, 2, seed=s, wide=wide) for s in range(3)]
    for threads in (1, 2):
        total, _ = sum_windows([blob] + [encode_window(o) for o in others], 4, E, 2, threads=threads)
        for name in ("counts", "coact", "trans"):
            want = getattr(w, name) + sum(getattr(o, name) for o in others)
            np.testing.assert_array_equal(getattr(total, name), want, err_msg=name)


def test_sum_windows_sizes_each_array_from_its_own_bound():
    """Large counts do not widen the pair arrays' accumulators (their traffic is most of a snapshot)."""
    from expertmesh.cluster.stats.codec import sum_windows, value_bounds

    w = dense_window(3, 16, 2, seed=9)
    counts = w.counts.copy()
    counts[0, 0] = 255_000  # counts need 32 bits
    w = WindowCounts(counts, 2, 77, w.coact, w.trans)
    blob = encode_window(w)
    counts_bound, coact_bound, trans_bound = value_bounds(blob)
    assert counts_bound >= 255_000 and coact_bound < 2**10 and trans_bound < 2**10
    total, _ = sum_windows([blob] * 4, 3, 16, 2)
    assert total.counts.dtype != np.uint16 and total.coact.dtype == total.trans.dtype == np.uint16
    np.testing.assert_array_equal(total.counts, 4 * w.counts)
    np.testing.assert_array_equal(total.trans, 4 * w.trans)


@pytest.mark.parametrize("share", [32, 64, 96])
def test_arrays_in_shares_encode_to_the_same_bytes(monkeypatch, share):
    """A large array is encoded in shares on threads: the bytes equal the one-piece encoding, for GROUPS
    and for DENSE with an overflow list (values beyond 16 bits rule GROUPS out)."""
    import expertmesh.cluster.stats.codec.encode as codec

    grouped = dense_window(5, 16, 2, seed=4, wide=2)
    patched = window_with(5, 16, 2, 0.97, 14, seed=4, hot=7)
    blobs = [encode_window(grouped), encode_window(patched)]
    assert [lo for lo, _, _ in layouts(blobs[0])[1:]] == [GROUPS, GROUPS]
    assert [(lo, bits) for lo, bits, n in layouts(blobs[1])[1:] if n] == [(DENSE, 4), (DENSE, 4)]
    monkeypatch.setattr(codec, "_SHARE_CELLS", share)
    monkeypatch.setattr(codec, "_THREADED_ENCODE_CPUS", 1)
    assert [encode_window(grouped), encode_window(patched)] == blobs


@pytest.mark.parametrize("version", [1, 2, 3, 5])
def test_other_format_versions_are_refused_by_number(version):
    """Only version 4 is read: windows of versions 1-3 (never released) get an error naming their version."""
    blob = encode_window(window_with(3, 8, 2, 0.5, 9))
    assert blob[4] == 4
    with pytest.raises(CodecError, match=f"window format version {version}: this expertmesh reads version 4 only"):
        decode_window(blob[:4] + bytes([version]) + blob[5:], 3, 8, 2)


def array_offsets(blob):
    """Byte offset of each array header (counts, coact, trans) of an encoded window."""
    out, offset = [], HEADER
    for _ in range(3):
        out.append(offset)
        layout, bits, ib, _, xb, n, nnz, n_over = ARRAY.unpack_from(blob, offset)
        offset += ARRAY.size
        if layout == GROUPS:
            offset += 2 * (-(-n // 4)) + n_over * ib + n_over * 4 * bits // 8
        else:
            m = n if layout == DENSE else nnz
            offset += {DENSE: 0, BITMAP: (n + 7) // 8, COO: nnz * ib}[layout] + (m * bits + 7) // 8 + n_over * (ib + xb)
    return out


def test_refuses_corrupt_hot_groups():
    blob = encode_window(dense_window(3, 16, 2, seed=2))
    at = array_offsets(blob)[1]  # coact
    layout, _, ib, _, _, n, _, n_hot = ARRAY.unpack_from(blob, at)
    assert layout == GROUPS and n_hot >= 2
    gaps = at + ARRAY.size + 2 * (-(-n // 4))
    bad = bytearray(blob)
    bad[gaps + ib : gaps + 2 * ib] = bytes(ib)  # the second gap 0: one group twice
    with pytest.raises(CodecError, match="coact: hot groups not in increasing order"):
        decode_window(bytes(bad), 3, 16, 2)
    bad = bytearray(blob)
    bad[gaps : gaps + ib] = (2 ** (8 * ib) - 1).to_bytes(ib, "little")  # the first hot group far outside
    with pytest.raises(CodecError, match="coact: hot group .* outside"):
        decode_window(bytes(bad), 3, 16, 2)
