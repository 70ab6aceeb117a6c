"""Expert compute over expert-ordered rows: grouped GEMM and SwiGLU experts, in BF16 and FP8.

Notation: M expert-input rows grouped by local slot (see `layout.ExpertLayout`), S local slots, H hidden,
F expert FFN width. `offsets` int32 [S] holds each group's end row (rows past offsets[-1] are not computed
and hold unspecified values). Weights are stored like `nn.Linear.weight`, output-major:

    w13  [S, 2F, H]   gate projection rows 0..F-1, up projection rows F..2F-1
    w2   [S, H, F]    down projection
    SwiGLU expert:    y = (silu(x @ w13[:F].T) * (x @ w13[F:].T)) @ w2.T

`grouped_mm` uses `torch._grouped_mm` where it exists for the device and dtype (CUDA SM90+ BF16, CPU)
and a per-group loop of `torch.mm` elsewhere. The FP8 path quantises activations rowwise (one scale per
row) and weights per output channel, and runs `torch._scaled_grouped_mm` on CUDA SM90+; elsewhere it
dequantises and runs the loop in float32 (same numbers up to accumulation order).

`scaled_grouped_mm_blockwise` takes DeepSeek-V3's finer format instead: activations with one scale per
1 x 128 tile (what FP8 dispatch carries), weights with one per 128 x 128 block (`quantize_weights_fp8_blockwise`);
its fast path is our Triton kernel (`_triton_grouped_fp8.py`), since torch's grouped FP8 GEMM takes only
rowwise scales on SM90.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._backend import check_impl, use_triton
from .fp8 import FP8_DTYPE, dequantize_fp8_reference, quantize_fp8

__all__ = [
    "FP8Weights",
    "FP8BlockWeights",
    "quantize_weights_fp8",
    "quantize_weights_fp8_blockwise",
    "quantize_weights_fp8_blockwise_pair",
    "scaled_grouped_mm_blockwise",
    "grouped_mm",
    "scaled_grouped_mm",
    "swiglu_experts",
    "swiglu_experts_fp8",
]


@dataclass(frozen=True)
class FP8Weights:
    """Expert weights in FP8 with one scale per output channel: w[s, n, :] ~= q[s, n, :] * scale[s, n]."""

    q: torch.Tensor  # float8_e4m3fn [S, N, K]
    scale: torch.Tensor  # float32 [S, N]


def quantize_weights_fp8(w: torch.Tensor) -> FP8Weights:
    """FP8Weights for w [S, N, K] (nn.Linear layout per expert)."""
    if w.dim() != 3:
        raise ValueError(f"w: expected shape [S, N, K], got {list(w.shape)}")
    S, N, K = w.shape
    q, s = quantize_fp8(w.reshape(S * N, K), tile=None)
    return FP8Weights(q.view(S, N, K), s.view(S, N))


WEIGHT_BLOCK = 128  # DeepSeek-V3's weight scale block (n and k); activations use 1 x 128 tiles


@dataclass(frozen=True)
class FP8BlockWeights:
    """Expert weights in FP8, one scale per 128 x 128 block: w[s, n, k] ~= q[s, n, k] * scale[s, n//128, k//128]."""

    q: torch.Tensor  # float8_e4m3fn [S, N, K]
    scale: torch.Tensor  # float32 [S, N / 128, K / 128]

    def t(self) -> FP8BlockWeights:
        """The transposed weights [S, K, N] as views (the same blocks, read the other way)."""
        return FP8BlockWeights(self.q.transpose(1, 2), self.scale.transpose(1, 2))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        full = self.scale.repeat_interleave(WEIGHT_BLOCK, 1).repeat_interleave(WEIGHT_BLOCK, 2)
        return (self.q.float() * full).to(dtype)


def quantize_weights_fp8_blockwise(w: torch.Tensor) -> FP8BlockWeights:
    """FP8BlockWeights for w [S, N, K] (nn.Linear layout per expert); N and K multiples of 128."""
    if w.dim() != 3 or w.shape[1] % WEIGHT_BLOCK or w.shape[2] % WEIGHT_BLOCK:
        raise ValueError(f"w: expected shape [S, N, K] with N and K multiples of {WEIGHT_BLOCK}, "
                         f"got {list(w.shape)}")
    S, N, K = w.shape
    nb, kb = N // WEIGHT_BLOCK, K // WEIGHT_BLOCK
    if use_triton("auto", w):  # one pass over the weights (training quantises them every step)
        from ._triton_fp8_train import quantize_blocks_triton

        return FP8BlockWeights(*quantize_blocks_triton(w))
    blocks = w.reshape(S, nb, WEIGHT_BLOCK, kb, WEIGHT_BLOCK).permute(0, 1, 3, 2, 4)  # [S, nb, kb, 128, 128]
    q, scale = quantize_fp8(blocks.reshape(S * nb * kb, WEIGHT_BLOCK * WEIGHT_BLOCK), tile=None)
    q = q.view(S, nb, kb, WEIGHT_BLOCK, WEIGHT_BLOCK).permute(0, 1, 3, 2, 4).reshape(S, N, K)
    return FP8BlockWeights(q.contiguous(), scale.view(S, nb, kb))


def quantize_weights_fp8_blockwise_pair(w: torch.Tensor) -> tuple[FP8BlockWeights, FP8BlockWeights]:
    """(w's FP8BlockWeights, the transposed ones [S, K, N] stored contiguously): `wb.t()`'s values, but laid out
    for the input-gradient GEMM. FP8 tensor cores take both operands contiguous along the reduced dim, and
    reading `wb.t()` through its strides makes the GEMM transpose every weight tile on chip."""
    if use_triton("auto", w) and w.dim() == 3 and not (w.shape[1] % WEIGHT_BLOCK or w.shape[2] % WEIGHT_BLOCK):
        from ._triton_fp8_train import quantize_blocks_triton

        q, scale, qt = quantize_blocks_triton(w, transposed=True)
        return FP8BlockWeights(q, scale), FP8BlockWeights(qt, scale.transpose(1, 2))
    wb = quantize_weights_fp8_blockwise(w)
    return wb, FP8BlockWeights(wb.q.transpose(1, 2).contiguous(), wb.scale.transpose(1, 2))


def scaled_grouped_mm_blockwise(xq: torch.Tensor, x_scale: torch.Tensor, w: FP8BlockWeights,
                                offsets: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                                impl: str = "auto") -> torch.Tensor:
    """[M, N] out_dtype: FP8 rows xq [M, K] with 1 x 128 scales x_scale [M, K/128] times block-scaled FP8
    weights, per group (offsets int32 [S] group ends; rows past offsets[-1] are not computed)."""
    _check_grouped(xq, w.q, offsets)
    check_impl(impl)
    M, K = xq.shape
    S, N, _ = w.q.shape
    if xq.dtype != FP8_DTYPE or w.q.dtype != FP8_DTYPE:
        raise ValueError(f"xq, w.q: expected {FP8_DTYPE}, got {xq.dtype} and {w.q.dtype}")
    if K % WEIGHT_BLOCK or N % WEIGHT_BLOCK:
        raise ValueError(f"w.q: expected N and K multiples of {WEIGHT_BLOCK}, got {list(w.q.shape)}")
    if tuple(x_scale.shape) != (M, K // WEIGHT_BLOCK):
        raise ValueError(f"x_scale: expected float32 [{M}, {K // WEIGHT_BLOCK}] (1 x 128 tiles), "
                         f"got {list(x_scale.shape)}")
    if tuple(w.scale.shape) != (S, N // WEIGHT_BLOCK, K // WEIGHT_BLOCK):
        raise ValueError(f"w.scale: expected float32 [{S}, {N // WEIGHT_BLOCK}, {K // WEIGHT_BLOCK}], "
                         f"got {list(w.scale.shape)}")
    if M == 0:
        return torch.zeros((0, N), dtype=out_dtype, device=xq.device)
    if use_triton(impl, xq, x_scale, w.q, w.scale, offsets):
        from ._triton_grouped_fp8 import grouped_fp8_blockwise_triton

        wq = w.q if 1 in w.q.stride()[1:] else w.q.contiguous()  # a transposed view runs as it is
        return grouped_fp8_blockwise_triton(xq.contiguous(), x_scale.contiguous().float(), wq,
                                            w.scale.float(), offsets, out_dtype)
    x = dequantize_fp8_reference(xq, x_scale, WEIGHT_BLOCK, torch.float32)
    return grouped_mm_reference(x, w.dequantize(torch.float32), offsets).to(out_dtype)


def _cuda_sm90(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.get_device_capability(t.device) >= (9, 0)


def _fast_grouped_mm_ok(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda":
        return _cuda_sm90(x) and x.dtype == torch.bfloat16
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


def _check_grouped(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> None:
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"x, w: expected [M, K] and [S, N, K], got {list(x.shape)} and {list(w.shape)}")
    if x.shape[1] != w.shape[2]:
        raise ValueError(f"w: expected K = {x.shape[1]} (x's width) in [S, N, K], got {list(w.shape)}")
    if offsets.shape != (w.shape[0],) or offsets.dtype != torch.int32:
        raise ValueError(f"offsets: expected int32 [{w.shape[0]}] (one end row per slot), "
                         f"got {offsets.dtype} {list(offsets.shape)}")


def _group_bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    ends = offsets.tolist()
    return list(zip([0] + ends[:-1], ends, strict=True))


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    out = torch.zeros((x.shape[0], w.shape[1]), dtype=x.dtype, device=x.device)
    for s, (a, b) in enumerate(_group_bounds(offsets)):
        if b > a:
            out[a:b] = x[a:b] @ w[s].T
    return out


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """[M, N]: rows of group s (offsets[s-1]..offsets[s]) times w[s].T; x [M, K], w [S, N, K]."""
    _check_grouped(x, w, offsets)
    check_impl(impl)
    if x.shape[0] == 0:
        return torch.zeros((0, w.shape[1]), dtype=x.dtype, device=x.device)
    if impl != "torch" and _fast_grouped_mm_ok(x):
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
    if impl == "triton":
        raise RuntimeError("grouped_mm: no fast grouped GEMM for this device/dtype "
                           f"({x.device}, {x.dtype}); use impl='auto' or 'torch'")
    return grouped_mm_reference(x, w, offsets)


def scaled_grouped_mm(xq: torch.Tensor, x_scale: torch.Tensor, w: FP8Weights, offsets: torch.Tensor,
                      out_dtype: torch.dtype = torch.bfloat16, fast_accum: bool = True,
                      impl: str = "auto") -> torch.Tensor:
    """[M, N] out_dtype: FP8 rows xq [M, K] with row scales x_scale [M] times FP8 weights, per group."""
    _check_grouped(xq, w.q, offsets)
    check_impl(impl)
    if xq.dtype != FP8_DTYPE or w.q.dtype != FP8_DTYPE:
        raise ValueError(f"xq, w.q: expected {FP8_DTYPE}, got {xq.dtype} and {w.q.dtype}")
    if x_scale.shape != (xq.shape[0],):
        raise ValueError(f"x_scale: expected float32 [{xq.shape[0]}], got {list(x_scale.shape)}")
    if xq.shape[0] == 0:
        return torch.zeros((0, w.q.shape[1]), dtype=out_dtype, device=xq.device)
    if impl != "torch" and hasattr(torch, "_scaled_grouped_mm") and _cuda_sm90(xq):
        return torch._scaled_grouped_mm(xq, w.q.transpose(-2, -1), x_scale.contiguous(), w.scale,
                                        offs=offsets, out_dtype=out_dtype, use_fast_accum=fast_accum)
    if impl == "triton":
        raise RuntimeError(f"scaled_grouped_mm: needs CUDA SM90+ (torch._scaled_grouped_mm), got {xq.device}")
    x = dequantize_fp8_reference(xq, x_scale[:, None], None, torch.float32)
    S, N, K = w.q.shape
    wf = dequantize_fp8_reference(w.q.reshape(S * N, K), w.scale.reshape(S * N, 1), None, torch.float32)
    return grouped_mm_reference(x, wf.view(S, N, K), offsets).to(out_dtype)


def swiglu_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor,
                   impl: str = "auto") -> torch.Tensor:
    """[M, H]: SwiGLU expert of each row's slot; x [M, H], w13 [S, 2F, H], w2 [S, H, F], offsets int32 [S]."""
    if w13.shape[1] % 2 or w2.shape[2] * 2 != w13.shape[1]:
        raise ValueError(f"w13, w2: expected [S, 2F, H], [S, H, F]; got {list(w13.shape)}, {list(w2.shape)}")
    h = grouped_mm(x, w13, offsets, impl)
    gate, up = h.chunk(2, dim=-1)
    return grouped_mm(F.silu(gate) * up, w2, offsets, impl)


def swiglu_experts_fp8(x: torch.Tensor, w13: FP8Weights, w2: FP8Weights, offsets: torch.Tensor,
                       fast_accum: bool = True, impl: str = "auto") -> torch.Tensor:
    """[M, H] bf16: `swiglu_experts` with FP8 GEMMs (activations quantised rowwise on the fly).

    Feed it groups padded to multiples of 16 rows (`build_expert_layout(..., align=16)`), as torchao and
    torchtitan do for `torch._scaled_grouped_mm`; that is the configuration tested on the GPU.
    """
    xq, xs = quantize_fp8(x, tile=None, impl="torch" if impl == "torch" else "auto")
    h = scaled_grouped_mm(xq, xs[:, 0], w13, offsets, torch.bfloat16, fast_accum, impl)
    gate, up = h.chunk(2, dim=-1)
    a = F.silu(gate.float()) * up.float()
    aq, as_ = quantize_fp8(a, tile=None, impl="torch" if impl == "torch" else "auto")
    return scaled_grouped_mm(aq, as_[:, 0], w2, offsets, torch.bfloat16, fast_accum, impl)
