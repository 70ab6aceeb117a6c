"""A grouped linear layer with autograd, in bf16 or FP8: y = x @ w[s].T on the rows of each local slot s.

    grouped_linear(x [M, K], w [S, N, K], offsets int32 [S], recipe) -> [M, N]

Three GEMMs per layer, each in the recipe's precision (master weights stay in w's dtype, bf16 in training):

| recipe          | forward y = x w^T                | input grad dx = dy w            | weight grad dw = dy^T x   |
|-----------------|----------------------------------|---------------------------------|---------------------------|
| `bf16`          | `grouped_mm`                     | `grouped_mm` (w transposed)     | `grouped_wgrad`           |
| `fp8-blockwise` | x 1x128, w 128x128 (DeepSeek-V3) | dy 1x128, w's blocks transposed | dy, x 128x1 (along M)     |
| `fp8-rowwise`   | x per row, w per out channel     | dy per row, w per in channel    | dy, x per (group, column) |

The blockwise GEMMs are `scaled_grouped_mm_blockwise` (forward, input gradient) and
`scaled_grouped_wgrad_blockwise`; the rowwise ones (torchao's recipe) `scaled_grouped_mm` and
`scaled_grouped_wgrad_rowwise`, with w re-quantised along N for the input gradient.

Every operand is quantised along the dimension its GEMM reduces (E4M3, amax scaling, no delayed scaling). The
blockwise recipe quantises x and dy once each into both orientations (`quantize_fp8_dual`) and keeps x's FP8
128 x 1 codes for backward instead of x, as DeepSeek-V3 caches FP8 activations.
The rowwise GEMMs run `torch._scaled_grouped_mm` on CUDA SM90+ (groups padded to 16 rows: the experts'
`align`), the blockwise ones our Triton kernels; every GEMM has its torch reference (CPU).
"""

from __future__ import annotations

from enum import StrEnum

import torch

from .experts import (
    grouped_mm,
    quantize_weights_fp8,
    quantize_weights_fp8_blockwise_pair,
    scaled_grouped_mm,
    scaled_grouped_mm_blockwise,
)
from .fp8 import quantize_fp8
from .grouped_wgrad import (
    grouped_wgrad,
    quantize_fp8_dual,
    quantize_fp8_group_cols,
    scaled_grouped_wgrad_blockwise,
    scaled_grouped_wgrad_rowwise,
)

__all__ = ["Recipe", "grouped_linear"]


class Recipe(StrEnum):
    """How a grouped linear layer's three GEMMs run."""

    BF16 = "bf16"  # the activations' dtype (no FP8)
    FP8_BLOCKWISE = "fp8-blockwise"  # E4M3, 1 x 128 activation tiles, 128 x 128 weight blocks (DeepSeek-V3)
    FP8_ROWWISE = "fp8-rowwise"  # E4M3, one scale per row / channel (torchao's MoE recipe)

    @property
    def align(self) -> int:
        """Rows each group is padded to (the rowwise library kernel wants multiples of 16)."""
        return 16 if self is Recipe.FP8_ROWWISE else 1


def _forward(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, recipe: Recipe):
    """(y, what backward needs besides w and, unless blockwise, x)."""
    if recipe is Recipe.BF16:
        return grouped_mm(x, w, offsets), None
    if recipe is Recipe.FP8_BLOCKWISE:  # x's 128 x 1 quantisation is kept for the weight gradient, not x
        xq, xs, xTq, xTs = quantize_fp8_dual(x)
        wb, wbT = quantize_weights_fp8_blockwise_pair(w)  # backward keeps the transposed codes only
        return scaled_grouped_mm_blockwise(xq, xs, wb, offsets, x.dtype), (wbT, xTq, xTs)
    xq, xs = quantize_fp8(x, None)
    return scaled_grouped_mm(xq, xs[:, 0], quantize_weights_fp8(w), offsets, x.dtype), None


def _input_grad(g: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    if recipe is Recipe.BF16:
        return grouped_mm(g, w.transpose(1, 2), offsets)
    gq, gs = quantize_fp8(g, None)
    return scaled_grouped_mm(gq, gs[:, 0], quantize_weights_fp8(w.transpose(1, 2).contiguous()), offsets, g.dtype)


def _blockwise_grads(g: torch.Tensor, offsets: torch.Tensor, saved, need_x: bool, need_w: bool, dtype: torch.dtype):
    """Both gradients of the blockwise recipe from one dual quantisation of g (1 x 128 and 128 x 1 tiles)."""
    wbT, xTq, xTs = saved
    gq, gs, gTq, gTs = quantize_fp8_dual(g)
    dx = scaled_grouped_mm_blockwise(gq, gs, wbT, offsets, g.dtype) if need_x else None
    dw = scaled_grouped_wgrad_blockwise(gTq, gTs, xTq, xTs, offsets, dtype) if need_w else None
    return dx, dw


def _weight_grad(g: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, recipe: Recipe,
                 dtype: torch.dtype) -> torch.Tensor:
    if recipe is Recipe.BF16:
        return grouped_wgrad(g, x, offsets).to(dtype)
    return scaled_grouped_wgrad_rowwise(*quantize_fp8_group_cols(g, offsets), *quantize_fp8_group_cols(x, offsets),
                                        offsets, dtype)


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets, recipe: Recipe):
        y, saved = _forward(x, w, offsets, recipe)
        blockwise = recipe is Recipe.FP8_BLOCKWISE
        ctx.save_for_backward(None if blockwise else x, w, offsets)
        ctx.recipe, ctx.saved = recipe, saved
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, offsets = ctx.saved_tensors
        g = g.contiguous()
        need_x, need_w = ctx.needs_input_grad[:2]
        if ctx.recipe is Recipe.FP8_BLOCKWISE:
            dx, dw = _blockwise_grads(g, offsets, ctx.saved, need_x, need_w, w.dtype)
            return dx, dw, None, None
        dx = _input_grad(g, w, offsets, ctx.recipe) if need_x else None
        dw = _weight_grad(g, x, offsets, ctx.recipe, w.dtype) if need_w else None
        return dx, dw, None, None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                   recipe: Recipe | str = Recipe.BF16) -> torch.Tensor:
    """[M, N] in x's dtype: rows of group s (offsets[s-1]..offsets[s]) times w[s].T, differentiable in x and w.

    x [M, K], w [S, N, K] (nn.Linear layout per slot), offsets int32 [S]. FP8 recipes need N and K multiples of
    128 (blockwise) or 16 (rowwise). Rows past offsets[-1] hold unspecified values (and get none back).
    """
    recipe = Recipe(recipe)
    if x.dtype != w.dtype:
        raise ValueError(f"w: expected x's dtype {x.dtype}, got {w.dtype}")
    multiple = {Recipe.BF16: 1, Recipe.FP8_BLOCKWISE: 128, Recipe.FP8_ROWWISE: 16}[recipe]
    if x.shape[1] % multiple or w.shape[1] % multiple:
        raise ValueError(f"w: recipe {recipe.value} needs N and K multiples of "
                             f"{128 if recipe is Recipe.FP8_BLOCKWISE else 16}, got {list(w.shape)}")
    return _GroupedLinear.apply(x, w, offsets, recipe)
