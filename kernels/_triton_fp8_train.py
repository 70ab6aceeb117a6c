"""Triton FP8 quantisers of training: both orientations of an activation in one read, and 128 x 128 weight blocks.

    quantize_dual_triton(x [M, N])  -> q [M, N] with scales [M, N/128]  (1 x 128 tiles along N: forward and
                                       input-gradient GEMMs) and qT [N, M] with scales [N, M/128] (128 x 1 tiles
                                       along M, stored transposed: the weight-gradient GEMM)
    quantize_blocks_triton(w [S, N, K]) -> q [S, N, K], scales [S, N/128, K/128] (and qT [S, K, N], the same
                                           codes transposed: the input-gradient GEMM's K-major operand)

One program per 128 x 128 tile: it reads the tile once, takes the amax of every row and of every column of it,
and writes the codes of each orientation (the same rounding as `_triton_fp8.quantize_tiles`, so the codes equal
`quantize_fp8`'s bit for bit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_fp8 import round_e4m3
from .fp8 import FP8_DTYPE

__all__ = ["quantize_dual_triton", "quantize_blocks_triton"]

_T = 128


@triton.jit
def _codes(x, scale):
    return round_e4m3(tl.minimum(tl.maximum(x / scale, -448.0), 448.0)).to(tl.float8e4nv)


@triton.jit
def _quant_dual_kernel(x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, N, stride_x, n_tiles, m_tiles,
                       T: tl.constexpr, TINY: tl.constexpr):
    bm = tl.program_id(0)
    bn = tl.program_id(1)
    rows = bm.to(tl.int64) * T + tl.arange(0, T)
    cols = bn.to(tl.int64) * T + tl.arange(0, T)
    ok = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    s_row = tl.maximum(tl.max(tl.abs(x), axis=1), TINY) / 448.0  # [T]: one per row of the tile
    tl.store(q_ptr + rows[:, None] * N + cols[None, :], _codes(x, s_row[:, None]), mask=ok)
    tl.store(s_ptr + rows * n_tiles + bn, s_row, mask=rows < M)
    s_col = tl.maximum(tl.max(tl.abs(x), axis=0), TINY) / 448.0  # [T]: one per column of the tile
    tl.store(qt_ptr + cols[None, :] * M + rows[:, None], _codes(x, s_col[None, :]), mask=ok)
    tl.store(st_ptr + cols * m_tiles + bm, s_col, mask=cols < N)


@triton.jit
def _quant_blocks_kernel(w_ptr, q_ptr, s_ptr, qt_ptr, N, K, nb, kb, T: tl.constexpr, TINY: tl.constexpr,
                         TRANS: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    bn = tl.program_id(1)
    bk = tl.program_id(2)
    rows = bn.to(tl.int64) * T + tl.arange(0, T)
    cols = bk.to(tl.int64) * T + tl.arange(0, T)
    offs = g * N * K + rows[:, None] * K + cols[None, :]
    w = tl.load(w_ptr + offs).to(tl.float32)
    scale = tl.maximum(tl.max(tl.max(tl.abs(w), axis=1), axis=0), TINY) / 448.0
    codes = _codes(w, scale)
    tl.store(q_ptr + offs, codes)
    if TRANS:  # FP8 tensor cores take operands contiguous along the reduced dim: the input gradient's is N
        tl.store(qt_ptr + g * N * K + cols[:, None] * N + rows[None, :], tl.trans(codes))
    tl.store(s_ptr + (g * nb + bn) * kb + bk, scale)


def quantize_dual_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.stride(1) != 1:
        x = x.contiguous()
    M, N = x.shape
    n_tiles, m_tiles = triton.cdiv(N, _T), triton.cdiv(M, _T)
    q = torch.empty((M, N), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((M, n_tiles), dtype=torch.float32, device=x.device)
    qt = torch.empty((N, M), dtype=FP8_DTYPE, device=x.device)
    st = torch.empty((N, m_tiles), dtype=torch.float32, device=x.device)
    _quant_dual_kernel[(m_tiles, n_tiles)](x, q, s, qt, st, M, N, x.stride(0), n_tiles, m_tiles, T=_T, TINY=1e-30,
                                           num_warps=8)
    return q, s, qt, st


def quantize_blocks_triton(w: torch.Tensor, transposed: bool = False) -> tuple[torch.Tensor, ...]:
    w = w.contiguous()
    S, N, K = w.shape
    nb, kb = N // _T, K // _T
    q = torch.empty((S, N, K), dtype=FP8_DTYPE, device=w.device)
    s = torch.empty((S, nb, kb), dtype=torch.float32, device=w.device)
    qt = torch.empty((S, K, N), dtype=FP8_DTYPE, device=w.device) if transposed else q
    _quant_blocks_kernel[(S, nb, kb)](w, q, s, qt, N, K, nb, kb, T=_T, TINY=1e-30, TRANS=transposed, num_warps=8)
    return (q, s, qt) if transposed else (q, s)
