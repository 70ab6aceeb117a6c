"""Triton kernels for `paged_attention.py`: write new keys/values into blocks, split-K decode, gather.

Addresses: position p of a row lives in block table[p // BS] at offset p % BS; a key row of one KV head is
D contiguous elements, so every load below is a [rows, D] tile of 16-byte vectors along D, rows gathered
through the table (addresses in 64-bit). Scalar conditions are broadcast to the block before `&` (Triton's
interpreter rejects the mix).

Decode, grid (B, KVH, SPLITS): the program of row b, KV head h and split s
  - loads the G query heads of h (padded to 16 rows, tl.dot's smallest M),
  - takes chunk s of the row's keys (chunk = ceil(length / SPLITS), rounded up to BLOCK_N; computed here
    from the length, so the grid depends only on the shapes) and runs an online softmax over its tiles:
    one K and one V tile per BLOCK_N keys, read once for all G heads,
  - writes the normalised output (SPLITS == 1) or its partial output and log2-sum-exp; empty chunks write
    lse = -inf, which the combine kernel weights by 0.
Scores use exp2 with the scale folded into log2(e) * scale. float32 caches use IEEE dots (no TF32): the
runtime's fp32 path must match `transformers` to 1e-4. Triton's interpreter computes bf16 dots wrongly, so
there the operands are widened to float32 first (exact: a bf16 product fits float32, as in the tensor core).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import interpreting

__all__ = ["write_kv_triton", "decode_attention_triton", "gather_kv_triton"]

LOG2E = 1.4426950408889634


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, KVH, D,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ch, stride_cs,
                     BS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < KVH) & (d < D) & (tl.zeros_like(d) + slot >= 0)
    dst = (slot // BS) * stride_cb + heads * stride_ch + (slot % BS) * stride_cs + d
    k = tl.load(k_ptr + t * stride_kt + heads * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + heads * stride_vh + d, mask=mask)
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, table_ptr, len_ptr, o_ptr, po_ptr, plse_ptr, qk_scale, QH, G, D,
                   stride_qb, stride_qh, stride_cb, stride_ch, stride_cs, stride_tb, stride_tw, stride_ob, stride_oh,
                   BS: tl.constexpr, SPLITS: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, F32_DOTS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.program_id(2)
    length = tl.load(len_ptr + b).to(tl.int32)
    chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
    start = s * chunk
    end = tl.minimum(start + chunk, length)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    heads = h * G + g
    dm = d < D
    qo_mask = (g < G)[:, None] & dm[None, :]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=qo_mask, other=0.0)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    table = table_ptr + b * stride_tb
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        valid = offs < end
        blk = tl.load(table + (offs // BS) * stride_tw, mask=valid, other=0).to(tl.int64)
        rows = blk * stride_cb + h * stride_ch + (offs % BS) * stride_cs
        kv_mask = valid[:, None] & dm[None, :]
        k = tl.load(kc_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if F32_DOTS:
            qk = tl.dot(q.to(tl.float32), tl.trans(k).to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if F32_DOTS:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    out = acc / safe_l[:, None]
    if SPLITS == 1:
        tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=qo_mask)
    else:
        part = (b * QH + heads) * SPLITS + s  # [G_PAD]: index of (row, query head, split)
        tl.store(po_ptr + part[:, None] * D + d[None, :], out, mask=qo_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(plse_ptr + part, lse, mask=g < G)


@triton.jit
def _combine_kernel(po_ptr, plse_ptr, o_ptr, QH, D, stride_ob, stride_oh,
                    SPLITS: tl.constexpr, S_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    qh = tl.program_id(1)
    base = (b * QH + qh) * SPLITS
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, BLOCK_D)
    sm = s < SPLITS
    lse = tl.load(plse_ptr + base + s, mask=sm, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # every chunk empty (length 0): all weights 0
    w = tl.exp2(lse - top)
    den = tl.sum(w, 0)
    parts = tl.load(po_ptr + (base + s)[:, None] * D + d[None, :], mask=sm[:, None] & (d < D)[None, :], other=0.0)
    out = tl.sum(w[:, None] * parts, 0) / tl.where(den > 0, den, 1.0)
    tl.store(o_ptr + b * stride_ob + qh * stride_oh + d, out.to(o_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def _gather_kv_kernel(kc_ptr, vc_ptr, table_ptr, len_ptr, ko_ptr, vo_ptr, KEYS, D,
                      stride_cb, stride_ch, stride_cs, stride_tb, stride_tw, stride_ob, stride_oh, stride_ok,
                      BS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    length = tl.load(len_ptr + b).to(tl.int32)
    valid = offs < tl.minimum(length, KEYS)
    blk = tl.load(table_ptr + b * stride_tb + (offs // BS) * stride_tw, mask=valid, other=0).to(tl.int64)
    src = (blk * stride_cb + h * stride_ch + (offs % BS) * stride_cs)[:, None] + d[None, :]
    dm = (d < D)[None, :]
    k = tl.load(kc_ptr + src, mask=valid[:, None] & dm, other=0.0)
    v = tl.load(vc_ptr + src, mask=valid[:, None] & dm, other=0.0)
    dst = b * stride_ob + h * stride_oh + offs[:, None].to(tl.int64) * stride_ok + d[None, :]
    out_mask = (offs < KEYS)[:, None] & dm
    tl.store(ko_ptr + dst, k, mask=out_mask)
    tl.store(vo_ptr + dst, v, mask=out_mask)


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def write_kv_triton(k_cache, v_cache, k, v, slots) -> None:
    T, KVH, D = k.shape
    if k.stride(2) != 1:
        k = k.contiguous()
    if v.stride(2) != 1:
        v = v.contiguous()
    _write_kv_kernel[(T,)](k, v, k_cache, v_cache, slots.contiguous(), KVH, D, k.stride(0), k.stride(1),
                           v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                           BS=k_cache.shape[2], BLOCK_H=max(2, triton.next_power_of_2(KVH)),
                           BLOCK_D=triton.next_power_of_2(D), num_warps=4)


def decode_attention_triton(q, k_cache, v_cache, block_tables, lengths, scale: float, splits: int) -> torch.Tensor:
    B, QH, D = q.shape
    KVH, BS = k_cache.shape[1], k_cache.shape[2]
    G = QH // KVH
    if q.stride(2) != 1:
        q = q.contiguous()
    out = torch.empty((B, QH, D), dtype=q.dtype, device=q.device)
    if splits > 1:
        part_o = torch.empty((B, QH, splits, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, QH, splits), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # not written
    block_d = _block_d(D)
    block_n = 64 if block_d <= 128 else 32
    _decode_kernel[(B, KVH, splits)](
        q, k_cache, v_cache, block_tables, lengths, out, part_o, part_lse, scale * LOG2E, QH, G, D,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), block_tables.stride(1), out.stride(0), out.stride(1),
        BS=BS, SPLITS=splits, G_PAD=max(16, triton.next_power_of_2(G)), BLOCK_N=block_n, BLOCK_D=block_d,
        F32_DOTS=q.dtype == torch.float32 or interpreting(), num_warps=4, num_stages=3)
    if splits > 1:
        _combine_kernel[(B, QH)](part_o, part_lse, out, QH, D, out.stride(0), out.stride(1), SPLITS=splits,
                                 S_PAD=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d, num_warps=4)
    return out


def gather_kv_triton(k_cache, v_cache, block_tables, lengths, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    B = block_tables.shape[0]
    KVH, BS, D = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    k = torch.empty((B, KVH, keys, D), dtype=k_cache.dtype, device=k_cache.device)
    v = torch.empty_like(k)
    block_n = 64
    _gather_kv_kernel[(B, KVH, triton.cdiv(keys, block_n))](
        k_cache, v_cache, block_tables, lengths, k, v, keys, D, k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0), block_tables.stride(1), k.stride(0), k.stride(1), k.stride(2),
        BS=BS, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(D), num_warps=4)
    return k, v
