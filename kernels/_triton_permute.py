"""Triton kernels for `permute.py`: row gather, gather + FP8 dequantise, and weighted gather-sum.

Each program moves one row's block of BLOCK columns; rows are addressed with 64-bit offsets. Memory-bound:
the goal is one read of every needed input byte and one write of every output byte.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import num_tiles

__all__ = ["permute_triton", "permute_dequant_triton", "unpermute_combine_triton"]


@triton.jit
def _permute_kernel(x_ptr, idx_ptr, out_ptr, H, stride_x, stride_o, BLOCK: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    src = tl.load(idx_ptr + m).to(tl.int64)
    cm = cols < H
    # (Scalar conditions are broadcast to the block before `&`: Triton's interpreter rejects the mix.)
    vals = tl.load(x_ptr + src * stride_x + cols, mask=cm & (tl.zeros_like(cols) + src >= 0), other=0)
    tl.store(out_ptr + m * stride_o + cols, vals, mask=cm)


@triton.jit
def _permute_dequant_kernel(q_ptr, s_ptr, idx_ptr, out_ptr, H, n_tiles, stride_q, stride_o,
                            TILE: tl.constexpr, TPP: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    tiles = tl.program_id(1) * TPP + tl.arange(0, TPP)
    cols = tiles[:, None] * TILE + tl.arange(0, TILE)[None, :]
    src = tl.load(idx_ptr + m).to(tl.int64)
    q = tl.load(q_ptr + src * stride_q + cols, mask=(cols < H) & (tl.zeros_like(cols) + src >= 0),
                other=0.0).to(tl.float32)
    s = tl.load(s_ptr + src * n_tiles + tiles, mask=(tiles < n_tiles) & (tl.zeros_like(tiles) + src >= 0),
                other=0.0)
    tl.store(out_ptr + m * stride_o + cols, (q * s[:, None]).to(out_ptr.dtype.element_ty), mask=cols < H)


@triton.jit
def _unpermute_combine_kernel(y_ptr, pos_ptr, w_ptr, out_ptr, H, stride_y, stride_o,
                              K: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cm = cols < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):
        p = tl.load(pos_ptr + n * K + j).to(tl.int64)
        if HAS_W:  # noqa: SIM108 (a compile-time branch)
            w = tl.load(w_ptr + n * K + j).to(tl.float32)
        else:
            w = 1.0
        rows = tl.load(y_ptr + p * stride_y + cols, mask=cm & (tl.zeros_like(cols) + p >= 0),
                       other=0.0).to(tl.float32)
        acc += w * rows
    tl.store(out_ptr + n * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=cm)


def _block(hidden: int, elem_bytes: int) -> int:
    # ~8 KiB per program: wide enough for 16-byte accesses by every thread, small enough for many programs.
    return min(triton.next_power_of_2(hidden), max(128, 8192 // elem_bytes))


def permute_triton(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if x.stride(1) != 1:
        x = x.contiguous()
    M, H = index.shape[0], x.shape[1]
    out = torch.empty((M, H), dtype=x.dtype, device=x.device)
    raw_x = x.view(torch.uint8) if x.element_size() == 1 else x  # FP8 moves as bytes
    raw_o = out.view(torch.uint8) if x.element_size() == 1 else out
    block = _block(H, x.element_size())
    grid = (M, triton.cdiv(H, block))
    _permute_kernel[grid](raw_x, index.contiguous(), raw_o, H, x.stride(0), out.stride(0), BLOCK=block,
                          num_warps=4)
    return out


def permute_dequant_triton(q: torch.Tensor, scales: torch.Tensor, index: torch.Tensor, tile: int,
                           out_dtype: torch.dtype) -> torch.Tensor:
    if tile & (tile - 1):
        raise ValueError(f"tile: the Triton path needs a power-of-two tile, got {tile}")
    q, scales = q.contiguous(), scales.contiguous()
    M, H = index.shape[0], q.shape[1]
    out = torch.empty((M, H), dtype=out_dtype, device=q.device)
    nt = num_tiles(H, tile)
    tpp = max(1, min(triton.next_power_of_2(nt), max(1, 4096 // tile)))
    _permute_dequant_kernel[(M, triton.cdiv(nt, tpp))](q, scales, index.contiguous(), out, H, nt, q.stride(0),
                                                       out.stride(0), TILE=tile, TPP=tpp, num_warps=4)
    return out


def unpermute_combine_triton(y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None,
                             out_dtype: torch.dtype) -> torch.Tensor:
    if y.stride(1) != 1:
        y = y.contiguous()
    N, K = pos.shape
    H = y.shape[1]
    out = torch.empty((N, H), dtype=out_dtype, device=y.device)
    block = _block(H, 4)
    w = weights.contiguous() if weights is not None else pos  # placeholder pointer when unweighted
    _unpermute_combine_kernel[(N, triton.cdiv(H, block))](y, pos.contiguous(), w, out, H, y.stride(0),
                                                          out.stride(0), K=K, HAS_W=weights is not None,
                                                          BLOCK=block, num_warps=4)
    return out
