"""One MoE layer's data path on one rank: layout -> dispatch -> expert permute -> experts -> combine.

This composes the public pieces in the order the runtime runs them; callers that overlap communication
with compute call the pieces themselves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .exchange import FP8_TILE, Exchange
from .expert_map import ExpertMap
from .layout import build_expert_layout, build_layout
from .permute import permute, permute_dequant

__all__ = ["ExpertsFn", "moe_forward"]

# (x [M, H] expert-ordered rows, offsets int32 [S] group ends) -> [M, H] expert outputs in the same order
ExpertsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def moe_forward(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    emap: ExpertMap,
    exchange: Exchange,
    experts: ExpertsFn,
    align: int = 1,
    max_rows: int | None = None,
) -> torch.Tensor:
    """[T, H]: sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) for this rank's tokens.

    x [T, H]; topk_ids, topk_weights [T, k]; emap: the layer's `ExpertMap` on x's device; `experts` runs
    this rank's S local slots over expert-ordered rows (FP8 dispatch is dequantised to BF16 first);
    `align` pads each slot's group (e.g. 16 for FP8 grouped GEMMs); `max_rows` avoids a host sync.
    """
    layout = build_layout(topk_ids, topk_weights, emap, exchange.rank)
    received = exchange.dispatch(x, layout)
    el = build_expert_layout(received.slots, emap.slots_per_gpu, received.valid, align, max_rows)
    if received.scales is not None:
        xe = permute_dequant(received.x, received.scales, el.row_index, FP8_TILE, x.dtype)
    else:
        xe = permute(received.x, el.row_index)
    y = experts(xe, el.offsets)
    return exchange.combine(y.to(x.dtype), el, received, layout)
