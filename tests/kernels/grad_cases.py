"""Shared pieces of the gradient tests (CPU, Triton interpreter, GPU): a dense autograd reference of the MoE
layer and the FP8 gradient tolerance.

`dense_moe` is written from the contract, not from the kernels: every expert runs on every token with plain
torch ops, and a token-expert mask with the top-k weights picks what counts, so torch's autograd gives the
reference gradients of x, the top-k weights and each logical expert's weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
              w2: torch.Tensor) -> torch.Tensor:
    """[T, H]: sum_j weights[t, j] * expert_{ids[t, j]}(x[t]); x [T, H], w13 [E, 2F, H], w2 [E, H, F]."""
    E = w13.shape[0]
    h = torch.einsum("th,efh->etf", x, w13)  # [E, T, 2F]
    gate, up = h.chunk(2, dim=-1)
    y = torch.einsum("etf,ehf->eth", F.silu(gate) * up, w2)  # [E, T, H]
    mask = F.one_hot(ids, E).to(x.dtype)  # [T, k, E]
    coef = torch.einsum("tke,tk->et", mask, weights.to(x.dtype))  # [E, T]
    return (coef[..., None] * y).sum(0)


def fp8_grad_tolerance(ref: torch.Tensor, rel: float = 0.1) -> float:
    """Absolute bound for a gradient computed through E4M3 GEMMs and FP8 dispatch: each quantised operand is
    within 2^-4 relative, and a gradient passes up to three of them; `rel` of the largest entry."""
    return rel * float(ref.abs().max()) + 1e-6 if ref.numel() else 0.0


def slot_grads_by_expert(grad: torch.Tensor, slot_expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E, ...]: the gradients of this rank's slots [S, ...] summed per logical expert (replicas add up)."""
    out = torch.zeros((num_experts,) + tuple(grad.shape[1:]), dtype=grad.dtype)
    return out.index_add_(0, slot_expert.cpu(), grad.cpu())
