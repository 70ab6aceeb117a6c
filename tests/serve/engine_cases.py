"""Helpers of the engine tests: a greedy reference, stream collection, the engine's config and event loop."""

from __future__ import annotations

import asyncio
import functools

import torch

from expertmesh.cluster.serve.config import EngineConfig
from expertmesh.cluster.serve.engine import Engine
from expertmesh.cluster.serve.types import Chunk, GenerateRequest
from expertmesh.workers.group_config import GroupConfig

CPUS = 0.5  # per worker


def engine_config(path, workers: int = 2, group: dict | None = None, **fields) -> EngineConfig:
    return EngineConfig(group=GroupConfig(model=str(path), workers=workers, cpus_per_worker=CPUS, **(group or {})),
                        **fields)


class Greedy:
    """Greedy continuations from the `transformers` model, recomputed from scratch at every token (no cache:
    the plainest reference), memoised per prompt."""

    def __init__(self, model) -> None:
        self.model = model

    @functools.cache  # noqa: B019 - one instance per test module, kept for its life
    def _tokens(self, prompt: tuple[int, ...], n: int) -> tuple[int, ...]:
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(self.model(torch.tensor([ids])).logits[0, -1].argmax()))
        return tuple(ids[len(prompt):])

    def __call__(self, prompt, n: int) -> list[int]:
        return list(self._tokens(tuple(prompt), n))


async def collect(engine: Engine, request: GenerateRequest) -> tuple[list[int], str, list[Chunk]]:
    """Every token and the whole text of a stream, and its chunks."""
    chunks = [c async for c in engine.generate(request)]
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks), chunks


class EngineRunner:
    """One engine on a module's own event loop: its replicas' loops advance while a test runs a coroutine
    with `run` (they pause in between)."""

    def __init__(self, config: EngineConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.engine = self.run(Engine.start(config))

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.engine.stop())
        self.loop.close()


async def wait_until(predicate, timeout_s: float, every_s: float = 0.01) -> float:
    """Seconds until `predicate()` held (AssertionError after `timeout_s`)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not predicate():
        if loop.time() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s} s")
        await asyncio.sleep(every_s)
    return loop.time() - start
