"""Checks of the fast paths (Triton kernels, the symmetric-memory exchange's kernels) against the references.

Plain functions taking a device, shared by `interpret_checks.py` (CPU, TRITON_INTERPRET=1, small sizes)
and `tests/gpu/` (CUDA). Tolerances: gathers bit-exact; FP8 codes and scales bit-exact; float32 sums
1e-5; bfloat16 results one bf16 rounding (Triton's interpreter truncates float32 -> bfloat16, the GPU
rounds to nearest, torch rounds to nearest): rtol 1e-2.
"""

from __future__ import annotations

import numpy as np
import torch
from kernel_cases import expert_weights, fp8_moe_tolerance, naive_moe, random_phy2log, random_routing

from expertmesh.kernels import (
    FP8_DTYPE,
    ExpertMap,
    SymmMemExchange,
    build_expert_layout,
    build_layout,
    dequantize_fp8,
    expert_counts,
    permute,
    permute_dequant,
    quantize_fp8,
    quantize_weights_fp8_blockwise,
    scaled_grouped_mm_blockwise,
    swiglu_experts,
    unpermute_combine,
)
from expertmesh.kernels.exchange import FP8_TILE
from expertmesh.kernels.fp8 import silu_mul_quantize_fp8
from expertmesh.kernels.replicas import balanced_split, split_order
from expertmesh.placement import routing


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def check_permute(device: str, N: int, H: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(N * 7 + H)
    x = torch.randn(N, H, generator=gen).to(dtype).to(device)
    index = torch.randint(-1, max(N, 1), (2 * N + 3,), generator=gen).to(device)
    if N == 0:
        index.fill_(-1)
    fast = permute(x, index, impl="triton" if N else "auto")
    ref = permute(x, index, impl="torch")
    assert torch.equal(_bits(fast), _bits(ref))


def check_unpermute_combine(device: str, N: int, K: int, H: int, dtype: torch.dtype, weighted: bool) -> None:
    gen = torch.Generator().manual_seed(N + K + H)
    M = 2 * N + 1
    y = torch.randn(M, H, generator=gen).to(dtype).to(device)
    pos = torch.randint(-1, M, (N, K), generator=gen).to(device)
    w = torch.rand(N, K, generator=gen).to(device) if weighted else None
    fast = unpermute_combine(y, pos, w, impl="triton" if N else "auto")
    ref = unpermute_combine(y, pos, w, impl="torch")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(fast.float(), ref.float(), rtol=tol, atol=tol)


def check_fp8(device: str, N: int, H: int, tile: int | None) -> None:
    gen = torch.Generator().manual_seed(N + H)
    x = (torch.randn(N, H, generator=gen) * torch.logspace(-4, 4, max(N, 1))[:N, None]).to(device)
    if N > 2:
        x[1] = 0
    q, s = quantize_fp8(x, tile, impl="triton")
    qr, sr = quantize_fp8(x, tile, impl="torch")
    assert q.dtype == FP8_DTYPE and s.shape == sr.shape
    back = dequantize_fp8(q, s, tile, torch.float32, impl="triton")
    ref = dequantize_fp8(qr, sr, tile, torch.float32, impl="torch")
    if device == "cpu":  # the interpreter divides exactly, like torch: identical codes and scales
        assert torch.equal(s, sr) and torch.equal(_bits(q), _bits(qr))
    else:  # Triton's fast float32 division may move a scale by an ulp and a code by one E4M3 step
        torch.testing.assert_close(s, sr, rtol=1e-5, atol=1e-38)
    width = x.shape[1] if tile is None else tile
    step = torch.repeat_interleave(sr, width, dim=1)[:, :x.shape[1]] * 2.0 ** -9  # smallest E4M3 step
    assert torch.all((back - ref).abs() <= ref.abs() * 2.0 ** -3 + step)  # within one code of torch
    assert torch.all((back - x).abs() <= x.abs() * 2.0 ** -4 * 1.001 + step)  # the format's error bound
    assert torch.equal(back, dequantize_fp8(q, s, tile, torch.float32, impl="torch"))
    if N and tile is not None:
        index = torch.randint(-1, N, (N + 4,), generator=gen).to(device)
        torch.testing.assert_close(permute_dequant(q, s, index, tile, torch.float32, impl="triton"),
                                   permute_dequant(q, s, index, tile, torch.float32, impl="torch"),
                                   rtol=0, atol=0)


def check_silu_mul_quantize(device: str, M: int, F: int) -> None:
    """The fused SwiGLU activation + 1 x 128 quantiser against silu(gate) * up quantised by the reference."""
    gen = torch.Generator().manual_seed(M + F)
    h = (torch.randn(M, 2 * F, generator=gen) * 3).to(device, torch.bfloat16)
    if M > 2:
        h[1] = 0  # an all-zero row: tiny scale, zero codes
    q, s = silu_mul_quantize_fp8(h, FP8_TILE, impl="triton")
    qr, sr = silu_mul_quantize_fp8(h, FP8_TILE, impl="torch")
    assert q.shape == (M, F) and q.dtype == FP8_DTYPE and s.shape == sr.shape
    # exp in Triton and torch's silu may differ by an ulp: scales to 1e-5, codes within one E4M3 step
    torch.testing.assert_close(s, sr, rtol=1e-5, atol=1e-38)
    back, ref = (dequantize_fp8(a, b, FP8_TILE, torch.float32, impl="torch") for a, b in ((q, s), (qr, sr)))
    step = torch.repeat_interleave(sr, FP8_TILE, dim=1)[:, :F] * 2.0 ** -9
    assert torch.all((back - ref).abs() <= ref.abs() * 2.0 ** -3 + step)
    assert float((back != ref).float().mean()) < 0.01  # ties only: a wrong column or scale moves most codes
    gate, up = h.float().chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate) * up
    assert torch.all((back - act).abs() <= act.abs() * 2.0 ** -4 * 1.001 + step)  # the format's bound


def check_grouped_fp8_blockwise(device: str, counts: list[int], N: int, K: int, extra_rows: int = 3) -> None:
    """The Triton blockwise FP8 grouped GEMM against the dequantise-then-float32 reference: groups of the
    given sizes (empty ones included), rows past the last group left alone, float32 and bf16 outputs."""
    gen = torch.Generator().manual_seed(sum(counts) + N + K)
    S, M = len(counts), sum(counts) + extra_rows
    x = (torch.randn(M, K, generator=gen) * torch.logspace(-2, 2, K)[None, :]).to(device)
    w = (torch.randn(S, N, K, generator=gen) * 0.05).to(device)
    offsets = torch.tensor(np.cumsum(counts), dtype=torch.int32, device=device)
    xq, xs = quantize_fp8(x, 128, impl="torch")
    wb = quantize_weights_fp8_blockwise(w)
    rows = sum(counts)
    # Hopper's FP8 tensor cores add inside a 128-wide k block with fewer bits than float32 (the reason
    # DeepSeek-V3 promotes once per block, as the kernel does): ~3e-4 of the largest output on the device.
    fp32_tol = 2e-3 if device == "cuda" else 1e-4
    for out_dtype, rtol in ((torch.float32, fp32_tol), (torch.bfloat16, 1e-2)):
        got = scaled_grouped_mm_blockwise(xq, xs, wb, offsets, out_dtype, impl="triton")[:rows].float()
        want = scaled_grouped_mm_blockwise(xq, xs, wb, offsets, out_dtype, impl="torch")[:rows].float()
        assert got.shape == (rows, N)
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())
    # Small tiles and groups of 3 M-tiles: the grouped tile order's edges (a last group of fewer tiles).
    from expertmesh.kernels._triton_grouped_fp8 import grouped_fp8_blockwise_triton

    # Tiles wider than a weight scale block (256 columns: one scale per column) where N allows.
    want = scaled_grouped_mm_blockwise(xq, xs, wb, offsets, torch.float32, impl="torch")
    for block_m, block_n, group_m in ((16, 128, 3), (16, 256, 2)):
        if block_n > N:
            continue
        got = grouped_fp8_blockwise_triton(xq, xs, wb.q, wb.scale, offsets, torch.float32, block_m, block_n,
                                           group_m=group_m)
        torch.testing.assert_close(got[:rows], want[:rows], rtol=fp32_tol,
                                   atol=fp32_tol * want.abs().max().item())
    # The block format itself: dequantised weights within one E4M3 step of the originals.
    step = wb.scale.repeat_interleave(128, 1).repeat_interleave(128, 2) * 2.0 ** -9  # smallest E4M3 step
    assert torch.all((wb.dequantize() - w).abs() <= w.abs() * 2.0 ** -4 * 1.001 + step)


def symm_loopback_moe(device: str, G: int, k: int, E: int, S: int, tokens: list[int], fp8: bool,
                      dtype: torch.dtype = torch.float32, H: int = 256, F: int = 64,
                      check_tokens: int = 256, replica_rule: str = "fixed") -> None:
    """G ranks of `SymmMemExchange.loopback` in this process: every rank's output = the naive MoE sum. Under
    the balanced replica rule the ranks' counts go through the loopback's gather phases first, and every
    rank's serving GPUs must equal placement's numpy rule over all ranks' tokens (the single-process result)."""
    rng = np.random.default_rng(G * 100 + k)
    gen = torch.Generator().manual_seed(G + k + E)
    phy2log = random_phy2log(rng, E, G, S)
    emap = ExpertMap.from_phy2log(phy2log, G, 1, E, device, replica_rule)
    w13, w2 = expert_weights(gen, E, H, F)
    data = []
    for r in range(G):
        ids, weights = random_routing(gen, tokens[r], E, k, skew=True)
        data.append((torch.randn(tokens[r], H, generator=gen), ids, weights))
    cap = max(max(tokens), 1)
    exs = SymmMemExchange.loopback(G, cap, H, k, dtype, fp8, device)
    counts = None
    assert emap.balanced or replica_rule == "fixed"  # the case does replicate experts across GPUs
    if emap.balanced:
        for r in range(G):
            exs[r].gather_counts_send(expert_counts(data[r][1].to(device), E))
        counts = [ex.gather_counts_recv() for ex in exs]
        assert all(torch.equal(c, counts[0]) for c in counts)
    layouts = [build_layout(ids.to(device), w.to(device), emap, r, counts=None if counts is None else counts[r])
               for r, (_, ids, w) in enumerate(data)]
    if emap.balanced:
        all_ids = np.concatenate([d[1].numpy() for d in data])
        source = np.repeat(np.arange(G), tokens)
        want = routing.choose_balanced(all_ids, source, emap.replicas.cpu().numpy(), np.zeros(G, dtype=np.int64))
        for r in range(G):
            assert np.array_equal(layouts[r].gpus.cpu().numpy(), want[source == r])
    for r in range(G):
        exs[r].dispatch_send(data[r][0].to(device, dtype), layouts[r])
    received = [ex.dispatch_recv() for ex in exs]
    els, ys = [], []
    for r in range(G):
        rec = received[r]
        el = build_expert_layout(rec.slots, S, rec.valid)
        xe = (permute_dequant(rec.x, rec.scales, el.row_index, FP8_TILE, dtype) if fp8
              else permute(rec.x, el.row_index))
        local = emap.slot_expert[r].cpu()
        ys.append(swiglu_experts(xe, w13[local].to(device, dtype), w2[local].to(device, dtype), el.offsets))
        els.append(el)
        # Rows received from each source = what that source's layout sent here.
        want = torch.stack([layouts[s].send_counts[r] for s in range(G)])
        assert torch.equal(rec.counts, want)
    for r in range(G):
        exs[r].combine_send(ys[r], els[r], received[r])
    for r in range(G):
        out = exs[r].combine_recv(layouts[r])
        assert out.shape == data[r][0].shape
        x, ids, w = (t[:check_tokens] for t in data[r])  # the per-token loop is slow: first tokens only
        out = out[:check_tokens]
        want = naive_moe(x.to(dtype).float(), ids, w, w13.to(dtype).float(), w2.to(dtype).float())
        scale = float(want.abs().max()) if want.numel() else 0.0
        tol = fp8_moe_tolerance(want) if fp8 else (1e-4 if dtype == torch.float32 else 0.05 * scale + 1e-2)
        err = float((out.double().cpu() - want).abs().max()) if want.numel() else 0.0
        assert out.shape == x.shape and err <= tol, f"rank {r}: error {err} > {tol}"
        assert torch.equal(exs[r].last_dispatch.rows, layouts[r].send_counts)


def check_balanced_split(device: str, cases: int, max_experts: int, gpus: tuple[int, ...] = (2, 3, 8, 12, 32)) -> None:
    """The split kernel (one program, Triton) equals placement's numpy split on random hosts and totals,
    through G not a power of two and more replicated experts than one warp's lanes."""
    rng = np.random.default_rng(11)
    for _ in range(cases):
        E, G = int(rng.integers(max_experts // 2, max_experts)), int(rng.choice(gpus))
        hosts = np.zeros((E, G), dtype=bool)
        for e in range(E):
            hosts[e, rng.choice(G, int(rng.integers(1, min(G, 4) + 1)), replace=False)] = True
        totals = rng.integers(0, 5000, E)
        replicated = torch.from_numpy(np.flatnonzero(hosts.sum(1) > 1)).to(device)
        got = balanced_split(torch.from_numpy(totals).to(device), torch.from_numpy(hosts).to(device), replicated,
                             impl="triton")
        assert np.array_equal(got.cpu().numpy(), routing.balanced_split(totals, hosts))
        order = split_order(torch.from_numpy(totals).to(device), replicated)
        assert order.numel() == replicated.numel()
