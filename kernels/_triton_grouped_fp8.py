"""Triton grouped GEMM in FP8 E4M3 with DeepSeek-V3's block scales: 1 x 128 for activations, 128 x 128 for
weights (see `experts.scaled_grouped_mm_blockwise` for the contract and the torch reference).

    out[m, n] = sum over k-blocks b of  (xq[m, b] . wq[g, n, b]) * x_scale[m, b] * w_scale[g, n // 128, b]

for the rows m of group g. Each k-block's FP8 product is taken in float32 and scaled before it is added,
as DeepSeek-V3 promotes partial sums: a block's scales never multiply another block's terms.

Scheduling reads no group size on the host (a CUDA graph can record the call): the launch covers an upper
bound of M-tiles, cdiv(M, BLOCK_M) + S (each group adds at most one partial tile), and every program finds
its group among the cumulative tile counts; programs past the last tile return at once.

Weights are read through their strides, so a transposed view of a block-quantised weight (the input-gradient
GEMM dx = dy @ w, reduced over w's output dim) runs without a copy: 128 x 128 blocks serve both orientations.

Tile order: the grid is one-dimensional and walks GROUP_M M-tiles down each N-tile before moving right
(the grouped order of Triton's matmul tutorial); GROUP_M = 1 runs the N-tiles of one M-tile back to back.
At shape (b) on an H200 the two measured within 1% of each other (`bench/results/kernels.md`, "tuning").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["grouped_fp8_blockwise_triton", "SCALE_BLOCK"]

SCALE_BLOCK = 128  # k and n extent of one scale (the format), and the k step of the kernel


@triton.jit
def _grouped_fp8_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, ends_ptr, tile_ends_ptr,
    N, K, S,
    stride_xm, stride_xsm, stride_wg, stride_wn, stride_wk, stride_wsg, stride_wsn, stride_wsk, stride_om,
    M_TILES, N_TILES,
    S_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    per_group = GROUP_M * N_TILES
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(M_TILES - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    groups = tl.arange(0, S_POW2)
    tile_ends = tl.load(tile_ends_ptr + groups, mask=groups < S, other=2147483647)
    if pid_m >= tl.max(tl.where(groups < S, tile_ends, 0), axis=0):
        return
    g = tl.sum((tile_ends <= pid_m).to(tl.int32), axis=0)  # the group holding M-tile pid_m
    g_tile_end = tl.load(tile_ends_ptr + g)
    g_end = tl.load(ends_ptr + g)
    g_start = tl.where(g > 0, tl.load(ends_ptr + g - 1, mask=g > 0, other=0), 0)
    g_tiles = tl.cdiv(g_end - g_start, BLOCK_M)
    row0 = g_start + (pid_m - (g_tile_end - g_tiles)) * BLOCK_M

    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < g_end
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = w_ptr + g.to(tl.int64) * stride_wg
    n_block = (pid_n * BLOCK_N) // BLOCK_K  # with BLOCK_N <= 128 (dividing it) one scale block per tile
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = kb * BLOCK_K
        a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + (k0 + ks)[None, :],
                    mask=row_ok[:, None], other=0.0)
        b = tl.load(w_base + cols[None, :].to(tl.int64) * stride_wn + (k0 + ks)[:, None].to(tl.int64) * stride_wk,
                    mask=col_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]: w[g]^T
        a_scale = tl.load(xs_ptr + rows.to(tl.int64) * stride_xsm + kb, mask=row_ok, other=0.0)
        if BLOCK_N <= BLOCK_K:
            b_scale = tl.load(ws_ptr + g.to(tl.int64) * stride_wsg + n_block * stride_wsn + kb * stride_wsk)
            acc += tl.dot(a, b, out_dtype=tl.float32) * (a_scale[:, None] * b_scale)
        else:  # a wider tile spans several weight scale blocks: one scale per column
            b_scale = tl.load(ws_ptr + g.to(tl.int64) * stride_wsg + (cols // BLOCK_K) * stride_wsn + kb * stride_wsk,
                              mask=col_ok, other=0.0)
            acc += tl.dot(a, b, out_dtype=tl.float32) * a_scale[:, None] * b_scale[None, :]
    out = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def grouped_fp8_blockwise_triton(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                                 offsets: torch.Tensor, out_dtype: torch.dtype, block_m: int = 64,
                                 block_n: int = 128, num_warps: int = 4, num_stages: int = 3,
                                 group_m: int = 1) -> torch.Tensor:
    """[M, N] out_dtype; arguments checked by the caller (`experts.scaled_grouped_mm_blockwise`).

    The default launch is the best of `bench/kernels.py`'s sweep over both GEMMs of shape (b) in two runs
    on an H200 (1.37-1.41x bf16's grouped GEMM); 64 rows per tile pad the ~256-row expert groups less
    than 128."""
    M, K = xq.shape
    S, N, _ = wq.shape
    out = torch.empty((M, N), dtype=out_dtype, device=xq.device)
    ends = offsets.to(torch.int32)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    tile_ends = torch.cumsum((ends - starts + block_m - 1) // block_m, 0).to(torch.int32)
    m_tiles, n_tiles = triton.cdiv(M, block_m) + S, triton.cdiv(N, block_n)
    _grouped_fp8_kernel[(m_tiles * n_tiles,)](
        xq, x_scale, wq, w_scale, out, ends, tile_ends,
        N, K, S,
        xq.stride(0), x_scale.stride(0), wq.stride(0), wq.stride(1), wq.stride(2),
        w_scale.stride(0), w_scale.stride(1), w_scale.stride(2),
        out.stride(0), m_tiles, n_tiles,
        S_POW2=triton.next_power_of_2(S), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=SCALE_BLOCK,
        GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages,
    )
    return out
