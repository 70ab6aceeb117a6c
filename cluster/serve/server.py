"""The gRPC server in front of an engine: Inference and Admin, health, reflection, metrics, drain.

    server, port = create_server(engine, ServerConfig(port=0))
    await server.start()
    ...
    await server.drain(grace_s=30)      # health NOT_SERVING, new calls UNAVAILABLE, running streams finish
    await server.stop()

`serve(engine, config)` is the process's loop: start, wait for SIGTERM or SIGINT, drain for the grace
period (a second signal cuts it short), stop. Health (`grpc.health.v1`) reports the engine's readiness for
"" and `expertmesh.v1.InferenceService`: NOT_SERVING until every replica is ready, while a failed group is
re-created, and from the start of a drain on. `expertmesh.v1.AdminService` is SERVING while the process is
up (until the drain), so operators can read the state of a server that is not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from expertmesh.protos.v1 import admin_pb2_grpc, inference_pb2_grpc

from .auth import BearerTokenInterceptor
from .exporter import ServiceMetrics, start_metrics_server
from .server_config import ServerConfig, read_pem
from .service import SERVICE_NAMES, AdminServicer, InferenceServicer

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["Server", "create_server", "serve", "HEALTH_POLL_S"]

log = logging.getLogger(__name__)

HEALTH_POLL_S = 0.2  # how soon health follows the engine's readiness
_SERVING, _NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
_INFERENCE, _ADMIN = SERVICE_NAMES


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    tls = config.tls
    if tls is None:
        return None
    chain = read_pem("server.tls.cert", tls.cert)
    key = read_pem("server.tls.key", tls.key)
    ca = read_pem("server.tls.client_ca", tls.client_ca)
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=ca, require_client_auth=ca is not None)


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address and not address.startswith("[") else f"{address}:{port}"


class Server:
    """One `grpc.aio` server and the pieces that live beside it (health watcher, metrics port, drain)."""

    def __init__(self, engine: Engine, config: ServerConfig, metrics: ServiceMetrics) -> None:
        self.engine, self.config, self.metrics = engine, config, metrics
        interceptors = [BearerTokenInterceptor(config.token, metrics)] if config.token else []
        size = config.max_message_bytes
        options = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
                   ("grpc.so_reuseport", 0)]  # a second server on the same port fails instead of sharing it
        self.grpc = grpc.aio.server(interceptors=interceptors, options=options,
                                    maximum_concurrent_rpcs=config.max_concurrent_rpcs)
        self.health = health.aio.HealthServicer()
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(engine, metrics), self.grpc)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(engine, metrics, self.begin_drain),
                                                          self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.grpc)
        address = _host_port(config.address, config.port)
        credentials = _credentials(config)
        try:
            self.port = (self.grpc.add_secure_port(address, credentials) if credentials is not None
                         else self.grpc.add_insecure_port(address))
        except RuntimeError as exc:
            raise OSError(f"server.port: cannot listen on {address} ({exc})") from None
        self.metrics_port: int | None = None
        self._http = None
        self._watcher: asyncio.Task | None = None
        self._drain: asyncio.Task | None = None

    async def start(self) -> None:
        await self.health.set("", _NOT_SERVING)
        await self.health.set(_INFERENCE, _NOT_SERVING)
        await self.health.set(_ADMIN, _SERVING)
        await self.grpc.start()
        if self.config.metrics_port is not None:
            self._http, self.metrics_port = start_metrics_server(self.config.address, self.config.metrics_port,
                                                                 self.metrics.registry)
        self._watcher = asyncio.create_task(self._follow_readiness(), name="health")

    async def _follow_readiness(self) -> None:
        serving = None
        while True:
            try:
                status = self.engine.status()
                ready = status.ready and not status.draining
            except Exception:  # noqa: BLE001 - an engine that cannot say it is ready is not
                ready = False
            if ready != serving:
                for name in ("", _INFERENCE):
                    await self.health.set(name, _SERVING if ready else _NOT_SERVING)
                serving = ready
            await asyncio.sleep(HEALTH_POLL_S)

    def begin_drain(self, grace_s: float | None = None) -> asyncio.Task:
        """Start draining (once; later calls return the same task): health NOT_SERVING at once, the engine
        refuses new requests and gives running ones `grace_s` (default: the config's) to finish."""
        if self._drain is None:
            grace = self.config.grace_s if grace_s is None else grace_s
            self._drain = asyncio.create_task(self._drain_for(grace), name="drain")
        return self._drain

    async def _drain_for(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        log.info("draining: new requests refused, running ones have %.1f s", grace_s)
        await self.engine.drain(grace_s)

    async def drain(self, grace_s: float | None = None) -> None:
        await self.begin_drain(grace_s)

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop listening; calls still open get `grace_s` to end (the engine itself is the caller's to stop)."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.grpc.stop(grace_s)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def create_server(engine: Engine, config: ServerConfig) -> tuple[Server, int]:
    """A server bound to `config.address:config.port` (not started), and the port it got; its metrics port
    serves the engine's registry beside the service's counter."""
    server = Server(engine, config, ServiceMetrics(engine.metrics.registry))
    return server, server.port


async def serve(engine: Engine, config: ServerConfig, started=None) -> None:
    """Serve until SIGTERM or SIGINT, then drain for `config.grace_s` (a second signal stops at once) and stop.

    started(server): called once the server listens (the CLI prints the address).
    """
    server, _ = create_server(engine, config)
    await server.start()
    loop = asyncio.get_running_loop()
    signals = asyncio.Queue()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    try:
        if started is not None:
            started(server)
        log.info("received %s", (await signals.get()).name)
        drain = server.begin_drain()
        second = asyncio.create_task(signals.get())
        await asyncio.wait({drain, second}, return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            log.warning("received %s again: stopping without waiting for running requests", second.result().name)
        second.cancel()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.stop()
        log.info("stopped")
