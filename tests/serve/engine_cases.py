"""Helpers of the engine tests: a greedy reference, stream collection, the engine's config and event loop."""

from __future__ import annotations

import asyncio

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
    """Greedy continuations of prompts from the `transformers` model, memoised per (prompt, length)."""

    def __init__(self, model) -> None:
        self.model = model
        self.cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def many(self, prompts, n: int) -> list[list[int]]:
        """`n` tokens per prompt: one left-padded batch through `generate` (EOS not honoured)."""
        todo = [tuple(p) for p in dict.fromkeys(tuple(p) for p in prompts) if (tuple(p), n) not in self.cache]
        if todo:
            width = max(map(len, todo))
            ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in todo])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in todo])
            with torch.no_grad():
                out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)
            for p, row in zip(todo, out[:, width:].tolist(), strict=True):
                self.cache[(p, n)] = row
        return [self.cache[(tuple(p), n)] for p in prompts]

    def __call__(self, prompt, n: int) -> list[int]:
        return self.many([prompt], n)[0]


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
