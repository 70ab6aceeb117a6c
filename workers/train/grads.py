"""Gradient reductions a plan implies: a replicated expert's slots get the sum of all its replicas' gradients.

A logical expert with several slots (on several ranks, or twice on one) is one set of weights: every slot
must take the same step. Each replica's gradient holds the tokens the replica-choice rule sent to it (a
second slot on the same GPU gets none), so the expert's gradient is the sum over its slots, and after
`sum_replica_grads` every slot holds that sum. Experts with one slot are left alone.

The reduction is planned once per placement (`ReplicaPlan.build`): per MoE layer, the replicated experts and
which local slots hold them. All layers' sums travel in one all-reduce over the EP group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from expertmesh.placement.plan import Placement

__all__ = ["ReplicaPlan", "sum_replica_grads", "sum_grads"]


@dataclass(frozen=True)
class ReplicaPlan:
    """Per MoE layer: the local slots of this rank holding a replicated expert (int64 [n]) and that expert's row
    among the layer's replicated experts (int64 [n]), plus each layer's count of replicated experts."""

    slots: tuple[torch.Tensor, ...]
    rows: tuple[torch.Tensor, ...]
    replicated: tuple[int, ...]

    @classmethod
    def build(cls, plan: Placement, rank: int, device: torch.device | str = "cpu") -> ReplicaPlan:
        S = plan.slots_per_gpu
        slots, rows, counts = [], [], []
        for layer in range(plan.num_layers):
            phy2log = plan.phy2log[layer]
            experts = np.flatnonzero(np.bincount(phy2log, minlength=plan.num_experts) > 1)
            row_of = {int(e): i for i, e in enumerate(experts)}
            mine = phy2log[rank * S:(rank + 1) * S]
            local = [s for s, e in enumerate(mine.tolist()) if e in row_of]
            slots.append(torch.tensor(local, dtype=torch.int64, device=device))
            rows.append(torch.tensor([row_of[int(mine[s])] for s in local], dtype=torch.int64, device=device))
            counts.append(len(experts))
        return cls(tuple(slots), tuple(rows), tuple(counts))

    @property
    def any(self) -> bool:
        return any(self.replicated)


def sum_replica_grads(params: Sequence[Sequence[torch.Tensor]], rplan: ReplicaPlan, world_size: int,
                      group: dist.ProcessGroup | None = None) -> None:
    """Give every slot of a replicated expert the sum of its replicas' gradients, in place (collective).

    params: per MoE layer, this rank's slot-indexed expert parameters ([S, ...] each, e.g. gate_up_proj and
    down_proj); a parameter without a gradient counts as zeros and gets one.
    """
    if not rplan.any:
        return
    parts, spans = [], []
    for layer, tensors in enumerate(params):
        n = rplan.replicated[layer]
        for p in tensors:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if n == 0:
                continue
            buf = torch.zeros((n,) + tuple(p.shape[1:]), dtype=torch.float32, device=p.device)
            buf.index_add_(0, rplan.rows[layer], p.grad.index_select(0, rplan.slots[layer]).float())
            parts.append(buf.view(-1))
            spans.append((p, layer, buf.shape))
    flat = torch.cat(parts)
    if world_size > 1:
        dist.all_reduce(flat, group=group)
    start = 0
    for p, layer, shape in spans:
        n = int(np.prod(shape))
        total = flat[start:start + n].view(shape)
        start += n
        p.grad.index_copy_(0, rplan.slots[layer], total.index_select(0, rplan.rows[layer]).to(p.grad.dtype))


def sum_grads(params: Sequence[torch.Tensor], world_size: int, group: dist.ProcessGroup | None = None) -> None:
    """Sum each parameter's gradient over the group's ranks, in place (collective; missing gradients count as
    zeros). The data-parallel reduction of the non-expert parameters under the loss shares' convention; a
    training job under DeepSpeed leaves it to DeepSpeed."""
    if world_size == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, group=group)
    start = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[start:start + g.numel()].view_as(g).to(g.dtype)
        start += g.numel()
