"""Checks of the backward fast paths (Triton kernels; the symmetric-memory exchange's backward) against the torch
references and the dense autograd reference.

Plain functions taking a device, shared by `interpret_checks_bwd.py` (CPU, TRITON_INTERPRET=1, small sizes) and
`tests/gpu/test_train_gpu.py` (CUDA). Tolerances: float32 sums 1e-5 relative to the largest entry (the
interpreter and the GPU add in another order); bf16 results one bf16 rounding (rtol 1e-2); FP8 products equal
the torch reference's float32 sums of the same codes (1e-5).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from grad_cases import dense_moe
from kernel_cases import random_phy2log, random_routing

from expertmesh.kernels import (
    ExpertMap,
    SymmMemExchange,
    build_expert_layout,
    build_layout,
    quantize_fp8,
    quantize_weights_fp8_blockwise,
    scaled_grouped_mm_blockwise,
    swiglu_experts,
)
from expertmesh.kernels.experts import quantize_weights_fp8_blockwise_pair
from expertmesh.kernels.grouped_wgrad import grouped_wgrad, quantize_fp8_cols, scaled_grouped_wgrad_blockwise
from expertmesh.kernels.permute import unpermute_combine_backward


# Hopper's FP8 tensor-core MMA adds the products of a k block with fewer bits than float32 (as the forward
# kernel's GPU tests found): on a GPU, FP8 GEMMs are held to 2e-3 of the largest output instead of 1e-5.
def _fp8_rel(device: str) -> float:
    return 2e-3 if torch.device(device).type == "cuda" else 1e-5


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    scale = float(want.abs().max()) if want.numel() else 0.0
    err = float((got.double().cpu() - want.double().cpu()).abs().max()) if want.numel() else 0.0
    assert err <= rel * scale + 1e-6, f"error {err} > {rel} x {scale}"


def check_unpermute_combine_backward(device: str, N: int, K: int, H: int, dtype: torch.dtype,
                                     weighted: bool) -> None:
    gen = torch.Generator().manual_seed(N * 3 + K)
    M = 2 * N * K + 1
    pos = torch.randperm(M, generator=gen)[: N * K].view(N, K)
    pos[torch.rand(N, K, generator=gen) < 0.3] = -1
    y = torch.randn(M, H, generator=gen).to(device, dtype)
    g = torch.randn(N, H, generator=gen).to(device, dtype)
    w = torch.rand(N, K, generator=gen).to(device) if weighted else None
    pos = pos.to(device)
    fast = unpermute_combine_backward(g, y, pos, w, impl="triton" if N else "auto")
    ref = unpermute_combine_backward(g, y, pos, w, impl="torch")
    rel = 1e-5 if dtype == torch.float32 else 1e-2
    _close(fast[0], ref[0], rel)
    _close(fast[1], ref[1], rel)


def check_grouped_wgrad(device: str, counts: list[int], N: int, K: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(sum(counts) + N)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32).to(device)
    M = sum(counts) + 3  # rows past the last group are ignored
    dy = torch.randn(M, N, generator=gen).to(device, dtype)
    x = torch.randn(M, K, generator=gen).to(device, dtype)
    fast = grouped_wgrad(dy, x, offsets, impl="triton")
    ref = grouped_wgrad(dy, x, offsets, impl="torch")
    _close(fast, ref, 1e-5 if dtype == torch.float32 else 1e-2)
    for s, c in enumerate(counts):
        if c == 0:
            assert not fast[s].any()


def check_fp8_wgrad_blockwise(device: str, counts: list[int], N: int, K: int) -> None:
    """The FP8 wgrad kernel equals the reference on the same codes; groups straddle 128-row scale tiles."""
    gen = torch.Generator().manual_seed(N + K + len(counts))
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32).to(device)
    M = sum(counts)
    dy = torch.randn(M, N, generator=gen).to(device)
    x = torch.randn(M, K, generator=gen).to(device)
    ops = (*quantize_fp8_cols(dy), *quantize_fp8_cols(x), offsets)
    fast = scaled_grouped_wgrad_blockwise(*ops, impl="triton")
    ref = scaled_grouped_wgrad_blockwise(*ops, impl="torch")
    _close(fast, ref, _fp8_rel(device))
    exact = grouped_wgrad(dy.double(), x.double(), offsets, impl="torch")
    _close(ref, exact, 0.1)  # the format itself: E4M3 operands within 2^-4


def check_fp8_dgrad_transposed_weights(device: str, counts: list[int], N: int, K: int) -> None:
    """dx = dy @ w through the forward kernel, reading the 128 x 128 blocks transposed (a view, no copy) and from
    the contiguous transposed codes that `quantize_weights_fp8_blockwise_pair` writes in the same pass."""
    gen = torch.Generator().manual_seed(N * K)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32).to(device)
    w32 = torch.randn(len(counts), N, K, generator=gen).to(device)
    w = quantize_weights_fp8_blockwise(w32)
    wb, wbT = quantize_weights_fp8_blockwise_pair(w32)
    assert wbT.q.is_contiguous() and wbT.q.shape == (len(counts), K, N)
    assert torch.equal(wbT.q.float(), w.t().q.float()) and torch.equal(wbT.scale, w.t().scale)
    assert torch.equal(wb.q.float(), w.q.float()) and torch.equal(wb.scale, w.scale)
    dy = torch.randn(sum(counts), N, generator=gen).to(device)
    q, s = quantize_fp8(dy, 128)
    ref = scaled_grouped_mm_blockwise(q, s, w.t(), offsets, torch.float32, impl="torch")
    for wt in (w.t(), wbT):
        _close(scaled_grouped_mm_blockwise(q, s, wt, offsets, torch.float32, impl="triton"), ref, _fp8_rel(device))


def symm_loopback_backward(device: str, G: int, k: int, E: int, S: int, tokens: list[int], fp8: bool,
                           H: int = 128, F: int = 32) -> None:
    """G ranks of `SymmMemExchange.loopback`, phase by phase: forward, then combine's backward (a dispatch of
    output gradients), the experts' backward, dispatch's backward (a combine of row and weight gradients);
    every rank's gradients of x and of its top-k weights equal the dense float64 reference."""
    rng = np.random.default_rng(G * 10 + k)
    gen = torch.Generator().manual_seed(G + 7 * k)
    phy2log = random_phy2log(rng, E, G, S)
    emap = ExpertMap.from_phy2log(phy2log, G, 1, E, device)
    w13 = torch.randn(E, 2 * F, H, generator=gen, dtype=torch.float64) / H ** 0.5
    w2 = torch.randn(E, H, F, generator=gen, dtype=torch.float64) / F ** 0.5
    data = []
    for r in range(G):
        ids, w = random_routing(gen, tokens[r], E, k, skew=True)
        data.append((torch.randn(tokens[r], H, generator=gen, dtype=torch.float64), ids, w,
                     torch.randn(tokens[r], H, generator=gen, dtype=torch.float64)))
    exs = SymmMemExchange.loopback(G, max(max(tokens), 1), H, k, torch.float32, fp8, device)
    layouts = [build_layout(ids.to(device), w.to(device), emap, r) for r, (_, ids, w, _) in enumerate(data)]
    for r in range(G):
        exs[r].dispatch_send(data[r][0].to(device, torch.float32), layouts[r])
    received = [ex.dispatch_recv() for ex in exs]
    # Each receiver's experts with torch autograd: rows (dequantised) -> expert outputs y.
    rows, ys, els = [], [], []
    for r in range(G):
        rec = received[r]
        el = build_expert_layout(rec.slots, S, rec.valid)
        x_r = (rec.x.float() * rec.scales.repeat_interleave(128, 1) if fp8 else rec.x.clone()).requires_grad_()
        local = emap.slot_expert[r].cpu()
        idx = el.row_index
        xe = torch.where(idx[:, None] >= 0, x_r[idx.clamp(min=0)], 0.0)  # permute, differentiable
        ys.append(swiglu_experts(xe, w13[local].to(device, torch.float32), w2[local].to(device, torch.float32),
                                 el.offsets, impl="torch"))
        rows.append(x_r)
        els.append(el)
    weights = [rec.weights.clone() for rec in received]
    counts = [rec.counts.clone() for rec in received]
    # Backward, phase 1: combine's backward dispatches each token's output gradient to its copies.
    for r in range(G):
        exs[r].combine_backward_send(data[r][3].to(device, torch.float32), layouts[r])
    grad_rows, grad_w = [], []
    for r in range(G):
        g_red = exs[r].combine_backward_recv()
        g_y, g_w = unpermute_combine_backward(g_red, ys[r].detach(), els[r].pair_pos, weights[r])
        (g_x,) = torch.autograd.grad(ys[r], rows[r], g_y)
        grad_rows.append(g_x.to(torch.float32))
        grad_w.append(g_w)
    # Phase 2: dispatch's backward combines row and weight gradients back to the sources.
    for r in range(G):
        exs[r].dispatch_backward_send(grad_rows[r], grad_w[r], dataclasses.replace(received[r], counts=counts[r]))
    for r in range(G):
        gx, gw = exs[r].dispatch_backward_recv(layouts[r])
        x, ids, w, g = data[r]
        xr, wr = x.clone().requires_grad_(), w.double().requires_grad_()
        want = torch.autograd.grad(dense_moe(xr, ids, wr, w13, w2), (xr, wr), g) if x.shape[0] else (x, wr)
        rel = 0.1 if fp8 else 1e-4
        _close(gx, want[0], rel)
        _close(gw, want[1], rel)
        assert gx.shape == x.shape and gw.shape == w.shape



def check_fp8_training_quantisers(device: str, M: int, N: int) -> None:
    """The dual quantiser equals quantize_fp8 in both orientations, and the weight-block quantiser the per-block
    reference, bit for bit (codes and scales)."""
    from expertmesh.kernels.fp8 import quantize_fp8_reference
    from expertmesh.kernels.grouped_wgrad import quantize_fp8_dual

    gen = torch.Generator().manual_seed(M + N)
    x = (torch.randn(M, N, generator=gen) * torch.rand(M, 1, generator=gen) * 10).to(device, torch.bfloat16)
    got = quantize_fp8_dual(x)
    want = (*quantize_fp8_reference(x, 128), *quantize_fp8_reference(x.T.contiguous(), 128))
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        if a.element_size() != 1:
            assert torch.equal(a, b)  # the scales, bit for bit
            continue
        # Codes compared as values (a GPU's -0 equals +0). The GPU multiplies by the scale's reciprocal where the
        # reference divides: at an exact rounding tie (seen 3 times in 8.4 M codes) that is one E4M3 step apart.
        a, b = a.float(), b.float()
        step = torch.maximum(b.abs() * 2**-3, torch.full_like(b, 2**-9))
        assert bool(((a - b).abs() <= step).all()) and int((a != b).sum()) <= max(1, a.numel() // 100_000)
    w = torch.randn(2, 256, 128, generator=gen).to(device, torch.bfloat16)
    fast = quantize_weights_fp8_blockwise(w)  # the Triton path here
    blocks = w.float().view(2, 2, 128, 1, 128).permute(0, 1, 3, 2, 4).reshape(4, 128 * 128)
    q, s = quantize_fp8_reference(blocks, None)
    assert torch.equal(fast.scale.reshape(-1).cpu(), s.reshape(-1).cpu())
    assert torch.equal(fast.q.float().cpu(),
                       q.view(2, 2, 1, 128, 128).permute(0, 1, 3, 2, 4).reshape(2, 256, 128).float().cpu())
