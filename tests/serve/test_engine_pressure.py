"""The engine under memory and queue pressure: 2 CPU workers of 20 KV blocks of 4 tokens each (80 tokens a
worker), at most 8 requests waiting.

    .venv/bin/python -m pytest tests/serve/test_engine_pressure.py -q

More long prompts than the blocks hold complete through preemption (recompute) with exactly the greedy
tokens of an undisturbed run; a full queue refuses at once.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from engine_cases import EngineRunner, Greedy, collect, engine_config

from expertmesh.cluster.serve.types import FinishReason, GenerateRequest, InvalidRequest, Prompt, QueueFull

BLOCKS, BLOCK = 20, 4


@pytest.fixture(scope="module")
def runner(ray_cluster, served_model):
    runner = EngineRunner(engine_config(served_model.path, group={"kv_block_size": BLOCK, "kv_blocks": BLOCKS},
                                        max_batch_tokens=64, max_waiting=8))
    yield runner
    runner.close()


def prompts(n: int, length: int) -> list[list[int]]:
    return [[(11 * i + 7 * j) % 400 + 2 for j in range(length)] for i in range(n)]


def test_more_long_prompts_than_blocks_complete_through_preemption(runner, served_model):
    """8 prompts of 30 tokens generating 24 each need 14 blocks apiece, 112 in all, of the 40 there are:
    sequences are preempted as they grow, re-prefilled from prompt + streamed tokens, and every stream
    still equals the greedy reference, token for token, with no token repeated or lost."""
    engine = runner.engine
    assert engine.models()[0].max_context == BLOCKS * BLOCK
    batch = prompts(8, 30)

    async def all_at_once():
        return await asyncio.gather(*(collect(engine, GenerateRequest(Prompt(token_ids=tuple(p)), max_new_tokens=24,
                                                                      ignore_eos=True)) for p in batch))

    results = runner.run(all_at_once())
    greedy = Greedy(served_model.reference)
    for prompt, (tokens, _, chunks) in zip(batch, results, strict=True):
        assert tokens == greedy(prompt, 24)
        assert chunks[-1].finish_reason is FinishReason.LENGTH
    status = engine.status()
    assert status.preemptions > 0
    assert (status.running, status.waiting, status.kv_blocks_used) == (0, 0, 0)


def test_a_request_beyond_one_workers_blocks_is_refused(runner):
    with pytest.raises(InvalidRequest, match="max_new_tokens: the prompt's 30 tokens plus 60 exceed the context of 80"):
        runner.run(collect(runner.engine, GenerateRequest(Prompt(token_ids=tuple(prompts(1, 30)[0])),
                                                          max_new_tokens=60)))


def test_a_full_queue_refuses_at_once_and_the_queued_requests_complete(runner):
    """12 requests at once: 8 wait, the other 4 get QueueFull within 100 ms; the 8 are then served."""
    engine = runner.engine

    async def attempt(prompt):
        start = time.monotonic()
        try:
            tokens, _, _ = await collect(engine, GenerateRequest(Prompt(token_ids=tuple(prompt)), max_new_tokens=8,
                                                                 ignore_eos=True))
            return "served", len(tokens), time.monotonic() - start
        except QueueFull:
            return "refused", 0, time.monotonic() - start

    async def burst():
        return await asyncio.gather(*(attempt(p) for p in prompts(12, 30)))

    results = runner.run(burst())
    served = [r for r in results if r[0] == "served"]
    refused = [r for r in results if r[0] == "refused"]
    assert len(served) == 8 and len(refused) == 4
    assert all(n == 8 for _, n, _ in served)
    assert all(seconds < 0.1 for _, _, seconds in refused)
