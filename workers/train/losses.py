"""The training losses of the MoE families, as `transformers` computes them, split into per-rank shares.

    lm    mean next-token cross-entropy over the labels that are not -100 (labels shifted by one inside)
    aux   E * sum_e f_e * P_e, Switch/Mixtral load balancing over every MoE layer's rows together (`transformers`'
          `load_balancing_loss_func`): f_e = top-k choices of expert e / rows, P_e = router probability of e
          summed / rows, rows = tokens x MoE layers
    z     mean over those rows of logsumexp(router logits)^2 (ST-MoE's router z-loss; not in `transformers`)
    loss  lm + aux_coef * aux + z_coef * z

Each rank holds the loss terms of its own tokens; its share divides them by the group's totals (labels, rows),
and the aux share uses the group's choice counts f_e (no gradient flows through a top-k count), so the shares
of all ranks sum to the loss of the whole batch in one process. Backward of a share therefore gives routed
experts their exact gradient (their tokens came from every rank through the exchange), while every other
parameter's gradient is this rank's part: summed over the ranks it is the whole batch's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..families import Routing

__all__ = ["LossShares", "loss_shares", "IGNORE_INDEX"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossShares:
    """This rank's shares (0-dim float32 tensors; summed over the group's ranks: the batch's losses)."""

    loss: torch.Tensor  # lm + aux_coef * aux + z_coef * z: what backward runs on
    lm: torch.Tensor
    aux: torch.Tensor  # before its coefficient
    z: torch.Tensor  # before its coefficient


def _lm_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies, number of labelled positions) for logits [B, L, V], labels [B, L]."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (shifted != IGNORE_INDEX).sum()


def loss_shares(logits: torch.Tensor, labels: torch.Tensor, routings: Sequence[Routing], num_experts: int,
                aux_coef: float, z_coef: float, world_size: int = 1,
                group: dist.ProcessGroup | None = None) -> LossShares:
    """This rank's loss shares from its logits [B, L, V], labels [B, L] and every MoE layer's routing of its
    B * L tokens. With world_size > 1 one all-reduce (no gradient) sums the group's label count, row count
    and top-k choice counts; every rank of `group` must call it."""
    device = logits.device
    lm_sum, labelled = _lm_sum(logits, labels)
    probs_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    z_sum = torch.zeros((), dtype=torch.float32, device=device)
    stats = torch.zeros(num_experts + 2, dtype=torch.float32, device=device)  # choices per expert, rows, labels
    for r in routings:
        lg = r.logits.float()
        probs_sum = probs_sum + torch.softmax(lg, dim=-1).sum(0)
        z_sum = z_sum + torch.logsumexp(lg, dim=-1).square().sum()
        stats[:num_experts] += torch.bincount(r.ids.reshape(-1), minlength=num_experts).float()
        stats[num_experts] += r.ids.shape[0]
    stats[num_experts + 1] = labelled.float()
    if world_size > 1:
        dist.all_reduce(stats, group=group)
    choices, rows, labels_total = stats[:num_experts], stats[num_experts].clamp(min=1), stats[-1].clamp(min=1)
    lm = lm_sum / labels_total
    aux = num_experts * (choices / rows * probs_sum / rows).sum()
    z = z_sum / rows
    return LossShares(lm + aux_coef * aux + z_coef * z, lm, aux, z)
