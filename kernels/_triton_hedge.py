"""Triton kernel of the balanced replica rule's split (kernels/replicas.py `balanced_split`).

The split is sequential over the replicated experts (each water-fills over its hosts on top of the levels
the experts before it left), so it runs as ONE program: the experts' totals and host rows are loaded once
as an [R, G] tile, and each step of the loop picks its row out of registers, so the loop never waits on
memory. The water level is found by bisection (the largest integer level the total pays for), 32 halvings of
the range [lowest host level, that + total], enough for any total below 2^32. The torch reference is
`replicas.balanced_split_reference`; tests hold the two equal (on the GPU and under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["split_kernel", "balanced_split_triton"]

_BITS = 32


@triton.jit
def split_kernel(
    totals_ptr,  # int64 [E] pairs per expert
    hosts_ptr,  # int8 [E, G] 1 where the expert has a replica
    order_ptr,  # int64 [R] replicated experts, in the order they are filled
    level_ptr,  # int64 [G] starting level: the single-host experts' loads
    split_ptr,  # int64 [E, G] out: rows of the replicated experts (the rest is written by the caller)
    R, G,
    RP: tl.constexpr, GP: tl.constexpr, BITS: tl.constexpr, FAR: tl.constexpr,
):
    rows = tl.arange(0, RP)
    cols = tl.arange(0, GP)
    r_ok = rows < R
    c_ok = cols < G
    e_all = tl.load(order_ptr + rows, mask=r_ok, other=0)
    n_all = tl.load(totals_ptr + e_all, mask=r_ok, other=0)
    h_all = tl.load(hosts_ptr + e_all[:, None] * G + cols[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0)
    level = tl.load(level_ptr + cols, mask=c_ok, other=0)
    for i in range(R):
        sel = rows == i
        e = tl.sum(tl.where(sel, e_all, 0), axis=0)
        n = tl.sum(tl.where(sel, n_all, 0), axis=0)
        h = tl.sum(tl.where(sel[:, None], h_all, 0).to(tl.int32), axis=0) > 0
        lo = tl.min(tl.where(h, level, FAR), axis=0)
        hi = lo + n
        for _ in tl.static_range(BITS):  # largest level whose water costs at most n
            mid = (lo + hi + 1) // 2
            cost = tl.sum(tl.where(h, tl.maximum(mid - level, 0), 0), axis=0)
            ok = cost <= n
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        a = tl.where(h, tl.maximum(lo - level, 0), 0)
        eligible = h & (level <= lo)
        rank_in = tl.cumsum(eligible.to(tl.int64), axis=0)
        a += tl.where(eligible & (rank_in <= n - tl.sum(a, axis=0)), 1, 0)
        tl.store(split_ptr + e * G + cols, a, mask=c_ok)
        level += a


def _pow2(n: int) -> int:
    return max(1, 1 << (n - 1).bit_length())


def balanced_split_triton(totals: torch.Tensor, hosts: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """int64 [E, G]: `replicas.balanced_split_reference(totals, hosts, order)` in one program."""
    G = hosts.shape[1]
    single = hosts & (hosts.sum(1) == 1)[:, None]
    split = torch.where(single, totals[:, None], 0)
    level = split.sum(0)
    R = order.numel()
    split_kernel[(1,)](totals.contiguous(), hosts.to(torch.int8).contiguous(), order.contiguous(), level, split,
                       R, G, RP=_pow2(R), GP=_pow2(G), BITS=_BITS, FAR=1 << 40, num_warps=4)
    return split
