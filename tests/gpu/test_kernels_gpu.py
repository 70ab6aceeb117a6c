"""The kernels' fast paths on CUDA: Triton ops, grouped GEMMs, and both exchanges on 1 and 2 GPUs.

The same checks as the CPU and interpreter tests (`tests/kernels/triton_checks.py`, `kernel_cases.py`), at
full sizes, against the torch references and the per-token loop. Skips cleanly without CUDA.

Run (on a machine with GPUs): pytest tests/gpu/test_kernels_gpu.py
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


import numpy as np  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import triton_checks as tc  # noqa: E402
from kernel_cases import (  # noqa: E402
    expert_weights,
    fp8_moe_tolerance,
    moe_on_rank,
    naive_layout,
    naive_moe,
    random_phy2log,
    random_routing,
)

from expertmesh.kernels import (  # noqa: E402
    AllToAllExchange,
    ExpertMap,
    SymmMemExchange,
    build_expert_layout,
    build_layout,
    grouped_mm,
    permute,
    quantize_fp8,
    quantize_weights_fp8,
    scaled_grouped_mm,
    swiglu_experts,
    swiglu_experts_fp8,
)
from expertmesh.kernels.experts import grouped_mm_reference  # noqa: E402

DEV = "cuda"
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


# ---- one GPU: Triton ops against the references ------------------------------------------------------
@pytest.mark.parametrize("N,H", [(0, 64), (1, 96), (33, 300), (4096, 7168)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_permute(N, H, dtype):
    tc.check_permute(DEV, N, H, dtype)


@pytest.mark.parametrize("N,K,H", [(0, 2, 64), (1, 1, 96), (33, 8, 300), (4096, 8, 7168)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
def test_unpermute_combine(N, K, H, dtype, weighted):
    tc.check_unpermute_combine(DEV, N, K, H, dtype, weighted)


@pytest.mark.parametrize("N,H,tile", [(1, 128, 128), (33, 300, 128), (4096, 7168, 128), (4096, 2048, None)])
def test_fp8(N, H, tile):
    tc.check_fp8(DEV, N, H, tile)


@pytest.mark.parametrize("M,F", [(33, 384), (8192, 768), (100, 14336)])
def test_silu_mul_quantize(M, F):
    tc.check_silu_mul_quantize(DEV, M, F)


@pytest.mark.parametrize("counts,N,K", [([0, 5, 70, 1], 256, 256), ([300] * 16, 512, 1024),
                                         ([0, 1, 2000, 129, 0, 64], 2048, 7168)])
def test_grouped_fp8_blockwise(counts, N, K):
    tc.check_grouped_fp8_blockwise(DEV, counts, N, K)


@pytest.mark.parametrize("G,k,E,S,tokens,fp8,dtype", [
    (1, 2, 8, 10, [33], False, torch.float32),
    (2, 1, 8, 5, [33, 0], True, torch.float32),
    (2, 8, 16, 10, [1, 4096], True, torch.bfloat16),
    (4, 8, 64, 20, [0, 1, 33, 300], False, torch.bfloat16),
    (3, 6, 12, 5, [9, 4, 11], True, torch.float32),
])
def test_symm_exchange_loopback_one_gpu(G, k, E, S, tokens, fp8, dtype):
    tc.symm_loopback_moe(DEV, G, k, E, S, tokens, fp8, dtype)


def _offsets(counts):
    return torch.tensor(counts).cumsum(0).to(torch.int32).to(DEV)


@pytest.mark.parametrize("counts", [[0, 0, 0], [1, 0, 0], [5, 0, 28, 0], [256] * 16, [3000, 0, 1, 17]])
def test_grouped_mm_bf16(counts):
    gen = torch.Generator().manual_seed(len(counts))
    S, K, N = len(counts), 256, 128
    x = torch.randn(sum(counts), K, generator=gen).to(DEV, torch.bfloat16)
    w = torch.randn(S, N, K, generator=gen).to(DEV, torch.bfloat16)
    out = grouped_mm(x, w, _offsets(counts))
    ref = grouped_mm_reference(x.float(), w.float(), _offsets(counts))
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-1)


# Groups of multiples of 16 rows (build_expert_layout(align=16)), the alignment FP8 grouped GEMMs are fed with.
@pytest.mark.parametrize("counts", [[16, 0, 32], [256] * 8, [48, 0, 0, 1024]])
def test_scaled_grouped_mm_fp8(counts):
    gen = torch.Generator().manual_seed(sum(counts))
    S, K, N = len(counts), 512, 256
    x = torch.randn(sum(counts), K, generator=gen).to(DEV)
    w = torch.randn(S, N, K, generator=gen).to(DEV)
    xq, xs = quantize_fp8(x, tile=None)
    wq = quantize_weights_fp8(w)
    out = scaled_grouped_mm(xq, xs[:, 0], wq, _offsets(counts)).float()
    ref = scaled_grouped_mm(xq, xs[:, 0], wq, _offsets(counts), impl="torch").float()
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


def test_swiglu_fp8_tracks_bf16():
    gen = torch.Generator().manual_seed(0)
    counts = [64, 0, 128, 16]
    S, H, F = len(counts), 1024, 512
    x = torch.randn(sum(counts), H, generator=gen).to(DEV, torch.bfloat16)
    w13 = (torch.randn(S, 2 * F, H, generator=gen) / H ** 0.5).to(DEV, torch.bfloat16)
    w2 = (torch.randn(S, H, F, generator=gen) / F ** 0.5).to(DEV, torch.bfloat16)
    y = swiglu_experts(x, w13, w2, _offsets(counts)).float()
    y8 = swiglu_experts_fp8(x, quantize_weights_fp8(w13), quantize_weights_fp8(w2), _offsets(counts)).float()
    assert float((y8 - y).norm() / y.norm()) < 0.08


# ---- two GPUs: NCCL all_to_all and the NVLink exchange --------------------------------------------------
H, F = 1024, 256


def _two_gpu_worker(rank: int, init_file: str, results) -> None:
    # Failed checks are collected, not raised: a rank that stopped early would leave its peer waiting in
    # a collective or a barrier for ever. Both ranks always run the same sequence of communication.
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            device_id=torch.device(DEV, rank), timeout=timedelta(seconds=120))
    errors: list[str] = []

    def check(ok: bool, what: str) -> None:
        if not ok:
            errors.append(what)

    try:
        for i, (k, E, S, tokens) in enumerate([(2, 8, 4, [4096, 33]), (8, 64, 40, [1, 0]),
                                                (8, 256, 128, [4096, 1])]):
            rng = np.random.default_rng(i)
            gen = torch.Generator().manual_seed(i)
            phy2log = random_phy2log(rng, E, 2, S)
            emap = ExpertMap.from_phy2log(phy2log, 2, 1, E, DEV)
            w13, w2 = expert_weights(gen, E, H, F)
            data = []
            for r in range(2):
                ids, weights = random_routing(gen, tokens[r], E, k, skew=True)
                data.append((torch.randn(tokens[r], H, generator=gen), ids, weights))
            x, ids, weights = data[rank]
            sample = slice(0, 64)  # the per-token loop is slow; it checks the first tokens
            want = naive_moe(x[sample].bfloat16().float(), ids[sample], weights[sample],
                             w13.bfloat16().float(), w2.bfloat16().float())
            xd = x.to(DEV, torch.bfloat16)
            for name in ("all_to_all", "symm_mem"):
                for fp8 in (False, True):
                    if name == "all_to_all":
                        ex = AllToAllExchange(fp8=fp8)
                    else:
                        ex = SymmMemExchange(None, max(tokens), H, k, torch.bfloat16, fp8)
                    out, layout, _, _ = moe_on_rank(xd, ids.to(DEV), weights.to(DEV), emap, ex, w13, w2, rank)
                    torch.cuda.synchronize()
                    where = f"{name} fp8={fp8} case {i} rank {rank}"
                    scale = float(want.abs().max()) if want.numel() else 0.0
                    tol = fp8_moe_tolerance(want) if fp8 else 0.03 * scale + 1e-2
                    err = float((out[sample].double().cpu() - want).abs().max()) if want.numel() else 0.0
                    check(err <= tol, f"{where}: error {err} > {tol}")
                    naive = naive_layout(ids, phy2log, E, 2, 1, rank)
                    for field in ("gpus", "slots", "dests", "dest_rows", "send_counts"):
                        check(np.array_equal(getattr(layout, field).cpu().numpy(), naive[field]),
                              f"{where}: layout.{field} differs from the per-token loop")
                    check(ex.last_dispatch.rows.tolist() == naive["dispatch_counts"].tolist(),
                          f"{where}: dispatched rows {ex.last_dispatch.rows.tolist()} != "
                          f"{naive['dispatch_counts'].tolist()}")
                    if name == "symm_mem":
                        check(_check_graph_replay(ex, xd, layout, emap), f"{where}: CUDA graph replay differs")
    except Exception as exc:  # noqa: BLE001 - reported through `results`; the peer may then time out
        errors.append(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise
    finally:
        results[rank] = errors or "ok"
        dist.destroy_process_group()


def _check_graph_replay(ex: SymmMemExchange, x, layout, emap) -> bool:
    """Dispatch + combine captured in a CUDA graph (no host sync inside) reproduce the eager result."""
    received = ex.dispatch(x, layout)
    el = build_expert_layout(received.slots, emap.slots_per_gpu, received.valid,
                             max_rows=received.slots.numel())
    y = torch.randn(el.num_rows, x.shape[1], device=DEV, dtype=x.dtype)
    ref = ex.combine(y, el, ex.dispatch(x, layout), layout)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        dist.barrier()
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            rec = ex.dispatch(x, layout)
            out = ex.combine(y, el, rec, layout)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    return torch.equal(out, ref)


@two_gpus
def test_two_gpu_exchanges_equal_weighted_expert_sum():
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        results = ctx.Manager().dict()
        try:
            mp.start_processes(_two_gpu_worker, args=(os.path.join(tmp, "rdzv"), results), nprocs=2,
                               join=True, start_method="spawn")
        finally:
            got = dict(results)
        assert got == {0: "ok", 1: "ok"}, got


def test_permute_handles_indices_past_int32_rows():
    # 64-bit row offsets: rows * H beyond 2^31 elements must not wrap.
    rows, H = 2 ** 16 + 8, 2 ** 15 + 128
    x = torch.zeros(rows, H, dtype=torch.float8_e4m3fn, device=DEV)
    x[-1] = 1.0
    out = permute(x, torch.tensor([rows - 1, 0], device=DEV))
    assert out[0].float().sum() == H and out[1].float().sum() == 0


def test_layout_on_gpu_matches_cpu():
    rng = np.random.default_rng(0)
    emap = ExpertMap.from_phy2log(random_phy2log(rng, 256, 8, 40), 8, 2, 256)
    ids, weights = random_routing(torch.Generator().manual_seed(0), 4096, 256, 8)
    a = build_layout(ids, weights, emap, 3)
    b = build_layout(ids.to(DEV), weights.to(DEV), emap.to(DEV), 3)
    for name in ("gpus", "slots", "dests", "dest_rows", "send_counts"):
        assert torch.equal(getattr(a, name), getattr(b, name).cpu()), name
    ea = build_expert_layout(a.slots, 40)
    eb = build_expert_layout(b.slots, 40)
    assert torch.equal(ea.pair_pos, eb.pair_pos.cpu()) and torch.equal(ea.row_index, eb.row_index.cpu())
    # The layout's flat scans on the device, at the shapes the profile found slow in torch's cumsum.
    from expertmesh.kernels._scan import cumsum_first, cumsum_last

    x = torch.randint(0, 2, (16384 * 8, 2), device=DEV)
    assert torch.equal(cumsum_last(x), torch.cumsum(x, -1))
    assert torch.equal(cumsum_first(x[:16384]), torch.cumsum(x[:16384], 0))
