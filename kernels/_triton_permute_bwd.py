"""Triton kernel for `permute.unpermute_combine_backward`: the gradients of a weighted gather-sum.

One program per received row n walks the hidden dim in blocks: it loads the row's output gradient once per
block, scatters w[n, j] * g[n] to each pair's expert row (a permutation: no two programs write one row) and
accumulates the K dot products <g[n], y[pos[n, j]]> in float32 for the weights' gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["unpermute_combine_backward_triton"]


@triton.jit
def _unpermute_combine_bwd_kernel(g_ptr, y_ptr, pos_ptr, w_ptr, gy_ptr, gw_ptr, H, stride_g, stride_y, stride_gy,
                                  K: tl.constexpr, KP: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, KP)
    pos = tl.load(pos_ptr + n * K + kk, mask=kk < K, other=-1).to(tl.int64)
    if HAS_W:  # noqa: SIM108 (a compile-time branch)
        w = tl.load(w_ptr + n * K + kk, mask=kk < K, other=0.0).to(tl.float32)
    else:
        w = tl.full([KP], 1.0, tl.float32)
    dots = tl.zeros([KP], dtype=tl.float32)
    for h0 in range(0, H, BLOCK):
        cols = h0 + tl.arange(0, BLOCK)
        cm = cols < H
        g = tl.load(g_ptr + n * stride_g + cols, mask=cm, other=0.0).to(tl.float32)
        ok = (pos[:, None] >= 0) & cm[None, :]
        y = tl.load(y_ptr + pos[:, None] * stride_y + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dots += tl.sum(y * g[None, :], axis=1)
        tl.store(gy_ptr + pos[:, None] * stride_gy + cols[None, :],
                 (w[:, None] * g[None, :]).to(gy_ptr.dtype.element_ty), mask=ok)
    tl.store(gw_ptr + n * K + kk, dots, mask=kk < K)


def unpermute_combine_backward_triton(grad_out: torch.Tensor, y: torch.Tensor, pos: torch.Tensor,
                                      weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if grad_out.stride(1) != 1:
        grad_out = grad_out.contiguous()
    if y.stride(1) != 1:
        y = y.contiguous()
    N, K = pos.shape
    H = y.shape[1]
    grad_y = torch.zeros_like(y, memory_format=torch.contiguous_format)  # rows no pair points at stay zero
    grad_w = torch.empty((N, K), dtype=torch.float32, device=y.device)
    w = weights.contiguous() if weights is not None else grad_w  # placeholder pointer when unweighted
    block = min(triton.next_power_of_2(H), 1024)
    _unpermute_combine_bwd_kernel[(N,)](grad_out, y, pos.contiguous(), w, grad_y, grad_w, H, grad_out.stride(0),
                                        y.stride(0), grad_y.stride(0), K=K, KP=triton.next_power_of_2(K),
                                        HAS_W=weights is not None, BLOCK=block, num_warps=4)
    return grad_y, grad_w
