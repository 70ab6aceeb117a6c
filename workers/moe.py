"""The routed-expert step of a MoE layer on one worker, through the kernels' public pipeline:

    layout   = build_layout(topk_ids, topk_weights, expert_map, rank)   which rank serves each pair
    received = exchange.dispatch(hidden, layout)                          one copy per destination rank
    experts  = build_expert_layout(received.slots, S, received.valid)     rows grouped by local slot
    y        = swiglu_experts(permute(received.x, experts.row_index), w13, w2, experts.offsets)
    out      = exchange.combine(y, experts, received, layout)             weighted sum back at home

Only `dispatch` and `combine` communicate. With `measuring` on, each layer's phases are timed (the device
is synchronised between phases, and the ranks meet at a barrier before each exchange, so dispatch and
combine times exclude waiting for a slower rank) and the exchange's traffic is kept as a `LayerMeasure`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from expertmesh.kernels.exchange import AllToAllExchange, Exchange, LocalExchange
from expertmesh.kernels.expert_map import ExpertMap
from expertmesh.kernels.experts import swiglu_experts
from expertmesh.kernels.layout import build_expert_layout, build_layout
from expertmesh.kernels.permute import permute
from expertmesh.kernels.symm_exchange import SymmMemExchange
from expertmesh.placement.plan import Placement

from .config import ModelConfig
from .weights import ExpertShard

__all__ = ["EPExecutor", "LayerMeasure", "make_exchange", "EXCHANGES"]

EXCHANGES = ("auto", "all_to_all", "symm_mem")


@dataclass(frozen=True)
class LayerMeasure:
    """One MoE layer of one step on one worker (G ranks)."""

    layer: int
    sent_rows: list[int]  # [G] token copies dispatched to each rank (own rank: the local copy)
    dispatch_payload: list[int]  # [G] bytes of token data dispatched to each rank
    dispatch_extra: list[int]  # [G] bytes of metadata (and FP8 scales) dispatched to each rank
    combine_payload: list[int]  # [G] bytes of reduced rows returned to each source rank
    received_rows: int  # token copies this rank received
    expert_pairs: int  # token-expert pairs computed here (the load of the cost model)
    route_s: float  # replica choice and send layout
    dispatch_s: float
    expert_s: float  # expert layout, permute and grouped GEMMs
    combine_s: float

    def remote_dispatch_bytes(self, rank: int) -> int:
        return sum(b for g, b in enumerate(self.dispatch_payload) if g != rank)


def make_exchange(world_size: int, kind: str = "auto", fp8: bool = False, max_tokens: int = 0,
                  cfg: ModelConfig | None = None, dtype: torch.dtype = torch.bfloat16) -> Exchange:
    """The exchange for this process's group: local for one rank, else `kind` (auto = all_to_all).

    `symm_mem` (one node, CUDA) writes into peers' buffers sized for `max_tokens` tokens per rank and step.
    """
    if kind not in EXCHANGES:
        raise ValueError(f"exchange: expected one of {EXCHANGES}, got {kind!r}")
    if world_size == 1:
        return LocalExchange(fp8=fp8)
    if kind == "symm_mem":
        if max_tokens < 1 or cfg is None:
            raise ValueError(
                f"max_tokens: the symm_mem exchange needs a token capacity >= 1, got {max_tokens}"
            )
        if torch.cuda.device_count() < world_size:
            raise RuntimeError(
                "exchange: 'symm_mem' needs every worker to see all GPUs of the node; start Ray with "
                "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 (EPGroup.create does when it starts Ray)"
            )
        return SymmMemExchange(None, max_tokens, cfg.hidden_size, cfg.top_k, dtype, fp8)
    return AllToAllExchange(fp8=fp8)


class EPExecutor:
    """Routed experts of every MoE layer for one rank: holds the shard and the per-layer expert maps."""

    def __init__(self, cfg: ModelConfig, rank: int, world_size: int, device: torch.device,
                 dtype: torch.dtype, exchange: Exchange | None = None) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device, self.dtype = device, dtype
        self._exchange = make_exchange(world_size, dtype=dtype) if exchange is None else exchange
        self._decode_exchange: Exchange | None = None
        self.version = 0  # changes with the shard or the exchanges: CUDA graphs recorded before are stale
        self.shard: ExpertShard | None = None
        self.maps: list[ExpertMap] = []
        self.measuring = False
        self.measures: list[LayerMeasure] = []
        # Set (by `DecodeGraphs`) while a call is the group's fixed-shape decode step: every rank brings
        # this many rows. Several ranks then use `decode_exchange`.
        self.fixed_batch = 0

    @property
    def exchange(self) -> Exchange:
        return self._exchange

    @exchange.setter
    def exchange(self, exchange: Exchange) -> None:
        self._exchange = exchange
        self.version += 1

    @property
    def decode_exchange(self) -> Exchange | None:
        """The exchange of fixed-shape decode steps on several ranks (None: those steps run the variable-
        shape path). A symm_mem exchange sized for the largest decode batch, not for a prefill's tokens:
        its receive side is scanned whole every layer, and the decode batch bounds the expert rows."""
        return self._decode_exchange

    @decode_exchange.setter
    def decode_exchange(self, exchange: Exchange | None) -> None:
        self._decode_exchange = exchange
        self.version += 1

    @property
    def capturable(self) -> bool:
        """A fixed-shape decode call can be recorded in a CUDA graph: no measuring (it synchronises), an
        exchange that reads nothing back (on several ranks the decode exchange, whose expert rows are
        bounded by the group's batch), and bf16 on a GPU (other dtypes take the per-group GEMM loop,
        which reads the group sizes back)."""
        ex = self._exchange if self.world_size == 1 else self._decode_exchange
        return (not self.measuring and ex is not None and ex.capturable and self.dtype == torch.bfloat16)

    def load(self, plan: Placement, shard: ExpertShard) -> None:
        self.maps = [ExpertMap.from_placement(plan, layer, self.device) for layer in range(plan.num_layers)]
        self.shard = shard
        self.version += 1

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _aligned(self) -> float:
        """Wait until every rank got here: an exchange timed from this point measures the exchange, not
        how much later the slowest rank finished its attention or its experts."""
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
        return self._sync()

    def __call__(self, moe_layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        emap, shard, ex = self.maps[moe_layer], self.shard, self.exchange
        fixed = self.fixed_batch and self.world_size > 1 and self._decode_exchange is not None
        if fixed:
            ex = self._decode_exchange
        t0 = self._sync() if self.measuring else 0.0
        layout = build_layout(topk_ids, topk_weights, emap, self.rank)
        t1 = self._sync() if self.measuring else 0.0
        t1_start = self._aligned() if self.measuring else 0.0
        received = ex.dispatch(hidden, layout)
        t2 = self._sync() if self.measuring else 0.0
        # Expert rows known without reading the layout back from the device (a sync per layer that kept the
        # host from queueing ahead, and that a CUDA graph cannot hold): one rank serves all of its T * k
        # pairs; in a fixed-shape step each of G ranks sends at most fixed_batch tokens of k pairs.
        local = isinstance(ex, LocalExchange)
        bound = (received.slots.numel() if local
                 else self.world_size * self.fixed_batch * self.cfg.top_k if fixed else None)
        experts = build_expert_layout(received.slots, emap.slots_per_gpu, received.valid, max_rows=bound,
                                      all_valid=local)
        rows = permute(received.x, experts.row_index)
        y = swiglu_experts(rows, shard.w_gate_up[moe_layer], shard.w_down[moe_layer], experts.offsets)
        t3 = self._sync() if self.measuring else 0.0
        t3_start = self._aligned() if self.measuring else 0.0
        out = ex.combine(y, experts, received, layout)
        if self.measuring:
            t4 = self._sync()
            d, c = ex.last_dispatch, ex.last_combine
            self.measures.append(LayerMeasure(
                layer=moe_layer,
                sent_rows=d.rows.tolist(),
                dispatch_payload=d.payload.tolist(),
                dispatch_extra=d.extra.tolist(),
                combine_payload=c.payload.tolist(),
                received_rows=int(received.counts.sum()),
                expert_pairs=int(experts.counts.sum()),
                route_s=t1 - t0, dispatch_s=t2 - t1_start, expert_s=t3 - t2, combine_s=t4 - t3_start,
            ))
        return out.to(hidden.dtype)
