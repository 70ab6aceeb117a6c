"""Checks of the paged-attention ops against a naive per-position loop (float64), on any device.

Plain functions shared by `test_paged_attention.py` (the torch references, CPU), `paged_interpret_checks.py`
(the Triton kernels on the interpreter, small sizes) and `tests/gpu/test_paged_gpu.py` (CUDA, full sizes).
Tolerances: writes and gathers bit-exact; float32 attention 2e-5 (IEEE dots, other summation orders);
bf16/fp16 attention 2e-2 (probabilities are rounded to bf16 before the PV product, as flash kernels do).
"""

from __future__ import annotations

import torch

from expertmesh.kernels.paged_attention import decode_attention, gather_kv, prefill_attention, write_kv

# (query heads, KV heads) of each family's GQA ratio: OLMoE and Qwen1.5-MoE 16/16, Mixtral 32/8,
# Qwen2-57B-A14B 28/4, Qwen3-30B-A3B 32/4 (scaled down to few heads; the ratio is what the kernels see).
GQA = {"olmoe": (4, 4), "mixtral": (8, 2), "qwen2_57b": (7, 1), "qwen3": (16, 2)}


def _tol(dtype: torch.dtype) -> float:
    return 2e-5 if dtype == torch.float32 else 2e-2


def random_cache(blocks: int, kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype, device: str,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (blocks, kv_heads, block_size, head_dim)
    return (torch.randn(shape, generator=gen).to(dtype).to(device),
            torch.randn(shape, generator=gen).to(dtype).to(device))


def random_tables(lengths: list[int], blocks: int, block_size: int, width: int, seed: int) -> torch.Tensor:
    """int32 [B, width]: distinct blocks per row for its length (rows may share none), the rest random ids."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(blocks, generator=gen)
    table = torch.randint(0, blocks, (len(lengths), width), generator=gen, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lengths):
        need = -(-n // block_size)
        table[b, :need] = perm[used : used + need].to(torch.int32)
        used += need
    assert used <= blocks, "not enough blocks for these lengths"
    return table


def naive_keys(cache: torch.Tensor, table: torch.Tensor, length: int, row: int) -> torch.Tensor:
    """float64 [KVH, length, D] of one row, position by position."""
    bs = cache.shape[2]
    rows = [cache[int(table[row, p // bs]), :, p % bs] for p in range(length)]
    if not rows:
        return torch.zeros((cache.shape[1], 0, cache.shape[3]), dtype=torch.float64)
    return torch.stack(rows, dim=1).double().cpu()


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: list[int], scale: float) -> torch.Tensor:
    """float64 [n, QH, D]: queries q [n, QH, D] at positions q_pos over k, v [KVH, L, D] (causal, GQA)."""
    n, QH, D = q.shape
    G = QH // k.shape[0]
    out = torch.zeros((n, QH, D), dtype=torch.float64)
    for i in range(n):
        for h in range(QH):
            keys = q_pos[i] + 1
            if keys == 0:
                continue
            s = (k[h // G, :keys] @ q[i, h].double()) * scale
            out[i, h] = torch.softmax(s, 0) @ v[h // G, :keys]
    return out


def check_write_kv(device: str, T: int, kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype,
                   impl: str) -> None:
    blocks = -(-T // block_size) + 3
    kc, vc = random_cache(blocks, kv_heads, block_size, head_dim, dtype, device, seed=T)
    gen = torch.Generator().manual_seed(T + 1)
    slots = torch.randperm(blocks * block_size, generator=gen)[:T]
    if T > 2:
        slots[1] = -1  # skipped
    k = torch.randn(T, kv_heads, head_dim, generator=gen).to(dtype).to(device)
    v = torch.randn(T, kv_heads, head_dim, generator=gen).to(dtype).to(device)
    want_k, want_v = kc.clone(), vc.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            want_k[slot // block_size, :, slot % block_size] = k[t]
            want_v[slot // block_size, :, slot % block_size] = v[t]
    write_kv(kc, vc, k, v, slots.to(device), impl=impl)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


def check_gather_kv(device: str, lengths: list[int], kv_heads: int, block_size: int, head_dim: int,
                    dtype: torch.dtype, impl: str) -> None:
    keys = max(lengths, default=0) + 3  # past the longest row: zeros
    width = -(-keys // block_size) + 1
    blocks = sum(-(-n // block_size) for n in lengths) + 2
    kc, vc = random_cache(blocks, kv_heads, block_size, head_dim, dtype, device, seed=len(lengths))
    table = random_tables(lengths, blocks, block_size, width, seed=keys)
    k, v = gather_kv(kc, vc, table.to(device), torch.tensor(lengths, device=device), keys, impl=impl)
    assert k.shape == (len(lengths), kv_heads, keys, head_dim)
    for b, n in enumerate(lengths):
        for cache, got in ((kc, k), (vc, v)):
            assert torch.equal(got[b, :, :n].cpu().double(), naive_keys(cache, table, n, b))
            assert not got[b, :, n:].any()


def check_decode(device: str, lengths: list[int], heads: tuple[int, int], block_size: int, head_dim: int,
                 dtype: torch.dtype, impl: str, splits: int | None = None, extra_columns: int = 2) -> None:
    """Decode attention of one query per row over its `lengths[b]` keys; the table has spare columns of
    random block ids past every row's length (never read)."""
    QH, KVH = heads
    width = max(-(-max(lengths, default=1) // block_size), 1) + extra_columns
    blocks = sum(-(-n // block_size) for n in lengths) + 2
    kc, vc = random_cache(blocks, KVH, block_size, head_dim, dtype, device, seed=sum(lengths) + head_dim)
    table = random_tables(lengths, blocks, block_size, width, seed=len(lengths) * 31 + block_size)
    gen = torch.Generator().manual_seed(QH * 7 + head_dim)
    q = torch.randn(len(lengths), QH, head_dim, generator=gen).to(dtype).to(device)
    got = decode_attention(q, kc, vc, table.to(device), torch.tensor(lengths, dtype=torch.int32, device=device),
                           splits=splits, impl=impl)
    assert got.shape == q.shape and got.dtype == dtype
    scale = head_dim ** -0.5
    for b, n in enumerate(lengths):
        want = naive_attention(q[b : b + 1].cpu(), naive_keys(kc, table, n, b), naive_keys(vc, table, n, b),
                               [n - 1], scale)[0]
        torch.testing.assert_close(got[b].cpu().double(), want, atol=_tol(dtype), rtol=_tol(dtype))


def check_prefill(device: str, pasts: list[int], n: int, heads: tuple[int, int], block_size: int, head_dim: int,
                  dtype: torch.dtype, impl: str) -> None:
    """n new queries per row at positions past .. past + n - 1 over the row's past and new keys."""
    QH, KVH = heads
    lengths = [p + n for p in pasts]
    width = -(-max(lengths) // block_size) + 1
    blocks = sum(-(-x // block_size) for x in lengths) + 2
    kc, vc = random_cache(blocks, KVH, block_size, head_dim, dtype, device, seed=n + sum(pasts))
    table = random_tables(lengths, blocks, block_size, width, seed=n)
    gen = torch.Generator().manual_seed(n * 3 + QH)
    q = torch.randn(len(pasts), n, QH, head_dim, generator=gen).to(dtype).to(device)
    got = prefill_attention(q, kc, vc, table.to(device), torch.tensor(lengths, device=device), max(lengths),
                            impl=impl)
    assert got.shape == q.shape
    for b, (p, x) in enumerate(zip(pasts, lengths, strict=True)):
        want = naive_attention(q[b].cpu(), naive_keys(kc, table, x, b), naive_keys(vc, table, x, b),
                               list(range(p, p + n)), head_dim ** -0.5)
        torch.testing.assert_close(got[b].cpu().double(), want, atol=_tol(dtype), rtol=_tol(dtype))
