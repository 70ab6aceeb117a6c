"""One MoE layer's placement in the form the kernels use (torch tensors on the runtime's device).

Notation: E logical experts, G GPUs (= ranks of the EP group), S expert slots per GPU, R = G * S slots.

    slot_expert  int64 [G, S]  logical expert held in local slot s of GPU g: `phy2log[layer].view(G, S)`,
                               i.e. global slot g * S + s (slot s' lives on GPU s' // S, as in the plan)
    replicas     int64 [E, G]  replicas of expert e on GPU g (`Placement.replicas[layer]`)
    local_slot   int64 [E, G]  the local slot on GPU g that serves expert e's tokens: the lowest local slot
                               holding e, -1 where g holds none. A second replica of e on the same GPU gets
                               no tokens (it would not change that GPU's work, only split a GEMM group).
    node_of_gpu  int64 [G]     node of every GPU (GPUs numbered node-major, as in `Topology`)
    replicated   int64 [R]     experts with replicas on more than one GPU, ascending (known when the map is
                               built, so the balanced rule's split loop has a static length: no host sync)
    replica_rule str           which rule serves a replicated expert's pairs ("fixed" | "balanced", see
                               `expertmesh.placement.routing`); the balanced one needs the ranks' counts
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .replicas import REPLICA_RULES

__all__ = ["ExpertMap"]


@dataclass(frozen=True)
class ExpertMap:
    slot_expert: torch.Tensor  # int64 [G, S]
    replicas: torch.Tensor  # int64 [E, G]
    local_slot: torch.Tensor  # int64 [E, G]
    node_of_gpu: torch.Tensor  # int64 [G]
    replicated: torch.Tensor  # int64 [R]
    replica_rule: str = "fixed"

    def __post_init__(self) -> None:
        if self.replica_rule not in REPLICA_RULES:
            raise ValueError(f"replica_rule: expected one of {REPLICA_RULES}, got {self.replica_rule!r}")

    @property
    def num_gpus(self) -> int:
        return self.slot_expert.shape[0]

    @property
    def slots_per_gpu(self) -> int:
        return self.slot_expert.shape[1]

    @property
    def num_experts(self) -> int:
        return self.replicas.shape[0]

    @property
    def device(self) -> torch.device:
        return self.slot_expert.device

    @property
    def balanced(self) -> bool:
        """Whether this layer's pairs take the balanced rule (which needs the ranks' counts) and it matters:
        some expert has replicas on several GPUs."""
        return self.replica_rule == "balanced" and self.replicated.numel() > 0

    def to(self, device: torch.device | str) -> ExpertMap:
        return ExpertMap(*(t.to(device) for t in (self.slot_expert, self.replicas, self.local_slot,
                                                   self.node_of_gpu, self.replicated)), self.replica_rule)

    def with_rule(self, replica_rule: str) -> ExpertMap:
        return replace(self, replica_rule=replica_rule)

    @classmethod
    def from_phy2log(
        cls,
        phy2log: np.ndarray | torch.Tensor,
        num_gpus: int,
        num_nodes: int = 1,
        num_experts: int | None = None,
        device: torch.device | str = "cpu",
        replica_rule: str = "fixed",
    ) -> ExpertMap:
        """From one layer's slot map `phy2log` [R]: logical expert per physical slot, slot s on GPU s // S."""
        p = np.asarray(phy2log.cpu() if isinstance(phy2log, torch.Tensor) else phy2log)
        if p.ndim != 1 or p.size == 0 or not np.issubdtype(p.dtype, np.integer):
            raise ValueError(f"phy2log: expected a non-empty 1-D integer array [R], got {list(p.shape)}")
        if num_gpus < 1 or p.size % num_gpus:
            raise ValueError(f"num_gpus: expected a positive divisor of the {p.size} slots, got {num_gpus}")
        if num_nodes < 1 or num_gpus % num_nodes:
            raise ValueError(f"num_nodes: expected a divisor of num_gpus={num_gpus}, got {num_nodes}")
        E = int(p.max()) + 1 if num_experts is None else int(num_experts)
        if p.min() < 0 or p.max() >= E:
            raise ValueError(f"phy2log: expert ids must lie in [0, {E}), found [{p.min()}, {p.max()}]")
        G, S = num_gpus, p.size // num_gpus
        slot_expert = p.reshape(G, S).astype(np.int64)
        replicas = np.zeros((E, G), dtype=np.int64)
        np.add.at(replicas, (slot_expert, np.broadcast_to(np.arange(G)[:, None], (G, S))), 1)
        missing = np.flatnonzero(replicas.sum(1) == 0)
        if missing.size:
            raise ValueError(f"phy2log: expert {missing[0]} has no slot; every expert needs one")
        local_slot = np.full((E, G), -1, dtype=np.int64)
        # Walk slots from the highest down so the lowest local slot of each expert is written last.
        for s in range(S - 1, -1, -1):
            local_slot[slot_expert[:, s], np.arange(G)] = s
        node_of_gpu = np.arange(G) // (G // num_nodes)
        replicated = np.flatnonzero((replicas > 0).sum(1) > 1)
        return cls(*(torch.as_tensor(a, dtype=torch.int64, device=device)
                     for a in (slot_expert, replicas, local_slot, node_of_gpu, replicated)), replica_rule)

    @classmethod
    def from_placement(cls, placement, layer: int, device: torch.device | str = "cpu",
                       replica_rule: str = "fixed") -> ExpertMap:
        """From `expertmesh.placement.plan.Placement` and a MoE layer index."""
        if not 0 <= layer < placement.num_layers:
            raise ValueError(f"layer: expected 0 <= layer < {placement.num_layers}, got {layer}")
        return cls.from_phy2log(placement.phy2log[layer], placement.num_gpus, placement.num_nodes,
                                placement.num_experts, device, replica_rule)
