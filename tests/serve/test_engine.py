"""The serving engine on a real local Ray cluster: 2 CPU workers (gloo), the tiny served model, one engine
shared by every test of the module (4 new tokens per worker and step would starve nothing; 32 makes
prompts longer than the budget arrive in chunks beside running decodes).

    .venv/bin/python -m pytest tests/serve/test_engine.py -q

References: `transformers`' greedy tokens (recomputed from scratch per token) and log-probabilities of the
same checkpoint.
"""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest
import torch
from engine_cases import EngineRunner, Greedy, collect, engine_config, wait_until
from prometheus_client import generate_latest

from expertmesh.cluster.serve.tokenizer import Tokenizer
from expertmesh.cluster.serve.types import (
    DeadlineExceeded,
    FinishReason,
    GenerateRequest,
    Prompt,
    Sampling,
    ScoreRequest,
)

BUDGET = 32  # new tokens per worker and step
LONG = [(7 * i + 3) % 400 + 2 for i in range(70)]  # 70 tokens: three chunks of a worker's budget
PROMPTS = [[5, 17, 3, 44, 9], [2, 8], [61, 7, 7, 30, 12, 90, 11], [33, 4, 4], [70], LONG]
TEXTS = ["Hello, world! The experts", "Grüße aus Köln: 日本語 🙂 and more"]


@pytest.fixture(scope="module")
def runner(ray_cluster, served_model):
    runner = EngineRunner(engine_config(served_model.path, max_batch_tokens=BUDGET, max_waiting=64))
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def greedy(served_model):
    return Greedy(served_model.reference)


@pytest.fixture(scope="module")
def tokenizer(served_model):
    return Tokenizer.from_model_dir(served_model.path)


def test_greedy_streams_equal_transformers_for_ids_and_text(runner, greedy, tokenizer):
    engine = runner.engine
    requests = [GenerateRequest(Prompt(token_ids=tuple(p)), max_new_tokens=16, ignore_eos=True) for p in PROMPTS]
    requests += [GenerateRequest(Prompt(text=t), max_new_tokens=16, ignore_eos=True) for t in TEXTS]

    async def all_at_once():
        return await asyncio.gather(*(collect(engine, r) for r in requests))

    results = runner.run(all_at_once())
    prompts = PROMPTS + [tokenizer.encode(t) for t in TEXTS]
    for prompt, (tokens, text, chunks) in zip(prompts, results, strict=True):
        assert tokens == greedy(prompt, 16)
        assert chunks[-1].finish_reason is FinishReason.LENGTH
        assert chunks[-1].usage.prompt_tokens == len(prompt) and chunks[-1].usage.generated_tokens == 16
        assert all(c.finish_reason is None for c in chunks[:-1])
        # Streamed text: what the generated tokens add to the prompt's text, whatever the chunking.
        assert text == tokenizer.decode(prompt + tokens)[len(tokenizer.decode(prompt)):]
    assert engine.status().kv_blocks_used == 0  # finished sequences freed their blocks


def test_detokenised_stream_holds_back_split_characters(runner, tokenizer):
    """A prompt of multi-byte characters split over byte tokens: every streamed delta is whole text."""
    text = "日本語 🙂 Grüße"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # characters do span several tokens
    from expertmesh.cluster.serve.detokenize import IncrementalDetokenizer

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
            req = GenerateRequest(Prompt(token_ids=tuple(prompt)), max_new_tokens=n, ignore_eos=True,
                                  request_id=f"c{c}-{i}")
            tokens, _, chunks = await collect(engine, req)
            assert (c, i) not in answers
            answers[(c, i)] = (tokens, chunks)

    async def clients():
        await asyncio.gather(*(client(c) for c in range(64)))

    runner.run(clients())
    assert len(answers) == 64 * 8
    for (c, i), (tokens, chunks) in answers.items():
        n = 2 + (c * 8 + i) % 3
        assert tokens == greedy(pool[(c + i) % len(pool)], 4)[:n]  # batching changes nothing
        assert [c_.finish_reason for c_ in chunks].count(FinishReason.LENGTH) == 1
    status = engine.status()
    assert (status.running, status.waiting, status.kv_blocks_used) == (0, 0, 0)


def test_sampling_is_reproducible_per_seed_and_independent_of_batching(runner):
    engine = runner.engine
    prompt = Prompt(token_ids=tuple(PROMPTS[2]))

    def request(seed, top_k=20, top_p=0.95):
        return GenerateRequest(prompt, max_new_tokens=12, ignore_eos=True,
                               sampling=Sampling(temperature=1.0, top_k=top_k, top_p=top_p, seed=seed))

    alone = runner.run(collect(engine, request(7)))[0]
    again = runner.run(collect(engine, request(7)))[0]

    async def crowded():  # the same request among others, sampled and greedy, prompts of other lengths
        others = [collect(engine, GenerateRequest(Prompt(token_ids=tuple(p)), max_new_tokens=12, ignore_eos=True,
                                                  sampling=Sampling(temperature=0.7, seed=i)))
                  for i, p in enumerate(PROMPTS)]
        return await asyncio.gather(collect(engine, request(7)), *others)

    batched = runner.run(crowded())[0][0]
    assert alone == again == batched
    other_seed = runner.run(collect(engine, request(8)))[0]
    assert other_seed != alone
    greedy_like = runner.run(collect(engine, request(9, top_k=1)))[0]  # top-k 1 is greedy whatever the seed
    greedy_tokens = runner.run(collect(engine, GenerateRequest(prompt, max_new_tokens=12, ignore_eos=True)))[0]
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
            async for chunk in engine.generate(GenerateRequest(Prompt(token_ids=tuple(LONG)), max_new_tokens=2000,
                                                               ignore_eos=True, deadline_s=0.5)):
                received.extend(chunk.token_ids)
        elapsed = time.monotonic() - start
        await wait_until(lambda: engine.status().kv_blocks_used == 0 and engine.status().running == 0, 2.0)
        return elapsed

    elapsed = runner.run(run())
    assert 0.5 <= elapsed < 1.5 and 0 < len(received) < 2000


def test_a_closed_stream_is_cancelled_and_freed_at_the_next_step(runner):
    engine = runner.engine

    async def run():
        stream = engine.generate(GenerateRequest(Prompt(token_ids=tuple(PROMPTS[0])), max_new_tokens=2000,
                                                 ignore_eos=True))
        await anext(stream)
        await anext(stream)
        assert engine.status().running == 1 and engine.status().kv_blocks_used > 0
        await stream.aclose()
        await wait_until(lambda: engine.status().kv_blocks_used == 0 and engine.status().running == 0, 2.0)

    runner.run(run())


def test_metrics_count_what_was_served(runner):
    """After the tests above: latency histograms and token counters are filled, gauges read the engine, and
    the routing figures are per layer and in range."""
    engine = runner.engine
    text = generate_latest(engine.metrics.registry).decode()

    def value(name: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{")]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    assert value("expertmesh_requests_total") >= 64 * 8
    assert value('expertmesh_requests_total{kind="generate",status="DEADLINE_EXCEEDED"}') == 1
    assert value('expertmesh_requests_total{kind="score",status="OK"}') == 2
    assert value("expertmesh_generated_tokens_total") >= 64 * 8 * 2
    assert value("expertmesh_time_to_first_token_seconds_count") >= 64 * 8
    assert value("expertmesh_inter_token_latency_seconds_count") > 0
    assert value("expertmesh_kv_blocks_total") == engine.status().kv_blocks_total > 0
    assert value("expertmesh_queue_depth") == 0
    balance, copies = engine.routing_figures()
    assert len(balance) == len(copies) == 2  # the tiny model's 2 MoE layers
    assert all(0 < b <= 1 for b in balance) and all(0 <= c <= 1 for c in copies)  # top-2 over 2 GPUs
    assert 'expertmesh_moe_balancedness{layer="1"}' in text
