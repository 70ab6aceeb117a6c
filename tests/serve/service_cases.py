"""Helpers of the service tests: an engine and its gRPC servers on an event loop of their own thread, as
another process would be, so the tests call them through real clients over loopback."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request

from expertmesh.cluster.serve.config import EngineConfig
from expertmesh.cluster.serve.engine import Engine
from expertmesh.cluster.serve.server import Server, create_server
from expertmesh.cluster.serve.server_config import ServerConfig


class ServingThread:
    """`Engine.start(config)` on a private loop in a daemon thread; `serve(...)` puts gRPC servers before it."""

    def __init__(self, config: EngineConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="serving", daemon=True)
        self.thread.start()
        self.servers: list[Server] = []
        self.engine: Engine = self.call(Engine.start(config), timeout_s=300)

    def call(self, coro, timeout_s: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def serve(self, config: ServerConfig) -> Server:
        async def start() -> Server:
            server, _ = create_server(self.engine, config)
            await server.start()
            return server

        server = self.call(start())
        self.servers.append(server)
        return server

    def stop_server(self, server: Server) -> None:
        self.call(server.stop(0))
        self.servers.remove(server)

    def close(self) -> None:
        for server in list(self.servers):
            self.stop_server(server)
        self.call(self.engine.stop(), timeout_s=120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


def wait_for(predicate, timeout_s: float, every_s: float = 0.02) -> float:
    """Seconds until `predicate()` held; AssertionError after `timeout_s`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s} s")
        time.sleep(every_s)
    return time.monotonic() - start


def scrape(port: int) -> dict[str, float]:
    """The Prometheus text at http://127.0.0.1:port/metrics as {'name{labels}': value} (labels sorted)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            labels = ",".join(sorted(re.findall(r'\w+="[^"]*"', m.group(2) or "")))
            samples[f"{m.group(1)}{{{labels}}}" if labels else m.group(1)] = float(m.group(3))
    return samples
