"""The Redis store against a real redis-server: exact snapshots, retention, decay, idempotency, refusals.

    .venv/bin/python -m pytest -q tests/cluster/test_stats_store.py
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import redis

from expertmesh.cluster.stats.codec import encode_window
from expertmesh.cluster.stats.connect import StatsSchemaError, StatsStoreError
from expertmesh.cluster.stats.counting import WindowAccumulator
from expertmesh.cluster.stats.keys import make_header
from expertmesh.cluster.stats.store import StatsStore
from expertmesh.placement.stats import stats_from_trace
from expertmesh.placement.trace import Trace

L, E, K = 3, 8, 2


def ids_for(seed, T=24, L=L, E=E, k=K):
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((T, L, E)), axis=2)[:, :, :k].astype(np.int32)


def window_of(ids, E=E):
    acc = WindowAccumulator(ids.shape[1], E, ids.shape[2])
    acc.add(ids)
    return acc.take()


def trace_stats(ids, E=E):
    return stats_from_trace(Trace(ids, np.zeros(len(ids), np.int32), E))


def same(a, b):
    return (
        a.tokens == b.tokens
        and np.array_equal(a.counts, b.counts)
        and np.array_equal(a.coact, b.coact)
        and np.array_equal(a.trans, b.trans)
    )


@pytest.fixture
def store(redis_url):
    s = StatsStore.open(redis_url, model="test-model", run="r1")
    yield s
    s.client.close()


def keys_under(store, prefix: str) -> list[str]:
    return sorted(k.decode() for k in store.client.scan_iter(match=prefix + "*"))


def test_snapshot_of_windows_equals_the_trace(store):
    header = store.ensure(L, E, K, keep=16)
    parts = [ids_for(i) for i in range(5)]
    for wid, ids in enumerate(parts):
        assert store.write(wid, window_of(ids), header=header, writer="a", seq=wid + 1)
    snap = store.snapshot()
    assert same(snap, trace_stats(np.concatenate(parts)))
    assert snap.meta["windows"] == [0, 1, 2, 3, 4] and snap.meta["head"] == 4
    last2 = store.snapshot(windows=2)
    assert same(last2, trace_stats(np.concatenate(parts[3:])))
    assert store.client.ttl(store.keys.window(0)) > 0  # old windows expire even without compaction


def test_several_writers_per_window_sum_and_compaction_keeps_it_exact(store):
    header = store.ensure(L, E, K, keep=16)
    everything = []
    for wid in range(3):
        for w in range(4):
            ids = ids_for(100 * wid + w)
            everything.append(ids)
            store.write(wid, window_of(ids), header=header, writer=f"w{w}", seq=wid + 1)
    before = store.snapshot()
    assert same(before, trace_stats(np.concatenate(everything)))
    assert before.meta["deltas"] == {"0": 4, "1": 4, "2": 4}
    report = store.compact()
    assert report == {"merged": 3, "folded": 0, "conflicts": 0}
    assert all(store.client.hlen(store.keys.window(w)) == 1 for w in range(3))
    assert len(keys_under(store, store.keys.blob_prefix)) == 3  # the merged deltas' blobs are gone
    assert keys_under(store, store.keys.stage_prefix) == []  # nothing staged is left behind
    after = store.snapshot()
    assert same(after, before) and after.meta["deltas"] == before.meta["deltas"]


def test_a_retried_delta_counts_once(store):
    header = store.ensure(L, E, K)
    w = window_of(ids_for(1))
    assert store.write(0, w, header=header, writer="x/1", seq=1) is True
    assert store.write(0, w, header=header, writer="x/1", seq=1) is False  # the retry after a lost reply
    assert store.write(0, w, header=header, writer="x/1", seq=1) is False
    assert store.snapshot().tokens == w.tokens
    assert store.write(0, w, header=header, writer="x/2", seq=1) is True  # another incarnation is another writer
    assert store.snapshot().tokens == 2 * w.tokens


def test_out_of_order_deltas_each_apply_once_and_the_floor_settles(store):
    """Redis can refuse seq 1 (-LOADING, -OOM) and apply seq 2 of the same pipeline: seq 1 must still land."""
    header = store.ensure(L, E, K)
    one, two, three = (window_of(ids_for(s)) for s in (1, 2, 3))
    assert store.write(0, two, header=header, writer="w/1", seq=2, floor=1) is True
    assert store.write(0, one, header=header, writer="w/1", seq=1, floor=1) is True  # a mark would call it dup
    assert store.write(0, two, header=header, writer="w/1", seq=2, floor=1) is False
    assert store.snapshot().tokens == one.tokens + two.tokens
    # Floor 3: the writer settled 1 and 2; a stale attempt for either is a duplicate, and the set forgets them.
    assert store.write(0, three, header=header, writer="w/1", seq=3, floor=3) is True
    assert store.write(0, one, header=header, writer="w/1", seq=1, floor=1) is False
    assert [int(m) for m in store.client.zrange(store.keys.applied("w/1"), 0, -1)] == [3]
    assert store.snapshot().tokens == one.tokens + two.tokens + three.tokens
    assert store.client.ttl(store.keys.applied("w/1")) > 0


def test_retention_fold_and_decayed_aggregate(store):
    keep, decay = 4, 0.5
    header = store.ensure(L, E, K, keep=keep, decay=decay)
    windows = [window_of(ids_for(i, T=10 + i)) for i in range(10)]
    for wid, w in enumerate(windows):
        store.write(wid, w, header=header, writer="a", seq=wid + 1)
    snap = store.snapshot()
    assert snap.meta["windows"] == [6, 7, 8, 9]  # the last `keep`
    expected = sum(decay ** (9 - i) * windows[i].counts.astype(float) for i in range(10))
    expected_tokens = sum(decay ** (9 - i) * windows[i].tokens for i in range(10))
    dec = store.decayed()
    np.testing.assert_allclose(dec.counts, expected, rtol=1e-12)
    assert dec.tokens == round(expected_tokens)

    report = store.compact()
    assert report["folded"] == 6 and report["conflicts"] == 0
    assert store.window_ids() == [6, 7, 8, 9]
    assert not store.client.exists(store.keys.window(0))
    blobs = keys_under(store, store.keys.blob_prefix)
    blob_windows = {int(k[len(store.keys.blob_prefix) :].split(":")[0]) for k in blobs}
    assert blob_windows == {6, 7, 8, 9}  # folded windows leave no blob behind
    np.testing.assert_allclose(store.decayed().counts, expected, rtol=1e-12)  # same after folding
    assert same(store.snapshot(), snap)

    # A late delta for a folded window is kept, then folded with its own weight; nothing is lost.
    late = window_of(ids_for(99, T=7))
    store.write(2, late, header=header, writer="b", seq=1)
    expected = expected + decay ** (9 - 2) * late.counts
    np.testing.assert_allclose(store.decayed().counts, expected, rtol=1e-12)
    assert store.compact()["folded"] == 1
    np.testing.assert_allclose(store.decayed().counts, expected, rtol=1e-12)
    coact = store.decayed().coact
    np.testing.assert_array_equal(coact, coact.transpose(0, 2, 1))


@pytest.mark.parametrize(
    "shape,match",
    [
        ((L, E * 2, K), "holds layers=3 experts=8 top_k=2; this writer has layers=3 experts=16 top_k=2"),
        ((L + 1, E, K), "holds layers=3 experts=8 top_k=2; this writer has layers=4"),
        ((L, E, K + 1), "top_k=3"),
    ],
)
def test_another_shape_is_refused_never_merged(store, shape, match):
    header = store.ensure(L, E, K)
    store.write(0, window_of(ids_for(0)), header=header, writer="a", seq=1)
    with pytest.raises(StatsSchemaError, match=match):
        store.ensure(*shape)
    other = make_header(*shape)
    ids = ids_for(1, L=shape[0], E=shape[1], k=shape[2])
    with pytest.raises(StatsSchemaError, match=match):
        store.write(1, window_of(ids, E=shape[1]), header=other, writer="b", seq=1)
    assert store.snapshot().meta["windows"] == [0]  # nothing of the other shape got in


def test_foreign_or_malformed_data_is_refused(store):
    client = store.client
    client.set(store.keys.meta, "somebody else's string")
    with pytest.raises(StatsSchemaError, match="is a Redis string, not an expertmesh statistics header"):
        store.snapshot()
    with pytest.raises(StatsSchemaError, match="string"):
        store.ensure(L, E, K)

    client.delete(store.keys.meta)
    client.hset(store.keys.meta, mapping={"schema": "celery/4", "head": 0, "keep": 4})
    with pytest.raises(StatsSchemaError, match="has schema celery/4, expected expertmesh.routing-stats/1"):
        store.ensure(L, E, K)
    with pytest.raises(StatsSchemaError, match="not expertmesh statistics"):
        store.snapshot()

    client.delete(store.keys.meta)
    header = store.ensure(L, E, K)
    store.write(0, window_of(ids_for(0)), header=header, writer="a", seq=1)
    client.hset(store.keys.window(0), "d:intruder:1", 12)
    client.set(store.keys.blob(0, "d:intruder:1"), b"\x89PNG garbage")
    with pytest.raises(StatsSchemaError, match=r":w:0 field 'd:intruder:1'.*not an expertmesh window"):
        store.snapshot()
    client.delete(store.keys.blob(0, "d:intruder:1"))
    with pytest.raises(StatsStoreError, match=r":w:0 lists field 'd:intruder:1' but its blob .*:b:0:d:intruder:1 is"):
        store.snapshot()
    client.hdel(store.keys.window(0), "d:intruder:1")
    wrong = encode_window(window_of(ids_for(0, E=16), E=16))
    client.hset(store.keys.window(0), "d:other:1", len(wrong))
    client.set(store.keys.blob(0, "d:other:1"), wrong)
    with pytest.raises(StatsSchemaError, match="window shape layers=3 experts=16"):
        store.snapshot()
    client.hdel(store.keys.window(0), "d:other:1")
    client.hset(store.keys.meta, "layers", "three")
    with pytest.raises(StatsSchemaError, match="header field 'layers': expected a number, got 'three'"):
        store.snapshot()


def test_empty_prefix_and_reset(store, redis_url):
    with pytest.raises(StatsStoreError, match="no statistics under .* model=test-model run=r1"):
        store.snapshot()
    header = store.ensure(L, E, K)
    for wid in range(3):
        store.write(wid, window_of(ids_for(wid)), header=header, writer="a", seq=wid + 1)
    neighbour = StatsStore.open(redis_url, model="test-model", run="r2")
    neighbour.write(0, window_of(ids_for(5)), header=neighbour.ensure(L, E, K), writer="a", seq=1)
    # meta, writers, index, 3 window listings and their 3 blobs, the writer's applied set (no aggregate yet)
    assert store.reset() == 10
    assert store.header() is None
    assert neighbour.snapshot().tokens == 24  # another run under the same model is untouched


def test_reset_finds_windows_missing_from_the_index(store):
    header = store.ensure(L, E, K)
    store.write(0, window_of(ids_for(0)), header=header, writer="a", seq=1)
    store.client.zrem(store.keys.index, "0")
    store.reset()
    assert store.client.keys(store.keys.prefix + "*") == []


def test_snapshots_during_concurrent_writes_are_whole_windows(store, redis_url):
    """Every snapshot taken while a writer writes is a sum of whole deltas: all invariants hold."""
    header = store.ensure(L, E, K, keep=64)
    writer = StatsStore.open(redis_url, model="test-model", run="r1")
    done = threading.Event()
    sizes = [5 + 13 * (i % 7) for i in range(60)]

    def write():
        for i, T in enumerate(sizes):
            writer.write(i % 20, window_of(ids_for(i, T=T)), header=header, writer="c", seq=i + 1)
        done.set()

    thread = threading.Thread(target=write)
    thread.start()
    seen = 0
    prefix_sums = set(np.cumsum(sizes).tolist())
    while not done.is_set() or seen == 0:
        try:
            snap = store.snapshot()
        except StatsStoreError:
            continue  # before the first window
        seen += 1
        assert snap.tokens in prefix_sums  # a whole number of deltas, in order
        np.testing.assert_array_equal(snap.counts.sum(axis=1), K * snap.tokens)
        np.testing.assert_array_equal(snap.coact.sum(axis=2), (K - 1) * snap.counts)
        np.testing.assert_array_equal(snap.trans.sum(axis=(1, 2)), K * K * snap.tokens)
    thread.join()
    assert store.snapshot().tokens == sum(sizes)


def test_password_protected_server(redis_server_factory):
    server = redis_server_factory(extra_args=("--requirepass", "s3cret"))
    good = StatsStore.open(f"redis://:s3cret@127.0.0.1:{server.port}/2?model=m")
    good.write(0, window_of(ids_for(0)), header=good.ensure(L, E, K), writer="a", seq=1)
    assert good.snapshot().tokens == 24
    assert redis.Redis(port=server.port, password="s3cret", db=2).exists(good.keys.meta)
    bad = StatsStore.open(f"redis://:wrong@127.0.0.1:{server.port}/2?model=m")
    with pytest.raises(Exception, match="refused the credentials|invalid username-password") as e:
        bad.snapshot()
    assert "wrong" not in str(e.value).replace("wrong password", "")


def test_tls_server(redis_server_factory, tmp_path):
    import shutil
    import socket
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        tls_port = s.getsockname()[1]
    args = (
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(cert),
        "--tls-auth-clients",
        "no",
    )
    try:
        redis_server_factory(extra_args=args)
    except RuntimeError as exc:
        pytest.skip(f"this redis-server has no TLS support: {exc}")
    url = f"rediss://127.0.0.1:{tls_port}/0?model=m&ssl_ca_certs={cert}"
    s = StatsStore.open(url)
    s.write(0, window_of(ids_for(0)), header=s.ensure(L, E, K), writer="a", seq=1)
    assert s.snapshot().tokens == 24


def test_repeated_snapshots_reuse_what_they_read_and_stay_exact(store, redis_url):
    """A reader that keeps its store re-reads only new fields; every answer equals a fresh reader's."""
    from expertmesh.cluster.stats.window import WindowCounts
    from expertmesh.placement.stats import RoutingStats

    header = store.ensure(L, E, K, keep=4)
    writer = StatsStore.open(redis_url, model="test-model", run="r1")
    seq = iter(range(1, 1000))
    fetched: list[int] = []  # fields each snapshot of `store` fetched

    def write(wid, seed, pairs=True):
        w = window_of(ids_for(seed))
        if not pairs:
            w = WindowCounts(w.counts, K, w.tokens)
        writer.write(wid, w, header=header, writer="w", seq=next(seq))

    fetch = store._fetch
    asked: list[int] = []

    def counting_fetch(names, *args):
        asked.append(len(names))
        return fetch(names, *args)

    store._fetch = counting_fetch

    def check():
        fresh = StatsStore.open(redis_url, model="test-model", run="r1", cache_bytes=0).snapshot()
        asked.clear()
        mine = store.snapshot()
        fetched.append(sum(asked))
        assert mine.meta["windows"] == fresh.meta["windows"] and mine.meta["deltas"] == fresh.meta["deltas"]
        assert mine.tokens == fresh.tokens and np.array_equal(mine.counts, fresh.counts)
        assert (mine.coact is None) == (fresh.coact is None)
        if mine.coact is not None:
            assert np.array_equal(mine.coact, fresh.coact) and np.array_equal(mine.trans, fresh.trans)
        return mine

    for wid in range(3):
        write(wid, wid)
    check()
    write(3, 10)  # one new field
    check()
    assert fetched[-2:] == [3, 1]  # the first read fetched every field, the second only the new one
    write(4, 11)  # window 0 leaves the last 4, window 4 enters
    write(4, 12)
    snap = check()
    assert snap.meta["windows"] == [1, 2, 3, 4] and snap.meta["deltas"]["4"] == 2
    store.compact()  # window 4's two fields become one merged field under a new name
    check()
    write(5, 13, pairs=False)  # counts only: the sum loses its pairs ...
    assert check().coact is None
    for wid in range(6, 10):  # ... until that window leaves the last 4
        write(wid, 20 + wid)
    after = check()
    assert after.coact is not None and after.meta["windows"] == [6, 7, 8, 9]
    after.counts[:] = 0  # what a caller does to its copy never reaches the cache
    assert check().counts.sum() > 0
    assert isinstance(after, RoutingStats) and after.counts.dtype == np.int64
