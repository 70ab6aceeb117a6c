"""Gradients through the MoE pipeline: autograd Functions (gradcheck), backward kernels' torch paths, the reverse
exchanges on 1, 2 and 4 gloo ranks, and the FP8 recipes against fp32.

    .venv/bin/python -m pytest tests/kernels/test_kernels_autograd.py -q

Tolerances: float64 gradcheck at its defaults (atol 1e-5, rtol 1e-3), except the top-k weights, which travel
as float32 (a finite-difference step of 1e-3 on a function linear in them, atol 1e-4); float32 gradients
against the float64 dense reference within 1e-4 of the largest entry over all ranks' tokens (measured <= 3e-7);
with FP8 dispatch (forward rows and backward gradients in E4M3 on the wire) within 15% of it (measured 8.8%).
One grouped layer in an FP8 recipe: y, dx, dw within `fp8_grad_tolerance` (10% of the largest entry).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from grad_cases import dense_moe, fp8_grad_tolerance, slot_grads_by_expert
from kernel_cases import random_phy2log, random_routing

from expertmesh.kernels import AllToAllExchange, ExpertMap, LocalExchange, build_expert_layout, moe_forward
from expertmesh.kernels.autograd import permute_rows
from expertmesh.kernels.grouped_linear import Recipe, grouped_linear
from expertmesh.kernels.grouped_wgrad import grouped_wgrad, grouped_wgrad_reference
from expertmesh.kernels.moe import TrainableExperts
from expertmesh.kernels.permute import unpermute_combine, unpermute_combine_backward

H, F = 16, 8


def _experts(gen: torch.Generator, E: int, H: int, F: int, dtype=torch.float64):
    w13 = torch.randn(E, 2 * F, H, generator=gen, dtype=dtype) / H ** 0.5
    w2 = torch.randn(E, H, F, generator=gen, dtype=dtype) / F ** 0.5
    return w13, w2


def _moe_fn(emap: ExpertMap, exchange, ids: torch.Tensor, recipe: Recipe = Recipe.BF16):
    def fn(x, weights, w13, w2):
        return moe_forward(x, ids, weights, emap, exchange, TrainableExperts(w13, w2, recipe))
    return fn


# ---- gradcheck of the autograd Functions (float64) -------------------------------------------------------
@pytest.mark.parametrize("T,k,S", [(0, 2, 8), (1, 1, 8), (7, 2, 10)])
def test_gradcheck_moe_forward_local(T, k, S):
    """dispatch -> permute_rows -> grouped_linear (x2) -> combine on one rank, replicas on the GPU."""
    E = 8
    gen = torch.Generator().manual_seed(T + 10 * k)
    phy2log = random_phy2log(np.random.default_rng(T), E, 1, S)
    emap = ExpertMap.from_phy2log(phy2log, 1)
    w13, w2 = _experts(gen, E, H, F)
    slots = torch.as_tensor(phy2log)
    ids, weights = random_routing(gen, T, E, k)
    x = torch.randn(T, H, generator=gen, dtype=torch.float64)
    fn = _moe_fn(emap, LocalExchange(), ids)
    inputs = (x.requires_grad_(), weights.double(), w13[slots].requires_grad_(), w2[slots].requires_grad_())
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    w_only = (x.detach(), weights.double().requires_grad_(), w13[slots], w2[slots])
    assert torch.autograd.gradcheck(fn, w_only, eps=1e-3, atol=1e-4, fast_mode=True)


def test_gradcheck_permute_rows_and_grouped_linear():
    gen = torch.Generator().manual_seed(3)
    slots = torch.tensor([[1, -1], [0, 2], [2, 1], [-1, -1], [0, 1]])  # received pairs' local slots
    el = build_expert_layout(slots, 3, align=4)  # padding rows inside groups
    rows = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: permute_rows(r, el), (rows,))
    x = torch.randn(el.num_rows, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: grouped_linear(a, b, el.offsets), (x, w))


@pytest.mark.parametrize("N,K,M", [(0, 2, 3), (1, 1, 1), (33, 8, 300)])
@pytest.mark.parametrize("weighted", [True, False])
def test_unpermute_combine_backward_equals_autograd_of_the_forward(N, K, M, weighted):
    gen = torch.Generator().manual_seed(N + K)
    pos = torch.randperm(M, generator=gen)[: N * K].view(N, K) if N * K <= M else torch.zeros(N, K, dtype=torch.int64)
    pos[torch.rand(N, K, generator=gen) < 0.3] = -1  # pairs served elsewhere
    y = torch.randn(M, 20, generator=gen, requires_grad=True)
    w = torch.rand(N, K, generator=gen, requires_grad=True) if weighted else None
    g = torch.randn(N, 20, generator=gen)
    grad_y, grad_w = unpermute_combine_backward(g, y.detach(), pos, None if w is None else w.detach(), impl="torch")
    if N == 0:
        assert grad_y.shape == y.shape and not grad_y.any() and grad_w.shape == (0, K)
        return
    out = unpermute_combine(y, pos, w, impl="torch")
    want = torch.autograd.grad(out, (y, w) if weighted else (y,), g)
    torch.testing.assert_close(grad_y, want[0], rtol=1e-5, atol=1e-5)
    if weighted:
        torch.testing.assert_close(grad_w, want[1], rtol=1e-5, atol=1e-5)
    assert torch.all(grad_w[pos < 0] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_wgrad_library_path_equals_reference(dtype):
    counts = [0, 16, 48, 16]  # torch._grouped_mm wants 16-byte strides and takes empty groups
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    gen = torch.Generator().manual_seed(1)
    dy, x = torch.randn(96, 32, generator=gen).to(dtype), torch.randn(96, 16, generator=gen).to(dtype)
    got = grouped_wgrad(dy, x, offsets)
    want = grouped_wgrad_reference(dy.double(), x.double(), offsets)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * float(want.abs().max()))
    assert torch.all(got[0] == 0)


# ---- FP8 recipes against fp32 ------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", [Recipe.FP8_BLOCKWISE, Recipe.FP8_ROWWISE])
def test_fp8_recipes_track_fp32_gradients(recipe):
    """Forward, input gradient and weight gradient of one grouped layer (CPU: the kernels' torch references)."""
    gen = torch.Generator().manual_seed(5)
    counts = [32, 0, 80, 16] if recipe is Recipe.FP8_ROWWISE else [17, 0, 90, 5]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(int(offsets[-1]), 256, generator=gen, requires_grad=True)
    w = (torch.randn(4, 128, 256, generator=gen) / 16).requires_grad_()
    g = torch.randn(x.shape[0], 128, generator=gen)
    ref = grouped_linear(x, w, offsets)
    want = [ref.detach()] + list(torch.autograd.grad(ref, (x, w), g))
    y = grouped_linear(x, w, offsets, recipe)
    got = [y.detach()] + list(torch.autograd.grad(y, (x, w), g))
    for name, a, b in zip(("y", "dx", "dw"), got, want, strict=True):
        err, tol = float((a - b).abs().max()), fp8_grad_tolerance(b)
        assert err <= tol, f"{recipe.value} {name}: {err} > {tol}"
        assert err > 0, f"{recipe.value} {name}: no FP8 rounding at all (the recipe did not run)"


# ---- the reverse exchanges on gloo ranks -------------------------------------------------------------------
TOKENS = [9, 0, 1, 13]
CASES = [(2, 8, 5, 1), (1, 8, 6, 2), (4, 16, 9, 2)]  # (k, E, S per GPU, nodes at 4 ranks)


def _check_gradients(rank: int, G: int, fp8: bool, dtype: torch.dtype) -> list[float]:
    errors = []
    for i, (k, E, S, nodes4) in enumerate(CASES):
        nodes = nodes4 if G == 4 else 1
        gen = torch.Generator().manual_seed(100 * i + G)
        phy2log = random_phy2log(np.random.default_rng(i + G), E, G, S)
        emap = ExpertMap.from_phy2log(phy2log, G, nodes, E)
        Hc = 128 if fp8 else H
        w13, w2 = _experts(gen, E, Hc, F)
        data = [(torch.randn(TOKENS[r % 4], Hc, generator=gen, dtype=torch.float64),
                 *random_routing(gen, TOKENS[r % 4], E, k, skew=True)) for r in range(G)]
        grads_out = [torch.randn(TOKENS[r % 4], Hc, generator=gen, dtype=torch.float64) for r in range(G)]
        # Reference: every rank's tokens through the dense float64 layer in one process.
        xs = [d[0].clone().requires_grad_() for d in data]
        ws = [d[2].double().requires_grad_() for d in data]
        r13, r2 = w13.clone().requires_grad_(), w2.clone().requires_grad_()
        outs = [dense_moe(xs[r], data[r][1], ws[r], r13, r2) for r in range(G)]
        every = torch.autograd.grad(outs, (*xs, *ws, r13, r2), grads_out)
        want = (every[rank], every[G + rank], every[-2], every[-1])
        # FP8 errors scale with the gradient's magnitude over the whole batch, not one rank's few tokens.
        scale = [max(float(g.abs().max()) if g.numel() else 0.0 for g in every[j * G:(j + 1) * G]) for j in (0, 1)]
        scale += [float(every[-2].abs().max()), float(every[-1].abs().max())]
        # Ours: this rank's slots, exchanged with the others.
        x, ids, w = data[rank]
        local = emap.slot_expert[rank]
        x = x.to(dtype).requires_grad_()
        w = w.requires_grad_()
        m13, m2 = w13[local].to(dtype).requires_grad_(), w2[local].to(dtype).requires_grad_()
        out = moe_forward(x, ids, w, emap, AllToAllExchange(fp8=fp8), TrainableExperts(m13, m2))
        got = list(torch.autograd.grad(out, (x, w, m13, m2), grads_out[rank].to(dtype)))
        got[2], got[3] = (slot_grads_by_expert(g, local, E) for g in got[2:])
        for g in got[2:]:
            dist.all_reduce(g)  # every slot of an expert, on every rank: the expert's whole gradient
        for name, a, b, mag in zip(("x", "weights", "w13", "w2"), got, want, scale, strict=True):
            if not b.numel():
                continue
            err = float((a.double() - b).abs().max())
            tol = (0.15 if fp8 else 1e-4) * mag + 1e-6
            assert err <= tol, f"case {i} rank {rank} fp8={fp8}: grad {name} error {err} > {tol}"
            errors.append(err / mag)
    return errors


def _worker(rank: int, G: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=G)
    try:
        if G == 1:  # one rank: gradcheck runs every forward in lockstep with itself
            k, E, S = 2, 8, 10
            gen = torch.Generator().manual_seed(0)
            phy2log = random_phy2log(np.random.default_rng(0), E, 1, S)
            emap = ExpertMap.from_phy2log(phy2log, 1)
            w13, w2 = _experts(gen, E, H, F)
            slots = torch.as_tensor(phy2log)
            ids, w = random_routing(gen, 6, E, k)
            x = torch.randn(6, H, generator=gen, dtype=torch.float64)
            fn = _moe_fn(emap, AllToAllExchange(), ids)
            assert torch.autograd.gradcheck(fn, (x.requires_grad_(), w.double(), w13[slots].requires_grad_(),
                                                 w2[slots].requires_grad_()), fast_mode=True)
            assert torch.autograd.gradcheck(fn, (x.detach(), w.double().requires_grad_(), w13[slots], w2[slots]),
                                            eps=1e-3, atol=1e-4, fast_mode=True)
            return
        _check_gradients(rank, G, False, torch.float32)
        _check_gradients(rank, G, True, torch.float32)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("G", [1, 2, 4])
def test_gloo_gradients_equal_dense_reference(G):
    """G=1: gradcheck through the all-to-all exchange; G=2, 4: x, top-k weights and every expert's gradient
    (summed over its replicas on all ranks) equal the dense float64 reference, fp32 and FP8 dispatch."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(G, os.path.join(tmp, "rendezvous")), nprocs=G, join=True,
                           start_method="fork")


def test_rowwise_wgrad_operands_have_16_byte_row_strides():
    """torch._scaled_grouped_mm rejects a transposed FP8 operand [N, M] whose row stride is not a multiple of 16
    bytes; M is any row count (Mixtral's 32768 pairs + 8 groups x 15 padding rows crashed), so storage is padded."""
    from expertmesh.kernels.grouped_wgrad import quantize_fp8_group_cols

    x = torch.randn(37, 24)
    offsets = torch.tensor([16, 32], dtype=torch.int32)
    qT, scales = quantize_fp8_group_cols(x, offsets)
    assert qT.shape == (24, 37) and qT.stride() == (48, 1)
    assert torch.all(qT[:, 32:].float() == 0)  # rows past the last group get code 0
    back = qT[:, :32].float().T * torch.repeat_interleave(scales, 16, dim=0)
    assert torch.all((back - x[:32]).abs() <= x[:32].abs() * 2.0 ** -4 * 1.001 + scales.max() * 2.0 ** -9)
