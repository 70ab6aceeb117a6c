"""The replica-choice rules in torch: which GPU serves each (token, expert) pair.

These are `expertmesh.placement.routing`'s rules (numpy, used by the cost model) rewritten as vectorised torch
that runs on any device without a host sync, so the runtime applies *exactly* the rule the planner's cost
model predicted with (the tests compare the two on random instances). routing.py's docstring states both
rules precisely; in short:

fixed (`choose_replicas`), for a pair whose expert has no replica on the token's source GPU:

1. the replica on the source GPU (no transfer);
2. a replica on the source's node, if any;
3. the (token_index + expert) mod n-th remaining candidate in GPU order.

balanced (`choose_balanced`, the run-time hedge), from every rank's per-expert counts (all-gathered [G, E]):

1. single-host experts load their GPU; 2. replicated experts, heaviest first, water-fill their totals over
their hosts (`balanced_split`: a Triton kernel on a GPU, `balanced_split_reference` beside it); 3. each host
serves its own rank's pairs first, then its node's, then the rest, matched in GPU order (`balanced_flows`);
this rank's pairs of an expert take their destinations in token order.

Shapes: T tokens, k experts per token, E logical experts, G GPUs of the EP group.
"""

from __future__ import annotations

import torch

from ._backend import use_triton
from ._scan import cumsum_first, cumsum_last

__all__ = ["REPLICA_RULES", "SPLIT_PASSES", "SPLIT_STEPS", "split_passes", "choose_replicas", "local_token_index",
           "expert_counts", "split_order", "balanced_split", "balanced_split_reference", "balanced_flows",
           "choose_balanced"]

# The names of `expertmesh.placement.routing.REPLICA_RULES` (kernels import no placement; a test holds them equal).
REPLICA_RULES = ("fixed", "balanced")


def local_token_index(source: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """int64 [T]: position of each token among the tokens with the same source GPU, in order.

    On one rank of the runtime every token has the same source, so this is simply `arange(T)`.
    """
    source = source.to(torch.int64)
    onehot = torch.nn.functional.one_hot(source, num_gpus)  # [T, G]
    before = cumsum_first(onehot) - onehot
    return before.gather(1, source[:, None]).squeeze(1)


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim (0 when there is none), like numpy's argmax on bool."""
    return torch.argmax(mask.to(torch.uint8), dim=-1)


def choose_replicas(
    topk_ids: torch.Tensor,
    source: torch.Tensor,
    replicas: torch.Tensor,
    node_of_gpu: torch.Tensor,
    token_index: torch.Tensor,
) -> torch.Tensor:
    """int64 [T, k]: the GPU that serves each (token, expert) pair.

    topk_ids [T, k] expert ids; source [T] GPU of each token; replicas [E, G] replica counts (> 0 where
    the expert has a replica); node_of_gpu [G]; token_index [T] (see `local_token_index`). All tensors on
    one device; the result is on that device. No host synchronisation.
    """
    ids = topk_ids.to(torch.int64)
    source = source.to(torch.int64)
    T, k = ids.shape
    G = replicas.shape[1]
    if T == 0:
        return torch.zeros((0, k), dtype=torch.int64, device=ids.device)
    cand = replicas.to(ids.device)[ids] > 0  # [T, k, G]
    on_source = torch.nn.functional.one_hot(source, G).bool()  # [T, G]
    need = ~(cand & on_source[:, None, :]).any(-1)  # rule 1 failed

    node = node_of_gpu.to(device=ids.device, dtype=torch.int64)
    same_node = node[None, :] == node[source][:, None]  # [T, G]
    near = cand & same_node[:, None, :]  # rule 2
    pool = torch.where(near.any(-1, keepdim=True), near, cand)
    n = pool.sum(-1)
    pick = (token_index.to(device=ids.device, dtype=torch.int64)[:, None] + ids) % n.clamp(min=1)  # rule 3
    rank = cumsum_last(pool.to(torch.int64)) - 1
    spread = _first_true(pool & (rank == pick[..., None]))
    return torch.where(need, spread, source[:, None])


# ---- the balanced rule ("hedge"): placement.routing's steps 1-3, for one rank -----------------------------

_FAR = 1 << 40  # a level no GPU reaches: marks non-hosts in the water-fill
SPLIT_PASSES, SPLIT_STEPS = 3, 64  # = placement.routing's (a test holds them equal)


def split_passes(replicated: int) -> int:
    """Rounds of the water-fill over `replicated` experts: placement.routing.split_passes."""
    return max(SPLIT_PASSES, -(-SPLIT_STEPS // max(replicated, 1)))


def expert_counts(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [E]: this rank's token-expert pairs per expert (its row of the counts the ranks all-gather).

    A scatter-add, not `torch.bincount`, which reads the largest id back to the host on a GPU."""
    ids = topk_ids.reshape(-1).to(torch.int64)
    return torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


def split_order(totals: torch.Tensor, replicated: torch.Tensor) -> torch.Tensor:
    """int64 [R]: the replicated experts (ascending ids `replicated` [R]) by decreasing total, ties by id."""
    return replicated[torch.sort(-totals[replicated], stable=True).indices]


def balanced_split_reference(totals: torch.Tensor, hosts: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """int64 [E, G]: `placement.routing.balanced_split` in torch, one replicated expert at a time (the
    reference of `_triton_hedge.split_kernel`; its Python loop reads `order` back to the host).

    totals int64 [E]; hosts bool [E, G]; order int64 [R] from `split_order`."""
    single = hosts & (hosts.sum(1) == 1)[:, None]
    split = torch.where(single, totals[:, None], 0)
    level = split.sum(0)
    G = hosts.shape[1]
    j = torch.arange(1, G + 1, device=totals.device)
    for e in order.tolist() * split_passes(order.numel()):
        h, n = hosts[e], totals[e]
        level = level - split[e]  # refill on top of everyone else's current share
        low = torch.sort(torch.where(h, level, _FAR)).values
        need = j * low - torch.cumsum(low, 0)  # water raising the j lowest hosts to the j-th lowest level
        J = (need <= n).sum()
        lam = low[J - 1] + (n - need[J - 1]) // J
        a = torch.where(h, (lam - level).clamp(min=0), 0)
        eligible = h & (level <= lam)
        a = a + (eligible & (torch.cumsum(eligible.to(torch.int64), 0) <= n - a.sum())).to(torch.int64)
        split[e] = a
        level = level + a
    return split


def balanced_split(totals: torch.Tensor, hosts: torch.Tensor, replicated: torch.Tensor,
                   impl: str = "auto") -> torch.Tensor:
    """int64 [E, G]: pairs of expert e served by GPU g (routing's steps 1-2). replicated int64 [R]: the experts
    with more than one host, ascending (`ExpertMap.replicated`). Triton on a GPU: no host synchronisation."""
    totals = totals.to(torch.int64)
    order = split_order(totals, replicated)
    if order.numel() and use_triton(impl, totals, hosts):
        from ._triton_hedge import balanced_split_triton

        return balanced_split_triton(totals, hosts, order, split_passes(order.numel()))
    return balanced_split_reference(totals, hosts, order)


def _overlap(ps: torch.Tensor, pe: torch.Tensor, qs: torch.Tensor, qe: torch.Tensor) -> torch.Tensor:
    """Length of [ps, pe) n [qs, qe), elementwise (broadcast), at least 0."""
    return (torch.minimum(pe, qe) - torch.maximum(ps, qs)).clamp(min=0)


def _before(x: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
    """[E, G]: sum of x [E, G] over the GPUs g' with below[g', g] (an int64 matmul, which CUDA lacks)."""
    return (x[:, :, None] * below).sum(1)


def balanced_flows(counts: torch.Tensor, split: torch.Tensor, node_of_gpu: torch.Tensor, rank: int) -> torch.Tensor:
    """int64 [E, 2G + 1]: row `rank` of `placement.routing.balanced_flows` (step 3), computed from the
    all-gathered counts [G, E] and the split [E, G] without the other sources' rows of the [G, E, G] flows."""
    C = counts.to(torch.int64).t()  # [E, G] pairs by source
    A = split
    G = A.shape[1]
    node = node_of_gpu.to(device=A.device, dtype=torch.int64)
    same = node[:, None] == node[None, :]
    ar = torch.arange(G, device=A.device)
    below = (same & (ar[:, None] < ar[None, :])).to(torch.int64)
    local = torch.minimum(A, C)
    rc, ra = C - local, A - local
    # 3b: sources and servers of each node end to end; a source's matched total is its overlap with all the
    # node's remaining shares, so the other sources' rows of the flows are never needed.
    ps, qs = _before(rc, below), _before(ra, below)
    pn, qn = _before(rc, same.to(torch.int64)), _before(ra, same.to(torch.int64))  # node totals, per GPU
    near = _overlap(ps[:, rank, None], (ps + rc)[:, rank, None], qs, qs + ra) * same[rank]
    rc2 = rc - _overlap(ps, ps + rc, torch.zeros_like(qn), qn)
    ra2 = ra - _overlap(qs, qs + ra, torch.zeros_like(pn), pn)
    ps2, qs2 = torch.cumsum(rc2, 1) - rc2, torch.cumsum(ra2, 1) - ra2
    rest = _overlap(ps2[:, rank, None], (ps2 + rc2)[:, rank, None], qs2, qs2 + ra2)
    return torch.cat([local[:, rank, None], near, rest], 1)


def choose_balanced(
    topk_ids: torch.Tensor,
    rank: int,
    counts: torch.Tensor,
    hosts: torch.Tensor,
    replicated: torch.Tensor,
    node_of_gpu: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """int64 [T, k]: the GPU serving each of this rank's pairs under the balanced rule (placement.routing).

    topk_ids [T, k] this rank's tokens in order; counts int [G, E] every rank's `expert_counts` (row `rank`
    must be this call's); hosts bool [E, G] = replicas > 0; replicated int64 [R] (`ExpertMap.replicated`).
    No host synchronisation on a GPU."""
    ids = topk_ids.to(torch.int64)
    T, k = ids.shape
    device = ids.device
    counts = counts.to(device=device, dtype=torch.int64)
    split = balanced_split(counts.sum(0), hosts, replicated, impl)
    flows = balanced_flows(counts, split, node_of_gpu, rank)  # [E, 2G + 1]
    G = hosts.shape[1]
    dest_of_col = torch.cat([torch.full((1,), rank, device=device), torch.arange(G, device=device).repeat(2)])
    # The j-th pair of expert e (token order) is position j of e's segment in the stable sort by expert; e's
    # flows laid end to end give each position its column by one search.
    order = torch.sort(ids.reshape(-1), stable=True).indices
    ends = torch.cumsum(flows.reshape(-1), 0)
    col = torch.searchsorted(ends, torch.arange(T * k, device=device), right=True)
    dest = torch.empty(T * k, dtype=torch.int64, device=device)
    dest[order] = dest_of_col[col % (2 * G + 1)]
    return dest.view(T, k)
