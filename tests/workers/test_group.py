"""The EP group on a real local Ray cluster: CPU actors, a gloo process group, tiny real checkpoints.

    .venv/bin/python -m pytest tests/workers/test_group.py -q

Correctness: for 1, 2 and 4 workers, under the contiguous plan and an `ilp` plan with replicas, our fp32
logits equal the `transformers` model's within atol 1e-5 + rtol 1e-4 and 32 greedy tokens are identical.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from expertmesh.placement.cost import CostParams, evaluate
from expertmesh.placement.eplb import eplb
from expertmesh.placement.ilp import IlpOptions, ilp
from expertmesh.placement.plan import Placement
from expertmesh.placement.stats import stats_from_trace
from expertmesh.placement.synthetic import SyntheticSpec, synthetic_trace
from expertmesh.placement.topology import Topology
from expertmesh.placement.trace import Trace
from expertmesh.workers import (
    GREEDY,
    EPGroup,
    GroupConfig,
    GroupError,
    PlanMismatchError,
    StepTimeout,
    WorkerFailure,
)
from expertmesh.workers.checkpoint import expert_keys
from expertmesh.workers.config import read_model_config

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")  # the checkpoints tests/workers/conftest.py writes
ATOL, RTOL = 1e-5, 1e-4
PROMPTS = [[5, 17, 3, 44, 9], [2, 8], [61, 7, 7, 30, 12, 90, 1], [33, 4, 4], [70]]
CPUS = 0.5  # per worker: four workers fit the 4 logical CPUs of the test cluster with room to spare


def config(path, workers: int | None = None, **fields) -> GroupConfig:
    """The group config of these tests: CPU workers of `CPUS` each, `fields` on top."""
    return GroupConfig(model=str(path), workers=workers, cpus_per_worker=CPUS, **fields)


def ilp_plan(num_layers: int, num_gpus: int) -> Placement:
    """An `ilp` plan with one redundant slot per GPU, from a structured synthetic trace of the tiny shape."""
    trace = synthetic_trace(SyntheticSpec(num_experts=8, top_k=2, num_layers=num_layers, num_tokens=512,
                                          num_domains=4, seed=1))
    options = IlpOptions(time_limit=1.0, workers=1)
    plan = ilp(stats_from_trace(trace), Topology(num_gpus), 8 + num_gpus, options)
    assert plan.num_redundant == num_gpus and plan.logcnt.max() >= 2
    return plan


def hf_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """`n` greedy tokens per prompt from `transformers` generate (one left-padded batch, no early stop)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[:, width:].tolist()


def assert_logits_match(group: EPGroup, ref, first_id: int) -> None:
    """Prefill the prompts (homes round robin), then two decode steps; compare every logit row."""
    G = group.num_workers
    history = {first_id + i: list(p) for i, p in enumerate(PROMPTS)}
    inputs = [[(s, toks) for s, toks in history.items() if (s - first_id) % G == r] for r in range(G)]
    for step in range(3):
        outs = group.step(inputs)
        nxt = {}
        for out in outs:
            for s, row in zip(out.seq_ids, out.logits, strict=True):
                with torch.no_grad():
                    want = ref(torch.tensor([history[s]])).logits[0, -1]
                torch.testing.assert_close(torch.tensor(row), want, atol=ATOL, rtol=RTOL)
                nxt[s] = (7 * s + step) % 96
        for s in history:
            history[s].append(nxt[s])
        inputs = [[(s, [nxt[s]]) for s, _ in batch] for batch in inputs]
    group.free(list(history))


@pytest.fixture(scope="module")
def greedy_reference(reference):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = hf_greedy(reference(family), PROMPTS, 32)
        return cache[family]

    return get


@pytest.mark.parametrize("num_workers", [1, 2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_group_matches_reference_under_contiguous_and_ilp_plans(ray_cluster, tiny_models, reference,
                                                                 greedy_reference, family, num_workers):
    path = tiny_models[family].path
    cfg = read_model_config(path)
    ref = reference(family)
    with EPGroup.create(config(path, num_workers)) as group:
        assert group.plan.strategy == "contiguous"
        assert_logits_match(group, ref, first_id=0)
        assert group.generate(PROMPTS, 32) == greedy_reference(family)

        plan = ilp_plan(cfg.num_moe_layers, num_workers)
        group.apply_plan(plan)
        assert_logits_match(group, ref, first_id=100)
        assert group.generate(PROMPTS, 32, first_seq_id=200) == greedy_reference(family)

        # Each worker read exactly the experts the ilp plan gives its GPU (besides the contiguous ones).
        S = plan.slots_per_gpu
        for info in group.worker_info():
            r = info["rank"]
            assert info["slot_expert"] == plan.phy2log[:, r * S:(r + 1) * S].tolist()
            experts_read = {n for n in info["tensors_read"] if ".experts." in n}
            mine = {k for layer in range(cfg.num_moe_layers)
                    for e in set(plan.phy2log[layer, r * S:(r + 1) * S].tolist()) | set(
                        range(r * 8 // num_workers, (r + 1) * 8 // num_workers))
                    for k in expert_keys(cfg, cfg.moe_layers[layer], e)}
            assert experts_read == mine


@pytest.mark.parametrize("shares", [True, False], ids=["layer-shares", "per-worker"])
def test_routing_counts_reach_redis_exactly(ray_cluster, tiny_models, reference, redis_url, shares):
    """Per worker (each writes its own tokens' window) or in layer shares (the group sums its counts and
    each worker writes a share of the layers): the store holds exactly the reference router's counts."""
    import redis

    from expertmesh.cluster import RedisStatsSink, StatsStore
    from expertmesh.cluster.stats.codec import encoded_header

    path = tiny_models["qwen3_moe"].path
    cfg = read_model_config(path)
    run = f"t{int(shares)}"
    sink = RedisStatsSink(url=redis_url, model="tiny-qwen3", num_layers=cfg.num_moe_layers,
                          num_experts=cfg.num_experts, top_k=cfg.top_k, run=run)
    with EPGroup.create(config(path, stats={"flush_every": 3, "shares": shares}),
                        plan=ilp_plan(cfg.num_moe_layers, 2), sink=sink) as group:
        generated = group.generate(PROMPTS, 6)
    # Every token fed to the model: the prompts and all generated tokens but the last.
    ref = reference("qwen3_moe")
    fed = [p + g[:-1] for p, g in zip(PROMPTS, generated, strict=True)]
    with torch.no_grad():
        ids = [np.stack([torch.topk(torch.softmax(lg.float(), -1), 2, -1).indices.numpy()
                         for lg in ref(torch.tensor([toks]), output_router_logits=True).router_logits], 1)
               for toks in fed]
    seq_ids = np.repeat(np.arange(len(fed)), [len(f) for f in fed])
    want = stats_from_trace(Trace(np.concatenate(ids), seq_ids, 8))
    client = redis.Redis.from_url(redis_url)
    store = StatsStore(client, "tiny-qwen3", run)
    blobs = [client.get(key) for key in client.scan_iter(match=store.keys.blob_prefix + "*")]
    first_layers = sorted({encoded_header(b)["first_layer"] for b in blobs})
    assert first_layers == ([0, cfg.num_moe_layers // 2] if shares else [0])
    got = store.snapshot()
    assert got.tokens == want.tokens == sum(len(f) for f in fed)
    assert np.array_equal(got.counts, want.counts)
    assert np.array_equal(got.coact, want.coact) and np.array_equal(got.trans, want.trans)


@pytest.mark.parametrize("num_workers,rule", [(2, "fixed"), (4, "fixed"), (4, "balanced")])
def test_replay_dispatch_bytes_equal_the_cost_model(ray_cluster, tiny_models, num_workers, rule):
    """Routing replay of a trace: measured per-rank dispatch and combine bytes equal the prediction, under the
    fixed replica rule and the balanced one (its counts all-gathered in every MoE layer)."""
    path = tiny_models["mixtral"].path
    cfg = read_model_config(path)
    trace = synthetic_trace(SyntheticSpec(num_experts=8, top_k=2, num_layers=3, num_tokens=300, num_domains=4,
                                          tokens_per_sequence=20, seed=5))
    stats = stats_from_trace(trace)
    topo = Topology(num_workers)
    plans = [ilp_plan(3, num_workers), eplb(stats, topo, 8 + num_workers)]
    home = trace.home_gpus(num_workers)
    params = CostParams(hidden=cfg.hidden_size, ffn=cfg.expert_ffn, dispatch_bytes=4, combine_bytes=4)
    with EPGroup.create(config(path, replica_rule=rule), plan=plans[0]) as group:
        for i, plan in enumerate(plans):
            if i:
                group.apply_plan(plan)
            inputs, ids = [], []
            for r in range(num_workers):
                mine = np.flatnonzero(home == r)
                seqs = {}
                for t in mine:
                    seqs.setdefault(int(trace.seq_ids[t]), []).append(int(t) % 96)
                inputs.append([(1000 * (i + 1) + s, toks) for s, toks in seqs.items()])
                ids.append(trace.topk_ids[mine])  # tokens of a sequence are consecutive within a rank
            outs = group.replay(inputs, ids)
            predicted = evaluate(trace, plan, topo, params, keep_pairs=True, replica_rule=rule)
            if rule == "balanced":  # the rule changed something here, so the test tells the rules apart
                other = evaluate(trace, plan, topo, params, keep_pairs=True, replica_rule="fixed")
                assert i == 0 or not np.array_equal(other.load, predicted.load)
            for layer in range(3):
                sent = np.array([out.layers[layer].sent_rows for out in outs])  # [G, G]
                assert np.array_equal(sent, predicted.dispatch_pairs[layer])
                payload = np.array([out.layers[layer].dispatch_payload for out in outs])
                assert np.array_equal(payload, predicted.dispatch_pairs[layer] * cfg.hidden_size * 4)
                back = np.array([out.layers[layer].combine_payload for out in outs])
                assert np.array_equal(back, payload.T)  # combine returns one row per copy received
                pairs = np.array([out.layers[layer].expert_pairs for out in outs])
                assert np.array_equal(pairs, predicted.load[layer])


# FP8 tolerances, as a share of the largest reference logit: FP8 dispatch rounds each token to E4M3 with one
# scale per 1 x 128 tile (measured on these checkpoints: up to 3.3%); FP8 experts also round the weights
# (128 x 128 blocks) and the SwiGLU activations (up to 6.6%).
FP8_TOLERANCE = {"fp8-dispatch": 0.05, "fp8": 0.12}


@pytest.mark.parametrize("precision", ["fp8-dispatch", "fp8"])
def test_fp8_group_matches_reference_within_the_fp8_tolerance(ray_cluster, tiny_models, wide_model, reference,
                                                             precision):
    """FP8 through the whole pipeline between 2 gloo workers under an ilp plan with replicas: dispatch as E4M3
    (both), expert GEMMs in FP8 too ("fp8", on the 128-wide checkpoint its weight blocks need). Logits of
    prefill and decode steps stay within the stated tolerance of `transformers`' fp32 logits, and the FP8
    path really ran: the error is far above fp32's 1e-5."""
    model = wide_model if precision == "fp8" else tiny_models["qwen3_moe"]
    ref = reference("wide" if precision == "fp8" else "qwen3_moe")
    plan = ilp_plan(read_model_config(model.path).num_moe_layers, 2)
    worst = 0.0
    with EPGroup.create(config(model.path, 2, precision=precision), plan=plan) as group:
        assert {i["precision"] for i in group.worker_info()} == {precision}
        history = {s: list(p) for s, p in enumerate(PROMPTS[:4])}
        inputs = [[(s, history[s]) for s in (0, 2)], [(s, history[s]) for s in (1, 3)]]
        for _ in range(3):
            outs = group.step(inputs)
            for out in outs:
                for s, row in zip(out.seq_ids, out.logits, strict=True):
                    with torch.no_grad():
                        want = ref(torch.tensor([history[s]])).logits[0, -1]
                    err = float((torch.tensor(row) - want).abs().max())
                    assert err <= FP8_TOLERANCE[precision] * float(want.abs().max()), (s, err)
                    worst = max(worst, err)
                    history[s].append(int(want.argmax()))
            inputs = [[(s, [history[s][-1]]) for s, _ in batch] for batch in inputs]
    assert worst > 1e-3


def test_measured_exchange_time_excludes_waiting_for_a_late_rank(ray_cluster, tiny_models):
    """Worker 1 starts its step 2 s late: worker 0's first dispatch must not be timed as that wait."""
    with EPGroup.create(config(tiny_models["mixtral"].path, 2)) as group:
        # a step first, so that the exchange's first-use setup (slow on a loaded 2-core machine) is not timed
        group.step([[(3, [5])], [(4, [8])]], return_logits=False)
        outs = group.step([[(1, [5, 6, 7])], [(2, [8, 9])]], return_logits=False, measure=True,
                          pause_s=[0.0, 2.0])
    first = outs[0].layers[0]
    assert outs[0].seconds > 1.9  # worker 0 did wait for worker 1 ...
    assert first.dispatch_s < 1.0 and first.combine_s < 1.0  # ... at the barrier, not inside the exchange
    assert first.route_s < 1.0


def test_compiled_steps_give_the_results_of_actor_calls(ray_cluster, tiny_models):
    """Steps through a Ray compiled graph (the GPU default) against plain actor calls: same logits and
    the same greedy tokens (failures through the graph: the killed-worker test below)."""
    path = tiny_models["qwen3_moe"].path
    prompts = [[5, 17, 3], [2, 8], [61, 7, 7, 30]]
    results = []
    for compiled in (False, True):
        with EPGroup.create(config(path, 2, compiled_steps=compiled)) as group:
            outs = group.step([[(9, [4, 4, 9])], [(8, [1])]])
            group.free([9, 8])
            results.append(([o.logits for o in outs], group.generate(prompts, 6)))
            if compiled:  # calls that run the model outside `step` release the graph; the next step rebuilds it
                group.apply_plan(group.plan)
                assert not group._compiled.built
                assert group.generate(prompts, 6, first_seq_id=20) == results[-1][1]
    (plain_logits, plain_tokens), (graph_logits, graph_tokens) = results
    assert graph_tokens == plain_tokens
    for a, b in zip(graph_logits, plain_logits, strict=True):
        np.testing.assert_array_equal(a, b)


def test_fixed_shape_decode_steps_across_workers_match_the_reference(ray_cluster, tiny_models, reference,
                                                                     greedy_reference):
    """Decode steps at fixed shapes on 2 workers (on a GPU: CUDA graphs through symm_mem; here the same
    padded steps run eagerly over gloo) under an ilp plan with replicas: uneven batches pad to the group's
    largest, a worker without sequences still joins every exchange, and logits and 32 greedy tokens equal
    `transformers`'."""
    family = "qwen3_moe"
    path = tiny_models[family].path
    ref = reference(family)
    plan = ilp_plan(read_model_config(path).num_moe_layers, 2)
    with EPGroup.create(config(path, 2, decode_graphs=True), plan=plan) as group:
        assert_logits_match(group, ref, first_id=0)  # 3 + 2 sequences: worker 1 pads 2 rows to 4
        assert [i["decode_steps"] for i in group.worker_info()] == [2, 2]
        # Worker 1 brings nothing: it runs 4 padding rows through the exchange with worker 0's 3 sequences.
        history = {s: list(p) for s, p in zip((10, 12, 14), PROMPTS[:3], strict=True)}
        outs = group.step([[(s, p) for s, p in history.items()], []])
        for _ in range(2):
            nxt = {s: int(np.argmax(row)) for s, row in zip(outs[0].seq_ids, outs[0].logits, strict=True)}
            for s, t in nxt.items():
                history[s].append(t)
            outs = group.step([[(s, [t]) for s, t in nxt.items()], []])
            assert outs[1].seq_ids == []
            for s, row in zip(outs[0].seq_ids, outs[0].logits, strict=True):
                with torch.no_grad():
                    want = ref(torch.tensor([history[s]])).logits[0, -1]
                torch.testing.assert_close(torch.tensor(row), want, atol=ATOL, rtol=RTOL)
        assert [i["decode_steps"] for i in group.worker_info()] == [4, 4]
        group.free(list(history))
        assert group.generate(PROMPTS, 32) == greedy_reference(family)


@pytest.mark.parametrize("compiled", [False, True], ids=["actor-calls", "compiled-graph"])
def test_killed_worker_fails_the_step_then_the_group_can_be_recreated(ray_cluster, tiny_models, compiled):
    path = tiny_models["olmoe"].path
    group = EPGroup.create(config(path, 2, timeouts={"step_s": 60}, compiled_steps=compiled))
    victim = group.pids()[1]
    threading.Timer(1.0, os.kill, (victim, signal.SIGKILL)).start()
    start = time.monotonic()
    with pytest.raises(WorkerFailure, match="worker 1 died"):
        group.step([[(0, [1, 2, 3])], [(1, [4, 5])]], pause_s=[0.0, 30.0])
    assert time.monotonic() - start < 20  # detected from the death, not the 60 s step timeout
    with pytest.raises(GroupError, match="unusable"):
        group.step([[(0, [1])], [(1, [2])]])

    # A hung worker: the step gives up at its timeout and tears the group down.
    group = EPGroup.create(config(path, 2, timeouts={"step_s": 3}, compiled_steps=compiled))
    start = time.monotonic()
    with pytest.raises(StepTimeout, match="did not answer within 3 s"):
        group.step([[(0, [1, 2, 3])], [(1, [4, 5])]], pause_s=[30.0, 0.0])
    assert time.monotonic() - start < 10

    with EPGroup.create(config(path, 2, compiled_steps=compiled)) as group:
        outs = group.step([[(0, [1, 2, 3])], [(1, [4, 5])]])
        assert [o.seq_ids for o in outs] == [[0], [1]]
    if compiled:
        # Ray's log records of the failed teardowns keep their tracebacks as text only: records kept with
        # frames kept the torn-down graphs alive until exit, and this test's process then crashed there.
        import gc

        from ray.dag import compiled_dag_node

        gc.collect()
        assert len(compiled_dag_node._compiled_dags) == 0


def test_kv_budget_refuses_a_step_before_it_runs_and_async_steps_match(ray_cluster, tiny_models):
    """Each worker holds 3 blocks of 4 tokens: a step that would need a fourth is refused before any worker
    runs it, the group keeps serving, and freeing gives the blocks back. `step_async` answers as `step`."""
    import asyncio

    from expertmesh.workers.ledger import KVBudgetError

    with EPGroup.create(config(tiny_models["mixtral"].path, 2, kv_block_size=4, kv_blocks=3)) as group:
        assert group.ledger.blocks == [3, 3]
        group.step([[(0, list(range(9)))], [(1, [1, 2])]])  # 3 blocks on worker 0, 1 on worker 1
        assert (group.ledger.used(0), group.ledger.used(1)) == (3, 1)
        with pytest.raises(KVBudgetError, match="worker 0 would need 1 more KV blocks of 4 tokens, 0 of its 3"):
            group.step([[(0, [5, 5, 5, 5])], []])  # 9 + 4 = 13 tokens: a 4th block
        with pytest.raises(KVBudgetError, match="worker 1 would need 3 more"):
            group.step([[], [(2, list(range(10)))]])
        assert group.ledger.length == {0: 9, 1: 2}  # nothing recorded for the refused steps
        sync = group.step([[(0, [5, 6, 7])], [(1, [3])]])  # 12 tokens fit 3 blocks exactly
        group.free([0])
        assert group.ledger.used(0) == 0
        group.step([[(3, list(range(9)))], [(4, [1, 2])]])
        async_out = asyncio.run(group.step_async([[(3, [5, 6, 7])], [(4, [3])]]))
        for a, b in zip(sync, async_out, strict=True):
            np.testing.assert_array_equal(a.logits, b.logits)  # the same histories, the same logits


def test_bad_plans_and_inputs_are_refused_with_the_field_named(ray_cluster, tiny_models):
    path = tiny_models["mixtral"].path
    wrong_layers = Placement(np.tile(np.arange(8), (2, 1)), num_gpus=2, num_experts=8)
    with pytest.raises(PlanMismatchError, match="2 MoE layers x 8 experts.*3 MoE layers x 8 experts"):
        EPGroup.create(config(path), plan=wrong_layers)
    wrong_experts = Placement(np.tile(np.arange(6), (3, 1)), num_gpus=2, num_experts=6)
    with pytest.raises(PlanMismatchError, match="6 experts"):
        EPGroup.create(config(path), plan=wrong_experts)
    with pytest.raises(PlanMismatchError, match="made for 2 GPUs, the group has 4"):
        EPGroup.create(config(path, 4), plan=ilp_plan(3, 2))
    with pytest.raises(PlanMismatchError, match="divisor"):
        EPGroup.create(config(path, 3))
    with EPGroup.create(config(path, 2)) as group:
        group.step([[(0, [1, 2])], []])
        with pytest.raises(ValueError, match="sequence 0 lives on worker 0"):
            group.step([[], [(0, [3])]])
        with pytest.raises(ValueError, match=r"token ids of sequence 5 must be integers in \[0, 96\)"):
            group.step([[(5, [96])], []])
        with pytest.raises(ValueError, match=r"token ids of sequence 6 must be integers"):
            group.step([[(4, [1]), (6, [2.5])], []])
        with pytest.raises(ValueError, match=r"token ids of sequence 7 must be integers"):
            group.step([[(4, [1]), (7, [[1, 2], [3]])], []])
        with pytest.raises(ValueError, match="sampling: expected one SamplingParams, or one per input"):
            group.step([[(0, [3])], []], sampling=[[GREEDY, GREEDY], []])
        with pytest.raises(ValueError, match="one list per worker"):
            group.step([[(0, [3])]])
        assert group.step([[(0, [3])], []])[0].seq_ids == [0]  # still serving after refused inputs
