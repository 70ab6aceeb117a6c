"""The writer side: recorder -> Redis equals the in-memory counts; outages, lost replies, bounded buffers.

    .venv/bin/python -m pytest -q tests/cluster/test_stats_recorder.py
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import socket
import threading
import time

import numpy as np
import pytest
import redis

from expertmesh.cluster.stats.connect import StatsSchemaError
from expertmesh.cluster.stats.recorder import RedisStatsSink
from expertmesh.cluster.stats.store import StatsStore
from expertmesh.placement.stats import stats_from_trace
from expertmesh.placement.trace import Trace

L, E, K = 3, 8, 2
BUSY = """
local t0 = redis.call('TIME')
local start = tonumber(t0[1]) + tonumber(t0[2]) / 1e6
while true do
  local t = redis.call('TIME')
  if tonumber(t[1]) + tonumber(t[2]) / 1e6 - start > tonumber(ARGV[1]) then return 1 end
end
"""


def ids_for(seed, T=16):
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((T, L, E)), axis=2)[:, :, :K].astype(np.int32)


def expected(parts):
    ids = np.concatenate(parts)
    return stats_from_trace(Trace(ids, np.zeros(len(ids), np.int32), E))


def assert_same(a, b):
    assert a.tokens == b.tokens
    for name in ("counts", "coact", "trans"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def sink(url, **kw):
    kw.setdefault("min_backoff_s", 0.01)
    kw.setdefault("max_backoff_s", 0.05)
    return RedisStatsSink(url, "rec-model", L, E, K, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_recorded_windows_equal_stats_from_trace(redis_url):
    rec = sink(redis_url).open("worker-0")
    parts = []
    for window in range(6):
        for step in range(3):
            ids = ids_for(10 * window + step)
            parts.append(ids)
            rec.record(ids)
        rec.flush(window=window)
    rec.flush(window=6)  # nothing recorded: no window
    assert rec.wait_idle(10)
    status = rec.close()
    assert (status.windows, status.sent, status.pending, status.dropped, status.rejected) == (6, 6, 0, 0, 0)
    snap = StatsStore.open(redis_url, model="rec-model").snapshot()
    assert_same(snap, expected(parts))
    assert snap.meta["windows"] == list(range(6))


def test_default_window_is_the_wall_clock_bucket(redis_url):
    rec = sink(redis_url, window_seconds=3600).open(7)
    rec.record(ids_for(0))
    before = int(time.time() // 3600)
    rec.flush()
    rec.close()
    ids = StatsStore.open(redis_url, model="rec-model").window_ids()
    assert ids in ([before], [before + 1])


def _open_in_child(pickled_sink: bytes, queue) -> None:
    s = pickle.loads(pickled_sink)
    rec = s.open("child")
    rec.record(ids_for(1))
    rec.flush(window=0)
    queue.put(rec.close().sent)


def test_sink_pickles_into_another_process_recorder_does_not(redis_url):
    s = sink(redis_url)
    assert pickle.loads(pickle.dumps(s)) == s
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter, as a Ray worker is
    queue = ctx.Queue()
    proc = ctx.Process(target=_open_in_child, args=(pickle.dumps(s), queue))
    proc.start()
    assert queue.get(timeout=60) == 1
    proc.join(30)
    assert_same(StatsStore.open(redis_url, model="rec-model").snapshot(), expected([ids_for(1)]))
    rec = s.open("parent")
    with pytest.raises(TypeError, match="pickle the RedisStatsSink"):
        pickle.dumps(rec)
    rec.close()


def test_sink_validates_fields(redis_url):
    with pytest.raises(ValueError, match="top_k"):
        RedisStatsSink(redis_url, "m", 2, 4, 5)
    with pytest.raises(ValueError, match="model"):
        RedisStatsSink(redis_url, "bad model", 2, 4, 2)
    with pytest.raises(ValueError, match="decay"):
        RedisStatsSink(redis_url, "m", 2, 4, 2, decay=1.5)
    with pytest.raises(ValueError, match="max_buffer_bytes"):
        RedisStatsSink(redis_url, "m", 2, 4, 2, max_buffer_bytes=0)
    with pytest.raises(ValueError, match="expected a redis:// or rediss:// URL"):
        RedisStatsSink("http://x", "m", 2, 4, 2)
    with pytest.raises(ValueError, match="writer_id"):
        sink(redis_url).open("has space")
    rec = sink(redis_url).open("w")
    with pytest.raises(ValueError, match=r"topk_ids: expected shape \[T, 3, 2\]"):
        rec.record(np.zeros((4, 3, 3), np.int32))
    with pytest.raises(ValueError, match="window: expected an integer id"):
        rec.flush(window=-1)
    rec.close()


def test_open_refuses_another_shape_under_the_prefix(redis_url):
    StatsStore.open(redis_url, model="rec-model").ensure(L, E * 2, K)
    with pytest.raises(StatsSchemaError, match="holds layers=3 experts=16 top_k=2; this writer has layers=3 experts=8"):
        sink(redis_url).open("w")


def test_shape_change_after_open_is_rejected_not_merged(redis_url, caplog):
    rec = sink(redis_url).open("w")
    store = StatsStore.open(redis_url, model="rec-model")
    store.reset()
    store.ensure(L, E * 2, K)  # someone recreated the run with another shape
    rec.record(ids_for(0))
    with caplog.at_level(logging.ERROR, logger="expertmesh.cluster.stats.recorder"):
        rec.flush(window=0)
        assert rec.wait_idle(10)
    status = rec.close()
    assert (status.rejected, status.sent, status.pending) == (1, 0, 0)
    assert "EMSHAPE" in status.last_error
    assert any("refused window 0" in r.message for r in caplog.records)
    assert store.window_ids() == []


def test_lost_reply_is_retried_and_counted_once(redis_url):
    """Redis applies the delta but the reply never arrives (timeout): the retry must not count it again."""
    rec = sink(redis_url, op_timeout_s=0.2).open("w")
    blocker = redis.Redis.from_url(redis_url)
    thread = threading.Thread(target=blocker.eval, args=(BUSY, 0, 0.8))
    thread.start()
    time.sleep(0.1)  # the server is now busy for 0.7 s more: our flush times out after 0.2 s
    rec.record(ids_for(3))
    rec.flush(window=0)
    thread.join()
    assert rec.wait_idle(10)
    status = rec.close()
    assert status.failures >= 1  # the timeout happened
    assert status.duplicates == 1 and status.sent == 0  # the first attempt was applied; the retry was a no-op
    assert_same(StatsStore.open(redis_url, model="rec-model").snapshot(), expected([ids_for(3)]))


def test_refused_for_lack_of_memory_is_kept_and_retried(redis_server_factory):
    """-OOM is transient: the deltas stay buffered (not rejected, not lost) until Redis has room again."""
    server = redis_server_factory()
    rec = sink(server.url).open("w")
    admin = redis.Redis(port=server.port)
    admin.config_set("maxmemory", 1)  # every write is refused with -OOM
    for window in range(2):
        rec.record(ids_for(window))
        rec.flush(window=window)
    deadline = time.monotonic() + 10
    while rec.status().failures < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    status = rec.status()
    assert status.failures >= 2 and status.pending == 2 and status.rejected == 0
    assert "maxmemory" in status.last_error
    admin.config_set("maxmemory", 0)
    assert rec.wait_idle(10)
    status = rec.close()
    assert (status.sent, status.rejected, status.dropped) == (2, 0, 0)
    assert_same(StatsStore.open(server.url, model="rec-model").snapshot(), expected([ids_for(0), ids_for(1)]))


def test_unreachable_redis_buffers_drops_oldest_and_catches_up(redis_server_factory, caplog):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    s = sink(url, max_buffer_windows=3, connect_timeout_s=0.2)
    with caplog.at_level(logging.WARNING, logger="expertmesh.cluster.stats.recorder"):
        rec = s.open("w")  # nobody listens: open() does not raise
        for window in range(5):
            rec.record(ids_for(window))
            started = time.perf_counter()
            rec.flush(window=window)
            assert time.perf_counter() - started < 0.1  # flush never waits for the network
        time.sleep(0.1)
        status = rec.status()
        assert status.connected is False and status.failures >= 1
        assert status.dropped == 2 and status.pending == 3
        drops = [r for r in caplog.records if "buffer full" in r.message]
        assert len(drops) == 2 and "(2 in all)" in drops[-1].getMessage()

        redis_server_factory(port=port)  # Redis comes (back)
        assert rec.wait_idle(10)
    status = rec.close()
    assert (status.sent, status.dropped, status.pending, status.connected) == (3, 2, 0, True)
    snap = StatsStore.open(url, model="rec-model").snapshot()
    assert snap.meta["windows"] == [2, 3, 4]  # the two oldest were dropped, the rest arrived exactly
    assert_same(snap, expected([ids_for(w) for w in (2, 3, 4)]))
    assert any("answers again" in r.message for r in caplog.records)


def test_close_gives_up_after_its_timeout_without_raising():
    url = f"redis://127.0.0.1:{free_port()}/0"
    rec = sink(url, connect_timeout_s=0.1).open("w")
    rec.record(ids_for(0))
    rec.flush(window=0)
    started = time.perf_counter()
    status = rec.close(timeout_s=0.3)
    assert time.perf_counter() - started < 2.0
    assert status.pending == 1 and status.sent == 0
