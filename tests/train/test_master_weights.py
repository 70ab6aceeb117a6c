"""fp32 master weights (`MasterWeights`): bf16 parameters follow an fp32 optimizer, where plain bf16 AdamW loses
updates below half a unit in the last place."""

from __future__ import annotations

import torch

from expertmesh.workers.train import MasterWeights


def _run(steps: int, master: bool) -> tuple[torch.Tensor, torch.Tensor]:
    norm = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))  # a norm weight: its ulp at 1.0 is 2^-7
    small = torch.nn.Parameter(torch.full((8,), 0.02, dtype=torch.bfloat16))

    def make(ps):
        return torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0)
    opt = MasterWeights([norm, small], make) if master else make([norm, small])
    for _ in range(steps):
        (norm.float().sum() + small.float().sum()).backward()  # constant gradient 1: Adam steps ~lr each time
        opt.step()
        opt.zero_grad()
    return norm.detach(), small.detach()


def test_bf16_parameters_follow_the_fp32_master_copy():
    norm, small = _run(20, master=True)
    # 20 steps of ~1e-3 each: the fp32 copy is at ~0.98 and ~0.0, and the bf16 parameters are its rounding.
    assert torch.all(norm < 0.985) and torch.all(norm > 0.975), norm
    assert torch.all(small.abs() < 2e-3), small
    plain_norm, _ = _run(20, master=False)
    assert torch.all(plain_norm == 1.0), "bf16 AdamW was expected to lose these updates (the reason for masters)"


def test_fp32_parameters_are_stepped_in_place_and_grads_cleared():
    w = torch.nn.Parameter(torch.ones(4))
    opt = MasterWeights([w], lambda ps: torch.optim.SGD(ps, lr=0.5))
    assert opt.master[0] is w
    w.sum().backward()
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((4,), 0.5))
    opt.zero_grad()
    assert w.grad is None
