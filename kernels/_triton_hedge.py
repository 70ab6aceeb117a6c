"""Triton kernel of the balanced replica rule's split (kernels/replicas.py `balanced_split`).

The split is sequential over the replicated experts (each water-fills over its hosts on top of the levels
the others left, `passes` rounds), so it runs as ONE program: the experts' totals and host rows are loaded
once as an [R, G] tile, their current shares live in another, and each step of the loop picks its row out of
registers, so the loop never waits on memory. The water level comes from the hosts' sorted levels (the
largest integer level the total pays for), as in numpy. The torch reference is
`replicas.balanced_split_reference`; tests hold the two equal (on the GPU and under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["split_kernel", "balanced_split_triton"]

@triton.jit
def split_kernel(
    totals_ptr,  # int64 [E] pairs per expert
    hosts_ptr,  # int8 [E, G] 1 where the expert has a replica
    order_ptr,  # int64 [R] replicated experts, in the order they are filled
    level_ptr,  # int64 [G] starting level: the single-host experts' loads
    split_ptr,  # int64 [E, G] out: rows of the replicated experts (the rest is written by the caller)
    R, G, steps,  # steps = R x rounds
    RP: tl.constexpr, GP: tl.constexpr, FAR: tl.constexpr,
):
    rows = tl.arange(0, RP)
    cols = tl.arange(0, GP)
    r_ok = rows < R
    c_ok = cols < G
    e_all = tl.load(order_ptr + rows, mask=r_ok, other=0)
    n_all = tl.load(totals_ptr + e_all, mask=r_ok, other=0)
    tile = r_ok[:, None] & c_ok[None, :]
    h_all = tl.load(hosts_ptr + e_all[:, None] * G + cols[None, :], mask=tile, other=0)
    level = tl.load(level_ptr + cols, mask=c_ok, other=0)
    alloc = tl.zeros((RP, GP), dtype=tl.int64)  # the replicated experts' current shares, in registers
    j = cols.to(tl.int64) + 1
    for step in range(steps):
        i = step % R
        sel = rows == i
        n = tl.sum(tl.where(sel, n_all, 0), axis=0)
        h = tl.sum(tl.where(sel[:, None], h_all, 0).to(tl.int32), axis=0) > 0
        level -= tl.sum(tl.where(sel[:, None], alloc, 0), axis=0)  # refill on top of the others' shares
        # Largest level L with sum over hosts of max(L - level, 0) <= n, from the hosts' sorted levels.
        low = tl.sort(tl.where(h, level, FAR), 0)
        need = j * low - tl.cumsum(low, 0)
        fits = need <= n
        J = tl.sum(fits.to(tl.int64), axis=0)
        last = cols == J - 1
        lam = tl.sum(tl.where(last, low, 0), axis=0) + (n - tl.sum(tl.where(last, need, 0), axis=0)) // J
        a = tl.where(h, tl.maximum(lam - level, 0), 0)
        eligible = h & (level <= lam)
        rank_in = tl.cumsum(eligible.to(tl.int64), 0)
        a += tl.where(eligible & (rank_in <= n - tl.sum(a, axis=0)), 1, 0)
        alloc = tl.where(sel[:, None], a[None, :], alloc)
        level += a
    tl.store(split_ptr + e_all[:, None] * G + cols[None, :], alloc, mask=tile)


def _pow2(n: int) -> int:
    return max(1, 1 << (n - 1).bit_length())


def balanced_split_triton(totals: torch.Tensor, hosts: torch.Tensor, order: torch.Tensor, passes: int) -> torch.Tensor:
    """int64 [E, G]: `replicas.balanced_split_reference(totals, hosts, order, passes)` in one program."""
    G = hosts.shape[1]
    single = hosts & (hosts.sum(1) == 1)[:, None]
    split = torch.where(single, totals[:, None], 0)
    level = split.sum(0)
    R = order.numel()
    split_kernel[(1,)](totals.contiguous(), hosts.to(torch.int8).contiguous(), order.contiguous(), level, split,
                       R, G, R * passes, RP=_pow2(R), GP=_pow2(G), FAR=1 << 40, num_warps=4)
    return split
