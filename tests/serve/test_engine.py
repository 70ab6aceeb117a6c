"""The serving engine on a real local Ray cluster: 2 replicas of 2 CPU workers (gloo) each, the tiny served
model, one engine shared by every test of the module (they run in order; the killed worker comes last).

    .venv/bin/python -m pytest tests/serve/test_engine.py -q

Each worker holds 32 KV blocks of 4 tokens (128 tokens: long prompts in numbers exhaust it) and takes 32 new
tokens per step (longer prompts arrive in chunks beside running decodes); at most 64 requests wait.
References: `transformers`' greedy tokens and log-probabilities of the same checkpoint.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import numpy as np
import pytest
import torch
from engine_cases import EngineRunner, Greedy, collect, engine_config, wait_until
from prometheus_client import generate_latest

from expertmesh.cluster.serve.detokenize import IncrementalDetokenizer
from expertmesh.cluster.serve.tokenizer import Tokenizer
from expertmesh.cluster.serve.types import (
    DeadlineExceeded,
    FinishReason,
    GenerateRequest,
    InvalidRequest,
    Prompt,
    QueueFull,
    Sampling,
    ScoreRequest,
    Unavailable,
)

BUDGET = 32  # new tokens per worker and step
BLOCKS, BLOCK = 32, 4  # KV blocks per worker, tokens per block
MAX_WAITING = 64
RECOVERY_S = 60.0  # a killed worker to the engine ready again, on 2 shared CPU cores (measured: see the test)
LONG = [(7 * i + 3) % 400 + 2 for i in range(70)]  # 70 tokens: three chunks of a worker's budget
PROMPTS = [[5, 17, 3, 44, 9], [2, 8], [61, 7, 7, 30, 12, 90, 11], [33, 4, 4], [70], LONG]
TEXTS = ["Hello, world! The experts", "Grüße aus Köln: 日本語 🙂 and more"]


@pytest.fixture(scope="module")
def runner(ray_cluster, served_model):
    config = engine_config(served_model.path, replicas=2, max_batch_tokens=BUDGET, max_waiting=MAX_WAITING,
                           group={"kv_block_size": BLOCK, "kv_blocks": BLOCKS},
                           recovery={"attempts": 3, "backoff_s": 0.5})
    runner = EngineRunner(config)
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def greedy(served_model):
    return Greedy(served_model.reference)


@pytest.fixture(scope="module")
def tokenizer(served_model):
    return Tokenizer.from_model_dir(served_model.path)


def request(prompt, n: int, **fields) -> GenerateRequest:
    return GenerateRequest(Prompt(token_ids=tuple(prompt)), max_new_tokens=n, ignore_eos=True, **fields)


def prompts(n: int, length: int) -> list[list[int]]:
    return [[(11 * i + 7 * j) % 400 + 2 for j in range(length)] for i in range(n)]


def idle(engine) -> bool:
    s = engine.status()
    return (s.running, s.waiting, s.kv_blocks_used) == (0, 0, 0)


def test_greedy_streams_equal_transformers_for_ids_and_text(runner, greedy, tokenizer):
    engine = runner.engine
    requests = [request(p, 16) for p in PROMPTS]
    requests += [GenerateRequest(Prompt(text=t), max_new_tokens=16, ignore_eos=True) for t in TEXTS]

    async def all_at_once():
        return await asyncio.gather(*(collect(engine, r) for r in requests))

    results = runner.run(all_at_once())
    ids = PROMPTS + [tokenizer.encode(t) for t in TEXTS]
    for prompt, want, (tokens, text, chunks) in zip(ids, greedy.many(ids, 16), results, strict=True):
        assert tokens == want
        assert chunks[-1].finish_reason is FinishReason.LENGTH
        assert chunks[-1].usage.prompt_tokens == len(prompt) and chunks[-1].usage.generated_tokens == 16
        assert all(c.finish_reason is None for c in chunks[:-1])
        # Streamed text: what the generated tokens add to the prompt's text, whatever the chunking.
        assert text == tokenizer.decode(prompt + tokens)[len(tokenizer.decode(prompt)):]
    assert idle(engine)  # finished sequences freed their blocks


def test_detokenised_stream_holds_back_split_characters(runner, tokenizer):
    """A prompt of multi-byte characters split over byte tokens: every streamed delta is whole text."""
    text = "日本語 🙂 Grüße"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # characters do span several tokens
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([t]) for t in ids] + [detok.flush()]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)


def test_stop_tokens_end_the_stream_and_the_models_eos_is_known(runner, greedy):
    engine = runner.engine
    assert engine.eos == (1,)  # generation_config.json of the tiny model
    want = greedy(PROMPTS[0], 16)
    stop = want[5]
    cut = want.index(stop) + 1
    tokens, _, chunks = runner.run(collect(engine, GenerateRequest(Prompt(token_ids=tuple(PROMPTS[0])),
                                                                   max_new_tokens=16, stop_token_ids=(stop,))))
    assert tokens == want[:cut]  # the stop token is included, nothing after it
    assert chunks[-1].finish_reason is FinishReason.STOP and chunks[-1].usage.generated_tokens == cut


def test_64_clients_x_8_requests_each_are_answered_exactly_once(runner, greedy):
    engine = runner.engine
    rng = random.Random(0)
    pool = [[rng.randrange(2, 400) for _ in range(rng.randrange(1, 12))] for _ in range(16)]
    answers: dict[tuple[int, int], tuple[list[int], list]] = {}

    async def client(c: int) -> None:
        for i in range(8):
            prompt = pool[(c + i) % len(pool)]
            n = 2 + (c * 8 + i) % 3
            tokens, _, chunks = await collect(engine, request(prompt, n, request_id=f"c{c}-{i}"))
            assert (c, i) not in answers
            answers[(c, i)] = (tokens, chunks)

    async def clients():
        await asyncio.gather(*(client(c) for c in range(64)))

    runner.run(clients())
    assert len(answers) == 64 * 8
    want = dict(zip(map(tuple, pool), greedy.many(pool, 4), strict=True))
    for (c, i), (tokens, chunks) in answers.items():
        n = 2 + (c * 8 + i) % 3
        assert tokens == want[tuple(pool[(c + i) % len(pool)])][:n]  # batching changes nothing
        assert [c_.finish_reason for c_ in chunks].count(FinishReason.LENGTH) == 1
    assert idle(engine)


def test_sampling_is_reproducible_per_seed_and_independent_of_batching(runner):
    engine = runner.engine

    def sampled(seed, top_k=20, top_p=0.95):
        return request(PROMPTS[2], 12, sampling=Sampling(temperature=1.0, top_k=top_k, top_p=top_p, seed=seed))

    alone = runner.run(collect(engine, sampled(7)))[0]
    again = runner.run(collect(engine, sampled(7)))[0]

    async def crowded():  # the same request among others, sampled and greedy, prompts of other lengths
        others = [collect(engine, request(p, 12, sampling=Sampling(temperature=0.7, seed=i)))
                  for i, p in enumerate(PROMPTS)]
        return await asyncio.gather(collect(engine, sampled(7)), *others)

    batched = runner.run(crowded())[0][0]
    assert alone == again == batched
    other_seed = runner.run(collect(engine, sampled(8)))[0]
    assert other_seed != alone
    greedy_like = runner.run(collect(engine, sampled(9, top_k=1)))[0]  # top-k 1 is greedy whatever the seed
    greedy_tokens = runner.run(collect(engine, request(PROMPTS[2], 12)))[0]
    assert greedy_like == greedy_tokens


def test_score_equals_transformers_log_probs_across_chunk_boundaries(runner, served_model, tokenizer):
    engine = runner.engine
    prompt = LONG[:20]
    continuation = [(5 * i + 1) % 400 + 2 for i in range(50)]  # prompt + continuation: 3 chunks of 32

    async def both():
        ids = engine.score(ScoreRequest(Prompt(token_ids=tuple(prompt)), Prompt(token_ids=tuple(continuation))))
        text = engine.score(ScoreRequest(Prompt(text="The experts"), Prompt(text=" route every token")))
        return await asyncio.gather(ids, text)

    by_ids, by_text = runner.run(both())
    model = served_model.reference

    def reference(p, c):
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([p + c])).logits[0], -1)
        return [float(logprobs[len(p) - 1 + j, t]) for j, t in enumerate(c)]

    np.testing.assert_allclose(by_ids.logprobs, reference(prompt, continuation), atol=2e-4, rtol=1e-4)
    text_prompt = tokenizer.encode("The experts")
    text_cont = tokenizer.encode(" route every token", add_special_tokens=False)
    np.testing.assert_allclose(by_text.logprobs, reference(text_prompt, text_cont), atol=2e-4, rtol=1e-4)
    assert by_ids.usage.prompt_tokens == 70 and by_ids.usage.generated_tokens == 0


def test_deadline_ends_the_stream_and_frees_its_blocks(runner):
    engine = runner.engine
    received = []

    async def run():
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="deadline_s"):
            async for chunk in engine.generate(request(PROMPTS[0], 120, deadline_s=0.25)):
                received.extend(chunk.token_ids)
        elapsed = time.monotonic() - start
        await wait_until(lambda: idle(engine), 2.0)
        return elapsed

    elapsed = runner.run(run())
    assert 0.25 <= elapsed < 1.25 and len(received) < 120


def test_a_closed_stream_is_cancelled_and_freed_at_the_next_step(runner):
    engine = runner.engine

    async def run():
        stream = engine.generate(request(PROMPTS[0], 120))
        await anext(stream)
        await anext(stream)
        assert engine.status().running == 1 and engine.status().kv_blocks_used > 0
        await stream.aclose()
        await wait_until(lambda: idle(engine), 2.0)

    runner.run(run())

def test_more_long_prompts_than_blocks_complete_through_preemption(runner, greedy):
    """16 prompts of 40 tokens generating 40 each need 20 blocks apiece, 320 in all, of the 128 there are:
    sequences are preempted as they grow, prefilled again from prompt + streamed tokens, and every stream
    still equals the greedy reference, token for token, with no token repeated or lost."""
    engine = runner.engine
    assert engine.models()[0].max_context == BLOCKS * BLOCK
    batch = prompts(16, 40)
    before = engine.status().preemptions

    async def all_at_once():
        return await asyncio.gather(*(collect(engine, request(p, 40)) for p in batch))

    results = runner.run(all_at_once())
    for want, (tokens, _, chunks) in zip(greedy.many(batch, 40), results, strict=True):
        assert tokens == want
        assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert engine.status().preemptions > before
    assert idle(engine)


def test_a_request_beyond_one_workers_blocks_is_refused(runner):
    with pytest.raises(InvalidRequest, match="max_new_tokens: the prompt's 40 tokens plus 100 exceed the context of "
                                             "128"):
        runner.run(collect(runner.engine, request(prompts(1, 40)[0], 100)))


def test_a_full_queue_refuses_at_once_and_the_queued_requests_complete(runner):
    """MAX_WAITING + 8 requests at once: MAX_WAITING wait, the other 8 get QueueFull at once; the
    queued ones are all served."""
    engine = runner.engine

    async def attempt(prompt):
        start = time.monotonic()
        try:
            tokens, _, _ = await collect(engine, request(prompt, 4))
            return "served", len(tokens), time.monotonic() - start
        except QueueFull:
            return "refused", 0, time.monotonic() - start

    async def burst():
        return await asyncio.gather(*(attempt(p) for p in prompts(MAX_WAITING + 8, 6)))

    results = runner.run(burst())
    served = [r for r in results if r[0] == "served"]
    refused = [r for r in results if r[0] == "refused"]
    assert len(served) == MAX_WAITING and len(refused) == 8
    assert all(n == 4 for _, n, _ in served)
    # at once: each refusal came back before the first queued request was served (a bound in seconds
    # would race a loaded 2-core machine; the order does not)
    assert max(seconds for _, _, seconds in refused) < min(seconds for _, _, seconds in served)


def test_requests_go_to_the_replica_with_the_fewest_outstanding_tokens(runner, greedy):
    """One long request lands on replica 0; the three short ones after it all go to replica 1, whose
    outstanding tokens (prompt + tokens to generate) stay below replica 0's."""
    engine = runner.engine
    assert idle(engine)

    async def run():
        tasks = [asyncio.ensure_future(collect(engine, request(PROMPTS[5], 40)))]
        await asyncio.sleep(0)  # the task submits its request
        tasks += [asyncio.ensure_future(collect(engine, request(p, 4))) for p in PROMPTS[:3]]
        await asyncio.sleep(0)
        placed = [sorted(len(s.tokens) for s in r.sequences) for r in engine.replicas]
        return placed, await asyncio.gather(*tasks)

    placed, results = runner.run(run())
    assert placed == [[len(PROMPTS[5])], sorted(len(p) for p in PROMPTS[:3])]
    assert [r[0] for r in results] == [greedy(PROMPTS[5], 40)] + greedy.many(PROMPTS[:3], 4)



def test_metrics_count_what_was_served(runner):
    """After the tests above: latency histograms and token counters are filled, gauges read the engine, and
    the routing figures are per layer and in range."""
    engine = runner.engine
    text = generate_latest(engine.metrics.registry).decode()

    def value(name: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{")]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    assert value("expertmesh_requests_total") >= 64 * 8
    assert value("expertmesh_preemptions_total") == engine.status().preemptions > 0
    assert value('expertmesh_requests_total{kind="generate",status="DEADLINE_EXCEEDED"}') == 1
    assert value('expertmesh_requests_total{kind="score",status="OK"}') == 2
    assert value('expertmesh_requests_total{kind="generate",status="RESOURCE_EXHAUSTED"}') == 8
    assert value('expertmesh_requests_total{kind="generate",status="INVALID_ARGUMENT"}') == 1
    assert value("expertmesh_generated_tokens_total") >= 64 * 8 * 2
    assert value("expertmesh_time_to_first_token_seconds_count") >= 64 * 8
    assert value("expertmesh_inter_token_latency_seconds_count") > 0
    assert value("expertmesh_kv_blocks_total") == engine.status().kv_blocks_total > 0
    assert value("expertmesh_queue_depth") == 0
    balance, copies = engine.routing_figures()
    assert len(balance) == len(copies) == 2  # the tiny model's 2 MoE layers
    assert all(0 < b <= 1 for b in balance) and all(0 <= c <= 1 for c in copies)  # top-2 over 2 GPUs
    assert 'expertmesh_moe_balancedness{layer="1"}' in text

def test_a_killed_worker_streams_continue_with_the_undisturbed_output(runner, greedy):
    """Worker 1 of the replica serving stream 0 is SIGKILLed after its 5th token: that replica re-creates
    its group and prefills its sequences again; every stream ends with exactly the greedy tokens (or
    Unavailable, with a correct prefix), and the engine is ready again within RECOVERY_S."""
    engine = runner.engine
    batch = [p for p in PROMPTS if len(p) < 20] * 2
    want = greedy.many(batch, 40)
    killed: dict[str, float] = {}

    async def stream(i: int):
        tokens = []
        try:
            async for chunk in engine.generate(request(batch[i], 40)):
                tokens += chunk.token_ids
                if i == 0 and len(tokens) >= 5 and not killed:
                    replica = next(r for r in engine.replicas if any(s.tokens[:len(batch[0])] == batch[0]
                                                                     for s in r.sequences))
                    os.kill(replica.group.pids()[1], signal.SIGKILL)
                    killed.update(at=time.monotonic(), replica=replica.index)
            return tokens, chunk.finish_reason
        except Unavailable:
            return tokens, "unavailable"

    seen_ready: set[bool] = set()

    async def watch():
        while True:
            seen_ready.add(engine.status().ready)
            await asyncio.sleep(0.005)

    async def run():
        watcher = asyncio.ensure_future(watch())
        results = await asyncio.gather(*(stream(i) for i in range(len(batch))))
        await wait_until(lambda: engine.status().ready, RECOVERY_S)
        watcher.cancel()
        return results, time.monotonic() - killed["at"]

    results, ready_after = runner.run(run())
    assert seen_ready == {True, False}  # not ready while the group was re-created
    print(f"killed worker: engine ready again {ready_after:.1f} s after the kill")
    assert killed and engine.replicas[int(killed["replica"])].incarnation == 1
    for (tokens, reason), expected in zip(results, want, strict=True):
        if reason == "unavailable":
            assert tokens == expected[:len(tokens)]  # what was sent before the end is still right
        else:
            assert reason is FinishReason.LENGTH and tokens == expected  # nothing repeated, nothing lost
    assert all(reason is FinishReason.LENGTH for _, reason in results)  # recovery succeeded: all continued
    assert ready_after < RECOVERY_S and engine.status().ready
    assert runner.run(collect(engine, request(PROMPTS[1], 8)))[0] == greedy(PROMPTS[1], 8)  # serving again


def test_drain_refuses_new_requests_and_ends_what_outlives_the_grace_period(runner, greedy):
    """Last (the engine stays draining): while draining, a new request is refused at once; a stream still
    running when the grace period is over ends Unavailable, after tokens that were all right."""
    engine = runner.engine
    received = []

    async def long_stream():
        async for chunk in engine.generate(request(PROMPTS[1], 120)):
            received.extend(chunk.token_ids)

    async def run():
        long = asyncio.ensure_future(long_stream())
        await collect(engine, request(PROMPTS[0], 3))  # done long before the 120-token stream
        drained = asyncio.ensure_future(engine.drain(grace_s=0.02))  # 100+ steps of >= 1 ms are left
        await asyncio.sleep(0)
        with pytest.raises(Unavailable, match="draining"):
            await collect(engine, request(PROMPTS[2], 4))
        await drained
        with pytest.raises(Unavailable, match="grace period"):
            await long
        await wait_until(lambda: idle(engine), 2.0)

    runner.run(run())
    assert 0 < len(received) < 120 and received == greedy(PROMPTS[1], 120)[:len(received)]
    assert engine.status().draining
