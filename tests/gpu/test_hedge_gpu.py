"""The balanced replica rule (the run-time hedge) on CUDA: the split kernel against numpy, the rule on the GPU
against numpy at the benchmark's shape, both exchanges on 2 GPUs against the single-process result, and
capture in a CUDA graph (no host sync). Skips cleanly without CUDA.

Run (on a machine with GPUs): pytest tests/gpu/test_hedge_gpu.py
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import triton_checks as tc  # tests/kernels, on the path through tests/gpu/conftest.py
from kernel_cases import expert_weights, naive_moe, random_phy2log

from expertmesh.kernels import (
    AllToAllExchange,
    DenseExperts,
    ExpertMap,
    SymmMemExchange,
    choose_balanced,
    expert_counts,
    moe_forward,
)
from expertmesh.placement import routing

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

DEV = "cuda"
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


def test_split_kernel_matches_numpy():
    tc.check_balanced_split(DEV, cases=40, max_experts=300)


def _skewed_ids(rng: np.random.Generator, T: int, E: int, k: int) -> np.ndarray:
    scores = np.log(rng.random((T, E))) / (1.0 + np.arange(E)[None, :] % 7)  # expert popularity varies
    return np.argsort(scores, axis=1)[:, -k:].astype(np.int64)


@pytest.mark.parametrize("G,nodes", [(8, 1), (32, 4)])
def test_rule_on_gpu_matches_numpy_at_the_benchmark_shape(G, nodes):
    """4096 tokens x 256 experts x top-8 per rank, every rank's pairs placed on the GPU equal numpy's."""
    rng = np.random.default_rng(G)
    T, E, k = 4096, 256, 8
    emap = ExpertMap.from_phy2log(random_phy2log(rng, E, G, (E + G) // G), G, nodes, E, DEV, "balanced")
    assert emap.balanced
    ids = [_skewed_ids(rng, T if r < 2 else 64, E, k) for r in range(G)]  # ranks 0, 1 full; the rest small
    counts = torch.stack([expert_counts(torch.from_numpy(i).to(DEV), E) for i in ids])
    source = np.repeat(np.arange(G), [len(i) for i in ids])
    want = routing.choose_balanced(np.concatenate(ids), source, emap.replicas.cpu().numpy(),
                                   emap.node_of_gpu.cpu().numpy())
    for rank in (0, 1, G - 1):
        got = choose_balanced(torch.from_numpy(ids[rank]).to(DEV), rank, counts, emap.replicas > 0,
                              emap.replicated, emap.node_of_gpu)
        assert np.array_equal(got.cpu().numpy(), want[source == rank])


def test_rule_is_captured_in_a_cuda_graph():
    """No host synchronisation: the rule records into a CUDA graph, and a replay with new ids is exact."""
    rng = np.random.default_rng(5)
    G, T, E, k = 8, 512, 64, 4
    emap = ExpertMap.from_phy2log(random_phy2log(rng, E, G, 10), G, 1, E, DEV, "balanced")
    ids = torch.from_numpy(_skewed_ids(rng, T, E, k)).to(DEV)
    counts = torch.stack([expert_counts(ids, E).roll(r) for r in range(G)])
    hosts = emap.replicas > 0

    def rule():
        return choose_balanced(ids, 0, counts, hosts, emap.replicated, emap.node_of_gpu)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        rule()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rule()
    ids.copy_(torch.from_numpy(_skewed_ids(rng, T, E, k)))
    counts.copy_(torch.stack([expert_counts(ids, E).roll(r) for r in range(G)]))
    graph.replay()
    assert torch.equal(out, choose_balanced(ids, 0, counts, hosts, emap.replicated, emap.node_of_gpu, impl="torch"))


def test_symm_loopback_balanced_rule_one_gpu():
    tc.symm_loopback_moe(DEV, 4, 4, 16, 8, [300, 0, 77, 1024], False, replica_rule="balanced")


def _two_gpu_worker(rank: int, init_file: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60), device_id=torch.device(DEV, rank))
    try:
        rng = np.random.default_rng(9)
        gen = torch.Generator().manual_seed(9)
        E, k, H, F, T = 16, 4, 128, 64, [700, 300]
        phy2log = np.concatenate([np.arange(E), [0, 0, 1, 2]])
        phy2log = rng.permutation(phy2log)
        emap = ExpertMap.from_phy2log(phy2log, 2, 1, E, DEV, "balanced")
        w13, w2 = expert_weights(gen, E, H, F)
        ids = [_skewed_ids(rng, t, E, k) for t in T]
        xs = [torch.randn(t, H, generator=gen) for t in T]
        ws = [torch.rand(t, k, generator=gen) + 0.05 for t in T]
        source = np.repeat([0, 1], T)
        gpus = routing.choose_balanced(np.concatenate(ids), source, emap.replicas.cpu().numpy(), np.zeros(2, int))
        pairs = routing.dispatch_counts(gpus, source, 2)
        local = emap.slot_expert[rank].cpu()
        experts = DenseExperts(w13[local].to(DEV), w2[local].to(DEV))
        x, i, w = xs[rank].to(DEV), torch.from_numpy(ids[rank]).to(DEV), ws[rank].to(DEV)
        want = naive_moe(xs[rank][:128], torch.from_numpy(ids[rank][:128]), ws[rank][:128], w13, w2)
        for ex in (AllToAllExchange(), SymmMemExchange(None, max(T), H, k, torch.float32)):
            out = moe_forward(x, i, w, emap, ex, experts)
            assert float((out[:128].double().cpu() - want).abs().max()) <= 1e-3
            assert np.array_equal(ex.last_dispatch.rows.cpu().numpy(), pairs[rank])
    finally:
        dist.destroy_process_group()


@two_gpus
def test_two_gpu_exchanges_under_the_balanced_rule_equal_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_two_gpu_worker, args=(os.path.join(tmp, "rendezvous"),), nprocs=2, join=True,
                           start_method="spawn")
