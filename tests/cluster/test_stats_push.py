"""`stats push` counts a file once: a second push is a no-op, a push that stopped resumes, --replace and
--append say otherwise; against a real redis-server.

    .venv/bin/python -m pytest -q tests/cluster/test_stats_push.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from expertmesh.cluster.stats.cli import stats_app
from expertmesh.cluster.stats.connect import StatsUnavailableError
from expertmesh.cluster.stats.push import push_routing, source_id
from expertmesh.cluster.stats.store import StatsStore, load_stats_url
from expertmesh.placement.stats import save_stats, stats_from_trace
from expertmesh.placement.trace import Trace, save_trace


def make_trace(T=95, L=4, E=16, k=2, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((T, L, E)) ** 3 * np.arange(1, E + 1), axis=2)[:, :, :k]
    return Trace(ids.astype(np.int32), np.arange(T, dtype=np.int32) // 7, E)


def run(*args):
    return CliRunner().invoke(stats_app, list(map(str, args)), catch_exceptions=False)


def push(path, url, *extra):
    result = run("push", path, "--redis", url, "--model", "m", *extra, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def same(stats, trace):
    want = stats_from_trace(trace)
    return (stats.tokens == want.tokens and np.array_equal(stats.counts, want.counts)
            and np.array_equal(stats.coact, want.coact) and np.array_equal(stats.trans, want.trans))


@pytest.fixture
def trace_file(tmp_path):
    trace = make_trace()
    save_trace(trace, tmp_path / "trace.npz")
    return trace, tmp_path / "trace.npz"


def test_pushing_the_same_file_twice_counts_it_once(redis_url, trace_file):
    trace, path = trace_file
    first = push(path, redis_url, "--window-tokens", 10)
    again = run("push", path, "--redis", redis_url, "--model", "m", "--window-tokens", 10)
    assert again.exit_code == 0
    assert same(load_stats_url(f"{redis_url}?model=m"), trace)  # 95 tokens, not 190
    assert (first["action"], first["windows"], first["written"]) == ("pushed", list(range(10)), list(range(10)))
    assert "already pushed" in again.stderr and "nothing written" in again.stderr and "--append" in again.stderr
    # The same tokens under another name or format are the same source.
    copy = path.with_name("copy.npz")
    save_trace(trace, copy)
    assert push(copy, redis_url)["action"] == "already pushed"
    assert load_stats_url(f"{redis_url}?model=m").tokens == 95
    # Another run is another place: the file is pushed there.
    assert push(path, f"{redis_url}?run=r2")["action"] == "pushed"


def test_append_counts_again_and_replace_pushes_anew_in_place_of_the_old_windows(redis_url, trace_file):
    trace, path = trace_file
    push(path, redis_url, "--window-tokens", 10)
    appended = push(path, redis_url, "--append", "--window-tokens", 50)
    assert (appended["action"], appended["windows"], appended["pushes"]) == ("appended", [10, 11], 2)
    assert load_stats_url(f"{redis_url}?model=m").tokens == 190

    replaced = push(path, redis_url, "--replace", "--window-tokens", 30)
    assert (replaced["action"], replaced["windows"], replaced["pushes"]) == ("replaced", [12, 13, 14, 15], 1)
    stats = load_stats_url(f"{redis_url}?model=m")
    assert same(stats, trace) and stats.meta["windows"] == [12, 13, 14, 15]  # the old windows are gone
    assert push(path, redis_url)["action"] == "already pushed"
    both = run("push", path, "--redis", redis_url, "--model", "m", "--replace", "--append")
    assert both.exit_code == 2 and both.stderr == "error: --replace and --append: give at most one\n"


def test_a_push_that_stopped_half_way_resumes_from_the_last_whole_window(redis_server_factory, trace_file):
    trace, path = trace_file
    server = redis_server_factory(durable=True)  # acknowledged windows survive the kill
    store = StatsStore.open(f"{server.url}?model=m")

    def kill_after_4(i, n):
        if i == 4:
            server.kill()

    with pytest.raises(StatsUnavailableError):
        push_routing(store, trace, 10, progress=kill_after_4)
    server.restart()
    resumed = push(path, server.url)
    assert resumed["action"] == "resumed" and resumed["windows"] == list(range(10))
    assert resumed["written"] == list(range(4, 10))
    assert same(load_stats_url(f"{server.url}?model=m"), trace)

    # A window written but not yet recorded (a crash between the two) is sent again and counted once.
    import redis

    client = redis.Redis.from_url(server.url)
    sources = "expertmesh:{m:default}:sources"
    record = json.loads(client.hget(sources, source_id(trace)))
    record["pushes"][-1]["done"] = 7
    client.hset(sources, source_id(trace), json.dumps(record))
    again = push(path, server.url)
    assert again["action"] == "resumed" and again["written"] == [7, 8, 9]
    assert same(load_stats_url(f"{server.url}?model=m"), trace)
    # Resuming with another windowing would not add up: refused, naming the flag.
    record["pushes"][-1]["done"] = 7
    client.hset(sources, source_id(trace), json.dumps(record))
    other = run("push", path, "--redis", server.url, "--model", "m", "--window-tokens", 20)
    assert other.exit_code == 2 and "window_tokens: " in other.stderr and "10 tokens per window" in other.stderr


def test_the_cli_says_how_to_resume_when_redis_goes_away(redis_server_factory, trace_file, monkeypatch):
    trace, path = trace_file
    server = redis_server_factory(durable=True)
    import expertmesh.cluster.stats.push as push_module

    real = push_module._window

    def window_then_die(routing, window_tokens, i):
        if i == 3:
            server.kill()
        return real(routing, window_tokens, i)

    monkeypatch.setattr(push_module, "_window", window_then_die)
    result = run("push", path, "--redis", server.url, "--model", "m", "--window-tokens", 10)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "3 of 10 windows written: run the same command again" in result.stderr
    monkeypatch.setattr(push_module, "_window", real)
    server.restart()
    again = run("push", path, "--redis", server.url, "--model", "m", "--window-tokens", 10)
    assert again.exit_code == 0 and "windows 0..2 were written before; wrote 3..9" in again.stderr
    assert same(load_stats_url(f"{server.url}?model=m"), trace)


def test_replace_refuses_when_compaction_folded_the_old_push(redis_url, trace_file, tmp_path):
    trace, path = trace_file
    push(path, redis_url, "--window-tokens", 10, "--keep", 2)  # 10 windows, 2 kept: 8 fold away
    other = make_trace(seed=5)
    save_trace(other, tmp_path / "other.npz")
    push(tmp_path / "other.npz", redis_url, "--window-tokens", 10)
    assert run("compact", "--redis", redis_url, "--model", "m").exit_code == 0
    before = load_stats_url(f"{redis_url}?model=m&windows=2")
    result = run("push", path, "--redis", redis_url, "--model", "m", "--replace")
    assert result.exit_code == 1 and "cannot replace" in result.stderr and "nothing was removed" in result.stderr
    after = load_stats_url(f"{redis_url}?model=m&windows=2")
    assert after.tokens == before.tokens and np.array_equal(after.counts, before.counts)


def test_statistics_files_and_count_matrices_push_once(redis_url, tmp_path):
    stats = stats_from_trace(make_trace(seed=3))
    save_stats(stats, tmp_path / "stats.npz")
    assert push(tmp_path / "stats.npz", redis_url)["action"] == "pushed"
    assert push(tmp_path / "stats.npz", redis_url)["action"] == "already pushed"
    assert load_stats_url(f"{redis_url}?model=m").tokens == stats.tokens

    # Count matrices do not record k: --top-k, which the advice names, exists on stats push.
    counts = tmp_path / "counts.json"
    counts.write_text(json.dumps({"counts": stats.counts.tolist()}))
    bare = run("push", counts, "--redis", redis_url, "--model", "c")
    assert bare.exit_code == 2 and "--top-k" in bare.stderr
    result = run("push", counts, "--redis", redis_url, "--model", "c", "--top-k", 2)
    assert result.exit_code == 0, result.output
    assert np.array_equal(load_stats_url(f"{redis_url}?model=c").counts, stats.counts)


def test_empty_input_is_refused(redis_url, tmp_path):
    save_trace(Trace(np.zeros((0, 4, 2), np.int32), np.zeros(0, np.int32), 16), tmp_path / "empty.npz")
    result = run("push", tmp_path / "empty.npz", "--redis", redis_url, "--model", "m")
    assert result.exit_code == 2 and "holds no tokens" in result.stderr
    assert StatsStore.open(f"{redis_url}?model=m").header() is None  # nothing created


def test_options_that_cannot_apply_are_named(redis_url, trace_file, tmp_path):
    _, path = trace_file
    push(path, redis_url, "--keep", 5)
    other = tmp_path / "other.npz"
    save_trace(make_trace(seed=9), other)
    later = run("push", other, "--redis", redis_url, "--model", "m", "--keep", 9, "--decay", 0.5)
    assert later.exit_code == 0
    assert "warning: --keep 9 applies when a push creates the store; this one was created before with --keep 5" \
        in later.stderr and "--decay 0.5" in later.stderr
    k = run("push", path, "--redis", redis_url, "--model", "m", "--top-k", 3)
    assert k.exit_code == 2 and "top_k: the file records 2, but 3 was passed" in k.stderr
