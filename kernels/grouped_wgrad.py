"""The weight gradient of a grouped linear layer: per group, a [N, M_g] x [M_g, K] product over the group's rows.

Notation as in `experts.py`: M expert-input rows grouped by local slot (`offsets` int32 [S] group ends), K the
layer's input width, N its output width. For y = x @ w[s].T on the rows of slot s, with output gradient dy:

    grouped_wgrad(dy [M, N], x [M, K], offsets)  -> dw [S, N, K],  dw[s] = dy_s^T @ x_s

FP8 (the weight-gradient operands are quantised along M, the dimension the product reduces; `quantize_fp8_cols`
and `quantize_fp8_group_cols` return them transposed, [N, M] and [K, M], contiguous along M):

    blockwise (DeepSeek-V3): one scale per 128 x 1 tile (128 rows, one column), tiles aligned to absolute row
        multiples of 128 (a tile may hold rows of two groups: it is still one scale);
        scaled_grouped_wgrad_blockwise(dyT_q, dyT_s [N, M/128], xT_q, xT_s [K, M/128], offsets)
    rowwise (torchao's MoE recipe): one scale per (group, column) over the group's rows;
        scaled_grouped_wgrad_rowwise(dyT_q, dy_s [S, N], xT_q, x_s [S, K], offsets)

Fast paths: `torch._grouped_mm` for bf16 where it runs (CUDA SM90+; CPU), our Triton kernel
(`_triton_grouped_wgrad.py`) for bf16 elsewhere and for the blockwise FP8 product, `torch._scaled_grouped_mm`
(CUDA SM90+) for rowwise FP8. Each has the per-group loop below as its reference. Groups without rows get
zeros; rows past offsets[-1] are ignored.
"""

from __future__ import annotations

import torch

from ._backend import check_impl, use_triton
from .experts import _cuda_sm90, _group_bounds
from .fp8 import FP8_DTYPE, FP8_MAX, dequantize_fp8_reference, num_tiles, quantize_fp8

__all__ = [
    "grouped_wgrad",
    "quantize_fp8_cols",
    "quantize_fp8_dual",
    "quantize_fp8_group_cols",
    "scaled_grouped_wgrad_blockwise",
    "scaled_grouped_wgrad_rowwise",
]

TILE_ROWS = 128
_TINY = 1e-30


def _check(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, transposed: bool) -> None:
    m_dim = 1 if transposed else 0
    if a.dim() != 2 or b.dim() != 2 or a.shape[m_dim] != b.shape[m_dim]:
        want = "[N, M] and [K, M]" if transposed else "[M, N] and [M, K]"
        raise ValueError(f"operands: expected {want} with the same M, got {list(a.shape)} and {list(b.shape)}")
    if offsets.dim() != 1 or offsets.dtype != torch.int32:
        raise ValueError(f"offsets: expected int32 [S] (one end row per slot), got {offsets.dtype} "
                         f"{list(offsets.shape)}")


def grouped_wgrad_reference(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    out = torch.zeros((offsets.shape[0], dy.shape[1], x.shape[1]), dtype=acc, device=dy.device)
    for s, (a, b) in enumerate(_group_bounds(offsets)):
        if b > a:
            out[s] = dy[a:b].to(acc).T @ x[a:b].to(acc)
    return out.to(dy.dtype)


def _aligned(*ts: torch.Tensor) -> bool:
    """Strides the library grouped GEMMs take: every non-unit stride a multiple of 16 bytes."""
    return all(all(st == 1 or (st * t.element_size()) % 16 == 0 for st in t.stride()) for t in ts)


def _library_ok(dy: torch.Tensor, x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or not _aligned(dy.T, x):
        return False
    if dy.device.type == "cuda":
        return _cuda_sm90(dy) and dy.dtype == torch.bfloat16
    return dy.device.type == "cpu" and dy.dtype in (torch.float32, torch.bfloat16)


def grouped_wgrad(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """[S, N, K] in dy's dtype: dw[s] = dy[rows of s]^T @ x[rows of s]; dy [M, N], x [M, K], offsets int32 [S].

    impl "auto": `torch._grouped_mm` where it runs (CUDA SM90+ bf16, CPU), else the Triton kernel where Triton
    runs, else the reference; "triton": the Triton kernel; "torch": the reference.
    """
    _check(dy, x, offsets, transposed=False)
    check_impl(impl)
    if dy.dtype != x.dtype:
        raise ValueError(f"x: expected dy's dtype {dy.dtype}, got {x.dtype}")
    if dy.shape[0] == 0 or offsets.shape[0] == 0:
        return torch.zeros((offsets.shape[0], dy.shape[1], x.shape[1]), dtype=dy.dtype, device=dy.device)
    if impl == "auto" and _library_ok(dy, x) and (dy.device.type == "cuda" or not use_triton("auto", dy)):
        return torch._grouped_mm(dy.T, x, offs=offsets)
    if dy.dtype != torch.float64 and use_triton(impl, dy, x, offsets):
        from ._triton_grouped_wgrad import grouped_wgrad_triton

        return grouped_wgrad_triton(dy, x, offsets, dy.dtype)
    return grouped_wgrad_reference(dy, x, offsets)


def quantize_fp8_cols(x: torch.Tensor, tile: int = TILE_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, N] quantised along M in 128 x 1 tiles: (qT float8 [N, M], scales float32 [N, ceil(M/128)]),
    x[m, n] ~= qT[n, m] * scales[n, m // 128]."""
    return quantize_fp8(x.T.contiguous(), tile)


def quantize_fp8_dual(x: torch.Tensor, impl: str = "auto") -> tuple[torch.Tensor, ...]:
    """Both blockwise orientations of x [M, N] from one read: (q [M, N], scales [M, N/128]) in 1 x 128 tiles, as
    `quantize_fp8(x, 128)`, and (qT [N, M], scalesT [N, M/128]) in 128 x 1 tiles, as `quantize_fp8_cols(x)`."""
    if x.dim() != 2:
        raise ValueError(f"x: expected shape [M, N], got {list(x.shape)}")
    if x.numel() and use_triton(impl, x):
        from ._triton_fp8_train import quantize_dual_triton

        return quantize_dual_triton(x)
    return (*quantize_fp8(x, TILE_ROWS, impl="torch"), *quantize_fp8(x.T.contiguous(), TILE_ROWS, impl="torch"))


def quantize_fp8_group_cols(x: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, N] with one scale per (group, column) over the group's rows: (qT float8 [N, M], scales float32
    [S, N]), x[m, n] ~= qT[n, m] * scales[group of m, n]. Rows past offsets[-1] get code 0."""
    M, N = x.shape
    S = offsets.shape[0]
    group = torch.searchsorted(offsets.to(torch.int64), torch.arange(M, device=x.device), right=True)  # [M]
    xf = x.float().abs()
    amax = torch.zeros((S + 1, N), dtype=torch.float32, device=x.device)
    amax.scatter_reduce_(0, group[:, None].expand(M, N), xf, "amax")
    scales = amax[:S].clamp(min=_TINY) / FP8_MAX
    inv = torch.cat([1.0 / scales, torch.zeros((1, N), device=x.device)])  # rows past the last group -> 0
    q = (x.float() * inv[group]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    # torch._scaled_grouped_mm wants every row stride a multiple of 16 bytes, and M (rows padded per group to 16,
    # plus the other groups' rows) need not be one: Mixtral's 32768 + 8 x 15 crashed. Pad the storage, not M.
    qT = torch.zeros((N, -(-M // 16) * 16), dtype=FP8_DTYPE, device=x.device)[:, :M]
    qT.copy_(q.T)
    return qT, scales


def _dequant_cols_blockwise(qT: torch.Tensor, sT: torch.Tensor) -> torch.Tensor:
    return dequantize_fp8_reference(qT, sT, TILE_ROWS, torch.float32).T


def _check_fp8_operands(aT: torch.Tensor, bT: torch.Tensor, a_s: torch.Tensor, b_s: torch.Tensor,
                        a_want: tuple[int, ...], b_want: tuple[int, ...]) -> None:
    if aT.dtype != FP8_DTYPE or bT.dtype != FP8_DTYPE:
        raise ValueError(f"dyT_q, xT_q: expected {FP8_DTYPE}, got {aT.dtype} and {bT.dtype}")
    if tuple(a_s.shape) != a_want or tuple(b_s.shape) != b_want:
        raise ValueError(f"scales: expected float32 {list(a_want)} and {list(b_want)}, "
                         f"got {list(a_s.shape)} and {list(b_s.shape)}")


def scaled_grouped_wgrad_blockwise(dyT_q: torch.Tensor, dyT_s: torch.Tensor, xT_q: torch.Tensor,
                                   xT_s: torch.Tensor, offsets: torch.Tensor,
                                   out_dtype: torch.dtype = torch.float32, impl: str = "auto") -> torch.Tensor:
    """[S, N, K] out_dtype from FP8 operands quantised along M in 128 x 1 tiles (`quantize_fp8_cols`):
    dyT_q [N, M], dyT_s [N, M/128], xT_q [K, M], xT_s [K, M/128]."""
    _check(dyT_q, xT_q, offsets, transposed=True)
    check_impl(impl)
    M = dyT_q.shape[1]
    nt = num_tiles(M, TILE_ROWS)
    _check_fp8_operands(dyT_q, xT_q, dyT_s, xT_s, (dyT_q.shape[0], nt), (xT_q.shape[0], nt))
    S, N, K = offsets.shape[0], dyT_q.shape[0], xT_q.shape[0]
    if M == 0 or S == 0:
        return torch.zeros((S, N, K), dtype=out_dtype, device=dyT_q.device)
    if use_triton(impl, dyT_q, xT_q, dyT_s, xT_s, offsets):
        from ._triton_grouped_wgrad import grouped_wgrad_triton

        return grouped_wgrad_triton(dyT_q.contiguous(), xT_q.contiguous(), offsets, out_dtype,
                                    dyT_s.float().contiguous(), xT_s.float().contiguous(), transposed=True)
    return grouped_wgrad_reference(_dequant_cols_blockwise(dyT_q, dyT_s), _dequant_cols_blockwise(xT_q, xT_s),
                                   offsets).to(out_dtype)


def scaled_grouped_wgrad_rowwise(dyT_q: torch.Tensor, dy_s: torch.Tensor, xT_q: torch.Tensor, x_s: torch.Tensor,
                                 offsets: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                                 fast_accum: bool = True, impl: str = "auto") -> torch.Tensor:
    """[S, N, K] out_dtype from FP8 operands with one scale per (group, column) (`quantize_fp8_group_cols`):
    dyT_q [N, M], dy_s [S, N], xT_q [K, M], x_s [S, K]. Groups padded to 16 rows on CUDA (as torchao)."""
    _check(dyT_q, xT_q, offsets, transposed=True)
    check_impl(impl)
    S, N, K = offsets.shape[0], dyT_q.shape[0], xT_q.shape[0]
    _check_fp8_operands(dyT_q, xT_q, dy_s, x_s, (S, N), (S, K))
    if dyT_q.shape[1] == 0 or S == 0:
        return torch.zeros((S, N, K), dtype=out_dtype, device=dyT_q.device)
    if impl != "torch" and hasattr(torch, "_scaled_grouped_mm") and _cuda_sm90(dyT_q):
        # torch's grouped FP8 GEMM writes bf16 only
        return torch._scaled_grouped_mm(dyT_q, xT_q.T, dy_s.float().contiguous().view(-1),
                                        x_s.float().contiguous().view(-1), offs=offsets, out_dtype=torch.bfloat16,
                                        use_fast_accum=fast_accum).to(out_dtype)
    if impl == "triton":
        raise RuntimeError(f"scaled_grouped_wgrad_rowwise: needs CUDA SM90+ (torch._scaled_grouped_mm), "
                           f"got {dyT_q.device}")
    out = torch.zeros((S, N, K), dtype=torch.float32, device=dyT_q.device)
    for s, (a, b) in enumerate(_group_bounds(offsets)):
        if b > a:
            dy_g = dyT_q[:, a:b].float() * dy_s[s, :, None]
            x_g = xT_q[:, a:b].float() * x_s[s, :, None]
            out[s] = dy_g @ x_g.T
    return out.to(out_dtype)
