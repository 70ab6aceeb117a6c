"""The engine's Prometheus metrics (`expertmesh_` prefix), in a registry of the engine's own.

The service exports `engine.metrics.registry` (e.g. `prometheus_client.start_http_server(port,
registry=engine.metrics.registry)`); a registry per engine lets several engines live in one process (tests).
Gauges read the engine's state when scraped; counters and histograms are recorded as things happen.
Routing figures are per MoE layer aggregates (never per expert).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["EngineMetrics"]

# Seconds: TTFT spans a queue wait and a prefill, inter-token latency one decode step.
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60)
_STEP = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("expertmesh_requests", "Requests ended, by status (ok or the error's gRPC code)",
                                ["kind", "status"], registry=r)
        self.prompt_tokens = Counter("expertmesh_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("expertmesh_generated_tokens", "Tokens generated and streamed", registry=r)
        self.ttft = Histogram("expertmesh_time_to_first_token_seconds", "Submission to first streamed token",
                              buckets=_LATENCY, registry=r)
        self.inter_token = Histogram("expertmesh_inter_token_latency_seconds",
                                     "Between consecutive tokens of a stream", buckets=_LATENCY, registry=r)
        self.e2e = Histogram("expertmesh_e2e_request_latency_seconds", "Submission to the end of a request",
                             buckets=_LATENCY, registry=r)
        self.step = Histogram("expertmesh_step_seconds", "One engine step (all workers of a replica)",
                              buckets=_STEP, registry=r)
        self.preemptions = Counter("expertmesh_preemptions", "Sequences preempted for KV blocks (recomputed)",
                                   registry=r)
        self.recoveries = Counter("expertmesh_group_recoveries", "EP groups re-created after a failure",
                                  registry=r)
        self.queue_depth = Gauge("expertmesh_queue_depth", "Requests waiting for admission", registry=r)
        self.running = Gauge("expertmesh_running_sequences", "Sequences in the running batches", registry=r)
        self.kv_used = Gauge("expertmesh_kv_blocks_used", "KV-cache blocks held, all workers", registry=r)
        self.kv_total = Gauge("expertmesh_kv_blocks_total", "KV-cache blocks in the budget, all workers", registry=r)

    def watch(self, queue_depth: Callable[[], float], running: Callable[[], float], kv_used: Callable[[], float],
              kv_total: Callable[[], float], routing: Callable[[], tuple[list[float], list[float]]]) -> None:
        """Read these gauges from the engine at scrape time; `routing` gives per MoE layer (balancedness,
        copies per token)."""
        self.queue_depth.set_function(queue_depth)
        self.running.set_function(running)
        self.kv_used.set_function(kv_used)
        self.kv_total.set_function(kv_total)
        self.registry.register(_RoutingCollector(routing))


class _RoutingCollector(Collector):
    """Per MoE layer routing figures, computed when scraped (the cost model's rule over recent steps)."""

    def __init__(self, figures: Callable[[], tuple[list[float], list[float]]]) -> None:
        self.figures = figures

    def collect(self):
        balance = GaugeMetricFamily("expertmesh_moe_balancedness",
                                    "mean/max token-expert load over a replica's GPUs, recent steps", labels=["layer"])
        copies = GaugeMetricFamily("expertmesh_moe_copies_per_token",
                                   "GPUs other than its home a token is dispatched to, recent steps", labels=["layer"])
        for layer, (b, c) in enumerate(zip(*self.figures(), strict=True)):
            balance.add_metric([str(layer)], b)
            copies.add_metric([str(layer)], c)
        return [balance, copies]
