"""FP8 E4M3 quantisation with one scale per 1 x `tile` channel tile (DeepSeek-V3's activation format).

    quantize_fp8(x [N, H], tile=128) -> q float8_e4m3fn [N, H], scales float32 [N, ceil(H / tile)]
    dequantize_fp8(q, scales, tile=128) -> [N, H]

x[n, c] ~= q[n, c] * scales[n, c // tile]. Each tile's scale is amax(|tile|) / 448 (448 = largest E4M3
value), so the largest element of a tile maps to +-448 and the relative rounding error of every element
is at most 2^-4 (3 mantissa bits), plus at most scale * 2^-10 for elements in E4M3's subnormal range.
An all-zero tile gets a tiny positive scale and zero codes. `tile=None` means one scale per row
(rowwise, the format `torch._scaled_grouped_mm` takes): scales [N, 1].
"""

from __future__ import annotations

import torch

from ._backend import use_triton

__all__ = ["FP8_MAX", "FP8_DTYPE", "quantize_fp8", "dequantize_fp8", "silu_mul_quantize_fp8", "num_tiles"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
_TINY = 1e-30  # keeps an all-zero tile's scale positive; x / scale stays finite since |x| <= amax


def num_tiles(hidden: int, tile: int | None) -> int:
    return 1 if tile is None else -(-hidden // tile)


def _check(x: torch.Tensor, tile: int | None, name: str = "x") -> None:
    if x.dim() != 2:
        raise ValueError(f"{name}: expected shape [N, H], got {list(x.shape)}")
    if tile is not None and tile < 1:
        raise ValueError(f"tile: expected a positive tile width or None (rowwise), got {tile}")


def quantize_fp8_reference(x: torch.Tensor, tile: int | None = 128) -> tuple[torch.Tensor, torch.Tensor]:
    N, H = x.shape
    width = H if tile is None else tile
    nt = num_tiles(H, tile)
    xf = torch.nn.functional.pad(x.float(), (0, nt * width - H)).view(N, nt, width)
    scales = xf.abs().amax(-1).clamp(min=_TINY) / FP8_MAX
    q = (xf / scales[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(N, nt * width)[:, :H].contiguous(), scales


def dequantize_fp8_reference(q: torch.Tensor, scales: torch.Tensor, tile: int | None = 128,
                             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    N, H = q.shape
    width = H if tile is None else tile
    nt = num_tiles(H, tile)
    qf = torch.nn.functional.pad(q.float(), (0, nt * width - H)).view(N, nt, width)
    return (qf * scales[..., None]).view(N, nt * width)[:, :H].to(out_dtype)


def quantize_fp8(x: torch.Tensor, tile: int | None = 128,
                 impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [N, H], scales float32 [N, ceil(H / tile)]); see the module docstring."""
    _check(x, tile)
    if x.shape[0] == 0 or x.shape[1] == 0:
        return (torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device),
                torch.ones(x.shape[0], num_tiles(x.shape[1], tile), device=x.device))
    if use_triton(impl, x):
        from ._triton_fp8 import quantize_fp8_triton

        return quantize_fp8_triton(x, tile)
    return quantize_fp8_reference(x, tile)


def silu_mul_quantize_fp8(h: torch.Tensor, tile: int = 128,
                          impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU's activation of a gate/up product h [M, 2F] (gate columns first), quantised like `quantize_fp8`:
    quantize_fp8(silu(gate) * up, tile) computed in float32, in one pass over h on the Triton path (the
    float32 products of the reference are F-wide intermediates written and read back several times)."""
    _check(h, tile, "h")
    if h.shape[1] % 2 or tile is None:
        raise ValueError(f"h: expected [M, 2F] and a tile width, got {list(h.shape)} and tile {tile}")
    if h.numel() and use_triton(impl, h):
        from ._triton_fp8 import silu_mul_quantize_fp8_triton

        return silu_mul_quantize_fp8_triton(h, tile)
    gate, up = h.float().chunk(2, dim=-1)
    return quantize_fp8_reference(torch.nn.functional.silu(gate) * up, tile)


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, tile: int | None = 128,
                   out_dtype: torch.dtype = torch.bfloat16, impl: str = "auto") -> torch.Tensor:
    """[N, H] in `out_dtype`: q * scale of its tile."""
    _check(q, tile, "q")
    if q.dtype != FP8_DTYPE:
        raise ValueError(f"q: expected dtype {FP8_DTYPE}, got {q.dtype}")
    want = (q.shape[0], num_tiles(q.shape[1], tile))
    if tuple(scales.shape) != want:
        raise ValueError(f"scales: expected shape {list(want)} for q {list(q.shape)} and tile {tile}, "
                         f"got {list(scales.shape)}")
    if q.numel() == 0:
        return torch.empty(q.shape, dtype=out_dtype, device=q.device)
    if use_triton(impl, q, scales):
        from ._triton_fp8 import dequantize_fp8_triton

        return dequantize_fp8_triton(q, scales, tile, out_dtype)
    return dequantize_fp8_reference(q, scales, tile, out_dtype)
