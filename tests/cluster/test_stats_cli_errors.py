"""What a user who gets something wrong sees from `expertmesh stats` and `--stats redis://...`: one line,
`error: <message>` on stderr, exit 1 (failure) or 2 (usage or invalid input); against a real redis-server.

    .venv/bin/python -m pytest -q tests/cluster/test_stats_cli_errors.py
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from expertmesh.cluster.stats.cli import stats_app
from expertmesh.cluster.stats.connect import StatsEndpointError, parse_target
from expertmesh.cluster.stats.store import load_stats_url
from expertmesh.placement.trace import Trace, save_trace

EXPERTMESH = Path(sys.executable).with_name("expertmesh")


def run(*args, env=None):
    return CliRunner().invoke(stats_app, list(map(str, args)), env=env or {}, catch_exceptions=False)


def expertmesh(*args, timeout=60):
    """The installed command, as a user runs it (tracebacks and rich boxes would show here)."""
    env = {k: v for k, v in os.environ.items() if k != "EXPERTMESH_REDIS_URL"} | {"COLUMNS": "80"}
    return subprocess.run([str(EXPERTMESH), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)


def one_error_line(stderr: str) -> str:
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "Error" not in stderr and "Traceback" not in stderr and "╭" not in stderr, stderr
    return stderr


@pytest.fixture
def not_redis():
    """A TCP server on a free port that answers every connection like a web server."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    stop.set()
    thread.join()
    server.close()


def test_a_port_that_is_not_redis_is_one_line_and_exit_2(not_redis):
    result = expertmesh("stats", "show", "--redis", not_redis, "--model", "m")
    assert result.returncode == 2
    assert "does not answer as Redis" in one_error_line(result.stderr)
    planned = expertmesh("plan", "--stats", f"{not_redis}?model=m", "--gpus", 4)
    assert planned.returncode == 2 and "does not answer as Redis" in planned.stderr
    assert planned.stderr.count("\n") == 1
    with pytest.raises(StatsEndpointError, match="does not answer as Redis"):
        load_stats_url(f"{not_redis}?model=m")


def test_rediss_against_a_plain_server_fails_fast_saying_tls_was_refused(redis_url):
    tls_url = redis_url.replace("redis://", "rediss://")
    started = time.monotonic()
    result = run("show", "--redis", tls_url, "--model", "m")
    elapsed = time.monotonic() - started
    assert result.exit_code == 2
    assert "TLS refused (no TLS handshake within 2 s)" in one_error_line(result.stderr)
    assert elapsed < 10, f"took {elapsed:.1f} s: the handshake should give up at the connect timeout (2 s)"


def test_tls_server_with_an_untrusted_certificate_says_so(redis_server_factory, tmp_path):
    if subprocess.run(["which", "openssl"], capture_output=True).returncode:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        redis_server_factory(extra_args=("--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file",
                                         str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"))
    except RuntimeError as exc:
        pytest.skip(f"this redis-server has no TLS support: {exc}")
    result = run("show", "--redis", f"rediss://127.0.0.1:{port}/0", "--model", "m")
    assert result.exit_code == 2
    assert "certificate is not trusted" in one_error_line(result.stderr) and "ssl_ca_certs" in result.stderr
    trusted = run("show", "--redis", f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}", "--model", "m")
    assert trusted.exit_code == 1 and "no statistics under" in trusted.stderr  # reached: only empty


@pytest.mark.parametrize(
    "query,match",
    [
        ("model=m&bogus=1", "unknown query parameter 'bogus'"),
        ("model=m&socket_timeout=soon", "Invalid value for 'socket_timeout'"),
        ("model=m&cluster=maybe", "cluster: expected 1/true/yes or 0/false/no, got 'maybe'"),
        ("model=m&windows=-3", "windows: expected a positive integer, got '-3'"),
        ("model=has space", "model: expected 1-200 characters"),
        ("model=m&cluster=1", "is a single Redis, not a Redis Cluster: remove ?cluster=1"),
    ],
)
def test_bad_url_query_is_one_line_naming_the_parameter_and_exit_2(redis_url, query, match):
    result = run("show", "--redis", f"{redis_url}?{query}")
    assert result.exit_code == 2 and match in one_error_line(result.stderr)
    with pytest.raises(ValueError, match=re.escape(match)):
        load_stats_url(f"{redis_url}?{query}")


def test_bad_urls_through_the_installed_command_exit_2_in_one_line(redis_url):
    for url in (f"{redis_url}?model=m&bogus=1", "redis://h:port/0?model=m"):
        result = expertmesh("stats", "show", "--redis", url)
        assert result.returncode == 2, result.stderr
        one_error_line(result.stderr)
        planned = expertmesh("plan", "--stats", url, "--gpus", 4)
        assert planned.returncode == 2 and planned.stderr.count("\n") == 1, planned.stderr


@pytest.mark.parametrize(
    "args,code,match",
    [
        (["show"], 2, "model: no model given"),
        (["push", "TRACE", "--window-tokens", "abc"], 2, "'--window-tokens'"),
        (["push", "TRACE", "--window-tokens", "0"], 2, "'--window-tokens'"),
        (["push"], 2, "Missing argument 'TRACE'"),
        (["push", "TRACE", "-m", "m", "--decay", "0"], 2, "decay: expected a factor in (0, 1]"),
        (["show", "--bogus"], 2, "No such option: --bogus"),
        (["show", "--width", "3"], 2, "'--width'"),
        (["nosuch"], 2, "No such command 'nosuch'"),
        (["compact", "--model", "nobody"], 1, "no statistics under"),
        (["reset", "--model", "nobody", "--yes"], 1, "no statistics under"),
        (["reset", "--model", "nobody"], 2, "--yes: refusing to delete without it when not interactive"),
        (["export", "--model", "m", "--out", "/nonexistent/dir/s.npz"], 2, "folder '/nonexistent/dir' does not"),
        (["export", "--model", "m", "--out", "stats"], 2, "expected a path ending in .npz"),
        (["push", "/nonexistent.npz", "--model", "m"], 2, "no such file"),
    ],
)
def test_usage_and_input_errors_are_one_line_with_the_documented_exit_code(redis_url, tmp_path, args, code, match):
    trace = tmp_path / "trace.npz"
    save_trace(Trace(np.zeros((5, 2, 2), np.int32) + [0, 1], np.zeros(5, np.int32), 4), trace)
    args = [str(trace) if a == "TRACE" else a for a in args]
    result = run(*args, env={"EXPERTMESH_REDIS_URL": redis_url})
    assert result.exit_code == code, result.output
    assert match in one_error_line(result.stderr)


def test_compact_of_an_unknown_model_is_not_a_success(redis_url):
    result = expertmesh("stats", "compact", "--redis", f"{redis_url}?model=typo")
    assert result.returncode == 1 and "no statistics under" in one_error_line(result.stderr)
    assert result.stdout == ""


def test_help_of_the_stats_commands_reads_cleanly_at_80_columns():
    for command in ("push", "show", "export", "compact", "reset"):
        text = run(command, "--help", env={"COLUMNS": "80"}).stdout
        text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())  # the words, as wrapped into rich's panels
        assert not re.search(r"\w \.( |$)", text), (command, text)  # "[default: x]" in help text, eaten as markup
        assert "<bool>" not in text and "<str>" not in text, (command, text)
        assert "…" not in text, (command, text)  # nothing truncated
        assert "redis://host:6379/0" in text and "(default: default)" in text
    push = run("push", "--help", env={"COLUMNS": "80"}).stdout
    assert "TRACE" in push and "{trace}" not in push and "--top-k" in push and "--replace" in push


def test_a_redis_url_needs_no_server_to_be_checked():
    """Checking the query sends nothing: it works with nothing listening."""
    target = parse_target("redis://127.0.0.1:1/0?model=m&socket_timeout=5&health_check_interval=10")
    assert target.redis_url == "redis://127.0.0.1:1/0?socket_timeout=5&health_check_interval=10"
    with pytest.raises(ValueError, match="unknown query parameter 'sockettimeout'"):
        parse_target("redis://127.0.0.1:1/0?model=m&sockettimeout=5")


@pytest.fixture
def silent_port():
    """A port that accepts connections and never says anything."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    server.close()


def test_a_port_that_never_answers_fails_in_seconds(silent_port):
    started = time.monotonic()
    result = run("show", "--redis", silent_port, "--model", "m")
    elapsed = time.monotonic() - started
    assert result.exit_code == 1 and "did not answer within 2 s" in one_error_line(result.stderr)
    assert elapsed < 10, f"took {elapsed:.1f} s: the first contact should give up after 2 s, not the 30 s read timeout"


def test_credentials_and_database_in_the_url_are_named(redis_server_factory, redis_url):
    server = redis_server_factory(extra_args=("--requirepass", "s3cret"))
    bare = run("show", "--redis", server.url, "--model", "m")
    assert bare.exit_code == 2 and "no password was given" in one_error_line(bare.stderr)
    wrong = run("show", "--redis", server.url.replace("redis://", "redis://:nope@"), "--model", "m")
    assert wrong.exit_code == 2 and "refused the credentials" in one_error_line(wrong.stderr)
    assert "nope" not in wrong.stderr
    right = run("show", "--redis", server.url.replace("redis://", "redis://:s3cret@"), "--model", "m")
    assert right.exit_code == 1 and "no statistics under" in right.stderr
    db = run("show", "--redis", redis_url.replace("/0", "/99"), "--model", "m")
    assert db.exit_code == 2 and "no such database on this server" in one_error_line(db.stderr)


def test_contradicting_or_empty_input_is_refused_before_anything_is_read(redis_url, tmp_path):
    env = {"EXPERTMESH_REDIS_URL": redis_url}
    both = run("show", "--model", "m", "--windows", 3, "--decayed", env=env)
    assert both.exit_code == 2 and "--windows and --decayed" in one_error_line(both.stderr)
    (tmp_path / "empty.npz").write_bytes(b"")
    empty = run("push", tmp_path / "empty.npz", "--model", "m", env=env)
    assert empty.exit_code == 2 and "empty file" in one_error_line(empty.stderr)


def test_statistics_with_no_tokens_are_not_planned_from(redis_url):
    from expertmesh.cluster.stats.store import StatsStore
    from expertmesh.cluster.stats.window import WindowCounts

    store = StatsStore.open(f"{redis_url}?model=idle")
    store.write(0, WindowCounts.zeros(2, 4, 2), header=store.ensure(2, 4, 2), writer="w", seq=1)
    with pytest.raises(Exception, match="no tokens under .* nothing to plan from"):
        load_stats_url(f"{redis_url}?model=idle")
