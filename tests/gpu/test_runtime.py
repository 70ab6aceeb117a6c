"""The EP runtime on GPUs: NCCL groups of Ray actors, one GPU each (skips without CUDA or Ray).

    python -m pytest tests/gpu/test_runtime.py -q

On CUDA in fp32 our logits equal `transformers`' within atol 1e-4 + rtol 1e-3 (TF32 is off on both sides;
CUDA kernels sum in other orders than the CPU), greedy tokens are identical, and routing replay's measured
dispatch bytes equal the cost model's exactly, for the all_to_all and the symmetric-memory exchanges.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu]

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
ray = pytest.importorskip("ray")
transformers = pytest.importorskip("transformers")

from expertmesh.placement.cost import CostParams, evaluate  # noqa: E402
from expertmesh.placement.eplb import eplb  # noqa: E402
from expertmesh.placement.stats import stats_from_trace  # noqa: E402
from expertmesh.placement.synthetic import SyntheticSpec, synthetic_trace  # noqa: E402
from expertmesh.placement.topology import Topology  # noqa: E402
from expertmesh.workers import EPGroup, GroupConfig, load_local_model, run_step  # noqa: E402

NUM_GPUS = torch.cuda.device_count()
PROMPTS = [[5, 17, 3, 44, 9], [2, 8], [61, 7, 7, 30, 12, 90, 1], [33, 4, 4]]
ATOL, RTOL = 1e-4, 1e-3


@pytest.fixture(scope="module")
def ref(checkpoint):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).cuda().eval()


@pytest.fixture(scope="module")
def cluster():
    if not ray.is_initialized():
        os.environ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"  # symm_mem: workers see both GPUs
        ray.init(num_cpus=4, num_gpus=NUM_GPUS, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def greedy(ref, prompt, n):
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(ref(torch.tensor([tokens], device="cuda")).logits[0, -1].argmax()))
    return tokens[len(prompt):]


def test_local_model_on_cuda_matches_reference_fp32_and_bf16(checkpoint, ref):
    model = load_local_model(checkpoint, torch.float32, "cuda")
    logits, _ = run_step(model, [(i, p) for i, p in enumerate(PROMPTS)])
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            want = ref(torch.tensor([p], device="cuda")).logits[0, -1]
            torch.testing.assert_close(logits[i], want, atol=ATOL, rtol=RTOL)
    bf16 = load_local_model(checkpoint, torch.bfloat16, "cuda")
    low, _ = run_step(bf16, [(i, p) for i, p in enumerate(PROMPTS)])
    assert (low - logits).abs().max() < 0.05 * logits.abs().max()  # bf16 rounding, not a different model


@pytest.mark.skipif(NUM_GPUS < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("exchange,rule", [("all_to_all", "fixed"), ("symm_mem", "fixed"), ("all_to_all", "balanced"),
                                           ("symm_mem", "balanced")])
def test_two_gpu_group_matches_reference_and_replay_bytes_match_cost_model(cluster, checkpoint, ref, exchange, rule):
    trace = synthetic_trace(SyntheticSpec(num_experts=8, top_k=2, num_layers=3, num_tokens=512, num_domains=4,
                                          tokens_per_sequence=32, seed=3))
    topo = Topology(2)
    plan = eplb(stats_from_trace(trace), topo, 10)
    config = GroupConfig(model=str(checkpoint), workers=2, device="cuda", dtype="float32", exchange=exchange,
                         max_tokens=1024, replica_rule=rule)
    with EPGroup.create(config, plan=plan) as group:
        outs = group.step([[(i, p) for i, p in enumerate(PROMPTS) if i % 2 == r] for r in range(2)])
        with torch.no_grad():
            for out in outs:
                for s, row in zip(out.seq_ids, out.logits, strict=True):
                    want = ref(torch.tensor([PROMPTS[s]], device="cuda")).logits[0, -1].cpu()
                    torch.testing.assert_close(torch.tensor(row), want, atol=ATOL, rtol=RTOL)
        group.free(range(len(PROMPTS)))
        assert group.generate(PROMPTS, 12, first_seq_id=10) == [greedy(ref, p, 12) for p in PROMPTS]

        home = trace.home_gpus(2)
        inputs, ids = [], []
        for r in range(2):
            mine = np.flatnonzero(home == r)
            seqs: dict[int, list[int]] = {}
            for t in mine:
                seqs.setdefault(int(trace.seq_ids[t]), []).append(int(t) % 128)
            inputs.append([(100 + s, toks) for s, toks in seqs.items()])
            ids.append(trace.topk_ids[mine])
        outs = group.replay(inputs, ids)
        predicted = evaluate(trace, plan, topo, CostParams(hidden=64, ffn=48, dispatch_bytes=4), keep_pairs=True,
                             replica_rule=rule)
        for layer in range(3):
            sent = np.array([o.layers[layer].dispatch_payload for o in outs])
            assert np.array_equal(sent, predicted.dispatch_pairs[layer] * 64 * 4)


def _greedy_decode(model, prompts, steps):
    """Greedy tokens and each decode step's logits of `prompts` (sequence ids 0..)."""
    logits, _ = run_step(model, [(i, p) for i, p in enumerate(prompts)])
    tokens, history = [[] for _ in prompts], []
    for _ in range(steps):
        nxt = logits.argmax(-1).tolist()
        for i, t in enumerate(nxt):
            tokens[i].append(t)
        logits, _ = run_step(model, [(i, [t]) for i, t in enumerate(nxt)])
        history.append(logits)
    return tokens, history


def test_fixed_shape_decode_on_cuda_matches_reference_fp32(checkpoint, ref):
    """fp32 takes the fixed-shape decode path eagerly (no graph: its GEMM loop reads sizes back)."""
    model = load_local_model(checkpoint, torch.float32, "cuda", decode_graphs=True)
    prompts = PROMPTS[:3]
    tokens, _ = _greedy_decode(model, prompts, 20)  # the 7-token prompt passes position 16: a second block
    assert sorted(model.decoder.entries) == [4] and model.decoder.captures == 0
    assert tokens == [greedy(ref, p, 20) for p in prompts]


def test_decode_cuda_graphs_replay_the_eager_fixed_shape_step_bf16(checkpoint):
    """bf16 decode steps replayed as CUDA graphs give the same logits as the same step run eagerly, through
    padding (3 rows -> 4) and sequences that cross into new cache blocks (the graph is captured once)."""
    graphs = load_local_model(checkpoint, torch.bfloat16, "cuda")
    eager = load_local_model(checkpoint, torch.bfloat16, "cuda")
    eager.decoder.capture = False
    prompts = PROMPTS[:3]
    got_tokens, got = _greedy_decode(graphs, prompts, 20)
    want_tokens, want = _greedy_decode(eager, prompts, 20)
    assert graphs.decoder.capture and graphs.decoder.captures == 1  # no fallback; growth needs no new graph
    assert got_tokens == want_tokens
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(NUM_GPUS < 2, reason="needs 2 GPUs")
def test_two_gpu_decode_cuda_graphs_through_symm_mem_match_one_gpu_bf16(cluster, checkpoint):
    """bf16 decode steps replayed as CUDA graphs on both GPUs, the symm_mem exchange inside the graphs, give
    the logits of the same steps run eagerly on one GPU: through sequences crossing into new cache blocks
    (one capture per worker), and a step where worker 1 has no sequence (it replays padding rows through the
    exchange)."""
    local = load_local_model(checkpoint, torch.bfloat16, "cuda")
    local.decoder.capture = False
    tokens, want = _greedy_decode(local, PROMPTS, 14)  # the 7-token prompt passes position 16: a second block

    def close(got, ref):
        torch.testing.assert_close(torch.tensor(got), ref.float().cpu(), atol=0.03 * float(ref.abs().max()),
                                   rtol=0.02)

    homes = [[i for i in range(len(PROMPTS)) if i % 2 == r] for r in range(2)]
    config = GroupConfig(model=str(checkpoint), workers=2, device="cuda", dtype="bfloat16", exchange="symm_mem",
                         max_tokens=64)
    with EPGroup.create(config) as group:
        group.step([[(i, PROMPTS[i]) for i in mine] for mine in homes])
        for step in range(14):
            outs = group.step([[(i, [tokens[i][step]]) for i in mine] for mine in homes])
            got = {s: row for o in outs for s, row in zip(o.seq_ids, o.logits, strict=True)}
            for i in range(len(PROMPTS)):
                close(got[i], want[step][i])
        infos = group.worker_info()
        assert [i["decode_steps"] for i in infos] == [14, 14]
        assert all(i["decode_graphs"] == 1 for i in infos), infos  # captured once: growth needs no new graph
        last = {i: int(want[-1][i].argmax()) for i in homes[0]}
        outs = group.step([[(i, [t]) for i, t in last.items()], []])
        ref, _ = run_step(local, [(i, [t]) for i, t in last.items()])
        for row, r in zip(outs[0].logits, ref, strict=True):
            close(row, r)
        assert outs[1].seq_ids == []


@pytest.mark.parametrize("num_workers", [1, pytest.param(2, marks=pytest.mark.skipif(NUM_GPUS < 2,
                                                                                   reason="needs 2 GPUs"))])
def test_compiled_steps_match_reference_then_replay_runs(cluster, checkpoint, ref, num_workers):
    """Steps through a Ray compiled graph (opt-in) give the reference's greedy tokens on 1 and 2 GPUs, and
    a routing replay afterwards (a plain actor call; the group releases the graph first) still answers.
    A previous version stopped answering on the device somewhere in this sequence (runtime.notes.md); the
    60 s step timeout turns a repeat into a StepTimeout naming the workers instead of a hang."""
    config = GroupConfig(model=str(checkpoint), workers=num_workers, device="cuda", dtype="float32",
                         compiled_steps=True, timeouts={"step_s": 60})
    with EPGroup.create(config) as group:
        assert group.generate(PROMPTS, 8) == [greedy(ref, p, 8) for p in PROMPTS]
        ids = np.zeros((5, 3, 2), dtype=np.int32)
        ids[:, :, 1] = 1
        outs = group.replay([[(100, [1, 2, 3, 4, 5])]] + [[] for _ in range(num_workers - 1)],
                            [ids] + [np.zeros((0, 3, 2), np.int32)] * (num_workers - 1))
        assert outs[0].num_tokens == 5
        assert group.generate(PROMPTS[:1], 4, first_seq_id=50) == [greedy(ref, PROMPTS[0], 4)]
