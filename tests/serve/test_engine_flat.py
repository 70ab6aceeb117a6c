"""The engine's fixed-shape steps on CPU workers (what CUDA graphs run on a GPU, here eagerly over gloo):
decode steps, and flat steps where short prompt chunks join the decodes as one-token rows
(`EngineConfig.decode_prefill_tokens`, `workers/decode_graph.py`). One replica of 2 workers.

    .venv/bin/python -m pytest tests/serve/test_engine_flat.py -q
"""

from __future__ import annotations

import asyncio
import random

import pytest
from engine_cases import EngineRunner, Greedy, collect, engine_config

from expertmesh.cluster.serve.types import GenerateRequest, Prompt

PREFILL = 8  # prompt tokens per worker and step beside decodes; longer prompts arrive in chunks of it


@pytest.fixture(scope="module")
def runner(ray_cluster, served_model):
    config = engine_config(served_model.path, max_batch_tokens=32, decode_prefill_tokens=PREFILL,
                           group={"kv_block_size": 4, "kv_blocks": 64, "decode_graphs": True})
    runner = EngineRunner(config)
    yield runner
    runner.close()


def test_flat_steps_stream_the_transformers_greedy_tokens(runner, served_model):
    """Clients arriving while others decode: their prompts (1 to 30 tokens: one chunk, or several of
    PREFILL beside decodes) join fixed-shape steps; every stream equals `transformers`' greedy tokens."""
    engine = runner.engine
    rng = random.Random(1)
    prompts = [[rng.randrange(2, 400) for _ in range(rng.randrange(1, 31))] for _ in range(12)]
    lengths = [3 + i % 9 for i in range(len(prompts))]

    async def client(i: int):
        await asyncio.sleep(0.02 * i)  # staggered: most prompts arrive beside running decodes
        request = GenerateRequest(Prompt(token_ids=tuple(prompts[i])), max_new_tokens=lengths[i], ignore_eos=True)
        return (await collect(engine, request))[0]

    async def clients():
        return await asyncio.gather(*(client(i) for i in range(len(prompts))))

    before = engine.replicas[0].group.worker_info()
    got = runner.run(clients())
    greedy = Greedy(served_model.reference)
    for prompt, n, tokens in zip(prompts, lengths, got, strict=True):
        assert tokens == greedy(prompt, n)
    after = engine.replicas[0].group.worker_info()
    flat = [a["flat_steps"] - b["flat_steps"] for a, b in zip(after, before, strict=True)]
    fixed = [a["decode_steps"] - b["decode_steps"] for a, b in zip(after, before, strict=True)]
    # Both ranks take every fixed-shape step (each MoE layer is a collective); a rank counts a step as flat
    # when its own rows hold a prompt chunk.
    assert fixed[0] == fixed[1] > max(flat) and sum(flat) > 0
    times = engine.replicas[0].times
    assert times.steps > fixed[0] and times.tokens >= sum(map(len, prompts)) + sum(lengths) - len(prompts)
