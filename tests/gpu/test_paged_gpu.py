"""The paged KV cache and its kernels on CUDA: the interpreter's checks at full sizes, the kernels inside a
CUDA graph, and the model's decode graphs over the paged cache (skips without CUDA).

    python -m pytest -q tests/gpu/test_paged_gpu.py

Kernels against the naive float64 loop at small lengths and against the torch reference (itself checked
against the loop on CPU) at long ones; tolerances as in tests/kernels/paged_checks.py.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


import paged_checks as pc  # noqa: E402

from expertmesh.kernels.paged_attention import decode_attention, decode_splits, write_kv  # noqa: E402

DEV = "cuda"
LENGTHS = [0, 1, 33, 16, 32, 17, 257]


@pytest.mark.parametrize("T,block_size,head_dim", [(1, 16, 128), (4099, 16, 128), (33, 5, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_write_kv(T, block_size, head_dim, dtype):
    pc.check_write_kv(DEV, T, 8, block_size, head_dim, dtype, "triton")


@pytest.mark.parametrize("block_size,head_dim", [(16, 128), (5, 64)])
def test_gather_kv(block_size, head_dim):
    pc.check_gather_kv(DEV, LENGTHS, 4, block_size, head_dim, torch.bfloat16, "triton")


@pytest.mark.parametrize("family", list(pc.GQA))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("splits", [None, 1, 7])
def test_decode_against_the_loop(family, head_dim, dtype, splits):
    pc.check_decode(DEV, LENGTHS, pc.GQA[family], 16, head_dim, dtype, "triton", splits=splits)


@pytest.mark.parametrize("block_size,head_dim", [(5, 16), (4, 8), (1, 32)])
def test_decode_odd_blocks_and_small_heads(block_size, head_dim):
    pc.check_decode(DEV, [1, 9, 20], (4, 2), block_size, head_dim, torch.float32, "triton", splits=2)


@pytest.mark.parametrize("heads", [(32, 8), (32, 4), (16, 16)])
@pytest.mark.parametrize("B", [1, 8, 32])
def test_long_decode_against_the_reference(heads, B):
    """Rows of 1 to 32k keys (split over many SMs at batch 1) against the torch path, bf16."""
    QH, KVH = heads
    gen = torch.Generator().manual_seed(B)
    lengths = torch.randint(1, 32768, (B,), generator=gen)
    lengths[0] = 32768
    bs, D = 16, 128
    width = 32768 // bs
    blocks = int((-(-lengths // bs)).sum()) + 1
    kc, vc = pc.random_cache(blocks, KVH, bs, D, torch.bfloat16, DEV, seed=B)
    table = torch.randint(0, blocks, (B, width), generator=gen, dtype=torch.int32)  # rows may share blocks
    q = torch.randn(B, QH, D, generator=gen).bfloat16().to(DEV)
    args = (q, kc, vc, table.to(DEV), lengths.to(DEV, torch.int32))
    got = decode_attention(*args, impl="triton")
    want = decode_attention(*args, impl="torch")
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_decode_and_write_replay_in_a_cuda_graph():
    """write_kv + decode_attention captured once at fixed shapes (B rows, W table columns), replayed with
    other tables, lengths and slots copied into the same inputs: equal to the eager reference each time."""
    B, (QH, KVH), bs, D, W = 4, pc.GQA["qwen3"], 16, 128, 64
    blocks = B * W + 1
    kc, vc = pc.random_cache(blocks, KVH, bs, D, torch.bfloat16, DEV, seed=0)
    q = torch.empty(B, QH, D, dtype=torch.bfloat16, device=DEV)
    k_new = torch.empty(B, KVH, D, dtype=torch.bfloat16, device=DEV)
    v_new = torch.empty_like(k_new)
    table = torch.zeros(B, W, dtype=torch.int32, device=DEV)
    lengths = torch.ones(B, dtype=torch.int32, device=DEV)
    slots = torch.zeros(B, dtype=torch.int64, device=DEV)
    splits = decode_splits(B, KVH, W * bs, torch.device(DEV))

    def step():
        write_kv(kc, vc, k_new, v_new, slots)
        return decode_attention(q, kc, vc, table, lengths, splits=splits)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    gen = torch.Generator().manual_seed(1)
    for trial in range(3):
        lens = torch.randint(1, W * bs, (B,), generator=gen)
        lens[trial] = [1, bs, W * bs][trial]
        perm = torch.randperm(blocks - 1, generator=gen)[: B * W].view(B, W).to(torch.int32)
        pos = lens - 1
        table.copy_(perm)
        lengths.copy_(lens)
        slots.copy_(perm[torch.arange(B), pos // bs].long() * bs + pos % bs)
        for t in (q, k_new, v_new):
            t.copy_(torch.randn(t.shape, generator=gen))
        graph.replay()
        ref_k, ref_v = kc.clone(), vc.clone()
        write_kv(ref_k, ref_v, k_new, v_new, slots, impl="torch")
        assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
        want = decode_attention(q, kc, vc, table, lengths, impl="torch")
        torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("n", [1, 33, 512])
def test_prefill(n):
    pc.check_prefill(DEV, [0, 16, 3, 100], n, pc.GQA["mixtral"], 16, 128, torch.bfloat16, "triton")


# ---- the model on the paged cache --------------------------------------------------------------------
def test_decode_graphs_capture_once_per_size_and_memory_stays_flat(checkpoint):
    """bf16 on one GPU, blocks of 16: 3 sequences decode 20 steps, 2 more join, all 5 decode 20 more (crossing
    blocks all along). One graph per padded size (4 and 8), the same greedy tokens as the steps run eagerly,
    the cache storage never moved, and the memory allocated equal at every step boundary once both sizes
    are captured."""
    from expertmesh.workers import load_local_model, run_step

    prompts = [[5, 17, 3, 44, 9], [2, 8], [61, 7, 7, 30, 12, 90, 1], [33, 4, 4], [1] * 15]

    def run(model):
        logits, _ = run_step(model, [(i, p) for i, p in enumerate(prompts[:3])])
        nxt, tokens, memory = logits.argmax(-1).tolist(), [], []
        for step in range(40):
            if step == 20:
                logits, _ = run_step(model, [(i, prompts[i]) for i in (3, 4)])
                nxt += logits.argmax(-1).tolist()
            logits, _ = run_step(model, list(enumerate([[t] for t in nxt])))
            nxt = logits.argmax(-1).tolist()
            tokens.append(nxt)
            del logits
            torch.cuda.synchronize()
            memory.append(torch.cuda.memory_allocated())
        return tokens, memory

    graphs = load_local_model(checkpoint, torch.bfloat16, "cuda", kv_blocks=64)
    eager = load_local_model(checkpoint, torch.bfloat16, "cuda", kv_blocks=64)
    eager.decoder.capture = False
    storage = graphs.cache.storage.data_ptr()
    got, memory = run(graphs)
    want, _ = run(eager)
    assert graphs.decoder.captures == 2 and sorted(graphs.decoder.entries) == [4, 8]
    assert got == want
    assert graphs.cache.storage.data_ptr() == storage
    assert len(set(memory[22:])) == 1, memory
