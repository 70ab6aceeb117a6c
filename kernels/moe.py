"""The one MoE layer pipeline on one rank: route -> dispatch -> expert compute -> combine.

    counts   = exchange.gather_counts(expert_counts(topk_ids, E))        balanced replica rule only: [G, E]
    layout   = build_layout(topk_ids, topk_weights, emap, rank, counts=counts)   which rank serves each pair
    received = exchange.dispatch(x, layout)                             one copy per destination rank
    el       = build_expert_layout(received.slots, S, received.valid)   rows grouped by local slot
    y        = experts(received, el)                                    grouped-GEMM SwiGLU over the slots
    out      = exchange.combine(y, el, received, layout)                weighted sum back at home

The runtime (`expertmesh.workers.moe.EPExecutor`), the kernel benchmarks and training call `moe_forward`;
nothing else strings these steps together. Only `dispatch` and `combine` communicate, plus, under the
balanced replica rule on a plan with experts replicated across GPUs (`emap.balanced`), the counts' gather
before the layout: one [G, E] all-gather per layer on every exchange of several ranks; on one rank (the
single-process model, `LocalExchange`) there is nothing to choose and nothing is gathered.

Precision is data, not a code path of its own: the exchange carries FP8 or not (`Exchange.fp8`), and the
experts are `DenseExperts` (the activations' dtype) or `FP8Experts` (FP8 E4M3 GEMMs over DeepSeek-V3's
block format: 1 x 128 activation tiles, 128 x 128 weight blocks). `Precision` names the three combinations
a user picks; `make_experts` builds the experts of one.

Training is the same call with `TrainableExperts` (weights that take gradients, GEMMs in a `Recipe`): when
grad is enabled, `moe_forward` runs dispatch, the experts' row gather and combine as the autograd Functions of
`autograd.py`, whose backward runs the reverse exchanges.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import torch
import torch.nn.functional as F

from . import autograd
from .exchange import FP8_TILE, Exchange, Received
from .expert_map import ExpertMap
from .experts import FP8BlockWeights, quantize_weights_fp8_blockwise, scaled_grouped_mm_blockwise, swiglu_experts
from .fp8 import silu_mul_quantize_fp8
from .grouped_linear import Recipe, grouped_linear
from .layout import DispatchLayout, ExpertLayout, build_expert_layout, build_layout
from .permute import permute, permute_dequant
from .replicas import expert_counts

__all__ = ["Precision", "Experts", "DenseExperts", "FP8Experts", "TrainableExperts", "make_experts", "PhaseProbe",
           "moe_forward"]


class Precision(StrEnum):
    """How a layer's routed experts run (attention and the dense parts keep the model's dtype)."""

    BF16 = "bf16"  # no FP8: dispatch, experts and combine in the activations' dtype
    FP8_DISPATCH = "fp8-dispatch"  # tokens travel as FP8 E4M3 with 1 x 128 scales; experts in the activations' dtype
    FP8 = "fp8"  # FP8 dispatch and FP8 expert GEMMs (128 x 128 block-scaled weights); combine in bf16

    @property
    def fp8_dispatch(self) -> bool:
        return self is not Precision.BF16


class Experts(abc.ABC):
    """This rank's S expert slots of one layer: SwiGLU over expert-ordered rows."""

    align = 1  # each slot's group of rows is padded to a multiple of this
    differentiable = False  # whether grad flows to the weights (and moe_forward runs the autograd pipeline)

    @property
    @abc.abstractmethod
    def num_slots(self) -> int: ...

    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes of the weights (and their scales)."""

    @abc.abstractmethod
    def __call__(self, received: Received, el: ExpertLayout, out_dtype: torch.dtype) -> torch.Tensor:
        """[M, H] expert outputs of the rows `el` picks from `received` (FP8 rows carry their scales)."""


def _expert_rows(received: Received, el: ExpertLayout, out_dtype: torch.dtype,
                 differentiable: bool = False) -> torch.Tensor:
    """[M, H] expert-ordered rows in `out_dtype`: FP8 dispatch is dequantised while gathering."""
    if received.scales is not None:
        return permute_dequant(received.x, received.scales, el.row_index, FP8_TILE, out_dtype)
    return autograd.permute_rows(received.x, el) if differentiable else permute(received.x, el.row_index)


@dataclass(frozen=True)
class DenseExperts(Experts):
    """Weights in the activations' dtype, stored like nn.Linear: w13 [S, 2F, H] (gate rows, then up), w2 [S, H, F]."""

    w13: torch.Tensor
    w2: torch.Tensor

    @property
    def num_slots(self) -> int:
        return self.w13.shape[0]

    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in (self.w13, self.w2))

    def __call__(self, received: Received, el: ExpertLayout, out_dtype: torch.dtype) -> torch.Tensor:
        return swiglu_experts(_expert_rows(received, el, out_dtype), self.w13, self.w2, el.offsets)


@dataclass(frozen=True)
class FP8Experts(Experts):
    """Block-scaled FP8 weights (`quantize_weights_fp8_blockwise`); rows arrive as 1 x 128-tile FP8, the
    SwiGLU activation is quantised the same way before the down projection."""

    w13: FP8BlockWeights
    w2: FP8BlockWeights

    @property
    def num_slots(self) -> int:
        return self.w13.q.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in (self.w13, self.w2) for t in (w.q, w.scale))

    def __call__(self, received: Received, el: ExpertLayout, out_dtype: torch.dtype) -> torch.Tensor:
        if received.scales is None:
            raise ValueError("received: FP8 experts need FP8 dispatch (an exchange built with fp8=True)")
        xq = permute(received.x, el.row_index)
        xs = permute(received.scales, el.row_index)
        h = scaled_grouped_mm_blockwise(xq, xs, self.w13, el.offsets, torch.bfloat16)
        aq, as_ = silu_mul_quantize_fp8(h, FP8_TILE)
        return scaled_grouped_mm_blockwise(aq, as_, self.w2, el.offsets, out_dtype)


class TrainableExperts(Experts):
    """Weights that take gradients (e.g. `nn.Parameter`s): w13 [S, 2F, H], w2 [S, H, F], GEMMs in `recipe`.
    Rows arrive in the activations' dtype (the autograd dispatch dequantises FP8 dispatch; without autograd,
    FP8 rows are dequantised while gathered)."""

    differentiable = True

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, recipe: Recipe | str = Recipe.BF16) -> None:
        S, F2, H = w13.shape if w13.dim() == 3 else (0, 0, 0)
        if w13.dim() != 3 or tuple(w2.shape) != (S, H, F2 // 2) or F2 % 2:
            raise ValueError(f"w13, w2: expected [S, 2F, H], [S, H, F]; got {list(w13.shape)}, {list(w2.shape)}")
        self.w13, self.w2, self.recipe = w13, w2, Recipe(recipe)
        self.align = self.recipe.align

    @property
    def num_slots(self) -> int:
        return self.w13.shape[0]

    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in (self.w13, self.w2))

    def __call__(self, received: Received, el: ExpertLayout, out_dtype: torch.dtype) -> torch.Tensor:
        rows = _expert_rows(received, el, out_dtype, differentiable=True)
        gate, up = grouped_linear(rows, self.w13, el.offsets, self.recipe).chunk(2, dim=-1)
        return grouped_linear(F.silu(gate) * up, self.w2, el.offsets, self.recipe)


def make_experts(w13: torch.Tensor, w2: torch.Tensor, precision: Precision) -> Experts:
    """The experts of one layer in `precision` from weights in the model's dtype (FP8: quantised here)."""
    if Precision(precision) is Precision.FP8:
        return FP8Experts(quantize_weights_fp8_blockwise(w13), quantize_weights_fp8_blockwise(w2))
    return DenseExperts(w13, w2)


class PhaseProbe(Protocol):
    """Watches one layer's call (measurement): called as each phase starts, and once at the end."""

    def start(self, phase: str) -> None:
        """phase: "route", "dispatch", "experts" or "combine"."""
        ...

    def finish(self, layout: DispatchLayout, received: Received, el: ExpertLayout) -> None: ...


def _row_bound(exchange: Exchange, received: Received, experts: Experts, top_k: int, fixed_batch: int) -> int | None:
    """Expert-input rows known without reading the layout back from the device (a sync per layer that keeps
    the host from queueing ahead, and that a CUDA graph cannot hold): one rank serves all of its pairs; in a
    fixed-shape step each of G ranks sends at most `fixed_batch` tokens of k pairs. None: read it back."""
    if exchange.world_size == 1:
        pairs = received.slots.numel()
    elif fixed_batch:
        pairs = exchange.world_size * fixed_batch * top_k
    else:
        return None
    return pairs + experts.num_slots * (experts.align - 1)


def moe_forward(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    emap: ExpertMap,
    exchange: Exchange,
    experts: Experts,
    *,
    fixed_batch: int = 0,
    probe: PhaseProbe | None = None,
) -> torch.Tensor:
    """[T, H]: sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) for this rank's tokens (collective).

    x [T, H]; topk_ids, topk_weights [T, k]; emap: the layer's `ExpertMap` on x's device; experts: this
    rank's slots of the layer. fixed_batch > 0: this call is part of a fixed-shape step in which every rank
    brings at most that many tokens (it bounds the expert rows, so nothing is read back). probe: measurement.
    With `TrainableExperts` and grad enabled, the result is differentiable in x, topk_weights and the experts'
    weights (collective in backward too: every rank runs backward through the same layers).
    """
    train = experts.differentiable and torch.is_grad_enabled()
    if probe is not None:
        probe.start("route")
    counts = None
    if emap.balanced and exchange.world_size > 1:  # the one collective the balanced rule adds, before dispatch
        counts = exchange.gather_counts(expert_counts(topk_ids, emap.num_experts))
    layout = build_layout(topk_ids, topk_weights.detach(), emap, exchange.rank, counts=counts)
    if probe is not None:
        probe.start("dispatch")
    received = (autograd.dispatch(exchange, x, topk_weights, layout) if train
                else exchange.dispatch(x, layout))
    if probe is not None:
        probe.start("experts")
    bound = _row_bound(exchange, received, experts, topk_ids.shape[1], fixed_batch)
    el = build_expert_layout(received.slots, emap.slots_per_gpu, received.valid, experts.align, bound,
                             all_valid=exchange.world_size == 1)
    y = experts(received, el, x.dtype)
    if probe is not None:
        probe.start("combine")
    y = y.to(x.dtype)
    out = autograd.combine(exchange, y, el, received, layout) if train else exchange.combine(y, el, received, layout)
    if probe is not None:
        probe.finish(layout, received, el)
    return out.to(x.dtype)
