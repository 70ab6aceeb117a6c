"""Dispatch then combine returns sum_k w_k * expert_k(x) for every token: 1 rank, and 2 / 4 gloo processes.

Each process owns different token counts (0, 1, 33, ...), the placements carry replicas (two nodes at 4
ranks, so the same-node rule is exercised), top-1 and top-8 routing leave experts without tokens, and
dispatch runs in float32 and FP8. The bytes each call records must match the layout's copy counts.

Run: pytest tests/kernels/test_kernels_exchange.py
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from kernel_cases import (
    expert_weights,
    fp8_moe_tolerance,
    moe_on_rank,
    naive_layout,
    naive_moe,
    random_phy2log,
    random_routing,
)

from expertmesh.kernels import (
    AllToAllExchange,
    DenseExperts,
    ExpertMap,
    LocalExchange,
    Precision,
    make_experts,
    moe_forward,
)

H, F = 64, 32
TOKENS = [33, 0, 1, 70]  # tokens on rank r: TOKENS[r % 4]


def _case(G: int, k: int, E: int, S: int, nodes: int, seed: int):
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    phy2log = random_phy2log(rng, E, G, S)
    w13, w2 = expert_weights(gen, E, H, F)
    per_rank = []
    for r in range(G):
        T = TOKENS[r % 4]
        ids, weights = random_routing(gen, T, E, k, skew=True)
        per_rank.append((torch.randn(T, H, generator=gen), ids, weights))
    return phy2log, w13, w2, per_rank


CASES = [  # (k, E, S per GPU, nodes at 4 ranks)
    (1, 8, 6, 2),
    (2, 8, 5, 1),
    (8, 16, 12, 2),
]


def _check_rank(rank: int, G: int, fp8: bool) -> None:
    for i, (k, E, S, nodes4) in enumerate(CASES):
        nodes = nodes4 if G == 4 else 1
        phy2log, w13, w2, per_rank = _case(G, k, E, S, nodes, seed=100 * i + G)
        emap = ExpertMap.from_phy2log(phy2log, G, nodes, E)
        x, ids, weights = per_rank[rank]
        ex = AllToAllExchange(fp8=fp8)
        out, layout, received, _ = moe_on_rank(x, ids, weights, emap, ex, w13, w2, rank)
        want = naive_moe(x, ids, weights, w13, w2)
        assert out.shape == x.shape and out.dtype == x.dtype
        tol = fp8_moe_tolerance(want) if fp8 else 1e-4
        # (Plain comparisons: assert_close imports DTensor once torch.distributed is up, ~6 s per process.)
        err = float((out.double() - want).abs().max()) if want.numel() else 0.0
        assert err <= tol, f"case {i} rank {rank}: max error {err} > {tol}"
        # Bytes: one copy per destination, exactly the cost model's counts.
        naive = naive_layout(ids, phy2log, E, G, nodes, rank)
        traffic = ex.last_dispatch
        assert np.array_equal(traffic.rows.numpy(), naive["dispatch_counts"])
        elem = 1 if fp8 else 4
        assert np.array_equal(traffic.payload.numpy(), naive["dispatch_counts"] * H * elem)
        # What every rank received is what every rank sent to it.
        sent = torch.tensor(naive["dispatch_counts"])
        dist.all_reduce(sent)
        assert int(received.counts.sum()) == int(sent[rank])
        assert np.array_equal(ex.last_combine.rows.numpy(), received.counts.numpy())


def _worker(rank: int, G: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=G)
    try:
        for fp8 in (False, True):
            _check_rank(rank, G, fp8)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("G", [2, 4])
def test_gloo_dispatch_combine_equals_weighted_expert_sum(G):
    with tempfile.TemporaryDirectory() as tmp:
        # fork: the children inherit the imported modules (spawning re-imports torch in every process).
        mp.start_processes(_worker, args=(G, os.path.join(tmp, "rendezvous")), nprocs=G, join=True,
                           start_method="fork")


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("T,k", [(0, 2), (1, 1), (33, 8), (4096, 2)])
def test_local_exchange_single_rank(T, k, fp8):
    E, S = 16, 20  # 4 redundant slots on the one GPU
    rng = np.random.default_rng(T)
    gen = torch.Generator().manual_seed(T)
    phy2log = random_phy2log(rng, E, 1, S)
    emap = ExpertMap.from_phy2log(phy2log, 1)
    w13, w2 = expert_weights(gen, E, H, F)
    x = torch.randn(T, H, generator=gen)
    ids, weights = random_routing(gen, T, E, k, skew=True)
    ex = LocalExchange(fp8=fp8)
    local = emap.slot_expert[0]
    out = moe_forward(x, ids, weights, emap, ex, DenseExperts(w13[local], w2[local]))
    n = min(T, 200)  # the per-token loop is slow; the vectorised path covers all rows the same way
    want = naive_moe(x[:n], ids[:n], weights[:n], w13, w2)
    tol = fp8_moe_tolerance(want) if fp8 else 1e-4
    torch.testing.assert_close(out[:n].double(), want, rtol=0, atol=tol)
    assert ex.last_dispatch.wire_bytes() == 0 and int(ex.last_dispatch.rows.sum()) == T


@pytest.mark.parametrize("T", [0, 1, 33, 300])
def test_fp8_experts_through_the_pipeline(T):
    """Precision "fp8": FP8 dispatch into block-scaled FP8 expert GEMMs (128 x 128 weight blocks, 1 x 128
    activation tiles; the CPU runs the kernels' torch references), replicas on the one GPU."""
    E, S, Hb, Fb, k = 8, 10, 128, 128, 2
    rng = np.random.default_rng(T)
    gen = torch.Generator().manual_seed(T)
    emap = ExpertMap.from_phy2log(random_phy2log(rng, E, 1, S), 1)
    w13, w2 = expert_weights(gen, E, Hb, Fb)
    local = emap.slot_expert[0]
    x = torch.randn(T, Hb, generator=gen)
    ids, weights = random_routing(gen, T, E, k, skew=True)
    ex = LocalExchange(fp8=Precision.FP8.fp8_dispatch)
    out = moe_forward(x, ids, weights, emap, ex, make_experts(w13[local], w2[local], Precision.FP8))
    want = naive_moe(x, ids, weights, w13, w2)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=fp8_moe_tolerance(want))
    # Not the dense path by accident: FP8 weights differ from the float ones, so the outputs do too.
    if T:
        dense = moe_forward(x, ids, weights, emap, LocalExchange(), DenseExperts(w13[local], w2[local]))
        assert not torch.equal(out, dense)


def test_fp8_experts_refuse_rows_without_fp8_dispatch():
    emap = ExpertMap.from_phy2log(np.arange(2), 1)
    experts = make_experts(torch.randn(2, 256, 128), torch.randn(2, 128, 128), Precision.FP8)
    with pytest.raises(ValueError, match="FP8 experts need FP8 dispatch"):
        moe_forward(torch.randn(3, 128), torch.zeros(3, 1, dtype=torch.int64), torch.ones(3, 1), emap,
                    LocalExchange(), experts)


def test_exchange_rejects_a_layout_of_another_rank():
    from expertmesh.kernels import build_layout

    emap = ExpertMap.from_phy2log(np.arange(8), 2)
    layout = build_layout(torch.zeros(3, 1, dtype=torch.int64), torch.ones(3, 1), emap, 1)
    with pytest.raises(ValueError, match="layout"):
        LocalExchange().dispatch(torch.zeros(3, 4), layout)
