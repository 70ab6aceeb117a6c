"""The routed experts of every MoE layer on one worker: `EPExecutor` runs the kernels' one pipeline
(`expertmesh.kernels.moe.moe_forward`: route -> dispatch -> experts -> combine) with this rank's shard.

What a call needs to know about its step travels in a `StepContext`: the fixed row count of a fixed-shape
decode step (it bounds expert rows, so nothing is read back and a CUDA graph can hold the step), and, when
the step is measured, the list its `LayerMeasure`s go to. Measuring times each layer's phases (the device is
synchronised between phases, and the ranks meet at a barrier before each exchange, so dispatch and combine
times exclude waiting for a slower rank) and keeps the exchange's traffic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from expertmesh.kernels.exchange import AllToAllExchange, Exchange, LocalExchange, Received
from expertmesh.kernels.expert_map import ExpertMap
from expertmesh.kernels.layout import DispatchLayout, ExpertLayout
from expertmesh.kernels.moe import Experts, Precision, make_experts, moe_forward
from expertmesh.kernels.symm_exchange import SymmMemExchange
from expertmesh.placement.plan import Placement

from .config import ModelConfig
from .group_config import EXCHANGES
from .weights import ExpertShard

__all__ = ["EPExecutor", "LayerMeasure", "StepContext", "make_exchange"]


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


@dataclass(frozen=True)
class StepContext:
    """Facts about the step a layer call belongs to (the same for every layer of the step).

    fixed_batch > 0: a fixed-shape decode step in which every rank brings exactly that many rows (padding
    included); measures: when not None, the step is measured and each layer appends its `LayerMeasure`.
    """

    fixed_batch: int = 0
    measures: list[LayerMeasure] | None = None

    @property
    def measuring(self) -> bool:
        return self.measures is not None


PLAIN_STEP = StepContext()


class _LayerTimer:
    """The `PhaseProbe` of a measured layer: phase boundaries synchronise the device, exchanges start at a
    barrier, and the end appends the layer's `LayerMeasure`."""

    def __init__(self, layer: int, exchange: Exchange, device: torch.device, into: list[LayerMeasure]) -> None:
        self.layer, self.exchange, self.device, self.into = layer, exchange, device, into
        self.starts: dict[str, float] = {}

    def _now(self, aligned: bool) -> float:
        if aligned and self.exchange.world_size > 1 and dist.is_initialized():
            dist.barrier()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self, phase: str) -> None:
        if phase in ("dispatch", "combine"):  # the end of the phase before, then the wait for the slowest rank
            self.starts[f"{phase}_ready"] = self._now(False)
        self.starts[phase] = self._now(phase in ("dispatch", "combine"))

    def finish(self, layout: DispatchLayout, received: Received, el: ExpertLayout) -> None:
        end = self._now(False)
        s = self.starts
        d, c = self.exchange.last_dispatch, self.exchange.last_combine
        self.into.append(LayerMeasure(
            layer=self.layer,
            sent_rows=d.rows.tolist(),
            dispatch_payload=d.payload.tolist(),
            dispatch_extra=d.extra.tolist(),
            combine_payload=c.payload.tolist(),
            received_rows=int(received.counts.sum()),
            expert_pairs=int(el.counts.sum()),
            route_s=s["dispatch_ready"] - s["route"], dispatch_s=s["experts"] - s["dispatch"],
            expert_s=s["combine_ready"] - s["experts"], combine_s=end - s["combine"],
        ))


def make_exchange(world_size: int, kind: str = "auto", fp8: bool = False, max_tokens: int = 0,
                  cfg: ModelConfig | None = None, dtype: torch.dtype = torch.bfloat16) -> Exchange:
    """The exchange for this process's group: local for one rank, else `kind` (auto = all_to_all).

    `kind` was validated with the group's config (`GroupConfig.exchange`). `symm_mem` (one node, CUDA)
    writes into peers' buffers sized for `max_tokens` tokens per rank and step.
    """
    assert kind in EXCHANGES, kind
    if world_size == 1:
        return LocalExchange(fp8=fp8)
    if kind == "symm_mem":
        assert max_tokens >= 1 and cfg is not None, "symm_mem needs a token capacity and the model's shape"
        if torch.cuda.device_count() < world_size:
            raise RuntimeError(
                "exchange: 'symm_mem' needs every worker to see all GPUs of the node; start Ray with "
                "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 (EPGroup.create does when it starts Ray)"
            )
        return SymmMemExchange(None, max_tokens, cfg.hidden_size, cfg.top_k, dtype, fp8)
    return AllToAllExchange(fp8=fp8)


class EPExecutor:
    """Routed experts of every MoE layer for one rank: the expert maps, this rank's experts, the exchanges.

    `version` changes whenever the experts or an exchange are replaced: CUDA graphs recorded before are stale.
    """

    def __init__(self, cfg: ModelConfig, rank: int, world_size: int, device: torch.device,
                 dtype: torch.dtype, precision: Precision = Precision.BF16, replica_rule: str = "fixed") -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device, self.dtype, self.precision = device, dtype, Precision(precision)
        self.replica_rule = replica_rule  # the layers' ExpertMaps carry it to the layout (kernels/replicas.py)
        self.version = 0
        self.maps: list[ExpertMap] = []
        self.experts: list[Experts] = []
        self.slot_expert: list[torch.Tensor] = []  # per MoE layer, int64 [S]: the expert of each local slot
        self._exchange: Exchange = make_exchange(world_size, fp8=self.precision.fp8_dispatch, dtype=dtype)
        self._decode_exchange: Exchange | None = None

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
    def fixed_decode(self) -> bool:
        """Whether fixed-shape decode steps can run (one rank always; several need a decode exchange)."""
        return self.world_size == 1 or self._decode_exchange is not None

    @property
    def capturable(self) -> bool:
        """A fixed-shape decode call can be recorded in a CUDA graph: an exchange that reads nothing back (on
        several ranks the decode exchange, whose expert rows are bounded by the group's batch), and bf16 on a
        GPU (other dtypes take the per-group GEMM loop, which reads the group sizes back)."""
        ex = self._exchange if self.world_size == 1 else self._decode_exchange
        return ex is not None and ex.capturable and self.dtype == torch.bfloat16

    def load(self, plan: Placement, shard: ExpertShard) -> None:
        """Serve `plan` with `shard` (its dense weights are released when the precision quantises them)."""
        self.maps = [ExpertMap.from_placement(plan, layer, self.device, self.replica_rule)
                     for layer in range(plan.num_layers)]
        self.slot_expert = shard.slot_expert
        self.experts = []
        for layer in range(plan.num_layers):
            self.experts.append(make_experts(shard.w_gate_up[layer], shard.w_down[layer], self.precision))
            if self.precision is Precision.FP8:
                shard.w_gate_up[layer] = shard.w_down[layer] = None
        self.version += 1

    def expert_bytes(self) -> int:
        return sum(e.nbytes() for e in self.experts)

    def __call__(self, moe_layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, ctx: StepContext = PLAIN_STEP) -> torch.Tensor:
        """[T, H] routed-expert output of this rank's tokens (collective: every rank calls it per layer)."""
        fixed = ctx.fixed_batch if self.world_size > 1 and self._decode_exchange is not None else 0
        exchange = self._decode_exchange if fixed else self._exchange
        probe = (None if ctx.measures is None
                 else _LayerTimer(moe_layer, exchange, self.device, ctx.measures))
        return moe_forward(hidden, topk_ids, topk_weights, self.maps[moe_layer], exchange, self.experts[moe_layer],
                           fixed_batch=fixed, probe=probe)
