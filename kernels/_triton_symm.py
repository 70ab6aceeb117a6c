"""Triton kernels of the NVLink exchange: write token rows straight into peers' symmetric-memory buffers.

Every rank's buffer has the same layout (byte offsets in `symm_exchange._BufferLayout`); `bases` [G] holds
each rank's buffer address as mapped into this process, so a store to `bases[d] + offset` lands in rank
d's memory over NVLink (or in this rank's own buffer for d == rank). Source rank r owns rows
[r * cap, (r + 1) * cap) of every receiver's dispatch and combine regions, so no rank needs to know
another's counts before writing and one barrier after the writes suffices.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_fp8 import quantize_tiles

__all__ = ["dispatch_kernel", "combine_kernel", "gather_copies_kernel", "tiles_per_program"]


@triton.jit
def dispatch_kernel(
    x_ptr, stride_x,  # [T, H] token rows
    gpus_ptr, slots_ptr, w_ptr,  # [T, K] serving rank, local slot, weight of each pair
    dests_ptr, dest_rows_ptr,  # [T, D] destination ranks (-1 padded) and row inside each destination block
    send_counts_ptr,  # [G] copies for each rank
    bases_ptr,  # [G] int64 buffer address of every rank
    T, H, n_tiles, rank, cap,
    off_scales, off_meta, off_counts,  # byte offsets of the buffer's sections
    K: tl.constexpr, KP: tl.constexpr, D: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    FP8: tl.constexpr, TILE: tl.constexpr, TPP: tl.constexpr, TINY: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    tiles = blk * TPP + tl.arange(0, TPP)
    cols = tiles[:, None] * TILE + tl.arange(0, TILE)[None, :]
    t_ok = (tl.zeros_like(cols) + t) < T
    col_ok = (cols < H) & t_ok
    x = tl.load(x_ptr + t * stride_x + cols, mask=col_ok, other=0.0)
    if FP8:
        # Quantise once per token; every destination gets the same codes and scales.
        codes, scale = quantize_tiles(x.to(tl.float32), TINY)
        payload = codes.to(tl.float8e4nv)
    else:
        payload = x
    kk = tl.arange(0, KP)  # KP, GP: K and G rounded up to powers of two for tl.arange
    meta_ok = (kk < K) & ((tl.zeros_like(kk) + blk) == 0) & ((tl.zeros_like(kk) + t) < T)
    g = tl.load(gpus_ptr + t * K + kk, mask=meta_ok, other=-1)
    sl = tl.load(slots_ptr + t * K + kk, mask=meta_ok, other=-1)
    w = tl.load(w_ptr + t * K + kk, mask=meta_ok, other=0.0)
    for j in tl.static_range(D):
        d = tl.load(dests_ptr + t * D + j, mask=t < T, other=-1)
        row = tl.load(dest_rows_ptr + t * D + j, mask=t < T, other=0).to(tl.int64)
        base = tl.load(bases_ptr + tl.maximum(d, 0))
        dst_row = rank * cap + row
        ok = col_ok & ((tl.zeros_like(cols) + d) >= 0)
        dst = base.to(tl.pointer_type(payload.dtype)) + dst_row * H + cols
        tl.store(dst, payload, mask=ok)
        if FP8:
            s_dst = (base + off_scales).to(tl.pointer_type(tl.float32)) + dst_row * n_tiles + tiles
            tl.store(s_dst, scale, mask=(tiles < n_tiles) & ((tl.zeros_like(tiles) + d) >= 0) &
                     ((tl.zeros_like(tiles) + t) < T))
        # Metadata: the pair's local slot where this destination serves it, else -1; weight likewise.
        mine = g == d
        m_dst = (base + off_meta).to(tl.pointer_type(tl.int32)) + dst_row * (2 * K) + kk
        m_ok = meta_ok & ((tl.zeros_like(kk) + d) >= 0)
        tl.store(m_dst, tl.where(mine, sl, -1).to(tl.int32), mask=m_ok)
        tl.store(m_dst + K, tl.where(mine, w, 0.0).to(tl.int32, bitcast=True), mask=m_ok)
    # Program (0, 0) tells every rank how many rows this rank wrote into its block.
    gg = tl.arange(0, GP)
    first = (gg < G) & ((tl.zeros_like(gg) + t) == 0) & ((tl.zeros_like(gg) + blk) == 0)
    cnt = tl.load(send_counts_ptr + gg, mask=first, other=0)
    peer = tl.load(bases_ptr + gg, mask=first, other=0)
    c_dst = (peer + off_counts).to(tl.pointer_type(tl.int64)) + rank
    tl.store(c_dst, cnt, mask=first)


@triton.jit
def combine_kernel(
    y_ptr, stride_y,  # [M, H] expert outputs in expert order
    pos_ptr,  # [N, K] expert row of each received pair (-1: none); N = G * cap
    w_ptr, stride_w,  # [N, K] the pairs' weights (rows may be strided)
    recv_counts_ptr,  # [G] rows received from each source
    bases_ptr,  # [G] int64 buffer address of every rank
    H, rank, cap, off_combine,
    K: tl.constexpr, BLOCK: tl.constexpr,
):
    # Received row i came from source i // cap; its reduced output goes to that source's combine region,
    # row rank * cap + i % cap.
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    src = i // cap
    pos = i % cap
    cnt = tl.load(recv_counts_ptr + src)
    ok = (cols < H) & ((tl.zeros_like(cols) + pos) < cnt)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):
        p = tl.load(pos_ptr + i * K + j).to(tl.int64)
        w = tl.load(w_ptr + i * stride_w + j)
        rows = tl.load(y_ptr + p * stride_y + cols, mask=ok & ((tl.zeros_like(cols) + p) >= 0), other=0.0)
        acc += w * rows.to(tl.float32)
    base = tl.load(bases_ptr + src) + off_combine
    dst = base.to(tl.pointer_type(y_ptr.dtype.element_ty)) + (rank * cap + pos) * H + cols
    tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def gather_copies_kernel(
    comb_ptr,  # [G * cap, H] this rank's combine region: row d * cap + r came back from rank d
    dests_ptr, rows_ptr,  # [T, D] destinations of each token (-1 padded) and the copy's row there
    out_ptr, H, cap,
    D: tl.constexpr, BLOCK: tl.constexpr,
):
    # out[t] = sum of the token's returned copies, accumulated in float32.
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(D):
        d = tl.load(dests_ptr + t * D + j)
        r = tl.load(rows_ptr + t * D + j)
        src = tl.maximum(d, 0) * cap + r
        m = (cols < H) & ((tl.zeros_like(cols) + d) >= 0)
        acc += tl.load(comb_ptr + src * H + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < H)


def tiles_per_program(hidden: int, tile: int, block_elems: int = 2048) -> int:
    """Tiles of one row a dispatch program handles: about `block_elems` elements, a power of two."""
    return max(1, min(triton.next_power_of_2(triton.cdiv(hidden, tile)), max(1, block_elems // tile)))
