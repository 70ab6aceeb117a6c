"""The balanced replica rule (the run-time hedge) in torch equals placement's numpy rule exactly, and the
MoE pipeline under it gives the weighted expert sum on 2 and 4 gloo ranks, with every rank's serving GPUs
and dispatch counts equal to the single-process (numpy, all tokens) result.

Run: pytest tests/kernels/test_kernels_hedge.py
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from kernel_cases import TOKEN_COUNTS, expert_weights, naive_moe, random_phy2log, random_routing

from expertmesh.kernels import (
    REPLICA_RULES,
    AllToAllExchange,
    DenseExperts,
    ExpertMap,
    build_layout,
    choose_balanced,
    expert_counts,
    moe_forward,
)
from expertmesh.kernels.replicas import SPLIT_PASSES, SPLIT_STEPS, balanced_split_reference, split_order, split_passes
from expertmesh.placement import routing


def test_rule_constants_agree_with_placement():
    assert REPLICA_RULES == routing.REPLICA_RULES
    assert (SPLIT_PASSES, SPLIT_STEPS) == (routing.SPLIT_PASSES, routing.SPLIT_STEPS)
    assert [split_passes(r) for r in range(40)] == [routing.split_passes(r) for r in range(40)]


def _ids(rng: np.random.Generator, T: int, E: int, k: int, skew: bool) -> np.ndarray:
    p = np.arange(1, E + 1, dtype=np.float64) ** (-1.5 if skew else 0.0)
    ids = [rng.choice(E, k, replace=False, p=p / p.sum()) for _ in range(T)]
    return np.array(ids, dtype=np.int64).reshape(T, k)


@pytest.mark.parametrize("T", TOKEN_COUNTS)
@pytest.mark.parametrize("G,nodes,S,E,k", [(2, 1, 5, 8, 2), (4, 2, 20, 64, 8), (6, 2, 8, 40, 4), (8, 4, 36, 256, 8)])
def test_choose_balanced_matches_numpy_rule(T, G, nodes, S, E, k):
    """Every rank, from the counts of all ranks, places its own pairs exactly as numpy places all of them."""
    rng = np.random.default_rng(T + 7 * G + E)
    emap = ExpertMap.from_phy2log(random_phy2log(rng, E, G, S), G, nodes, E, replica_rule="balanced")
    while not emap.balanced:  # draw until some expert has replicas on several GPUs
        emap = ExpertMap.from_phy2log(random_phy2log(rng, E, G, S), G, nodes, E, replica_rule="balanced")
    replicas, node = emap.replicas.numpy(), emap.node_of_gpu.numpy()
    ids = _ids(rng, T, E, k, skew=True)
    source = rng.integers(0, G, T)
    want = routing.choose_balanced(ids, source, replicas, node)
    counts = torch.stack([expert_counts(torch.from_numpy(ids[source == r]), E) for r in range(G)])
    assert np.array_equal(counts.numpy(), routing.route_counts(ids, source, E, G))
    for rank in range(G):
        mine = source == rank
        got = choose_balanced(torch.from_numpy(ids[mine]), rank, counts, emap.replicas > 0, emap.replicated,
                              emap.node_of_gpu)
        assert got.dtype == torch.int64 and np.array_equal(got.numpy(), want[mine])


def test_split_reference_matches_numpy_on_random_totals():
    rng = np.random.default_rng(3)
    for _ in range(50):
        E, G = int(rng.integers(1, 30)), int(rng.integers(1, 13))
        hosts = np.zeros((E, G), dtype=bool)
        for e in range(E):
            hosts[e, rng.choice(G, rng.integers(1, G + 1), replace=False)] = True
        totals = rng.integers(0, 500, E)
        replicated = torch.from_numpy(np.flatnonzero(hosts.sum(1) > 1))
        got = balanced_split_reference(torch.from_numpy(totals), torch.from_numpy(hosts),
                                       split_order(torch.from_numpy(totals), replicated))
        assert np.array_equal(got.numpy(), routing.balanced_split(totals, hosts))


def test_build_layout_needs_the_counts_under_the_balanced_rule():
    emap = ExpertMap.from_phy2log(np.array([0, 1, 0, 2]), 2, replica_rule="balanced")
    with pytest.raises(ValueError, match="counts"):
        build_layout(torch.zeros(3, 1, dtype=torch.int64), torch.ones(3, 1), emap, 0)
    with pytest.raises(ValueError, match="replica_rule"):
        ExpertMap.from_phy2log(np.arange(4), 2, replica_rule="lplb")


H, F = 32, 16
TOKENS = [40, 0, 65, 7]  # tokens on rank r


def _case(G: int, seed: int):
    """A skewed router on experts 0..E-1 with the hot ones replicated: the balanced rule has work to do."""
    E, k, nodes = 12, 3, 2 if G == 4 else 1
    S = -(-(E + 4) // G)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    phy2log = np.concatenate([np.arange(E), np.zeros(G * S - E - 2, dtype=np.int64), [1, 2]])
    phy2log = rng.permutation(phy2log)
    w13, w2 = expert_weights(gen, E, H, F)
    data = []
    for r in range(G):
        ids = torch.from_numpy(_ids(rng, TOKENS[r], E, k, skew=True))
        data.append((torch.randn(TOKENS[r], H, generator=gen), ids, random_routing(gen, TOKENS[r], E, k)[1]))
    return phy2log, nodes, E, w13, w2, data


def _check_rank(rank: int, G: int) -> None:
    phy2log, nodes, E, w13, w2, data = _case(G, seed=G)
    emap = ExpertMap.from_phy2log(phy2log, G, nodes, E, replica_rule="balanced")
    x, ids, weights = data[rank]
    ex = AllToAllExchange()
    local = emap.slot_expert[rank]
    out = moe_forward(x, ids, weights, emap, ex, DenseExperts(w13[local], w2[local]))
    err = float((out.double() - naive_moe(x, ids, weights, w13, w2)).abs().max()) if len(x) else 0.0
    assert err <= 1e-4, f"rank {rank}: max error {err}"
    # The single-process result: numpy's rule over every rank's tokens, and its dispatch counts.
    all_ids = np.concatenate([d[1].numpy() for d in data])
    source = np.repeat(np.arange(G), [len(d[1]) for d in data])
    gpus = routing.choose_balanced(all_ids, source, emap.replicas.numpy(), emap.node_of_gpu.numpy())
    pairs = routing.dispatch_counts(gpus, source, G)
    assert np.array_equal(ex.last_dispatch.rows.numpy(), pairs[rank])
    counts = ex.gather_counts(expert_counts(ids, E))
    mine = build_layout(ids, weights, emap, rank, counts=counts)
    assert np.array_equal(mine.gpus.numpy(), gpus[source == rank])


def _worker(rank: int, G: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=G)
    try:
        _check_rank(rank, G)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("G", [2, 4])
def test_gloo_balanced_rule_equals_single_process(G):
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(G, os.path.join(tmp, "rendezvous")), nprocs=G, join=True,
                           start_method="fork")
