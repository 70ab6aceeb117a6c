"""`expertmesh stats push/show/export/compact/reset` and `load_stats_url`, against a real redis-server.

    .venv/bin/python -m pytest -q tests/cluster/test_stats_cli.py
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from expertmesh.cluster.stats.cli import stats_app
from expertmesh.cluster.stats.connect import StatsUnavailableError
from expertmesh.cluster.stats.store import load_stats_url
from expertmesh.placement.stats import load_stats, save_stats, stats_from_trace
from expertmesh.placement.trace import Trace, save_trace

MIXTRAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "traces" / "mixtral-8x7b-decode"


def make_trace(T=95, L=4, E=16, k=2, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((T, L, E)) ** 3 * np.arange(1, E + 1), axis=2)[:, :, :k]
    return Trace(ids.astype(np.int32), np.arange(T, dtype=np.int32) // 7, E)


def same(a, b):
    return (
        a.tokens == b.tokens
        and a.top_k == b.top_k
        and np.array_equal(a.counts, b.counts)
        and np.array_equal(a.coact, b.coact)
        and np.array_equal(a.trans, b.trans)
    )


def run(*args, env=None):
    return CliRunner().invoke(stats_app, list(map(str, args)), env=env or {}, catch_exceptions=False)


@pytest.fixture
def trace_file(tmp_path):
    trace = make_trace()
    path = tmp_path / "trace.npz"
    save_trace(trace, path)
    return trace, path


def test_push_then_load_stats_url_equals_the_trace(redis_url, trace_file):
    trace, path = trace_file
    result = run("push", path, "--redis", redis_url, "--model", "tiny", "--window-tokens", 10, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["windows"] == list(range(10)) and report["tokens"] == 95 and report["created"] is True

    stats = load_stats_url(f"{redis_url}?model=tiny")
    assert same(stats, stats_from_trace(trace))
    last2 = load_stats_url(f"{redis_url}?model=tiny&windows=2")
    assert same(last2, stats_from_trace(trace.slice_tokens(80, 95)))

    # Another file continues after the newest window, with its own writer identity.
    other = make_trace(seed=1)
    save_trace(other, path.with_name("other.npz"))
    again = run("push", path.with_name("other.npz"), "--redis", redis_url, "-m", "tiny", "--window-tokens", 50,
                "--json")
    assert json.loads(again.stdout)["windows"] == [10, 11] and json.loads(again.stdout)["created"] is False
    assert load_stats_url(f"{redis_url}?model=tiny").tokens == 190


def test_url_from_the_environment_and_run_option(redis_url, trace_file):
    trace, path = trace_file
    env = {"EXPERTMESH_REDIS_URL": redis_url}
    assert run("push", path, "--model", "envm", "--run", "r9", env=env).exit_code == 0
    assert same(load_stats_url(f"{redis_url}?model=envm&run=r9"), stats_from_trace(trace))
    with pytest.raises(Exception, match="no statistics under"):
        load_stats_url(f"{redis_url}?model=envm")  # the default run is another prefix


def test_show_table_heatmap_and_json(redis_url, trace_file):
    trace, path = trace_file
    run("push", path, "--redis", redis_url, "--model", "show", "--window-tokens", 30)
    result = run("show", "--redis", f"{redis_url}?model=show")
    assert result.exit_code == 0, result.output
    assert "balancedness" in result.stderr and "windows 0..3" in result.stderr
    assert "load / layer mean" in result.stderr  # the heatmap
    assert result.stdout.startswith("layers=4 experts=16 tokens=95 balancedness_mean=")

    data = json.loads(run("show", "--redis", redis_url, "--model", "show", "--json").stdout)
    expect = stats_from_trace(trace)
    assert data["counts"] == expect.counts.tolist() and data["windows"] == [0, 1, 2, 3]
    layer0 = expect.counts[0]
    assert data["per_layer"][0]["balancedness"] == pytest.approx(layer0.mean() / layer0.max())
    assert data["per_layer"][0]["hottest"] == int(layer0.argmax())

    decayed = json.loads(run("show", "--redis", redis_url, "--model", "show", "--decayed", "--json").stdout)
    assert decayed["decayed"] is True and decayed["tokens"] < 95


def test_export_compact_reset(redis_url, trace_file, tmp_path):
    trace, path = trace_file
    run("push", path, "--redis", redis_url, "--model", "ex", "--window-tokens", 20)
    out = tmp_path / "stats.npz"
    result = run("export", "--redis", redis_url, "--model", "ex", "--out", out)
    assert result.exit_code == 0 and result.stdout.strip() == str(out)
    assert same(load_stats(out), stats_from_trace(trace))

    compacted = json.loads(run("compact", "--redis", redis_url, "--model", "ex", "--json").stdout)
    assert compacted == {"merged": 0, "folded": 0, "conflicts": 0}  # one writer: nothing to merge

    assert run("reset", "--redis", redis_url, "--model", "ex").exit_code == 2  # not interactive, no --yes
    removed = json.loads(run("reset", "--redis", redis_url, "--model", "ex", "--yes", "--json").stdout)
    # meta, writers, index, 5 window listings and their 5 blobs, the pusher's applied set, the push record
    assert removed["keys_removed"] == 3 + 5 + 5 + 1 + 1
    gone = run("show", "--redis", redis_url, "--model", "ex")
    assert gone.exit_code == 1 and "no statistics under" in gone.stderr


def test_push_statistics_file_as_one_window(redis_url, tmp_path):
    stats = stats_from_trace(make_trace(seed=3))
    path = tmp_path / "stats.npz"
    save_stats(stats, path)
    assert run("push", path, "--redis", redis_url, "--model", "st").exit_code == 0
    assert same(load_stats_url(f"{redis_url}?model=st"), stats)


def test_mismatched_data_is_refused_with_exit_1(redis_url, trace_file, tmp_path):
    _, path = trace_file
    run("push", path, "--redis", redis_url, "--model", "mm")
    other = tmp_path / "other.npz"
    save_trace(make_trace(E=32), other)
    result = run("push", other, "--redis", redis_url, "--model", "mm")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "experts=16" in result.stderr and "experts=32" in result.stderr and "EMSHAPE" not in result.stderr
    assert load_stats_url(f"{redis_url}?model=mm").num_experts == 16  # nothing merged

    import redis

    redis.Redis.from_url(redis_url).set("expertmesh:{foreign:default}:meta", "x")
    result = run("show", "--redis", redis_url, "--model", "foreign")
    assert result.exit_code == 1 and "not an expertmesh" in result.stderr


def test_usage_and_unreachable_errors(redis_url, trace_file):
    _, path = trace_file
    no_model = run("show", "--redis", redis_url)
    assert no_model.exit_code == 2 and "--model" in no_model.output
    assert run("show", "--redis", "http://nope", "--model", "m").exit_code == 2
    missing = run("push", "/nonexistent/trace.npz", "--redis", redis_url, "--model", "m")
    assert missing.exit_code == 2 and "no such" in missing.stderr  # invalid input, not a failure

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = run("show", "--redis", f"redis://:pw@127.0.0.1:{port}/0", "--model", "m")
    assert down.exit_code == 1 and "cannot reach Redis" in down.stderr and ":pw@" not in down.stderr
    with pytest.raises(StatsUnavailableError):
        load_stats_url(f"redis://127.0.0.1:{port}/0?model=m")


@pytest.mark.skipif(not MIXTRAL.exists(), reason="real Mixtral routing logs not on this machine")
def test_real_mixtral_router_logs_round_trip(redis_url):
    from expertmesh.placement.sources import load_routing

    trace = load_routing(MIXTRAL, num_experts=8)
    result = run("push", MIXTRAL, "--redis", redis_url, "--model", "mixtral-8x7b", "--window-tokens", 128,
                 "--num-experts", 8)
    assert result.exit_code == 0, result.output
    assert same(load_stats_url(f"{redis_url}?model=mixtral-8x7b"), stats_from_trace(trace))
