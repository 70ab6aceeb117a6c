"""Layer shares: a group sums its counts and each member flushes a share of the layers; the store's windows
then equal the group's tokens counted in one place, exactly, before and after compaction.

    .venv/bin/python -m pytest -q tests/cluster/test_stats_shares.py
"""

from __future__ import annotations

import numpy as np
import pytest

from expertmesh.cluster.stats.codec import CodecError, decode_window, encode_window, encoded_header
from expertmesh.cluster.stats.counting import WindowAccumulator
from expertmesh.cluster.stats.recorder import RedisStatsSink
from expertmesh.cluster.stats.store import StatsStore
from expertmesh.cluster.stats.window import WindowCounts, layer_shares, transition_rows
from expertmesh.placement.stats import stats_from_trace
from expertmesh.placement.trace import Trace

L, E, K = 5, 8, 3


def ids_for(seed: int, T: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((T, L, E)), axis=2)[:, :, :K].astype(np.int32)


def expected(parts: list[np.ndarray]):
    ids = np.concatenate(parts)
    return stats_from_trace(Trace(ids, np.zeros(len(ids), np.int32), E))


def test_layer_shares_cover_the_layers_once():
    assert layer_shares(5, 2) == [(0, 2), (2, 5)]
    sizes = [stop - first for first, stop in layer_shares(58, 8)]
    assert sum(sizes) == 58 and max(sizes) - min(sizes) == 1 and layer_shares(58, 8)[-1][1] == 58
    assert [transition_rows(a, b - a, 5) for a, b in layer_shares(5, 3)] == [1, 2, 1]
    with pytest.raises(ValueError, match="parts"):
        layer_shares(5, 0)


@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_shares_counted_from_ids_sum_to_the_whole_window(parts):
    ids = ids_for(parts)
    whole = WindowAccumulator(L, E, K)
    whole.add(ids)
    total = WindowCounts.zeros(L, E, K)
    tokens = 0.0
    from expertmesh.cluster.stats.codec import add_window_into

    for first, stop in layer_shares(L, parts):
        acc = WindowAccumulator(L, E, K, layers=(first, stop))
        acc.add(ids)
        share = acc.take()
        assert (share.first_layer, share.num_layers, share.total_layers) == (first, stop - first, L)
        assert share.is_share == (parts > 1)
        blob = encode_window(share)
        assert encoded_header(blob)["version"] == 4
        tok, _, _, _ = add_window_into(total, blob)
        tokens += tok
    ref = whole.take()
    assert tokens == ref.tokens == len(ids)
    for name in ("counts", "coact", "trans", "trans_top1"):
        np.testing.assert_array_equal(getattr(total, name), getattr(ref, name), err_msg=name)


def test_a_share_refuses_arrays_of_another_share_and_reports_model_layers():
    acc = WindowAccumulator(L, E, K, layers=(2, 4))
    with pytest.raises(ValueError, match=r"counts: expected an integer array of shape \[2, 8\]"):
        acc.add_dense(np.zeros((L, E), np.int64), np.zeros((L, E, E), np.int64), np.zeros((L - 1, E, E), np.int64), 0)
    pairs = np.zeros((2, E, E), np.int64)
    pairs[1, 3, 3] = 1
    with pytest.raises(ValueError, match="twice in layer 3"):
        acc.add_dense(np.zeros((2, E), np.int64), pairs, np.zeros((2, E, E), np.int64), 1)
    ids = ids_for(0)
    ids[7, 2, 1] = ids[7, 2, 0]
    with pytest.raises(ValueError, match="token 7 selects the same expert twice in layer 2"):
        acc.add(ids)
    with pytest.raises(ValueError, match=r"layers: expected a share \[first, stop\)"):
        WindowAccumulator(L, E, K, layers=(3, 9))
    with pytest.raises(ValueError, match="not a whole window"):
        WindowCounts.zeros(2, E, K, first_layer=1, model_layers=L).to_stats()


def test_a_share_blob_outside_its_model_is_refused():
    blob = bytearray(encode_window(WindowCounts.zeros(2, E, K, first_layer=3, model_layers=L)))
    blob[32:36] = (4).to_bytes(4, "little")  # after the 32-byte header: first layer 4, + 2 layers > 5
    with pytest.raises(CodecError, match=r"layer share \[4, 6\) outside the window's 5 layers"):
        decode_window(bytes(blob), L, E, K)


def test_group_shares_in_redis_equal_the_group_tokens_before_and_after_compaction(redis_url):
    """Three writers: each step's ids are the group's (as after the group's sum), each writer flushes its
    share of layers; one writer's window without shares rides along (a group and a lone writer mix)."""
    sink = RedisStatsSink(redis_url, "share-model", L, E, K, top1=True, min_backoff_s=0.01, max_backoff_s=0.05)
    recs = [sink.open(f"rank-{r}", group=(r, 3)) for r in range(3)]
    assert [rec.layers for rec in recs] == layer_shares(L, 3)
    lone = sink.open("lone")
    parts = []
    for window in range(4):
        ids = ids_for(100 + window)
        parts.append(ids)
        for rec in recs:
            rec.record(ids)
            rec.flush(window)
        if window == 2:
            extra = ids_for(7, T=9)
            parts.append(extra)
            lone.record(extra)
            lone.flush(window)
    for rec in [*recs, lone]:
        assert rec.wait_idle(10)
        assert rec.close().sent == (4 if rec is not lone else 1)
    store = StatsStore.open(redis_url, model="share-model")
    want = expected(parts)
    for when in ("before", "after"):
        snap = store.snapshot()
        assert snap.tokens == want.tokens, when
        for name in ("counts", "coact", "trans", "trans_top1"):
            np.testing.assert_array_equal(getattr(snap, name), getattr(want, name), err_msg=f"{name} {when}")
        store.compact()


def test_share_of_a_whole_window_is_its_rows():
    acc = WindowAccumulator(L, E, K)
    acc.add(ids_for(3))
    whole = acc.take()
    last = whole.share(3, 5)
    assert (last.first_layer, last.num_layers, last.trans.shape[0]) == (3, 2, 1)
    np.testing.assert_array_equal(last.trans, whole.trans[3:4])
    with pytest.raises(ValueError, match=r"share: expected 0 <= first < stop <= 5"):
        whole.share(4, 4)
    with pytest.raises(ValueError, match="whole window"):
        last.share(0, 1)


def test_a_step_recorder_writes_shares_only_where_every_worker_gets_one(redis_url):
    """Layer shares need a sink whose open() takes a group, counts as tensors and no more workers than
    layers; otherwise each worker writes its own window (no collective at flush)."""
    import torch

    from expertmesh.workers.recording import StepRecorder

    sink = RedisStatsSink(redis_url, "share-step", L, E, K)

    def reduce(t: torch.Tensor) -> None:
        t.mul_(2)  # a group of two identical workers

    class PlainSink:  # answers a group's request with a recorder of every layer
        def open(self, writer_id, group=None):
            return sink.open(writer_id)

    with pytest.raises(ValueError, match=r"group: expected \(rank, size\)"):
        sink.open("w", group=(2, 2))
    for kind, size, share in ((sink, 2, (2, 5)), (sink, L + 1, None), (sink, 1, None), (PlainSink(), 2, None)):
        other = StepRecorder(kind, "w", shape=(L, E, K), group=(size - 1, size), reduce=reduce)
        assert other.share == share
        other.close()  # nothing recorded: writes nothing
    rec = StepRecorder(sink, "w", shape=(L, E, K), group=(0, 2), reduce=reduce)
    ids = ids_for(11)
    rec.record(torch.from_numpy(ids))
    rec.close()
    rec.flush()  # nothing since the last flush: no second collective, no empty window
    got = StatsStore.open(redis_url, model="share-step").snapshot()
    want = expected([ids, ids])
    assert got.tokens == want.tokens
    np.testing.assert_array_equal(got.counts[:2], want.counts[:2])
    assert not got.counts[2:].any()  # the other worker's share was never written
    np.testing.assert_array_equal(got.trans[:2], want.trans[:2])
