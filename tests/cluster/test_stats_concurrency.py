"""Acceptance: concurrent writer processes, writers killed mid-flush, Redis killed and restarted mid-flush.

    .venv/bin/python -m pytest -q tests/cluster/test_stats_concurrency.py
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from expertmesh.cluster.stats.counting import WindowAccumulator
from expertmesh.cluster.stats.store import StatsStore

sys.path.insert(0, str(Path(__file__).parent))
from stats_writer_proc import step_ids  # noqa: E402

SCRIPT = Path(__file__).with_name("stats_writer_proc.py")
pytestmark = pytest.mark.slow


def start_writers(url, model, writers, windows, **opts):
    args = []
    for key, value in opts.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), url, model, str(w), str(windows), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(writers)
    ]


def finish(procs, timeout=120, logs=None):
    statuses = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"writer raised into its caller:\n{err[-3000:]}"
        statuses.append(json.loads(out))
        if logs is not None:
            logs.append(err)
    return statuses


def expected_sum(writers, windows, tokens=8, layers=4, experts=16, top_k=2):
    acc = WindowAccumulator(layers, experts, top_k)
    for w in writers:
        for window in windows(w):
            acc.add(step_ids(w, window, tokens, layers, experts, top_k))
    return acc.take().to_stats()


def assert_same(a, b):
    assert a.tokens == b.tokens
    for name in ("counts", "coact", "trans"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_eight_writers_two_hundred_windows_sum_exactly(redis_url):
    procs = start_writers(redis_url, "conc", writers=8, windows=200)
    statuses = finish(procs)
    assert all(s["sent"] == 200 and s["dropped"] == 0 and s["rejected"] == 0 for s in statuses)
    store = StatsStore.open(redis_url, model="conc")
    snap = store.snapshot()
    assert snap.meta["windows"] == list(range(200))
    assert set(snap.meta["deltas"].values()) == {8}  # every window holds all 8 writers' deltas
    want = expected_sum(range(8), lambda w: range(200))
    assert_same(snap, want)
    assert store.compact()["merged"] == 200
    assert_same(store.snapshot(), want)


def test_writer_cut_off_mid_command_leaves_nothing(redis_url):
    """The connection dies half-way through sending a flush: Redis never runs it, nothing is visible."""
    store = StatsStore.open(redis_url, model="cut")
    header = store.ensure(4, 16, 2)
    ids = step_ids(0, 0, 64, 4, 16, 2)
    acc = WindowAccumulator(4, 16, 2)
    acc.add(ids)
    from expertmesh.cluster.stats.codec import encode_window

    blob = encode_window(acc.take())
    stage, flush = store.flush_commands(header, 0, blob, "w/x", 1)
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(resp(stage)[:-40])  # everything but the end of the staged blob
    time.sleep(0.1)
    with socket.create_connection(("127.0.0.1", port)) as s:  # staged whole, the connection dies before the script
        s.sendall(resp(stage))
        assert s.recv(100) == b"+OK\r\n"
    assert store.window_ids() == []
    assert not store.client.exists(store.keys.window(0))
    assert store.client.ttl(stage[1]) > 0  # the orphaned stage key goes away by itself
    with socket.create_connection(("127.0.0.1", port)) as s:  # the pair whole does apply
        s.sendall(resp(stage) + resp(flush))
        assert s.recv(100) == b"+OK\r\n$2\r\nok\r\n"
    assert store.snapshot().tokens == 64
    assert not store.client.exists(stage[1])


def resp(command: tuple) -> bytes:
    """One command in Redis's wire format (RESP)."""
    parts = [b"*%d\r\n" % len(command)]
    for a in command:
        a = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)


def test_writer_killed_mid_flush_leaves_only_whole_deltas(redis_url):
    """SIGKILL a writer flushing DeepSeek-like windows: the store holds exactly its first n deltas."""
    layers, experts, top_k, tokens = 8, 64, 4, 512  # ~100 KiB per delta: the kill lands mid-send
    procs = start_writers(
        redis_url,
        "killed",
        writers=1,
        windows=400,
        tokens=tokens,
        layers=layers,
        experts=experts,
        top_k=top_k,
    )
    store = StatsStore.open(redis_url, model="killed")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if len(store.window_ids()) >= 5:
                break
        except Exception:  # noqa: BLE001 - not started yet
            pass
        time.sleep(0.01)
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(10)
    floors = {k.decode(): int(v) for k, v in store.client.hgetall(store.keys.writers).items()}
    assert len(floors) == 1 and next(iter(floors)).startswith("w0/")
    writer, floor = next(iter(floors.items()))
    # Applied: every seq below the floor (this writer dropped nothing) and the recorded ones above it.
    above = [int(m) for m in store.client.zrange(store.keys.applied(writer), 0, -1)]
    seqs = sorted(set(range(1, floor)) | set(above))
    assert seqs == list(range(1, len(seqs) + 1))  # a whole prefix of the writer's deltas, nothing partial
    windows = [s - 1 for s in seqs][-256:]  # seq n is window n - 1 in this writer; the store keeps 256
    snap = store.snapshot()
    assert snap.meta["windows"] == windows
    assert_same(snap, expected_sum([0], lambda w: windows, tokens, layers, experts, top_k))


def test_redis_killed_and_restarted_while_writers_flush(redis_server_factory):
    server = redis_server_factory(durable=True)  # AOF, fsync always: acknowledged deltas survive the kill
    procs = start_writers(server.url, "restart", writers=4, windows=120, sleep=0.01)
    store = StatsStore.open(server.url, model="restart", socket_connect_timeout=1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # every writer has delivered something: all are mid-run
        try:
            if store.client.hlen(store.keys.writers) == 4:
                break
        except Exception:  # noqa: BLE001 - writers still starting
            pass
        time.sleep(0.01)
    delivered = store.snapshot().tokens
    server.kill()
    time.sleep(0.5)
    server.start()
    logs: list[str] = []
    statuses = finish(procs, logs=logs)
    assert delivered < 4 * 120 * 8  # Redis died while windows were still being flushed
    assert sum(s["failures"] for s in statuses) >= 1  # and the writers ran into the outage
    assert all(s["pending"] == 0 and s["dropped"] == 0 and s["rejected"] == 0 for s in statuses)
    assert all(s["sent"] + s["duplicates"] == 120 for s in statuses)
    snap = StatsStore.open(server.url, model="restart").snapshot()
    short = {
        w: sorted(k.decode() for k in store.client.hkeys(store.keys.window(int(w))))
        for w, n in snap.meta["deltas"].items()
        if n != 4
    }
    assert not short, f"windows missing deltas: {short}\nstatuses {statuses}\nlogs {logs}"
    assert_same(snap, expected_sum(range(4), lambda w: range(120)))
    assert set(snap.meta["deltas"].values()) == {4}


def test_redis_restart_without_persistence_loses_data_but_never_double_counts(redis_server_factory):
    """An in-memory Redis restarts empty; writers recreate the header and later windows arrive once."""
    server = redis_server_factory(durable=False)
    url = server.url
    store = StatsStore.open(url, model="volatile")
    from expertmesh.cluster.stats.recorder import RedisStatsSink

    rec = RedisStatsSink(url, "volatile", 4, 16, 2, min_backoff_s=0.01, max_backoff_s=0.05).open("w")
    for window in range(3):
        rec.record(step_ids(0, window, 8, 4, 16, 2))
        rec.flush(window=window)
    assert rec.wait_idle(10)
    server.restart()
    for window in range(3, 6):
        rec.record(step_ids(0, window, 8, 4, 16, 2))
        rec.flush(window=window)
    assert rec.wait_idle(10)
    rec.close()
    snap = store.snapshot()
    assert snap.meta["windows"] == [3, 4, 5]
    assert_same(snap, expected_sum([0], lambda w: range(3, 6)))
    assert redis.Redis.from_url(url).hget(store.keys.meta, "layers") == b"4"
