"""Local counting and the store's window layout reproduce `stats_from_trace` exactly.

    .venv/bin/python -m pytest -q tests/cluster/test_stats_counting.py
"""

from __future__ import annotations

import numpy as np
import pytest

from expertmesh.cluster.stats import counting
from expertmesh.cluster.stats.counting import WindowAccumulator
from expertmesh.cluster.stats.window import WindowCounts
from expertmesh.placement.stats import RoutingStats, stats_from_trace
from expertmesh.placement.trace import Trace


def random_ids(rng, T, L, E, k):
    return np.argsort(rng.random((T, L, E)), axis=2)[:, :, :k].astype(np.int32)


def assert_same(a: RoutingStats, b: RoutingStats, names=("coact", "trans", "trans_top1")) -> None:
    assert a.tokens == b.tokens and a.top_k == b.top_k
    np.testing.assert_array_equal(a.counts, b.counts)
    for name in names:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == np.int64 and y.dtype == np.int64, name
            np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.mark.parametrize("T,L,E,k", [(60, 3, 8, 2), (41, 1, 5, 1), (33, 4, 16, 4), (7, 2, 4, 4), (1, 5, 3, 3)])
def test_steps_sum_to_stats_from_trace(T, L, E, k):
    rng = np.random.default_rng(T * 100 + L)
    ids = random_ids(rng, T, L, E, k)
    acc = WindowAccumulator(L, E, k)
    for start in range(0, T, 10):  # several steps into one window
        acc.add(ids[start : start + 10])
    acc.add(ids[:0])  # an empty step changes nothing
    window = acc.take()
    assert window.tokens == T and window.deltas == 1
    assert_same(window.to_stats(), stats_from_trace(Trace(ids, np.zeros(T, np.int32), E)))
    assert acc.take().tokens == 0  # take() starts a fresh window


def test_windows_beyond_uint16_widen_exactly():
    """Counting runs in uint16 up to 65,535 tokens a window; past that it widens, still exact."""
    rng = np.random.default_rng(4)
    ids = random_ids(rng, 70_000, 2, 2, 2)  # two experts, top-2: every cell counts every token
    acc = WindowAccumulator(2, 2, 2)
    acc.add(ids[:60_000])
    assert acc.take().counts.dtype == np.uint16
    acc.add(ids[:60_000])
    acc.add(ids[60_000:])  # crosses the limit within the window
    window = acc.take()
    assert window.counts.dtype == np.int64 and window.tokens == 70_000
    assert window.trans.max() > 2**16 - 1  # the cells really exceed uint16
    assert_same(window.to_stats(), stats_from_trace(Trace(ids, np.zeros(70_000, np.int32), 2)))
    big = WindowAccumulator(2, 2, 2)
    big.add(ids)  # one step larger than the limit
    assert_same(big.take().to_stats(), stats_from_trace(Trace(ids, np.zeros(70_000, np.int32), 2)))


def test_token_blocks_give_the_same_counts(monkeypatch):
    """A step larger than one block is counted block by block (a partial last block too), same result."""
    rng = np.random.default_rng(1)
    ids = random_ids(rng, 50, 7, 12, 3)
    whole = WindowAccumulator(7, 12, 3)
    whole.add(ids)
    monkeypatch.setattr(counting, "_TOKEN_BLOCK", 7)  # 8 blocks, the last of 1 token
    blocked = WindowAccumulator(7, 12, 3)
    blocked.add(ids)
    assert_same(whole.take().to_stats(), blocked.take().to_stats())


def test_a_duplicate_in_a_later_block_counts_nothing(monkeypatch):
    """Pairs of every block are counted (and checked) before anything is added to the window."""
    monkeypatch.setattr(counting, "_TOKEN_BLOCK", 4)
    rng = np.random.default_rng(6)
    ids = random_ids(rng, 10, 3, 8, 3)
    ids[9, 2, 1] = ids[9, 2, 0]  # the last block, the last layer
    acc = WindowAccumulator(3, 8, 3)
    acc.add(ids[:3])
    before = acc._window.coact.copy(), acc._window.trans.copy(), acc._window.counts.copy()
    with pytest.raises(ValueError, match="token 9 selects the same expert twice in layer 2"):
        acc.add(ids)
    assert acc.tokens == 3
    for got, want in zip((acc._window.coact, acc._window.trans, acc._window.counts), before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_router_order_of_the_k_experts_does_not_matter():
    """Pairs are counted in the router's slot order (unsorted); the triangle folds both orientations."""
    rng = np.random.default_rng(7)
    ids = random_ids(rng, 40, 3, 9, 4)
    shuffled = np.take_along_axis(ids, np.argsort(rng.random(ids.shape), axis=2), axis=2)
    a, b = WindowAccumulator(3, 9, 4), WindowAccumulator(3, 9, 4)
    a.add(np.sort(ids, axis=2))
    b.add(shuffled)
    # trans_top1 follows slot 0, so it does depend on the order; every other statistic does not.
    assert_same(a.take().to_stats(), b.take().to_stats(), names=("coact", "trans"))


@pytest.mark.parametrize(
    "ids,match",
    [
        (np.zeros((4, 3), np.int32), r"expected shape \[T, 2, 2\]"),
        (np.zeros((4, 3, 2), np.int32), r"expected shape \[T, 2, 2\]"),
        (np.full((4, 2, 2), 0.5), "integer array"),
        (np.array([[[0, 9], [1, 2]]]), r"must lie in \[0, 8\), found \[0, 9\]"),
        (np.array([[[0, -1], [1, 2]]]), r"must lie in \[0, 8\)"),
        (np.array([[[0, 1], [3, 3]]]), "token 0 selects the same expert twice in layer 1"),
    ],
)
def test_bad_steps_are_refused_by_field(ids, match):
    acc = WindowAccumulator(2, 8, 2)
    with pytest.raises(ValueError, match=match):
        acc.add(ids)
    assert acc.tokens == 0  # nothing half-counted


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="top_k"):
        WindowAccumulator(2, 4, 5)


def test_from_stats_round_trip_and_refusals():
    rng = np.random.default_rng(2)
    ids = random_ids(rng, 30, 3, 6, 2)
    stats = stats_from_trace(Trace(ids, np.zeros(30, np.int32), 6))
    assert_same(WindowCounts.from_stats(stats).to_stats(), stats)

    counts_only = RoutingStats(stats.counts, 2, 30)
    back = WindowCounts.from_stats(counts_only).to_stats()
    assert back.coact is None and back.trans is None
    np.testing.assert_array_equal(back.counts, stats.counts)

    diag = stats.coact.copy()
    diag[1, 2, 2] = 5
    with pytest.raises(ValueError, match="zero diagonal.*layer 1 expert 2"):
        WindowCounts.from_stats(RoutingStats(stats.counts, 2, 30, diag, stats.trans))
    with pytest.raises(ValueError, match="counts: expected integer counts"):
        WindowCounts.from_stats(stats.scaled(0.5))


def test_windows_add_like_routing_stats_merge():
    rng = np.random.default_rng(3)
    a_ids, b_ids = random_ids(rng, 20, 2, 5, 2), random_ids(rng, 9, 2, 5, 2)
    a = stats_from_trace(Trace(a_ids, np.zeros(20, np.int32), 5))
    b = stats_from_trace(Trace(b_ids, np.zeros(9, np.int32), 5))
    total = WindowCounts.from_stats(a) + WindowCounts.from_stats(b)
    assert total.deltas == 2
    assert_same(total.to_stats(), a.merge(b))
    no_pairs = WindowCounts.from_stats(a) + WindowCounts.from_stats(RoutingStats(b.counts, 2, 9))
    assert no_pairs.coact is None and no_pairs.trans is None


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64, np.uint64])
def test_any_integer_dtype_counts_the_same(dtype):
    rng = np.random.default_rng(8)
    ids = random_ids(rng, 25, 2, 6, 3)
    a, b = WindowAccumulator(2, 6, 3), WindowAccumulator(2, 6, 3)
    a.add(ids)
    b.add(ids.astype(dtype))
    assert_same(a.take().to_stats(), b.take().to_stats())


@pytest.mark.parametrize("T,L,E,k", [(60, 3, 8, 2), (41, 1, 5, 1), (2100, 4, 16, 4), (1, 5, 3, 3)])
def test_counts_made_on_a_device_fold_into_the_same_window(T, L, E, k, monkeypatch):
    """A worker's DeviceCounts (torch; CPU here, the GPU in serving) handed over with add_dense give the
    window WindowAccumulator.add counts from the same ids, token blocks included."""
    import torch

    from expertmesh.workers.recording import DeviceCounts

    monkeypatch.setattr(DeviceCounts, "block", 1000)  # 2100 tokens: three blocks
    rng = np.random.default_rng(T + 7 * E)
    ids = random_ids(rng, T, L, E, k)
    direct, dense = WindowAccumulator(L, E, k), WindowAccumulator(L, E, k)
    device = DeviceCounts(L, E, k, torch.device("cpu"))
    for start in range(0, T, 700):
        direct.add(ids[start : start + 700])
        device.add(torch.from_numpy(ids[start : start + 700]))
    dense.add_dense(**device.take())
    assert device.take()["tokens"] == 0  # take() zeroes the counter
    want, got = direct.take(), dense.take()
    assert got.tokens == want.tokens == T
    assert_same(got.to_stats(), want.to_stats())


def test_dense_counts_are_refused_by_field_and_add_nothing():
    L, E, k = 2, 4, 2
    acc = WindowAccumulator(L, E, k)
    counts, pairs, trans = np.zeros((L, E), np.int64), np.zeros((L, E, E), np.int64), np.zeros((L - 1, E, E))
    with pytest.raises(ValueError, match=r"pairs: expected an integer array of shape \[2, 4, 4\]"):
        acc.add_dense(counts, pairs[:1], trans.astype(np.int64), 1)
    with pytest.raises(ValueError, match="trans: expected an integer array"):
        acc.add_dense(counts, pairs, trans, 1)  # float
    pairs[1, 3, 3] = 1
    counts[0, 0] = 5
    with pytest.raises(ValueError, match="same expert twice in layer 1"):
        acc.add_dense(counts, pairs, trans.astype(np.int64), 1)
    with pytest.raises(ValueError, match="counts: expected counts >= 0"):
        acc.add_dense(-counts, np.zeros_like(pairs), trans.astype(np.int64), 1)
    assert acc.tokens == 0 and not acc.take().counts.any()


@pytest.mark.parametrize("top1", [False, True])
def test_a_worker_counting_on_its_device_writes_the_stats_of_its_ids(redis_url, top1):
    """StepRecorder with device counting (a GPU worker's path; forced on the CPU here): steps recorded as
    torch ids, flushed every 2 steps and at close, reach Redis as stats_from_trace of those ids; the top-1
    transitions are counted only where the sink keeps them."""
    import redis
    import torch

    from expertmesh.cluster.stats.recorder import RedisStatsSink
    from expertmesh.cluster.stats.store import StatsStore
    from expertmesh.workers.recording import StepRecorder

    L, E, k = 3, 8, 2
    ids = random_ids(np.random.default_rng(5), 90, L, E, k)
    sink = RedisStatsSink(redis_url, "dev", L, E, k, run=f"r{int(top1)}", top1=top1)
    rec = StepRecorder(sink, "w0", flush_every=2, shape=(L, E, k), device=torch.device("cpu"),
                       device_counting=True)
    assert rec.device_counts is not None and (rec.device_counts.trans_top1 is not None) == top1
    for start in range(0, 90, 20):  # 5 steps: windows {0, 1}, {2, 3}, {4} (at close)
        rec.record(torch.from_numpy(ids[start : start + 20]))
    rec.close()
    got = StatsStore(redis.Redis.from_url(redis_url), "dev", f"r{int(top1)}").snapshot()
    want = stats_from_trace(Trace(ids, np.zeros(90, np.int32), E))
    assert_same(got, want, names=("coact", "trans", "trans_top1") if top1 else ("coact", "trans"))
    assert (got.trans_top1 is not None) == top1


def test_writers_record_trans_top1_only_when_asked(redis_url):
    """trans_top1 costs a DeepSeek-V3-size window ~40% more bytes: live writers record it on request; a
    window without it leaves the snapshot without it (token-follow plans then use trans / top_k)."""
    import redis

    from expertmesh.cluster.stats.recorder import RedisStatsSink
    from expertmesh.cluster.stats.store import StatsStore

    L, E, k = 3, 8, 2
    ids = random_ids(np.random.default_rng(9), 30, L, E, k)
    assert WindowAccumulator(L, E, k, top1=False).take().trans_top1 is None
    want = stats_from_trace(Trace(ids, np.zeros(30, np.int32), E))
    for run, top1 in (("plain", False), ("top1", True)):
        with RedisStatsSink(redis_url, "m", L, E, k, run=run, top1=top1).open("w") as rec:
            rec.record(ids)
            rec.flush(0)
        got = StatsStore(redis.Redis.from_url(redis_url), "m", run).snapshot()
        assert_same(got, want, names=("coact", "trans"))
        assert (got.trans_top1 is not None) == top1
        if top1:
            np.testing.assert_array_equal(got.trans_top1, want.trans_top1)
