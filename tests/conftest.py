"""Shared fixtures: a private, real `redis-server` on a free port (no fakeredis anywhere), one local Ray
cluster, and a tiny served model.

    redis_server          session-scoped handle: .url, .port, .kill() (SIGKILL), .restart() (same port)
    redis_url             function-scoped: the server's URL, server alive and database empty for every test
    redis_server_factory  function-scoped: start extra private servers, e.g. durable=True (AOF, fsync always)
                          for tests that kill Redis and expect acknowledged writes to survive the restart
    ray_cluster           session: `ray.init(num_cpus=4)` once for every test that starts workers
    served_model          session: `write_tiny_model`'s folder (tokenizer.json, config.json) with real random
                          weights written by `transformers` (fp32), and that `transformers` model (eval)

`make test` installs redis-server when it is missing; without it these fixtures skip with that advice.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# `python -m pytest` puts the repository root on sys.path, where our source folders would shadow installed
# packages of the same name (transformers imports Hugging Face's `kernels` package, and found ours). The
# code under test is imported as `expertmesh.*` through the install, never from the root.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if p not in ("", ".") and Path(p or ".").resolve() != _ROOT]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process in its own directory, on 127.0.0.1:`port`."""

    def __init__(
        self, workdir: Path, port: int | None = None, durable: bool = False, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.skip(
                "redis-server is not installed: `make test` installs it (or apt-get install redis-server)"
            )
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.durable = durable
        self.extra_args = list(extra_args)  # e.g. --requirepass, --tls-port (the plain port stays for ping)
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _args(self) -> list[str]:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.workdir / "redis.log"),
        ]
        if self.durable:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        return args + self.extra_args

    def start(self, timeout_s: float = 10.0) -> None:
        self.proc = subprocess.Popen(self._args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode} on port {self.port}:\n{log}"
                )
            if self.ping():
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s} s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # alive, maybe password-protected
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown save, connections cut mid-command."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self) -> None:
        """Start again on the same port (after kill(), or kills first)."""
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    if not redis_server.alive():
        redis_server.start()
    import redis

    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
def redis_server_factory(tmp_path):
    started: list[RedisServer] = []

    def make(durable: bool = False, port: int | None = None, extra_args: tuple[str, ...] = ()) -> RedisServer:
        server = RedisServer(
            tmp_path / f"redis-{len(started)}", port=port, durable=durable, extra_args=extra_args
        )
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@dataclass(frozen=True)
class ServedModel:
    path: Path
    reference: object  # the transformers model of the checkpoint


@pytest.fixture(scope="session")
def served_model(tmp_path_factory) -> ServedModel:
    import torch
    import transformers

    from expertmesh.cluster.serve.tiny import write_tiny_model

    path = write_tiny_model(tmp_path_factory.mktemp("served") / "tiny")
    config = transformers.AutoConfig.from_pretrained(path)
    torch.manual_seed(11)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # the default 0.02 init gives near-uniform logits: greedy ties would be coin flips
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    model.save_pretrained(path)  # config.json again (same fields), generation_config.json, model.safetensors
    return ServedModel(path, model.eval())
