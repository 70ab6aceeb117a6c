"""fp32 master weights for a model whose parameters (and so its GEMMs) are bf16: mixed-precision training.

    opt = MasterWeights(model.parameters(), lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    out.loss.backward(); opt.step(); opt.zero_grad()          # schedulers take opt.optimizer

Why: an optimizer stepping bf16 parameters in place keeps its state in bf16 too, and bf16 holds 8 significant
bits. An update below half a unit in the last place is lost (a norm weight of 1.0 never moves at lr 1e-3), and
Adam's second moment stops decaying: v * 0.999 rounds back to v, and adding 0.001 * g^2 changes nothing unless
g^2 is several times v, so v stays near the largest early gradients and the effective step size drifts with
them. Training then depends on rounding details, and runs that differ only by small noise (FP8 GEMMs against
bf16 ones) end apart by far more than the noise explains. DeepSeek-V3 and Megatron keep fp32 master weights
and optimizer state for this reason; the model still computes in bf16 (or FP8) from the rounded copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["MasterWeights"]


class MasterWeights:
    """An optimizer over fp32 copies of `params`; each `step` feeds it the parameters' gradients in fp32 and
    writes the updated copies back, rounded to the parameters' dtype. fp32 parameters are stepped in place."""

    def __init__(self, params: Iterable[torch.nn.Parameter],
                 make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer]) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.master = [p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_()
                       for p in self.params]
        self.optimizer = make_optimizer(self.master)

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.master, strict=True):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        self.optimizer.step()
        for p, m in zip(self.params, self.master, strict=True):
            if m is not p:
                p.copy_(m)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        self.optimizer.zero_grad(set_to_none=True)
