"""Index maps of one MoE layer: where each token copy goes (source side), the expert order (receiver side).

Notation: T tokens on this rank, k experts per token, G ranks (GPUs) of the EP group, S local expert slots
per GPU, D = min(k, G) most destinations of one token, N rows received by a rank, M expert-input rows.

Source side, `DispatchLayout` (built by `build_layout` from top-k ids and an `ExpertMap`):

    gpus       int64 [T, k]   rank that serves each (token, expert) pair: `choose_replicas`, source = rank,
                              token_index = position of the token on this rank; or, when the map's
                              replica_rule is "balanced", `choose_balanced` from every rank's counts [G, E]
    slots      int64 [T, k]   local slot on that rank: `ExpertMap.local_slot[expert, gpu]`
    weights    float32 [T, k] top-k weights
    dests      int64 [T, D]   the token's distinct destination ranks, ascending, -1 padded: a token is sent
                              ONCE to every rank serving one of its experts (its own rank included)
    dest_rows  int64 [T, D]   row of that copy inside the destination's block, in token order; -1 padded
    send_counts int64 [G]     copies sent to each rank (row `rank` of `placement.routing.dispatch_counts`:
                              entry `rank` is the copy kept local, which crosses no link)

The send buffer of a rank is destination-major: block d holds `send_counts[d]` rows, the tokens in
increasing order; row (d, dest_rows[t, j]) is token t for d = dests[t, j]. Each copy carries metadata
for its k pairs: the local slot where that pair's expert runs on d, or -1 if the pair is served
elsewhere, and the pair's weight.

Receiver side, `ExpertLayout` (built by `build_expert_layout` from the received metadata [N, k]):

    row_index  int64 [M]      received row feeding each expert-input row, -1 for alignment padding
    pair_pos   int64 [N, k]   expert-input row of received pair (i, j), -1 if the pair is not for this rank
    counts     int64 [S]      token-expert pairs per local slot (without padding)
    offsets    int32 [S]      end row of each slot's group, groups padded to `align` rows (the `offs`
                              argument of `torch._grouped_mm`); expert compute runs slots 0..S-1 in order

Expert-input rows are grouped by local slot in slot order; inside a group they keep the received order
(source rank, then the source's token order), so the layout is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._scan import cumsum_first
from .expert_map import ExpertMap
from .replicas import choose_balanced, choose_replicas

__all__ = ["DispatchLayout", "ExpertLayout", "build_layout", "build_expert_layout"]


@dataclass(frozen=True)
class DispatchLayout:
    rank: int
    num_ranks: int
    gpus: torch.Tensor  # int64 [T, k]
    slots: torch.Tensor  # int64 [T, k]
    weights: torch.Tensor  # float32 [T, k]
    dests: torch.Tensor  # int64 [T, D]
    dest_rows: torch.Tensor  # int64 [T, D]
    send_counts: torch.Tensor  # int64 [G]

    @property
    def num_tokens(self) -> int:
        return self.gpus.shape[0]

    @property
    def top_k(self) -> int:
        return self.gpus.shape[1]

    def send_offsets(self) -> torch.Tensor:
        """int64 [G]: first row of each destination's block in the send buffer."""
        return torch.cumsum(self.send_counts, 0) - self.send_counts

    def send_rows(self) -> torch.Tensor:
        """int64 [T, D]: row of each copy in the destination-major send buffer, -1 padded."""
        rows = self.send_offsets()[self.dests.clamp(min=0)] + self.dest_rows
        return torch.where(self.dests >= 0, rows, -1)

    def send_index(self) -> torch.Tensor:
        """int64 [sum(send_counts)]: token of every send-buffer row (synchronises with the device)."""
        n = int(self.send_counts.sum())
        rows = self.send_rows().flatten()
        tokens = torch.arange(self.num_tokens, device=rows.device).repeat_interleave(self.dests.shape[1])
        index = torch.empty(n + 1, dtype=torch.int64, device=rows.device)
        index.scatter_(0, torch.where(rows >= 0, rows, n), tokens)
        return index[:n]

    def send_meta(self, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots int64 [n, k], weights float32 [n, k]): the metadata of every send-buffer row.

        A row's slot j is the local slot of the token's j-th expert on the row's destination, or -1 when
        that pair is served by another rank (its weight is then 0).
        """
        index = self.send_index() if index is None else index
        dest = torch.repeat_interleave(
            torch.arange(self.num_ranks, device=index.device), self.send_counts.to(index.device),
            output_size=index.numel())
        mine = self.gpus[index] == dest[:, None]
        return (torch.where(mine, self.slots[index], -1),
                torch.where(mine, self.weights[index], 0.0))


@dataclass(frozen=True)
class ExpertLayout:
    row_index: torch.Tensor  # int64 [M]
    pair_pos: torch.Tensor  # int64 [N, k]
    counts: torch.Tensor  # int64 [S]
    offsets: torch.Tensor  # int32 [S]

    @property
    def num_rows(self) -> int:
        return self.row_index.shape[0]


def _check_routing(topk_ids: torch.Tensor, topk_weights: torch.Tensor, emap: ExpertMap, rank: int) -> None:
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids: expected shape [T, k], got {list(topk_ids.shape)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids: expected an integer dtype, got {topk_ids.dtype}")
    if topk_ids.shape[1] < 1:
        raise ValueError("topk_ids: expected k >= 1 experts per token, got 0")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights: expected shape {list(topk_ids.shape)} like topk_ids, "
                         f"got {list(topk_weights.shape)}")
    if not 0 <= rank < emap.num_gpus:
        raise ValueError(f"rank: expected 0 <= rank < {emap.num_gpus} (GPUs in the expert map), got {rank}")
    # Value checks need the data on the host; on an accelerator they would cost a synchronisation per layer.
    if topk_ids.device.type == "cpu" and topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= emap.num_experts:
            raise ValueError(f"topk_ids: expert ids must lie in [0, {emap.num_experts}), found [{lo}, {hi}]")


def build_layout(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    emap: ExpertMap,
    rank: int,
    token_index: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> DispatchLayout:
    """The source-side layout of this rank's tokens (see the module docstring). No host synchronisation.

    topk_ids [T, k] integer expert ids; topk_weights [T, k]; emap on the same device; rank = this GPU's index
    in the EP group (= the source of every token here); token_index [T] overrides the default arange(T).
    counts int [G, E]: every rank's pairs per expert (`Exchange.gather_counts` of `expert_counts`), needed when
    `emap.balanced` (the balanced replica rule) and ignored otherwise.
    """
    _check_routing(topk_ids, topk_weights, emap, rank)
    device = topk_ids.device
    ids = topk_ids.to(torch.int64)
    T, k = ids.shape
    G = emap.num_gpus
    D = min(k, G)
    if G == 1:
        # One GPU serves every pair and each token is one copy in order: what the general path below
        # computes, in 4 kernels instead of ~25 (a decode step is launch-bound).
        return DispatchLayout(rank, 1, torch.zeros_like(ids), emap.local_slot[ids, 0], topk_weights.to(torch.float32),
                              torch.zeros((T, 1), dtype=torch.int64, device=device),
                              torch.arange(T, device=device)[:, None],
                              torch.full((1,), T, dtype=torch.int64, device=device))
    source = torch.full((T,), rank, dtype=torch.int64, device=device)
    if token_index is None:
        token_index = torch.arange(T, device=device)
    if emap.balanced:
        if counts is None or tuple(counts.shape) != (G, emap.num_experts):
            raise ValueError(f"counts: the balanced replica rule needs every rank's pairs per expert "
                             f"[{G}, {emap.num_experts}], got {None if counts is None else list(counts.shape)}")
        gpus = choose_balanced(ids, rank, counts, emap.replicas > 0, emap.replicated, emap.node_of_gpu)
    else:
        gpus = choose_replicas(ids, source, emap.replicas, emap.node_of_gpu, token_index)
    slots = emap.local_slot[ids, gpus]
    mask = torch.zeros((T, G), dtype=torch.bool, device=device)
    mask.scatter_(1, gpus, True)
    # Distinct destinations in ascending order: rank ids where the mask is set, G (sorted last) elsewhere.
    keyed = torch.where(mask, torch.arange(G, device=device), G)
    dests = torch.sort(keyed, dim=1).values[:, :D]
    dests = torch.where(dests < G, dests, -1)
    taken = mask.to(torch.int64)
    before = cumsum_first(taken) - taken  # [T, G]: copies to each rank from earlier tokens
    dest_rows = torch.where(dests >= 0, before.gather(1, dests.clamp(min=0)), -1)
    return DispatchLayout(rank, G, gpus, slots, topk_weights.to(torch.float32), dests, dest_rows,
                          taken.sum(0))


def build_expert_layout(
    slots: torch.Tensor,
    num_slots: int,
    valid: torch.Tensor | None = None,
    align: int = 1,
    max_rows: int | None = None,
    all_valid: bool = False,
) -> ExpertLayout:
    """Group received pairs by local slot (see the module docstring).

    slots int [N, k] received metadata (-1 = pair not for this rank); valid bool [N] marks rows that hold a
    token (None = all); each slot's group is padded to a multiple of `align` rows. The number of rows M is
    read back from the device unless `max_rows` is given (then M = max_rows, which must be >= the padded
    total: this keeps the call free of host synchronisation, e.g. for CUDA graphs). `all_valid` promises
    that every pair has a slot here (one rank serving everything): with align 1 and no `valid`, the
    layout is then the stable sort of the slots, built without the masking and padding arithmetic.
    """
    if slots.dim() != 2:
        raise ValueError(f"slots: expected shape [N, k], got {list(slots.shape)}")
    if num_slots < 1:
        raise ValueError(f"num_slots: expected >= 1, got {num_slots}")
    if align < 1:
        raise ValueError(f"align: expected >= 1, got {align}")
    device = slots.device
    N, k = slots.shape
    S = num_slots
    if all_valid and valid is None and align == 1:
        return _all_valid_expert_layout(slots, S, max_rows)
    key = slots.to(torch.int64)
    if valid is not None:
        key = torch.where(valid[:, None], key, -1)
    key = torch.where(key >= 0, key, S).flatten()  # [P]; S marks "no pair"
    P = key.numel()
    counts_all = torch.zeros(S + 1, dtype=torch.int64, device=device)
    counts_all.scatter_add_(0, key, torch.ones_like(key))
    counts = counts_all[:S]
    padded = (counts + align - 1) // align * align
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    first = torch.cumsum(counts_all, 0) - counts_all  # first sorted position of each key
    within = torch.arange(P, device=device) - first[sorted_key]
    pos_sorted = torch.where(sorted_key < S, starts[sorted_key.clamp(max=S - 1)] + within, -1)
    pair_pos = torch.empty(P, dtype=torch.int64, device=device)
    pair_pos.scatter_(0, order, pos_sorted)
    M = int(ends[-1]) if max_rows is None else int(max_rows)
    # Padding rows and pairs without a slot land in a dummy row M that is cut off.
    row_index = torch.full((M + 1,), -1, dtype=torch.int64, device=device)
    target = torch.where(pos_sorted >= 0, pos_sorted, M).clamp(max=M)
    row_index.scatter_(0, target, order // k)
    row_index = row_index[:M]
    return ExpertLayout(row_index, pair_pos.view(N, k), counts, ends.to(torch.int32))


def _all_valid_expert_layout(slots: torch.Tensor, S: int, max_rows: int | None) -> ExpertLayout:
    """`build_expert_layout` when every pair has a slot: expert row r is the r-th pair in stable slot order."""
    device = slots.device
    N, k = slots.shape
    key = slots.reshape(-1).to(torch.int64)
    P = key.numel()
    order = torch.sort(key, stable=True).indices
    counts = torch.zeros(S, dtype=torch.int64, device=device).scatter_add_(0, key, torch.ones_like(key))
    pair_pos = torch.empty(P, dtype=torch.int64, device=device)
    pair_pos.scatter_(0, order, torch.arange(P, device=device))
    row_index = order // k
    M = P if max_rows is None else int(max_rows)
    if M > P:
        row_index = torch.cat([row_index, torch.full((M - P,), -1, dtype=torch.int64, device=device)])
    return ExpertLayout(row_index[:M], pair_pos.view(N, k), counts, torch.cumsum(counts, 0).to(torch.int32))
