"""Permute, unpermute-combine, FP8 and grouped GEMM: dispatch point vs reference vs a naive loop.

On a CPU without the interpreter the dispatch point of the Triton ops is the reference itself; the same
checks run against the Triton kernels in `interpret_checks.py` (TRITON_INTERPRET=1) and `tests/gpu/`.
Tolerances: gathers exact; sums of float32 rows 1e-6 relative; FP8 round trip 2^-4 relative per element
(+ one subnormal step of its tile); grouped GEMM float32 1e-5.

Run: pytest tests/kernels/test_kernels_ops.py
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import TOKEN_COUNTS

from expertmesh.kernels import (
    FP8_DTYPE,
    dequantize_fp8,
    grouped_mm,
    permute,
    permute_dequant,
    quantize_fp8,
    quantize_weights_fp8,
    quantize_weights_fp8_blockwise,
    scaled_grouped_mm,
    scaled_grouped_mm_blockwise,
    swiglu_experts,
    swiglu_experts_fp8,
    unpermute_combine,
)
from expertmesh.kernels._scan import cumsum_first, cumsum_last
from expertmesh.kernels.experts import grouped_mm_reference
from expertmesh.kernels.fp8 import dequantize_fp8_reference, quantize_fp8_reference
from expertmesh.kernels.permute import permute_reference, unpermute_combine_reference

IMPLS = ["auto", "torch"]


def _index(gen, n_src, m):
    return torch.randint(-1, max(n_src, 1), (m,), generator=gen) if n_src else torch.full((m,), -1)


@pytest.mark.parametrize("N", TOKEN_COUNTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, FP8_DTYPE])
@pytest.mark.parametrize("impl", IMPLS)
def test_permute_matches_loop(N, dtype, impl):
    gen = torch.Generator().manual_seed(N)
    x = torch.randn(N, 96, generator=gen).to(dtype)
    index = _index(gen, N, 2 * N + 3)
    out = permute(x, index, impl=impl)
    assert out.dtype == dtype and out.shape == (index.numel(), 96)
    raw = out.view(torch.uint8) if dtype == FP8_DTYPE else out
    xr = x.view(torch.uint8) if dtype == FP8_DTYPE else x
    for m, i in enumerate(index.tolist()):
        assert torch.equal(raw[m], xr[i] if i >= 0 else torch.zeros_like(raw[m]))
    ref = permute_reference(x, index)
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("N", TOKEN_COUNTS)
@pytest.mark.parametrize("K", [1, 8])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
def test_unpermute_combine_matches_loop(N, K, weighted, impl):
    gen = torch.Generator().manual_seed(N + K)
    M = 3 * N + 1
    y = torch.randn(M, 80, generator=gen)
    pos = torch.randint(-1, M, (N, K), generator=gen)
    w = torch.rand(N, K, generator=gen) if weighted else None
    out = unpermute_combine(y, pos, w, impl=impl)
    want = torch.zeros(N, 80, dtype=torch.float64)
    for n in range(min(N, 64)):
        for j in range(K):
            if pos[n, j] >= 0:
                want[n] += (float(w[n, j]) if weighted else 1.0) * y[pos[n, j]].double()
    torch.testing.assert_close(out[:64].double(), want[:64], rtol=1e-6, atol=1e-6)
    ref = unpermute_combine_reference(y, pos, w, torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_unpermute_combine_bf16_accumulates_in_float32():
    y = torch.full((8, 16), 1.0 / 3).to(torch.bfloat16)
    out = unpermute_combine(y, torch.arange(8).view(1, 8), None, out_dtype=torch.float32)
    assert torch.allclose(out, y.float().sum(0, keepdim=True), rtol=0, atol=1e-6)


@pytest.mark.parametrize("N", TOKEN_COUNTS)
@pytest.mark.parametrize("H,tile", [(256, 128), (300, 128), (7168, 128), (96, None)])
@pytest.mark.parametrize("impl", IMPLS)
def test_fp8_round_trip_and_scales(N, H, tile, impl):
    if N == 4096 and H == 7168:
        N = 257  # keep the CPU test short; the shape still covers 56 tiles per row
    gen = torch.Generator().manual_seed(N + H)
    # Rows spanning 12 orders of magnitude, and an all-zero row.
    x = torch.randn(N, H, generator=gen) * torch.logspace(-6, 6, max(N, 1))[:N, None]
    if N:
        x[N // 2] = 0
    q, s = quantize_fp8(x, tile, impl=impl)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32
    width = H if tile is None else tile
    nt = -(-H // width)
    assert s.shape == (N, nt)
    # Every tile's amax maps to the largest E4M3 value.
    tiles = torch.nn.functional.pad(x, (0, nt * width - H)).view(N, nt, width)
    amax = tiles.abs().amax(-1)
    nz = amax > 0
    torch.testing.assert_close(s[nz], amax[nz] / 448.0, rtol=1e-6, atol=0)
    back = dequantize_fp8(q, s, tile, torch.float32, impl=impl)
    step = torch.repeat_interleave(s, width, dim=1)[:, :H] * 2.0 ** -9
    assert torch.all((back - x).abs() <= x.abs() * 2.0 ** -4 + step)
    qr, sr = quantize_fp8_reference(x, tile)
    assert torch.equal(s, sr) and torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
    assert torch.equal(back, dequantize_fp8_reference(qr, sr, tile, torch.float32))


@pytest.mark.parametrize("N", [0, 1, 33])
@pytest.mark.parametrize("impl", IMPLS)
def test_permute_dequant_equals_dequant_of_permute(N, impl):
    gen = torch.Generator().manual_seed(N)
    q, s = quantize_fp8(torch.randn(N, 384, generator=gen))
    index = _index(gen, N, N + 5)
    out = permute_dequant(q, s, index, out_dtype=torch.float32, impl=impl)
    want = dequantize_fp8(permute(q, index), permute(s, index), out_dtype=torch.float32)
    assert torch.equal(out, want)


def _offsets(counts):
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("counts", [[0, 0, 0], [1, 0, 0], [5, 0, 28], [0, 33, 0, 7], [1024, 1024, 2048]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_matches_loop(counts, dtype):
    gen = torch.Generator().manual_seed(sum(counts))
    S, K, N = len(counts), 64, 48
    x = torch.randn(sum(counts), K, generator=gen).to(dtype)
    w = torch.randn(S, N, K, generator=gen).to(dtype)
    offsets = _offsets(counts)
    out = grouped_mm(x, w, offsets)
    ref = grouped_mm_reference(x, w, offsets)
    start = 0
    for s, c in enumerate(counts):
        if c:
            want = x[start:start + c].double() @ w[s].double().T
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(out[start:start + c].double(), want, rtol=tol, atol=tol * 8)
        start += c
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_swiglu_experts_and_fp8_variant():
    gen = torch.Generator().manual_seed(3)
    counts = [7, 0, 33, 1]
    S, H, F = len(counts), 128, 64
    x = torch.randn(sum(counts), H, generator=gen)
    w13 = torch.randn(S, 2 * F, H, generator=gen) / H ** 0.5
    w2 = torch.randn(S, H, F, generator=gen) / F ** 0.5
    offsets = _offsets(counts)
    y = swiglu_experts(x, w13, w2, offsets)
    start = 0
    for s, c in enumerate(counts):
        for r in range(start, start + c):
            h = w13[s].double() @ x[r].double()
            want = w2[s].double() @ (torch.nn.functional.silu(h[:F]) * h[F:])
            torch.testing.assert_close(y[r].double(), want, rtol=1e-5, atol=1e-5)
        start += c
    y8 = swiglu_experts_fp8(x, quantize_weights_fp8(w13), quantize_weights_fp8(w2), offsets)
    assert y8.dtype == torch.bfloat16
    err = (y8.float() - y).abs().max() / y.abs().max()
    assert err < 0.1  # two FP8 GEMMs: ~2^-4 relative per operand


def test_scaled_grouped_mm_reference_scales():
    # Powers of two survive FP8 exactly, so the scaled product must equal the float one exactly.
    x = torch.tensor([[1.0, 2.0], [4.0, 0.5]])
    w = torch.tensor([[[1.0, 0.25]], [[2.0, 8.0]]])  # S=2, N=1, K=2
    xq, xs = quantize_fp8(x, tile=None)
    out = scaled_grouped_mm(xq, xs[:, 0], quantize_weights_fp8(w), _offsets([1, 1]), torch.float32)
    assert out.tolist() == [[1.5], [12.0]]


def test_blockwise_fp8_grouped_mm_matches_a_per_row_loop_and_checks_its_inputs():
    """DeepSeek-V3's format (1 x 128 activation tiles, 128 x 128 weight blocks) at the dispatch point, against
    a loop over rows and k-blocks that applies each block's two scales to its own partial product."""
    gen = torch.Generator().manual_seed(3)
    counts, N, K = [2, 0, 5], 256, 384
    x = torch.randn(sum(counts), K, generator=gen) * torch.logspace(-2, 2, K)
    w = torch.randn(len(counts), N, K, generator=gen)
    xq, xs = quantize_fp8(x, 128)
    wb = quantize_weights_fp8_blockwise(w)
    out = scaled_grouped_mm_blockwise(xq, xs, wb, _offsets(counts), torch.float32)
    group = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    want = torch.zeros(sum(counts), N)
    for r in range(sum(counts)):
        g = int(group[r])
        for b in range(K // 128):
            part = wb.q[g, :, b * 128:(b + 1) * 128].float() @ xq[r, b * 128:(b + 1) * 128].float()
            want[r] += part * xs[r, b] * wb.scale[g, :, b].repeat_interleave(128)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    step = wb.scale.repeat_interleave(128, 1).repeat_interleave(128, 2) * 2.0 ** -9  # smallest E4M3 step
    assert torch.all((wb.dequantize() - w).abs() <= w.abs() * 2.0 ** -4 * 1.001 + step)
    with pytest.raises(ValueError, match="x_scale: expected float32 \\[7, 3\\]"):
        scaled_grouped_mm_blockwise(xq, xs[:, :2], wb, _offsets(counts))
    with pytest.raises(ValueError, match="multiples of 128"):
        quantize_weights_fp8_blockwise(torch.zeros(1, 100, 128))


def test_op_inputs_are_checked():
    with pytest.raises(ValueError, match="index"):
        permute(torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="weights"):
        unpermute_combine(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="scales"):
        dequantize_fp8(torch.zeros(2, 256).to(FP8_DTYPE), torch.ones(2, 1))
    with pytest.raises(ValueError, match="offsets"):
        grouped_mm(torch.zeros(2, 4), torch.zeros(3, 4, 4), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="impl"):
        permute(torch.zeros(2, 2), torch.zeros(2, dtype=torch.int64), impl="cuda")


@pytest.mark.parametrize("shape", [(0, 2), (1, 1), (33, 2), (5, 0), (4096, 3), (7, 8, 2), (1, 5, 64)])
def test_flat_scans_equal_torch_cumsum(shape):
    """The layout's prefix sums (one flat scan, then the rows' offsets taken out) equal torch.cumsum exactly."""
    x = torch.randint(0, 5, shape, generator=torch.Generator().manual_seed(sum(shape)))
    assert torch.equal(cumsum_last(x), torch.cumsum(x, dim=-1))
    if x.dim() == 2:
        assert torch.equal(cumsum_first(x), torch.cumsum(x, dim=0))

