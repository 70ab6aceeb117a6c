"""Replicas and recovery: 2 replicas of 2 CPU workers each, the tiny served model.

    .venv/bin/python -m pytest tests/serve/test_engine_recovery.py -q

A request goes to the replica with the fewest outstanding tokens; a worker killed mid-stream makes its
replica re-create the group and re-prefill its sequences, whose streams go on with exactly the tokens of an
undisturbed greedy run (or end Unavailable), and the engine is ready again within RECOVERY_S.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from engine_cases import EngineRunner, Greedy, collect, engine_config, wait_until

from expertmesh.cluster.serve.types import FinishReason, GenerateRequest, Prompt, Unavailable

RECOVERY_S = 60.0  # kill to ready again, on 2 shared CPU cores (new actors, gloo rendezvous, weights)
PROMPTS = [[(13 * i + 5 * j) % 400 + 2 for j in range(4 + 3 * i)] for i in range(6)]


@pytest.fixture(scope="module")
def runner(ray_cluster, served_model):
    runner = EngineRunner(engine_config(served_model.path, replicas=2, max_batch_tokens=64,
                                        recovery={"attempts": 3, "backoff_s": 0.5}))
    yield runner
    runner.close()


def request(prompt, n: int) -> GenerateRequest:
    return GenerateRequest(Prompt(token_ids=tuple(prompt)), max_new_tokens=n, ignore_eos=True)


def test_requests_go_to_the_replica_with_the_fewest_outstanding_tokens(runner, served_model):
    """One long request lands on replica 0; the three short ones after it all go to replica 1, whose
    outstanding tokens (prompt + tokens to generate) stay below replica 0's."""
    engine = runner.engine

    async def run():
        tasks = [asyncio.ensure_future(collect(engine, request(PROMPTS[0], 64)))]
        await asyncio.sleep(0)  # the task submits its request
        tasks += [asyncio.ensure_future(collect(engine, request(p, 4))) for p in PROMPTS[1:4]]
        await asyncio.sleep(0)
        placed = [sorted(len(s.tokens) for s in r.sequences) for r in engine.replicas]
        return placed, await asyncio.gather(*tasks)

    placed, results = runner.run(run())
    assert placed == [[len(PROMPTS[0])], sorted(len(p) for p in PROMPTS[1:4])]
    greedy = Greedy(served_model.reference)
    assert [r[0] for r in results] == [greedy(PROMPTS[0], 64)] + [greedy(p, 4) for p in PROMPTS[1:4]]


def test_a_killed_worker_streams_continue_with_the_undisturbed_output(runner, served_model):
    engine = runner.engine
    greedy = Greedy(served_model.reference)
    want = [greedy(p, 40) for p in PROMPTS]
    killed: dict[str, float] = {}

    async def stream(i: int):
        tokens = []
        try:
            async for chunk in engine.generate(request(PROMPTS[i], 40)):
                tokens += chunk.token_ids
                if i == 0 and len(tokens) >= 5 and not killed:
                    replica = next(r for r in engine.replicas if r.sequences and PROMPTS[0] ==
                                   r.sequences[0].tokens[:len(PROMPTS[0])])
                    os.kill(replica.group.pids()[1], signal.SIGKILL)
                    killed.update(at=time.monotonic(), replica=replica.index)
            return tokens, chunk.finish_reason
        except Unavailable:
            return tokens, "unavailable"

    async def run():
        results = await asyncio.gather(*(stream(i) for i in range(len(PROMPTS))))
        ready_s = await wait_until(lambda: engine.status().ready, RECOVERY_S)
        return results, time.monotonic() - killed["at"] - ready_s

    results, recovered_after = runner.run(run())
    assert killed and engine.replicas[killed["replica"]].incarnation == 1
    for (tokens, reason), expected in zip(results, want, strict=True):
        if reason == "unavailable":
            assert tokens == expected[:len(tokens)]  # what was sent before the end is still right
        else:
            assert reason is FinishReason.LENGTH and tokens == expected  # nothing repeated, nothing lost
    assert sum(reason is FinishReason.LENGTH for _, reason in results) == len(PROMPTS)  # recovery succeeded
    assert recovered_after < RECOVERY_S
    assert engine.status().ready
    # The re-created group serves new requests.
    tokens, _, _ = runner.run(collect(engine, request(PROMPTS[1], 8)))
    assert tokens == greedy(PROMPTS[1], 8)
