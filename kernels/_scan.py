"""Inclusive prefix sums along one dimension of a 2-D integer tensor, as one flat scan.

torch's CUDA cumsum along a dimension launches its row-wise scan kernels, which are slow for the shapes of
a dispatch layout: many tokens and few ranks. On 2 x H200 at 16k tokens per rank, `cumsum(dim=0)` of a
[16384, 2] int64 tensor took 1.5 ms and `cumsum(dim=-1)` of [16384 * 8, 2] took 0.8 ms, per MoE layer: 4.7 of
the 7 ms a 2-GPU prefill step spent over a 1-GPU one (bench/results/profile-qwen3_30b.md). A cumsum of a
flat tensor is one device-wide scan; the rows' offsets are then taken back out.
"""

from __future__ import annotations

import torch

__all__ = ["cumsum_last", "cumsum_first"]


def cumsum_last(x: torch.Tensor) -> torch.Tensor:
    """torch.cumsum(x, dim=-1) for an integer tensor x [..., n], computed as one flat scan."""
    n = x.shape[-1]
    if x.numel() == 0 or n == 0:
        return torch.cumsum(x, dim=-1)
    flat = x.reshape(-1, n).to(torch.int64).reshape(-1).cumsum(0).view(-1, n)
    before = torch.cat([flat.new_zeros(1), flat[:-1, -1]])  # everything in earlier rows
    return (flat - before[:, None]).view(x.shape).to(x.dtype)


def cumsum_first(x: torch.Tensor) -> torch.Tensor:
    """torch.cumsum(x, dim=0) for a 2-D integer tensor x [T, G], computed as one flat scan."""
    return cumsum_last(x.t().contiguous()).t()
