"""The `grpc` variant of bench/serve.py: the engine behind its gRPC server, clients in another process.

The server runs on the engine's event loop, as `expertmesh serve` runs it; the closed-loop clients
(`expertmesh.client.AsyncClient`, one channel) run in a child process, as an application's would, so their
work does not share the server's loop. TPOT is measured where the client reads the stream.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

__all__ = ["GrpcClients"]


def _level(target: str, requests: list[tuple[list[int], int]], concurrency: int) -> tuple[list, float]:
    """(ttft s, tpot s, tokens) per request and the wall time of `requests` from `concurrency` clients."""
    from expertmesh.client import AsyncClient

    async def run():
        pending = list(reversed(requests))
        records = []
        async with AsyncClient(target) as client:
            async def one():
                while pending:
                    prompt, n = pending.pop()
                    t0 = time.perf_counter()
                    first = last = None
                    count = 0
                    async for chunk in client.generate(prompt, max_new_tokens=n, ignore_eos=True):
                        last = time.perf_counter()
                        first = first or last
                        count += len(chunk.token_ids)
                    records.append((first - t0, (last - first) / (count - 1) if count > 1 else math.nan, count))

            start = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(concurrency)))
            return records, time.perf_counter() - start

    return asyncio.run(run())


class GrpcClients:
    """A server in front of `engine` on this loop, and one client process that runs the levels."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        # The child finds this module by name (bench/ is off serve.py's path: its kernels.py would shadow
        # Hugging Face's); at the end of the path, and only while the child starts, which copies it.
        sys.path.append(str(Path(__file__).resolve().parent))
        try:
            self.pool.submit(int).result()
        finally:
            sys.path.pop()
        self.server = None

    async def start(self) -> None:
        from expertmesh.cluster.serve.server import create_server
        from expertmesh.cluster.serve.server_config import ServerConfig

        self.server, port = create_server(self.engine, ServerConfig(port=0, metrics_port=None))
        await self.server.start()
        self.target = f"127.0.0.1:{port}"

    async def level(self, requests: list[tuple[list[int], int]], concurrency: int) -> tuple[list, float]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, _level, self.target, requests,
                                                                concurrency)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
        self.pool.shutdown()
