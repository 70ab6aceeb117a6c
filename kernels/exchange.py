"""Dispatch and combine between the ranks of an EP group, behind one interface.

    received = ex.dispatch(x [T, H], layout)                      token copies -> the ranks serving them
    experts  = build_expert_layout(received.slots, S, received.valid)
    y        = expert compute over permute(received.x, experts.row_index)          [M, H]
    out      = ex.combine(y, experts, received, layout)           [T, H] = sum_j w[t, j] * expert_j(x[t])

Implementations: `LocalExchange` (one rank, no communication), `AllToAllExchange`
(`torch.distributed.all_to_all_single` with split sizes: the baseline, any backend, gloo included) and
`symm_exchange.SymmMemExchange` (a Triton kernel writing straight into peers' buffers over NVLink through
torch symmetric memory; CUDA, one node). All three return the same `Received` and the same combine
result for the same inputs; tests hold them to the plain-torch path.

Dispatch carries one row per (token, destination rank) -- never one per expert -- plus the row's
metadata (the k local slots, -1 where another rank serves the pair, and the k weights). The receiving
rank reduces its local experts' outputs for a row with those weights, so combine also returns one row
per copy, and the source sums the copies of each token.

Backward (training; `autograd.py` wraps both directions in autograd Functions): combine's backward is a
dispatch of gradients (`combine_backward`: each token's output gradient to every rank holding a copy of it,
FP8 on the wire where dispatch is), and dispatch's backward is a combine of gradients (`dispatch_backward`:
every received row's gradient back to its source and summed over the token's copies, with each pair's
weight gradient from the copy that served it).

Counts (the balanced replica rule, `ExpertMap.replica_rule == "balanced"`): before the layout of a layer,
`moe_forward` calls `gather_counts` with this rank's pairs per expert [E]; every rank gets the same [G, E]
and derives the same split from it (kernels/replicas.py). One small collective per layer, issued before
dispatch: `all_gather` on the process group for `AllToAllExchange` and for `SymmMemExchange` (NCCL, which
a CUDA graph can capture; the symmetric buffers are sized for token rows, and a write-then-barrier of [E]
ints would cost the same one barrier), nothing on one rank. Its bytes (G x E x 8) are not part of `Traffic`,
which counts what dispatch and combine carry.

Bytes: `Traffic` records what a call moved per destination rank (the entry of the caller's own rank is
the local copy, which crosses no link). Its `payload` equals rows x hidden x bytes per element, the
cost model's `copies x hidden x bytes` exactly; `extra` is the FP8 scales and the routing metadata.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .fp8 import FP8_DTYPE, dequantize_fp8, num_tiles, quantize_fp8
from .layout import DispatchLayout, ExpertLayout
from .permute import permute, unpermute_combine

__all__ = ["Exchange", "Received", "Traffic", "LocalExchange", "AllToAllExchange", "FP8_TILE"]

FP8_TILE = 128


@dataclass(frozen=True)
class Traffic:
    """What one dispatch or combine sent from this rank, per destination rank (int64 [G] tensors).

    Recording it launches nothing; `payload` and `extra` are computed when read.
    """

    rows: torch.Tensor  # token rows sent to each rank
    row_payload: int  # bytes of token data per row: hidden x element size
    row_extra: int  # bytes of FP8 scales and routing metadata per row
    rank: int

    @property
    def payload(self) -> torch.Tensor:
        """int64 [G]: bytes of token data sent to each rank (the cost model's copies x hidden x bytes)."""
        return self.rows * self.row_payload

    @property
    def extra(self) -> torch.Tensor:
        """int64 [G]: bytes of FP8 scales and routing metadata sent to each rank."""
        return self.rows * self.row_extra

    def wire_bytes(self) -> int:
        """Bytes that leave this GPU (payload + extra to every rank but this one); synchronises."""
        total = self.payload + self.extra
        return int(total.sum() - total[self.rank])


@dataclass(frozen=True)
class Received:
    """Token copies that arrived at this rank: N rows, k pairs each.

    x        [N, H]      token rows (the dispatch dtype: the input's, or float8_e4m3fn with FP8 dispatch)
    scales   [N, H/128]  float32 FP8 tile scales, or None
    slots    int32/int64 [N, k]  local slot of each pair, -1 where the pair is not for this rank
    weights  float32 [N, k]  (views into a receive buffer may be strided)
    counts   int64 [G]   rows received from each source rank
    valid    bool [N]    rows that hold a token (None: all; buffers of fixed capacity have gaps)
    state    exchange-private bookkeeping for combine
    """

    x: torch.Tensor
    scales: torch.Tensor | None
    slots: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor
    valid: torch.Tensor | None = None
    state: object = field(default=None, repr=False)

    @property
    def num_rows(self) -> int:
        return self.x.shape[0]


class Exchange(abc.ABC):
    """Moves token copies to the ranks serving them (dispatch) and the results back (combine)."""

    rank: int
    world_size: int
    fp8: bool  # FP8 (E4M3, 1x128 scales) dispatch; combine is always in the input's dtype
    capturable = False  # dispatch and combine read nothing back to the host: a CUDA graph can record them
    group: object | None = None  # torch.distributed process group of the collectives (None: the default one)
    last_dispatch: Traffic | None = None
    last_combine: Traffic | None = None

    @abc.abstractmethod
    def dispatch(self, x: torch.Tensor, layout: DispatchLayout) -> Received:
        """Send each token of x [T, H] once to every rank in `layout.dests`; return what this rank got."""

    @abc.abstractmethod
    def combine(self, y: torch.Tensor, experts: ExpertLayout, received: Received,
                layout: DispatchLayout) -> torch.Tensor:
        """[T, H]: for every token, sum_j weight_j * expert_j output, given the expert outputs y [M, H]."""

    def gather_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """int64 [G, E]: every rank's `counts` [E] (this rank's pairs per expert), row r from rank r (collective:
        every rank calls it, at the same layer). The default gathers over `self.group` with torch.distributed."""
        return _all_gather_rows(counts, self.world_size, self.group)

    # ---- backward (training) -----------------------------------------------------------------------
    @abc.abstractmethod
    def combine_backward(self, grad_out: torch.Tensor, received: Received, layout: DispatchLayout) -> torch.Tensor:
        """[N, H] in grad_out's dtype: each token's output gradient grad_out [T, H] at every row of `received`
        that holds a copy of it (a dispatch of gradients; rows that hold no token are unspecified)."""

    @abc.abstractmethod
    def dispatch_backward(self, grad_rows: torch.Tensor, grad_weights: torch.Tensor, received: Received,
                          layout: DispatchLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """(grad_x [T, H], grad_weights float32 [T, k]) from the gradients of the received rows [N, H] and of
        their pair weights [N, k] (a combine of gradients: copies summed; a pair's weight gradient comes from
        the one copy that served it, the others hold zero there)."""

    # ---- shared helpers ----------------------------------------------------------------------------
    def _check_dispatch(self, x: torch.Tensor, layout: DispatchLayout) -> None:
        if x.dim() != 2 or x.shape[0] != layout.num_tokens:
            raise ValueError(f"x: expected shape [T={layout.num_tokens}, H], got {list(x.shape)}")
        if layout.num_ranks != self.world_size or layout.rank != self.rank:
            raise ValueError(f"layout: built for rank {layout.rank} of {layout.num_ranks}, "
                             f"but this exchange is rank {self.rank} of {self.world_size}")
        if self.fp8 and x.shape[1] % 16:
            raise ValueError(f"x: FP8 dispatch needs hidden % 16 == 0, got {x.shape[1]}")

    def _traffic(self, rows: torch.Tensor, hidden: int, elem: int, k: int, fp8: bool) -> Traffic:
        extra_per_row = 8 * k + (4 * num_tiles(hidden, FP8_TILE) if fp8 else 0)  # int32 slot + f32 weight
        return Traffic(rows, hidden * elem, extra_per_row, self.rank)


def _all_gather_rows(row: torch.Tensor, world_size: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[G, n]: `row` [n] of every rank. Into one flat tensor: gloo gathers into a flat output only."""
    row = row.to(torch.int64).contiguous()
    out = row.new_empty(world_size * row.numel())
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.11+
    gather(out, row, group=group)
    return out.view(world_size, row.numel())


def _pack_meta(slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """int32 [n, 2k]: slots then the weights' float32 bits, so one collective carries both."""
    return torch.cat([slots.to(torch.int32), weights.to(torch.float32).view(torch.int32)], dim=1)


def _unpack_meta(meta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return meta[:, :k].to(torch.int64), meta[:, k:].contiguous().view(torch.float32)


def _fp8_wire(t: torch.Tensor) -> torch.Tensor:
    """t as it arrives after crossing an FP8 link (quantised in 1 x 128 tiles, then dequantised)."""
    q, s = quantize_fp8(t, FP8_TILE)
    return dequantize_fp8(q, s, FP8_TILE, t.dtype)


class LocalExchange(Exchange):
    """A group of one rank: every copy stays here; no communication (FP8 dispatch still quantises)."""

    capturable = True

    def __init__(self, fp8: bool = False):
        self.rank, self.world_size, self.fp8 = 0, 1, fp8

    def dispatch(self, x: torch.Tensor, layout: DispatchLayout) -> Received:
        self._check_dispatch(x, layout)
        slots, weights = layout.slots, layout.weights  # every pair is served here
        rows = x
        scales = None
        if self.fp8:
            rows, scales = quantize_fp8(x, FP8_TILE)
        self.last_dispatch = self._traffic(layout.send_counts, x.shape[1], rows.element_size(),
                                           layout.top_k, self.fp8)
        return Received(rows, scales, slots, weights, layout.send_counts, None, x.dtype)

    def gather_counts(self, counts: torch.Tensor) -> torch.Tensor:
        return counts.to(torch.int64)[None]

    def combine(self, y: torch.Tensor, experts: ExpertLayout, received: Received,
                layout: DispatchLayout) -> torch.Tensor:
        out_dtype = received.state if isinstance(received.state, torch.dtype) else y.dtype
        out = unpermute_combine(y, experts.pair_pos, received.weights, out_dtype)
        self.last_combine = self._traffic(layout.send_counts, y.shape[1], out.element_size(), 0, False)
        return out

    def combine_backward(self, grad_out: torch.Tensor, received: Received, layout: DispatchLayout) -> torch.Tensor:
        return _fp8_wire(grad_out) if self.fp8 else grad_out

    def dispatch_backward(self, grad_rows: torch.Tensor, grad_weights: torch.Tensor, received: Received,
                          layout: DispatchLayout) -> tuple[torch.Tensor, torch.Tensor]:
        return grad_rows, grad_weights


@dataclass(frozen=True)
class _A2AState:
    send_splits: list[int]
    recv_splits: list[int]
    out_dtype: torch.dtype
    send_index: torch.Tensor  # int64 [n]: token of every send-buffer row


class AllToAllExchange(Exchange):
    """`all_to_all_single` with split sizes (the baseline). Works with gloo (CPU) and NCCL (CUDA).

    Dispatch: one small all-to-all for the counts (read back to the host for the split sizes), then the
    token rows (FP8 codes travel as bytes), the FP8 scales and the metadata. Combine: one all-to-all of
    the reduced rows back, then the sum of each token's copies.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, fp8: bool = False):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.fp8 = fp8

    def _a2a(self, t: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        wire = t.view(torch.uint8) if t.dtype == FP8_DTYPE else t  # gloo has no FP8 type
        out = wire.new_empty((sum(recv),) + tuple(t.shape[1:]))
        dist.all_to_all_single(out, wire.contiguous(), recv, send, group=self.group)
        return out.view(t.dtype)

    def dispatch(self, x: torch.Tensor, layout: DispatchLayout) -> Received:
        self._check_dispatch(x, layout)
        recv_counts = torch.empty_like(layout.send_counts)
        dist.all_to_all_single(recv_counts, layout.send_counts, group=self.group)
        send_splits = layout.send_counts.tolist()
        recv_splits = recv_counts.tolist()
        index = layout.send_index()
        slots, weights = layout.send_meta(index)
        meta = self._a2a(_pack_meta(slots, weights), send_splits, recv_splits)
        scales = None
        if self.fp8:  # quantise each token once, then copy codes and scales per destination
            q, s = quantize_fp8(x, FP8_TILE)
            rows = self._a2a(permute(q, index), send_splits, recv_splits)
            scales = self._a2a(permute(s, index), send_splits, recv_splits)
        else:
            rows = self._a2a(permute(x, index), send_splits, recv_splits)
        self.last_dispatch = self._traffic(layout.send_counts, x.shape[1], rows.element_size(),
                                           layout.top_k, self.fp8)
        r_slots, r_weights = _unpack_meta(meta, layout.top_k)
        state = _A2AState(send_splits, recv_splits, x.dtype, index)
        return Received(rows, scales, r_slots, r_weights, recv_counts, None, state)

    def combine(self, y: torch.Tensor, experts: ExpertLayout, received: Received,
                layout: DispatchLayout) -> torch.Tensor:
        state = self._state(received)
        reduced = unpermute_combine(y, experts.pair_pos, received.weights, state.out_dtype)
        back = self._a2a(reduced, state.recv_splits, state.send_splits)
        self.last_combine = self._traffic(received.counts, y.shape[1], reduced.element_size(), 0, False)
        return unpermute_combine(back, layout.send_rows(), None, state.out_dtype)

    def _state(self, received: Received) -> _A2AState:
        if not isinstance(received.state, _A2AState):
            raise ValueError("received: expected the result of this exchange's dispatch")
        return received.state

    def combine_backward(self, grad_out: torch.Tensor, received: Received, layout: DispatchLayout) -> torch.Tensor:
        state = self._state(received)
        rows = permute(grad_out, state.send_index)
        if not self.fp8:
            return self._a2a(rows, state.send_splits, state.recv_splits)
        q, s = quantize_fp8(rows, FP8_TILE)
        q = self._a2a(q, state.send_splits, state.recv_splits)
        return dequantize_fp8(q, self._a2a(s, state.send_splits, state.recv_splits), FP8_TILE, grad_out.dtype)

    def dispatch_backward(self, grad_rows: torch.Tensor, grad_weights: torch.Tensor, received: Received,
                          layout: DispatchLayout) -> tuple[torch.Tensor, torch.Tensor]:
        state = self._state(received)
        send_rows = layout.send_rows()
        back = self._a2a(grad_rows.contiguous(), state.recv_splits, state.send_splits)
        back_w = self._a2a(grad_weights.float().contiguous(), state.recv_splits, state.send_splits)
        return (unpermute_combine(back, send_rows, None, grad_rows.dtype),
                unpermute_combine(back_w, send_rows, None, torch.float32))
