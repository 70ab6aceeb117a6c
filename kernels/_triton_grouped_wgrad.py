"""Triton grouped weight-gradient GEMM: out[g] = A_g @ B_g^T over the rows m of group g (see `grouped_wgrad.py`).

    out[g, n, k] = sum over rows m of group g of  a(n, m) * b(k, m)            (bf16 / fp32)
    out[g, n, k] = sum over 128-row tiles t of  sa[n, t] * sb[k, t] * sum_{m in t, m in g} a(n, m) * b(k, m)   (FP8)

a and b are addressed through strides (a(n, m) = a_ptr + n * stride_an + m * stride_am), so the same kernel
reads row-major [M, N] gradients (bf16) and [N, M] transposed FP8 codes. One program owns one [BLOCK_N,
BLOCK_K] tile of one group and walks that group's rows in chunks aligned to absolute multiples of BLOCK_M:
with BLOCK_M dividing 128, a chunk never straddles two FP8 scale tiles, whatever the group boundaries, so
a chunk's FP8 product is scaled once and added in float32 (DeepSeek-V3's promotion). Rows of a chunk outside
the group load as zero. A group without rows writes zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import interpreting

__all__ = ["grouped_wgrad_triton", "SCALE_ROWS"]

SCALE_ROWS = 128  # rows (the reduced dim) covered by one FP8 scale


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr, b_ptr, as_ptr, bs_ptr, out_ptr, ends_ptr,
    N, K,
    stride_an, stride_am, stride_bk, stride_bm, stride_asn, stride_bsk, stride_og, stride_on,
    K_TILES,
    FP8: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, SCALE_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    pid_n = pid // K_TILES
    pid_k = pid % K_TILES
    end = tl.load(ends_ptr + g)
    start = tl.where(g > 0, tl.load(ends_ptr + g - 1, mask=g > 0, other=0), 0)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = ns < N
    k_ok = ks < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range((start // BLOCK_M) * BLOCK_M, end, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        m_ok = (ms >= start) & (ms < end)
        a = tl.load(a_ptr + ns[:, None].to(tl.int64) * stride_an + ms[None, :].to(tl.int64) * stride_am,
                    mask=n_ok[:, None] & m_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_M]
        b = tl.load(b_ptr + ks[None, :].to(tl.int64) * stride_bk + ms[:, None].to(tl.int64) * stride_bm,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        if FP8:
            t = m0 // SCALE_M
            sa = tl.load(as_ptr + ns.to(tl.int64) * stride_asn + t, mask=n_ok, other=0.0)
            sb = tl.load(bs_ptr + ks.to(tl.int64) * stride_bsk + t, mask=k_ok, other=0.0)
            acc += tl.dot(a, b, out_dtype=tl.float32) * (sa[:, None] * sb[None, :])
        elif IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        elif UPCAST:  # Triton's CPU interpreter mis-computes bf16 dots (3.x); float32 gives the same sums
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    out = out_ptr + g.to(tl.int64) * stride_og + ns[:, None].to(tl.int64) * stride_on + ks[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


def grouped_wgrad_triton(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, out_dtype: torch.dtype,
                         a_scale: torch.Tensor | None = None, b_scale: torch.Tensor | None = None,
                         transposed: bool = False, block_n: int = 128, block_k: int = 128, block_m: int | None = None,
                         num_warps: int = 8, num_stages: int = 3) -> torch.Tensor:
    """[S, N, K] out_dtype; arguments checked by the callers in `grouped_wgrad.py`.

    transposed=False: a = dy [M, N], b = x [M, K] (row-major, bf16/fp32). transposed=True: a = [N, M] and b =
    [K, M] (FP8 codes quantised along M), with scales a_scale [N, ceil(M/128)] and b_scale [K, ceil(M/128)].
    """
    fp8 = a_scale is not None
    if transposed:
        (N, _), (K, _) = a.shape, b.shape
        s_an, s_am, s_bk, s_bm = a.stride(0), a.stride(1), b.stride(0), b.stride(1)
    else:
        (_, N), (_, K) = a.shape, b.shape
        s_an, s_am, s_bk, s_bm = a.stride(1), a.stride(0), b.stride(1), b.stride(0)
    S = offsets.shape[0]
    if block_m is None:
        block_m = SCALE_ROWS if fp8 else 64
    assert not fp8 or SCALE_ROWS % block_m == 0, block_m
    out = torch.empty((S, N, K), dtype=out_dtype, device=a.device)
    k_tiles = triton.cdiv(K, block_k)
    placeholder = out  # unused scale pointers when not FP8
    _grouped_wgrad_kernel[(triton.cdiv(N, block_n) * k_tiles, S)](
        a, b, a_scale if fp8 else placeholder, b_scale if fp8 else placeholder, out, offsets.to(torch.int32),
        N, K, s_an, s_am, s_bk, s_bm,
        a_scale.stride(0) if fp8 else 0, b_scale.stride(0) if fp8 else 0, out.stride(0), out.stride(1),
        k_tiles, FP8=fp8, IEEE=a.dtype == torch.float32, UPCAST=interpreting(), SCALE_M=SCALE_ROWS,
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=block_m, num_warps=num_warps, num_stages=num_stages,
    )
    return out
