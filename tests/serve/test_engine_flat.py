"""The engine's fixed-shape and overlapped steps on CPU workers, one replica of 2 workers (gloo):

- flat: decode steps at fixed shapes (what CUDA graphs run on a GPU, here eagerly), and flat steps where
  short prompt chunks join the decodes as one-token rows (`EngineConfig.decode_prefill_tokens`,
  `workers/decode_graph.py`);
- overlap: the same, each step sent before the previous one's tokens are back (`EngineConfig.
  overlap_steps`, `cluster/serve/overlap.py`), through actor calls and through a compiled graph.

    .venv/bin/python -m pytest tests/serve/test_engine_flat.py -q
"""

from __future__ import annotations

import asyncio
import random

import pytest
from engine_cases import EngineRunner, Greedy, collect, engine_config, wait_until

from expertmesh.cluster.serve.types import FinishReason, GenerateRequest, Prompt

PREFILL = 8  # prompt tokens per worker and step beside decodes; longer prompts arrive in chunks of it
VARIANTS = {"flat": {}, "overlap": {"overlap_steps": True},
            "overlap-compiled": {"overlap_steps": True, "compiled": True}}


@pytest.fixture(scope="module", params=list(VARIANTS))
def runner(request, ray_cluster, served_model):
    fields = dict(VARIANTS[request.param])
    group = {"kv_block_size": 4, "kv_blocks": 64, "decode_graphs": True,
             "compiled_steps": fields.pop("compiled", False)}
    runner = EngineRunner(engine_config(served_model.path, max_batch_tokens=32, decode_prefill_tokens=PREFILL,
                                        group=group, **fields))
    runner.name = request.param
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def greedy(served_model):
    return Greedy(served_model.reference)


def test_streams_equal_the_transformers_greedy_tokens(runner, greedy):
    """Clients arriving while others decode: their prompts (1 to 30 tokens: one chunk, or several of
    PREFILL beside decodes) join fixed-shape steps; every stream equals `transformers`' greedy tokens,
    stops at its stop token when one is given (overlapped: after a step already sent with it), and every
    block is free at the end."""
    engine = runner.engine
    rng = random.Random(1)
    prompts = [[rng.randrange(2, 400) for _ in range(rng.randrange(1, 31))] for _ in range(12)]
    lengths = [3 + i % 9 for i in range(len(prompts))]
    want = [greedy(p, n) for p, n in zip(prompts, lengths, strict=True)]
    # Every third request stops at its greedy token at position 1 (its first occurrence).
    stops = [{w[1]} if i % 3 == 0 else set() for i, w in enumerate(want)]
    want = [w[: w.index(w[1]) + 1] if stop else w for w, stop in zip(want, stops, strict=True)]

    async def client(i: int):
        await asyncio.sleep(0.02 * i)  # staggered: most prompts arrive beside running decodes
        request = GenerateRequest(Prompt(token_ids=tuple(prompts[i])), max_new_tokens=lengths[i], ignore_eos=True,
                                  stop_token_ids=tuple(stops[i]))
        tokens, _, chunks = await collect(engine, request)
        return tokens, chunks[-1]

    async def clients():
        return await asyncio.gather(*(client(i) for i in range(len(prompts))))

    before = engine.replicas[0].group.worker_info()
    got = runner.run(clients())
    for (tokens, last), w, stop in zip(got, want, stops, strict=True):
        assert tokens == w
        assert last.finish_reason is (FinishReason.STOP if stop else FinishReason.LENGTH)
        assert last.usage.generated_tokens == len(w)
    after = engine.replicas[0].group.worker_info()
    flat = [a["flat_steps"] - b["flat_steps"] for a, b in zip(after, before, strict=True)]
    fixed = [a["decode_steps"] - b["decode_steps"] for a, b in zip(after, before, strict=True)]
    # Both ranks take every fixed-shape step (each MoE layer is a collective); a rank counts a step as flat
    # when its own rows hold a prompt chunk.
    assert fixed[0] == fixed[1] > max(flat) and sum(flat) > 0
    times = engine.replicas[0].times
    assert times.steps > fixed[0] and times.tokens >= sum(map(len, prompts)) + sum(map(len, want)) - len(prompts)
    runner.run(wait_until(lambda: engine.status().kv_blocks_used == 0 and not engine.status().running, 30))
    # Overlapped: most steps were sent while the one before them ran.
    overlapped = engine.replicas[0].overlapped
    assert overlapped > times.steps // 2 if runner.name.startswith("overlap") else overlapped == 0


def test_a_cancelled_stream_is_freed_while_others_continue(runner, greedy):
    """A consumer that leaves after 2 tokens: its sequence ends at the next boundary (overlapped: with a
    step in flight that still holds it) and the others' tokens are unchanged."""
    engine = runner.engine
    prompts = [[5, 17, 3, 44, 9], [2, 8, 61, 7], [33, 4, 4, 70, 12, 90]]

    async def leaver():
        stream = engine.generate(GenerateRequest(Prompt(token_ids=tuple(prompts[0])), max_new_tokens=40,
                                                 ignore_eos=True))
        got = []
        async for chunk in stream:
            got += chunk.token_ids
            if len(got) >= 2:
                break
        await stream.aclose()
        return got

    async def stayer(p):
        return (await collect(engine, GenerateRequest(Prompt(token_ids=tuple(p)), max_new_tokens=12,
                                                      ignore_eos=True)))[0]

    async def run():
        return await asyncio.gather(leaver(), *(stayer(p) for p in prompts[1:]))

    left, *stayed = runner.run(run())
    assert left == greedy(prompts[0], 40)[: len(left)] and len(left) >= 2
    assert stayed == [greedy(p, 12) for p in prompts[1:]]
    runner.run(wait_until(lambda: engine.status().kv_blocks_used == 0 and not engine.status().running, 30))
