"""Training on CUDA: the backward kernels and FP8 training GEMMs against their references, a training step of
the model against the CPU fp32 one, and gradients through NCCL all_to_all and the NVLink exchange on 2 GPUs.

The same checks as the interpreter tests (`tests/kernels/bwd_checks.py`) at larger sizes, plus what only a GPU
runs: `torch._grouped_mm` / `torch._scaled_grouped_mm` (SM90) paths and the multi-GPU exchanges. Skips
cleanly without CUDA.

Run (on a machine with GPUs): pytest tests/gpu/test_train_gpu.py
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


import bwd_checks as bc  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from expertmesh.kernels.experts import _cuda_sm90  # noqa: E402
from expertmesh.kernels.grouped_linear import Recipe, grouped_linear  # noqa: E402
from expertmesh.kernels.grouped_wgrad import (  # noqa: E402
    grouped_wgrad,
    quantize_fp8_group_cols,
    scaled_grouped_wgrad_rowwise,
)
from expertmesh.workers.checkpoint import RandomReader  # noqa: E402
from expertmesh.workers.config import ModelConfig  # noqa: E402
from expertmesh.workers.plans import contiguous_plan  # noqa: E402
from expertmesh.workers.train import TrainableMoE, TrainSettings  # noqa: E402

DEV = "cuda"
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
sm90 = pytest.mark.skipif(not (torch.cuda.is_available() and _cuda_sm90(torch.zeros(1, device=DEV))),
                          reason="needs SM90 (torch._scaled_grouped_mm)")


# ---- backward kernels and FP8 GEMMs --------------------------------------------------------------------------
@pytest.mark.parametrize("N,K,H", [(1, 1, 16), (33, 8, 200), (4096, 8, 7168)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpermute_combine_backward(N, K, H, dtype):
    bc.check_unpermute_combine_backward(DEV, N, K, H, dtype, weighted=True)


@pytest.mark.parametrize("counts,N,K", [([0, 5, 70, 1], 64, 48), ([300, 0, 1000, 17] * 8, 1536, 2048)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_wgrad_triton(counts, N, K, dtype):
    bc.check_grouped_wgrad(DEV, counts, N, K, dtype)


def test_grouped_wgrad_library_path_equals_triton():
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([256, 0, 512, 128] * 4)
    offsets = counts.cumsum(0).to(torch.int32).to(DEV)
    dy = torch.randn(int(counts.sum()), 768, generator=gen).to(DEV, torch.bfloat16)
    x = torch.randn(int(counts.sum()), 2048, generator=gen).to(DEV, torch.bfloat16)
    lib, tri = grouped_wgrad(dy, x, offsets), grouped_wgrad(dy, x, offsets, impl="triton")
    torch.testing.assert_close(lib.float(), tri.float(), rtol=2e-2, atol=2e-2 * float(tri.abs().max()))


@pytest.mark.parametrize("counts,N,K", [([0, 5, 70, 1], 128, 64), ([300, 0, 1000, 17] * 8, 1536, 2048)])
def test_fp8_wgrad_blockwise(counts, N, K):
    bc.check_fp8_wgrad_blockwise(DEV, counts, N, K)


@pytest.mark.parametrize("counts,N,K", [([0, 5, 40], 256, 128), ([300, 0, 1000, 17] * 8, 768, 2048)])
def test_fp8_dgrad_transposed_weights(counts, N, K):
    bc.check_fp8_dgrad_transposed_weights(DEV, counts, N, K)


@pytest.mark.parametrize("M,N", [(1, 128), (130, 200), (4099, 2048)])
def test_fp8_training_quantisers(M, N):
    bc.check_fp8_training_quantisers(DEV, M, N)


@sm90
def test_rowwise_fp8_wgrad_library_equals_reference():
    """torch._scaled_grouped_mm's 2d x 2d form with per-(group, column) scales (group-major, as torchao's)."""
    gen = torch.Generator().manual_seed(1)
    counts = torch.tensor([64, 0, 128, 16] * 4)
    offsets = counts.cumsum(0).to(torch.int32).to(DEV)
    dy = torch.randn(int(counts.sum()), 256, generator=gen).to(DEV, torch.bfloat16)
    x = torch.randn(int(counts.sum()), 512, generator=gen).to(DEV, torch.bfloat16)
    ops = (*quantize_fp8_group_cols(dy, offsets), *quantize_fp8_group_cols(x, offsets), offsets)
    lib = scaled_grouped_wgrad_rowwise(*ops, out_dtype=torch.float32)
    ref = scaled_grouped_wgrad_rowwise(*ops, out_dtype=torch.float32, impl="torch")
    torch.testing.assert_close(lib, ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))


@pytest.mark.parametrize("recipe", [Recipe.BF16, Recipe.FP8_BLOCKWISE,
                                    pytest.param(Recipe.FP8_ROWWISE, marks=sm90)])
def test_grouped_linear_recipes_track_fp32(recipe):
    """Forward, input and weight gradients of one grouped layer at a training size, bf16 activations."""
    gen = torch.Generator().manual_seed(2)
    counts = torch.tensor([256, 0, 512, 128, 64, 1024, 16, 32])
    if recipe is Recipe.FP8_ROWWISE:
        counts = (counts + 15) // 16 * 16
    offsets = counts.cumsum(0).to(torch.int32).to(DEV)
    x32 = torch.randn(int(counts.sum()), 1024, generator=gen).to(DEV)
    w32 = (torch.randn(8, 768, 1024, generator=gen) / 32).to(DEV)
    g32 = torch.randn(x32.shape[0], 768, generator=gen).to(DEV)
    x, w = x32.bfloat16().requires_grad_(), w32.bfloat16().requires_grad_()
    y = grouped_linear(x, w, offsets, recipe)
    got = [y.detach()] + list(torch.autograd.grad(y, (x, w), g32.bfloat16()))
    xr, wr = x32.requires_grad_(), w32.requires_grad_()
    yr = grouped_linear(xr, wr, offsets)
    want = [yr.detach()] + list(torch.autograd.grad(yr, (xr, wr), g32))
    bound = 0.02 if recipe is Recipe.BF16 else 0.1
    for name, a, b in zip(("y", "dx", "dw"), got, want, strict=True):
        err = float((a.float() - b).norm() / b.norm())
        assert err <= bound, f"{recipe.value} {name}: {err:.3f} of the norm"


def test_symm_exchange_loopback_backward_one_gpu():
    for fp8 in (False, True):
        bc.symm_loopback_backward(DEV, 2, 8, 64, 40, [300, 77], fp8, H=512)


# ---- the model ------------------------------------------------------------------------------------------------
def small_config() -> ModelConfig:
    return ModelConfig(family="qwen3_moe", vocab_size=512, hidden_size=256, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6, num_experts=16, top_k=4,
                       expert_ffn=256, dense_ffn=512, shared_ffn=0, norm_topk_prob=True, qk_norm="head",
                       clip_qkv=None, moe_layers=(0, 1), tie_word_embeddings=False, dtype="bfloat16")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm())


@pytest.mark.parametrize("precision,recipe", [("bf16", "blockwise"), ("fp8", "blockwise"),
                                              pytest.param("fp8", "rowwise", marks=sm90)])
def test_training_step_on_gpu_tracks_cpu_fp32(precision, recipe):
    """One step of the model in bf16 (and FP8) on the GPU against the same weights in fp32 on the CPU, the
    CPU's expert choices replayed (bf16 rounding would flip near ties): loss and every gradient."""
    cfg = small_config()
    plan = contiguous_plan(2, 16, 1)
    batch = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(3))
    cpu = TrainableMoE(cfg, plan, reader=RandomReader(cfg, "cpu"), dtype=torch.float32)
    want = cpu(batch)
    want.loss.backward()
    settings = TrainSettings(precision=precision, fp8_recipe=recipe)
    gpu = TrainableMoE(cfg, plan, settings=settings, reader=RandomReader(cfg, "cpu"), device=DEV)
    # The CPU model's weights, rounded to bf16 (random bf16 draws are not the fp32 draws rounded on a GPU).
    gpu.load_state_dict({name: t.to(DEV, torch.bfloat16) for name, t in cpu.state_dict().items()})
    out = gpu(batch.to(DEV), override_ids=want.routed.to(DEV))
    out.loss.backward()
    assert abs(out.loss.item() - want.loss.item()) <= 0.02 * want.loss.item()
    bound = 0.05 if precision == "bf16" else 0.25
    reference = dict(cpu.named_parameters())
    for name, p in gpu.named_parameters():
        err = _rel(p.grad, reference[name].grad)
        assert err <= bound, f"{precision} {recipe} {name}: gradient {err:.3f} of its norm"


# ---- two GPUs: gradients through NCCL all_to_all and the NVLink exchange --------------------------------------
def _two_gpu_worker(rank: int, init_file: str, results) -> None:
    # Failed checks are collected, not raised: a rank that stopped early would leave its peer waiting.
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            device_id=torch.device(DEV, rank), timeout=timedelta(seconds=120))
    errors: list[str] = []
    try:
        cfg = small_config()
        batch = torch.randint(0, 512, (5, 64), generator=torch.Generator().manual_seed(4))
        cpu = TrainableMoE(cfg, contiguous_plan(2, 16, 1), reader=RandomReader(cfg, "cpu"), dtype=torch.float32)
        ref = cpu(batch)
        ref.loss.backward()
        want = {n: p.grad for n, p in cpu.named_parameters()}
        # This rank's sequences' expert choices in the one-process run, replayed (FP8 would flip near ties).
        routed = ref.routed.view(5, 64, 2, 4)[rank::2].reshape(-1, 2, 4).to(DEV)
        for exchange in ("all_to_all", "symm_mem"):
            for precision in ("bf16", "fp8"):
                settings = TrainSettings(precision=precision, exchange=exchange, max_tokens=3 * 64)
                model = TrainableMoE(cfg, contiguous_plan(2, 16, 2), rank, 2, settings,
                                     reader=RandomReader(cfg, "cpu"), dtype=torch.float32, device=DEV)
                out = model(batch[rank::2].to(DEV), override_ids=routed)
                out.loss.backward()
                model.sum_replica_grads()
                model.sum_dense_grads()
                bound = 1e-3 if precision == "bf16" else 0.25  # "bf16" runs fp32 here: exact up to sum order
                for name, p in model.named_parameters():
                    ref = want[name]
                    if ".experts." in name:
                        ref = ref[model.model.layers[int(name.split(".")[2])].ffn.experts.slot_expert.cpu()]
                    err = _rel(p.grad, ref)
                    if err > bound:
                        errors.append(f"{exchange} {precision} rank {rank} {name}: {err:.2e} of its norm")
                torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - reported through `results`
        errors.append(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise
    finally:
        results[rank] = errors or "ok"
        dist.destroy_process_group()


@two_gpus
def test_two_gpu_training_gradients_equal_one_process():
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        results = ctx.Manager().dict()
        try:
            mp.start_processes(_two_gpu_worker, args=(os.path.join(tmp, "rdzv"), results), nprocs=2,
                               join=True, start_method="spawn")
        finally:
            got = dict(results)
        assert got == {0: "ok", 1: "ok"}, got
