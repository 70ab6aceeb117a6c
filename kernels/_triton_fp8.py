"""Triton kernels for FP8 E4M3 quantisation with 1 x TILE scales (see `fp8.py` for the format).

Rounding: `round_e4m3` rounds a float32 to the nearest E4M3 value (ties to even) with integer and
power-of-two arithmetic only, so the final cast to float8 is exact. That keeps the codes identical on a GPU
and in Triton's CPU interpreter, whose float8 cast mis-rounds values that carry into the next binade.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import FP8_DTYPE, num_tiles

__all__ = ["quantize_fp8_triton", "dequantize_fp8_triton", "silu_mul_quantize_fp8_triton", "round_e4m3",
           "quantize_tiles"]

# 1.5 * 2^23: adding and subtracting it rounds |v| < 2^22 to an integer (ties to even). A constexpr, since
# jitted code may read no other globals.
_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def round_e4m3(v):
    """float32 v with |v| <= 448 -> the nearest E4M3 value (ties to even), still float32."""
    a = tl.abs(v)
    e = (a.to(tl.int32, bitcast=True) >> 23) - 127  # unbiased exponent (-127 for zero)
    e = tl.maximum(e, -6)  # E4M3 subnormals share the spacing of the smallest binade
    inv_step = ((127 + 3 - e) << 23).to(tl.float32, bitcast=True)  # 2^-(e-3): 3 mantissa bits
    step = ((127 - 3 + e) << 23).to(tl.float32, bitcast=True)
    r = (a * inv_step + _ROUND_MAGIC) - _ROUND_MAGIC
    out = r * step
    return tl.where(v < 0, -out, out)


@triton.jit
def quantize_tiles(x, TINY: tl.constexpr):
    """x float32 [R, TILE] -> (codes float32 [R, TILE] on the E4M3 grid, scales float32 [R])."""
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.maximum(amax, TINY) / 448.0
    v = x / scale[:, None]
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    return round_e4m3(v), scale


@triton.jit
def _quant_tiles_kernel(x_ptr, q_ptr, s_ptr, H, n_tiles, stride_x, stride_q,
                        TILE: tl.constexpr, TPP: tl.constexpr, TINY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    tiles = tl.program_id(1) * TPP + tl.arange(0, TPP)
    cols = tiles[:, None] * TILE + tl.arange(0, TILE)[None, :]
    m = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    codes, scale = quantize_tiles(x, TINY)
    tl.store(q_ptr + row * stride_q + cols, codes.to(tl.float8e4nv), mask=m)
    tl.store(s_ptr + row * n_tiles + tiles, scale, mask=tiles < n_tiles)


@triton.jit
def _silu_mul_quant_kernel(h_ptr, q_ptr, s_ptr, F, n_tiles, stride_h, stride_q,
                           TILE: tl.constexpr, TPP: tl.constexpr, TINY: tl.constexpr):
    # SwiGLU's activation straight from the gate/up GEMM output h [M, 2F] (gate columns, then up) to the
    # down projection's FP8 operand: one read of h, no float32 intermediates in memory.
    row = tl.program_id(0).to(tl.int64)
    tiles = tl.program_id(1) * TPP + tl.arange(0, TPP)
    cols = tiles[:, None] * TILE + tl.arange(0, TILE)[None, :]
    m = cols < F
    gate = tl.load(h_ptr + row * stride_h + cols, mask=m, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * stride_h + F + cols, mask=m, other=0.0).to(tl.float32)
    codes, scale = quantize_tiles(gate / (1.0 + tl.exp(-gate)) * up, TINY)
    tl.store(q_ptr + row * stride_q + cols, codes.to(tl.float8e4nv), mask=m)
    tl.store(s_ptr + row * n_tiles + tiles, scale, mask=tiles < n_tiles)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, H, stride_x, stride_q, BLOCK: tl.constexpr, TINY: tl.constexpr):
    # One scale per row: a first pass finds the row's amax, a second writes the codes.
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, H, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < H, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), TINY) / 448.0
    for start in range(0, H, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < H, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        tl.store(q_ptr + row * stride_q + cols, round_e4m3(v).to(tl.float8e4nv), mask=cols < H)
    tl.store(s_ptr + row, scale)


@triton.jit
def _dequant_tiles_kernel(q_ptr, s_ptr, out_ptr, H, n_tiles, stride_q, stride_o,
                          TILE: tl.constexpr, TPP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    tiles = tl.program_id(1) * TPP + tl.arange(0, TPP)
    cols = tiles[:, None] * TILE + tl.arange(0, TILE)[None, :]
    m = cols < H
    q = tl.load(q_ptr + row * stride_q + cols, mask=m, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + row * n_tiles + tiles, mask=tiles < n_tiles, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (q * s[:, None]).to(out_ptr.dtype.element_ty), mask=m)


def _tiles_per_program(hidden: int, tile: int) -> int:
    # About 1-2K elements per program: enough bytes in flight per program, enough programs per row.
    return max(1, min(triton.next_power_of_2(num_tiles(hidden, tile)), max(1, 2048 // tile)))


def quantize_fp8_triton(x: torch.Tensor, tile: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if x.stride(1) != 1:
        x = x.contiguous()
    N, H = x.shape
    q = torch.empty((N, H), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((N, num_tiles(H, tile)), dtype=torch.float32, device=x.device)
    if tile is None:
        block = min(triton.next_power_of_2(H), 4096)
        _quant_rows_kernel[(N,)](x, q, s, H, x.stride(0), q.stride(0), BLOCK=block, TINY=1e-30)
        return q, s
    if tile & (tile - 1):
        raise ValueError(f"tile: the Triton path needs a power-of-two tile, got {tile}")
    tpp = _tiles_per_program(H, tile)
    grid = (N, triton.cdiv(num_tiles(H, tile), tpp))
    _quant_tiles_kernel[grid](x, q, s, H, s.shape[1], x.stride(0), q.stride(0), TILE=tile, TPP=tpp,
                              TINY=1e-30)
    return q, s


def silu_mul_quantize_fp8_triton(h: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    if h.stride(1) != 1:
        h = h.contiguous()
    if tile & (tile - 1):
        raise ValueError(f"tile: the Triton path needs a power-of-two tile, got {tile}")
    M, F = h.shape[0], h.shape[1] // 2
    q = torch.empty((M, F), dtype=FP8_DTYPE, device=h.device)
    s = torch.empty((M, num_tiles(F, tile)), dtype=torch.float32, device=h.device)
    tpp = _tiles_per_program(F, tile)
    _silu_mul_quant_kernel[(M, triton.cdiv(num_tiles(F, tile), tpp))](h, q, s, F, s.shape[1], h.stride(0),
                                                                       q.stride(0), TILE=tile, TPP=tpp, TINY=1e-30)
    return q, s


def dequantize_fp8_triton(q: torch.Tensor, scales: torch.Tensor, tile: int | None,
                          out_dtype: torch.dtype) -> torch.Tensor:
    N, H = q.shape
    width = H if tile is None else tile
    if width & (width - 1):
        # Rowwise scales over a width that is not a power of two: broadcast them to 128-wide tiles.
        width = 128
        scales = scales.expand(N, num_tiles(H, width)).contiguous()
    q = q.contiguous()
    scales = scales.contiguous()
    out = torch.empty((N, H), dtype=out_dtype, device=q.device)
    tpp = _tiles_per_program(H, width)
    grid = (N, triton.cdiv(num_tiles(H, width), tpp))
    _dequant_tiles_kernel[grid](q, scales, out, H, scales.shape[1], q.stride(0), out.stride(0),
                                TILE=width, TPP=tpp)
    return out
