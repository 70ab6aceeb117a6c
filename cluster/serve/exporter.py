"""Prometheus metrics on their own HTTP port: the engine's (`expertmesh_...`) and the gRPC calls handled.

    metrics = ServiceMetrics(engine_registry)             # one registry serving both
    http, port = start_metrics_server("127.0.0.1", 9464, metrics.registry)    # GET /metrics
    http.shutdown()

The engine records requests, tokens, latencies, queue, KV blocks, preemptions and the per-MoE-layer
routing figures; the service adds one counter of the calls it answered, by method and status code
(UNAUTHENTICATED and malformed requests included, which never reach the engine).
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, start_http_server

__all__ = ["ServiceMetrics", "start_metrics_server"]


class ServiceMetrics:
    def __init__(self, engine_registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry()
        self._handled = Counter("expertmesh_grpc_server_handled", "gRPC calls completed, by method and status code",
                                ["method", "code"], registry=self.registry)
        if engine_registry is not None:
            self.registry.register(engine_registry)  # a registry is a collector: scraped with ours

    def handled(self, method: str, code: str) -> None:
        self._handled.labels(method=method, code=code).inc()


def start_metrics_server(address: str, port: int, registry: CollectorRegistry) -> tuple[WSGIServer, int]:
    """Serve `registry` at http://address:port/metrics from a daemon thread; port 0 picks a free one."""
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server, server.server_port
