"""Autograd through the MoE pipeline's data movement: dispatch, the experts' row gather, combine.

    received = dispatch(exchange, x [T, H], topk_weights [T, k], layout)    rows [N, H] and pair weights [N, k]
    rows     = permute_rows(received.x, el)                                  [M, H] expert-ordered rows
    out      = combine(exchange, y [M, H], el, received, layout)             [T, H]

`moe.moe_forward` composes these instead of the exchange's plain calls when grad is enabled and its experts are
trainable; the pipeline is the same. Backward:

    dispatch      the exchange's `dispatch_backward` (a combine of gradients: row gradients summed over a
                  token's copies at the source, each pair's weight gradient from the copy that served it)
    permute_rows  unpermute_combine(grad [M, H], el.pair_pos) (each received row sums its pairs' gradients)
    combine       the exchange's `combine_backward` (a dispatch of gradients), then
                  `unpermute_combine_backward` (expert rows' gradients w * g, pair weights' <g, y>)

The received rows carry the gradient in the activations' dtype: with FP8 dispatch (the wire carries E4M3 with
1 x 128 scales) they are dequantised at the receiver, and FP8 experts quantise their GEMM operands themselves.
Dispatch copies the received metadata (slots, weights, counts) that backward reads: symmetric-memory buffers
are rewritten by the next layer's dispatch. The received rows themselves are consumed by the expert gather
in the same forward (they stay valid until the exchange's next dispatch, as in serving).
"""

from __future__ import annotations

import dataclasses

import torch

from .exchange import FP8_TILE, Exchange, Received
from .fp8 import dequantize_fp8
from .layout import DispatchLayout, ExpertLayout
from .permute import permute, unpermute_combine, unpermute_combine_backward

__all__ = ["dispatch", "permute_rows", "combine"]


def _snapshot(received: Received) -> Received:
    """The metadata of `received` copied out of any buffer the exchange reuses."""
    copy = [None if t is None else t.clone() for t in (received.slots, received.weights, received.counts,
                                                        received.valid)]
    return dataclasses.replace(received, slots=copy[0], weights=copy[1], counts=copy[2], valid=copy[3])


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, exchange: Exchange, layout: DispatchLayout, box: list):
        received = _snapshot(exchange.dispatch(x, layout))
        rows = received.x
        if received.scales is not None:  # FP8 on the wire: the autograd graph carries the dequantised rows
            rows = dequantize_fp8(rows, received.scales, FP8_TILE, x.dtype)
        ctx.exchange, ctx.layout, ctx.received = exchange, layout, received
        ctx.rows_shape, ctx.dtype = tuple(rows.shape), x.dtype
        box.append(received)
        return rows, received.weights

    @staticmethod
    def backward(ctx, grad_rows, grad_weights):
        received = ctx.received
        if grad_rows is None:
            grad_rows = torch.zeros(ctx.rows_shape, dtype=ctx.dtype, device=received.weights.device)
        if grad_weights is None:
            grad_weights = torch.zeros_like(received.weights)
        grad_x, grad_w = ctx.exchange.dispatch_backward(grad_rows, grad_weights, received, ctx.layout)
        return grad_x, grad_w, None, None, None


def dispatch(exchange: Exchange, x: torch.Tensor, topk_weights: torch.Tensor, layout: DispatchLayout) -> Received:
    """`exchange.dispatch(x, layout)` with gradients to x [T, H] and topk_weights [T, k] (the layout must have
    been built from the same weights). The result's x is in x's dtype (FP8 rows dequantised) and scales None."""
    box: list[Received] = []
    rows, weights = _Dispatch.apply(x, topk_weights, exchange, layout, box)
    return dataclasses.replace(box[0], x=rows, scales=None, weights=weights)


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, el: ExpertLayout):
        ctx.el, ctx.n, ctx.dtype = el, rows.shape[0], rows.dtype
        return permute(rows, el.row_index)

    @staticmethod
    def backward(ctx, grad):
        return unpermute_combine(grad, ctx.el.pair_pos, None, ctx.dtype), None


def permute_rows(rows: torch.Tensor, el: ExpertLayout) -> torch.Tensor:
    """[M, H]: the received rows [N, H] in expert order (`permute(rows, el.row_index)`), differentiable."""
    return _PermuteRows.apply(rows, el)


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weights, exchange: Exchange, el: ExpertLayout, received: Received, layout: DispatchLayout):
        received = dataclasses.replace(received, weights=weights.detach())
        ctx.save_for_backward(y, weights)
        ctx.exchange, ctx.el, ctx.received, ctx.layout = exchange, el, received, layout
        return exchange.combine(y, el, received, layout)

    @staticmethod
    def backward(ctx, grad_out):
        y, weights = ctx.saved_tensors
        grad_reduced = ctx.exchange.combine_backward(grad_out.contiguous(), ctx.received, ctx.layout)
        grad_y, grad_w = unpermute_combine_backward(grad_reduced.to(y.dtype), y, ctx.el.pair_pos, weights)
        return grad_y, grad_w.to(weights.dtype), None, None, None, None


def combine(exchange: Exchange, y: torch.Tensor, el: ExpertLayout, received: Received,
            layout: DispatchLayout) -> torch.Tensor:
    """`exchange.combine(y, el, received, layout)` with gradients to the expert outputs y [M, H] and to the
    pair weights `received.weights` [N, k] (the output of `dispatch`)."""
    return _Combine.apply(y, received.weights, exchange, el, received, layout)
