"""Permute (gather rows into destination or expert order) and unpermute-and-combine (weighted gather-sum).

    permute(x [N, H], index [M]) -> [M, H]                 out[m] = x[index[m]], a zero row where index < 0
    permute_dequant(q, scales, index) -> [M, H] bf16       the same, from FP8 with 1x128 scales
    unpermute_combine(y [M, H], pos [N, K], w [N, K]) -> [N, H]
                                     out[n] = sum_j w[n, j] * y[pos[n, j]] over pos >= 0
    unpermute_combine_backward(g [N, H], y, pos, w) -> grad_y [M, H], grad_w float32 [N, K]
                                     grad_y[pos[n, j]] = w[n, j] * g[n]; grad_w[n, j] = <g[n], y[pos[n, j]]>

Both directions are gathers (no atomics), so results are deterministic and unpermute needs no zeroing
pass: the same two ops serve the source side (copy tokens into the destination-major send buffer; sum
the copies that come back) and the receiver side (rows into expert order; weighted sum of a token's
expert outputs). Sums accumulate in float32 (float64 for float64 inputs, so gradients can be checked).

Backward: permute's is an unpermute-combine without weights (each expert row back to the received row it
came from, a pair's rows summed), and unpermute-combine's is `unpermute_combine_backward` (a weighted
scatter of the output gradient to each pair's row, which is a permutation: no two pairs share a row, so
again no atomics, and one dot product per pair for the weights' gradient).
"""

from __future__ import annotations

import torch

from ._backend import use_triton
from .fp8 import FP8_DTYPE, dequantize_fp8_reference, num_tiles

__all__ = ["permute", "permute_dequant", "unpermute_combine", "unpermute_combine_backward"]


def _check_index(index: torch.Tensor, name: str, dims: int) -> None:
    if index.dim() != dims or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: expected a {dims}-D int32/int64 tensor, got {index.dim()}-D {index.dtype}")


def permute_reference(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    index = index.to(torch.int64)
    if x.shape[0] == 0:
        return torch.zeros((index.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
    raw = x.view(torch.uint8) if x.dtype == FP8_DTYPE else x  # where() has no FP8 kernels
    rows = raw.index_select(0, index.clamp(min=0))
    rows = torch.where(index[:, None] >= 0, rows, torch.zeros((), dtype=raw.dtype, device=x.device))
    return rows.view(x.dtype)


def permute(x: torch.Tensor, index: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """[M, H]: rows of x [N, H] picked by index [M] (any dtype, FP8 included); index < 0 gives a zero row."""
    if x.dim() != 2:
        raise ValueError(f"x: expected shape [N, H], got {list(x.shape)}")
    _check_index(index, "index", 1)
    if index.numel() == 0 or x.shape[1] == 0:
        return torch.zeros((index.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
    if x.shape[0] > 0 and use_triton(impl, x, index):
        from ._triton_permute import permute_triton

        return permute_triton(x, index)
    return permute_reference(x, index)


def permute_dequant(q: torch.Tensor, scales: torch.Tensor, index: torch.Tensor, tile: int = 128,
                    out_dtype: torch.dtype = torch.bfloat16, impl: str = "auto") -> torch.Tensor:
    """[M, H] `out_dtype`: FP8 rows q [N, H] (scales [N, ceil(H/tile)]) picked by index and dequantised."""
    _check_index(index, "index", 1)
    if q.dtype != FP8_DTYPE or q.dim() != 2:
        raise ValueError(f"q: expected a 2-D {FP8_DTYPE} tensor, got {q.dim()}-D {q.dtype}")
    if tuple(scales.shape) != (q.shape[0], num_tiles(q.shape[1], tile)):
        raise ValueError(f"scales: expected shape {[q.shape[0], num_tiles(q.shape[1], tile)]}, "
                         f"got {list(scales.shape)}")
    if index.numel() == 0 or q.shape[0] == 0:
        return torch.zeros((index.shape[0], q.shape[1]), dtype=out_dtype, device=q.device)
    if use_triton(impl, q, scales, index):
        from ._triton_permute import permute_dequant_triton

        return permute_dequant_triton(q, scales, index, tile, out_dtype)
    deq = dequantize_fp8_reference(permute_reference(q, index), permute_reference(scales, index), tile,
                                   out_dtype)
    return deq


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def unpermute_combine_reference(y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None,
                                out_dtype: torch.dtype) -> torch.Tensor:
    N, K = pos.shape
    acc = _acc_dtype(y.dtype)
    out = torch.zeros((N, y.shape[1]), dtype=acc, device=y.device)
    if y.shape[0] == 0:
        return out.to(out_dtype)
    pos = pos.to(torch.int64)
    for j in range(K):
        rows = y.index_select(0, pos[:, j].clamp(min=0)).to(acc)
        ok = pos[:, j] >= 0
        w = ok.to(acc) if weights is None else torch.where(ok, weights[:, j].to(acc), 0.0)
        out += w[:, None] * rows
    return out.to(out_dtype)


def unpermute_combine(y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None = None,
                      out_dtype: torch.dtype | None = None, impl: str = "auto") -> torch.Tensor:
    """[N, H]: out[n] = sum over j with pos[n, j] >= 0 of weights[n, j] * y[pos[n, j]] (weights None = 1).

    y [M, H] rows (float); pos int [N, K]; weights float [N, K] or None. Accumulates in float32; the result
    is in `out_dtype` (default y's dtype).
    """
    if y.dim() != 2:
        raise ValueError(f"y: expected shape [M, H], got {list(y.shape)}")
    _check_index(pos, "pos", 2)
    if weights is not None and tuple(weights.shape) != tuple(pos.shape):
        raise ValueError(f"weights: expected shape {list(pos.shape)} like pos, got {list(weights.shape)}")
    out_dtype = y.dtype if out_dtype is None else out_dtype
    if pos.shape[0] == 0 or y.shape[1] == 0 or y.shape[0] == 0:
        return torch.zeros((pos.shape[0], y.shape[1]), dtype=out_dtype, device=y.device)
    if use_triton(impl, y, pos):
        from ._triton_permute import unpermute_combine_triton

        return unpermute_combine_triton(y, pos, weights, out_dtype)
    return unpermute_combine_reference(y, pos, weights, out_dtype)


def unpermute_combine_backward_reference(grad_out: torch.Tensor, y: torch.Tensor, pos: torch.Tensor,
                                         weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    N, K = pos.shape
    acc = _acc_dtype(y.dtype)
    grad_y = torch.zeros_like(y)
    grad_w = torch.zeros((N, K), dtype=torch.float64 if acc == torch.float64 else torch.float32, device=y.device)
    pos = pos.to(torch.int64)
    ok = pos >= 0
    rows = torch.arange(N, device=y.device)[:, None].expand(N, K)[ok]  # received row of each pair
    p = pos[ok]  # its expert row
    g = grad_out.index_select(0, rows).to(acc)
    w = torch.ones_like(p, dtype=acc) if weights is None else weights[ok].to(acc)
    grad_y[p] = (w[:, None] * g).to(y.dtype)
    grad_w[ok] = (g * y.index_select(0, p).to(acc)).sum(-1).to(grad_w.dtype)
    return grad_y, grad_w


def unpermute_combine_backward(grad_out: torch.Tensor, y: torch.Tensor, pos: torch.Tensor,
                               weights: torch.Tensor | None = None,
                               impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `unpermute_combine(y, pos, weights)` for output gradient grad_out [N, H]:
    (grad_y [M, H] in y's dtype, rows no pair points at are zero; grad_w float32 [N, K], zero where pos < 0).

    Every pair must point at its own row (pos >= 0 entries distinct), as the expert layout's `pair_pos` does.
    Dot products accumulate in float32 (float64 for float64 inputs).
    """
    _check_index(pos, "pos", 2)
    if y.dim() != 2 or tuple(grad_out.shape) != (pos.shape[0], y.shape[1]):
        raise ValueError(f"grad_out, y: expected [N={pos.shape[0]}, H] and [M, H], got {list(grad_out.shape)} "
                         f"and {list(y.shape)}")
    if weights is not None and tuple(weights.shape) != tuple(pos.shape):
        raise ValueError(f"weights: expected shape {list(pos.shape)} like pos, got {list(weights.shape)}")
    if pos.numel() == 0 or y.shape[0] == 0 or y.shape[1] == 0:
        return torch.zeros_like(y), torch.zeros(pos.shape, dtype=torch.float32, device=y.device)
    if y.dtype != torch.float64 and use_triton(impl, grad_out, y, pos):
        from ._triton_permute_bwd import unpermute_combine_backward_triton

        return unpermute_combine_backward_triton(grad_out, y, pos, weights)
    return unpermute_combine_backward_reference(grad_out, y, pos, weights)
