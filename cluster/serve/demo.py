"""`expertmesh demo` (`make demo`): the service end to end on this machine, in under a minute.

1. A private `redis-server` on a free loopback port (when one is installed) for the routing statistics.
2. The tiny random model (`tiny.py`) on 2 CPU workers (gloo) of a local Ray, behind the gRPC server on
   loopback, its workers recording routing into that Redis.
3. A burst of concurrent streamed requests through `expertmesh.client.AsyncClient`: output tokens/s, time to
   first token and end-to-end latency (p50 / p99).
4. The routing the workers recorded, read back from Redis as `RoutingStats` (`load_stats_url`), and every
   placer's plan for `gpus` GPUs scored with the cost model (as `expertmesh compare --stats redis://...`).

Everything it starts (Redis, Ray, the engine, the server) is stopped before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

__all__ = ["run_demo"]

_PROMPTS = [
    "Mixture-of-Experts models route every token to a few experts.",
    "Hello, world! The quick brown fox",
    "Expert parallelism places the experts of each layer on different GPUs",
    "The engine batches requests continuously:",
    "Placement balances the load of the experts and",
    "0123456789 0123456789",
]
_MODEL = "tiny-demo"  # model name of the statistics in Redis
_RUN = "serve"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _private_redis(console: Console) -> Iterator[str | None]:
    """redis://127.0.0.1:PORT/0 of a redis-server of our own (no persistence), or None without the binary."""
    binary = shutil.which("redis-server")
    if binary is None:
        console.print("[yellow]redis-server is not installed (make redis-server installs it): serving without "
                      "routing statistics, so no placement at the end[/]")
        yield None
        return
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="expertmesh-redis-") as workdir:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir, "--save", "",
                                 "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port}")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


def _percentiles(xs: list[float]) -> tuple[float, float]:
    return (float(np.percentile(xs, 50)), float(np.percentile(xs, 99))) if xs else (float("nan"), float("nan"))


async def _burst(target: str, requests: int, max_new_tokens: int) -> dict:
    """Every request at once; per request the time to its first token and to its end."""
    from expertmesh.client import AsyncClient

    async def one(client: AsyncClient, i: int) -> tuple[float, float, int]:
        start = time.monotonic()
        first, tokens = None, 0
        async for chunk in client.generate(_PROMPTS[i % len(_PROMPTS)], max_new_tokens=max_new_tokens,
                                           ignore_eos=True, temperature=0.8, seed=i):
            if chunk.token_ids and first is None:
                first = time.monotonic() - start
            tokens += len(chunk.token_ids)
        return first, time.monotonic() - start, tokens

    async with AsyncClient(target, timeout_s=120) as client:
        start = time.monotonic()
        results = await asyncio.gather(*(one(client, i) for i in range(requests)))
        wall = time.monotonic() - start
    ttft = [r[0] for r in results if r[0] is not None]
    e2e = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    return {"requests": requests, "generated_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall,
            "ttft_p50_s": _percentiles(ttft)[0], "ttft_p99_s": _percentiles(ttft)[1],
            "e2e_p50_s": _percentiles(e2e)[0], "e2e_p99_s": _percentiles(e2e)[1]}


async def _serve_and_burst(model_dir: Path, redis_url: str | None, requests: int, max_new_tokens: int,
                           console: Console) -> dict:
    from expertmesh.cluster.serve.config import EngineConfig
    from expertmesh.cluster.serve.engine import Engine
    from expertmesh.cluster.serve.server import create_server
    from expertmesh.cluster.serve.server_config import ServerConfig

    config = EngineConfig.from_dict({
        "group": {"model": str(model_dir), "weights": "random", "workers": 2, "device": "cpu"},
        "stats": {"redis_url": redis_url, "model": _MODEL, "run": _RUN}}, "demo")
    start = time.monotonic()
    engine = await Engine.start(config)
    try:
        server, port = create_server(engine, ServerConfig(port=0, metrics_port=None))
        await server.start()
        console.print(f"engine ready in {time.monotonic() - start:.1f} s: tiny model on 2 CPU workers, "
                      f"gRPC on 127.0.0.1:{port}; sending {requests} concurrent requests")
        try:
            return await _burst(f"127.0.0.1:{port}", requests, max_new_tokens)
        finally:
            await server.stop()
    finally:
        await engine.stop()  # the workers flush their last statistics window


def _placements(redis_url: str, gpus: int) -> tuple[list[dict], int]:
    from expertmesh.cluster import load_stats_url
    from expertmesh.placement import STRATEGIES, IlpOptions, Topology, evaluate, place

    stats = load_stats_url(f"{redis_url}?model={_MODEL}&run={_RUN}")
    topology = Topology(gpus, 1)
    redundant = gpus  # one spare slot per GPU, for the replicating placers
    rows = []
    for name in STRATEGIES:
        start = time.monotonic()
        plan = place(name, stats, topology, redundant, IlpOptions(time_limit=5.0) if name == "ilp" else None)
        solve_s = time.monotonic() - start
        m = evaluate(stats, plan, topology).summary()  # from counts: balance and pair cuts, not per-token copies
        rows.append({"strategy": name, "balancedness": m["balancedness"], "balancedness_worst": m["balancedness_worst"],
                     "coact_cut": m["coact_cut"], "compute_ms": m["compute_ms"], "solve_s": solve_s})
    return rows, int(stats.tokens)


def run_demo(requests: int = 64, max_new_tokens: int = 32, gpus: int = 4, console: Console | None = None) -> dict:
    """Run the demo, print its tables on `console` (stderr by default); returns the figures."""
    import ray

    from expertmesh.cluster.serve.tiny import write_tiny_model

    # The ilp placer forks worker processes after gRPC has started its threads; its fork handlers only log.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    console = console or Console(stderr=True)
    started = time.monotonic()
    figures: dict = {}
    with _private_redis(console) as redis_url, tempfile.TemporaryDirectory(prefix="expertmesh-demo-") as tmp:
        model_dir = write_tiny_model(Path(tmp) / "tiny")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            figures["burst"] = asyncio.run(_serve_and_burst(model_dir, redis_url, requests, max_new_tokens, console))
        finally:
            ray.shutdown()
        b = figures["burst"]
        table = Table(title=f"{requests} concurrent streams x {max_new_tokens} tokens over gRPC (2 CPU workers)")
        for col in ("output tokens/s", "TTFT p50", "TTFT p99", "latency p50", "latency p99"):
            table.add_column(col, justify="right")
        table.add_row(f"{b['output_tokens_per_s']:.0f}", f"{b['ttft_p50_s']:.2f} s", f"{b['ttft_p99_s']:.2f} s",
                      f"{b['e2e_p50_s']:.2f} s", f"{b['e2e_p99_s']:.2f} s")
        console.print(table)
        if redis_url is not None:
            rows, tokens = _placements(redis_url, gpus)
            figures["placements"] = rows
            table = Table(title=f"placements for {gpus} GPUs (+{gpus} spare slots) from the routing of {tokens} "
                                f"tokens recorded in Redis (pairs split: co-activated expert pairs on different GPUs)")
            for col in ("placer", "balance", "worst layer", "pairs split", "expert ms", "solve s"):
                table.add_column(col, justify="right")
            for r in rows:
                table.add_row(r["strategy"], f"{r['balancedness']:.3f}", f"{r['balancedness_worst']:.3f}",
                              f"{r['coact_cut']:.3f}", f"{r['compute_ms']:.4f}", f"{r['solve_s']:.2f}")
            console.print(table)
    figures["total_s"] = time.monotonic() - started
    console.print(f"demo done in {figures['total_s']:.0f} s")
    return figures
