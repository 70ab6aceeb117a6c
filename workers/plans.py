"""Plans as the runtime takes them: the default placement, and the check that a plan fits a checkpoint."""

from __future__ import annotations

from expertmesh.placement import baselines
from expertmesh.placement.plan import Placement

from .config import ModelConfig

__all__ = ["PlanMismatchError", "contiguous_plan", "check_plan"]


class PlanMismatchError(ValueError):
    """The plan does not fit the checkpoint or the group."""


def contiguous_plan(num_layers: int, num_experts: int, num_gpus: int) -> Placement:
    """The group's default plan: `expertmesh.placement.baselines.contiguous_plan` (experts 0..E-1 in
    order, E / G per GPU), its error restated for the group's `num_workers`."""
    if num_gpus >= 1 and num_experts % num_gpus == 0:
        return baselines.contiguous_plan(num_layers, num_experts, num_gpus)
    raise PlanMismatchError(
        f"num_workers: the contiguous default plan needs a divisor of the {num_experts} experts, got "
        f"{num_gpus}; pass a plan with redundant slots instead"
    )


def check_plan(plan: Placement, cfg: ModelConfig, num_workers: int, where: str) -> None:
    """Refuse a plan whose shape differs from the checkpoint's MoE layers and experts, or the group's size."""
    if not isinstance(plan, Placement):
        raise PlanMismatchError(f"plan: expected a Placement or a plan file, got {type(plan).__name__}")
    if (plan.num_layers, plan.num_experts) != (cfg.num_moe_layers, cfg.num_experts):
        raise PlanMismatchError(
            f"plan: has {plan.num_layers} MoE layers x {plan.num_experts} experts, but the checkpoint at "
            f"{where} has {cfg.num_moe_layers} MoE layers x {cfg.num_experts} experts"
        )
    if plan.num_gpus != num_workers:
        raise PlanMismatchError(f"plan: made for {plan.num_gpus} GPUs, the group has {num_workers} workers")
