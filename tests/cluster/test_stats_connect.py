"""Stats URLs: redis:// and rediss://, password, db, our query options, env fallback, clear errors.

    .venv/bin/python -m pytest -q tests/cluster/test_stats_connect.py
"""

from __future__ import annotations

import pytest

from expertmesh.cluster.stats.connect import ENV_URL, StatsUnavailableError, masked, parse_target
from expertmesh.cluster.stats.keys import StatsKeys
from expertmesh.cluster.stats.store import StatsStore


def test_parse_redis_url_with_our_options():
    t = parse_target("redis://:s3cret@db.example:6380/3?model=deepseek-ai/DeepSeek-V3&run=r1&windows=16")
    assert (t.model, t.run, t.windows, t.cluster) == ("deepseek-ai/DeepSeek-V3", "r1", 16, False)
    assert t.redis_url == "redis://:s3cret@db.example:6380/3"  # our options removed, redis-py gets the rest
    assert "s3cret" not in t.display and "***" in t.display
    client = t.connect()
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == (
        "db.example",
        6380,
        3,
        "s3cret",
    )


def test_rediss_url_uses_tls_and_passes_ssl_options():
    from redis.connection import SSLConnection

    t = parse_target("rediss://user:pw@h:6379/0?model=m&ssl_cert_reqs=none")
    assert t.redis_url == "rediss://user:pw@h:6379/0?ssl_cert_reqs=none"
    pool = t.connect().connection_pool
    assert issubclass(pool.connection_class, SSLConnection)
    assert pool.connection_kwargs["username"] == "user"


def test_env_fallback_and_defaults(monkeypatch):
    monkeypatch.setenv(ENV_URL, "redis://localhost:7000/1")
    t = parse_target(None).with_overrides("m", None)
    assert (t.redis_url, t.model, t.run, t.windows) == ("redis://localhost:7000/1", "m", "default", None)
    monkeypatch.delenv(ENV_URL)
    with pytest.raises(ValueError, match=f"no Redis URL given.*{ENV_URL}"):
        parse_target(None)


@pytest.mark.parametrize(
    "url,match",
    [
        ("http://h:1/0?model=m", "expected a redis:// or rediss:// URL"),
        ("redis://h:1/zero?model=m", "database must be a number"),
        ("redis://h:1/0?model=m&windows=0", "windows: expected a positive integer"),
        ("redis://h:1/0?model=a{b}", "model: expected 1-200 characters"),
        ("redis://h:1/0?model=m&run=has space", "run: expected"),
        ("redis://h:notaport/0", "bad port"),
        ("redis:///0", "no host"),
        ("redis://h:1/2?model=m&cluster=1", "Cluster has only database 0"),
    ],
)
def test_bad_urls_name_the_field(url, match):
    with pytest.raises(ValueError, match=match):
        parse_target(url)


def test_model_is_required_for_a_store():
    with pytest.raises(ValueError, match=r"model: no model given.*--model M or add \?model=M"):
        parse_target("redis://h:1/0").require_model()


def test_password_never_in_messages():
    assert masked("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert masked("redis://h:1/0") == "redis://h:1/0"


def test_unreachable_redis_is_a_clear_error():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = StatsStore.open(f"redis://:hunter2@127.0.0.1:{port}/0?model=m", socket_connect_timeout=0.5)
    with pytest.raises(StatsUnavailableError, match=rf"cannot reach Redis at redis://:\*\*\*@127.0.0.1:{port}/0") as e:
        store.snapshot()
    assert "hunter2" not in str(e.value) and "EXPERTMESH_REDIS_URL" in str(e.value)


def test_all_keys_of_a_run_share_one_cluster_slot():
    from redis.crc import key_slot

    keys = StatsKeys("deepseek-ai/DeepSeek-V3", "train-7")
    names = [keys.meta, keys.writers, keys.index, keys.agg, keys.window(0), keys.window(2**40)]
    assert len({key_slot(n.encode()) for n in names}) == 1
    other = StatsKeys("deepseek-ai/DeepSeek-V3", "train-8")
    assert keys.meta != other.meta
