"""The Triton kernels on Triton's CPU interpreter, at small sizes (run by test_kernels_triton_interpret.py).

TRITON_INTERPRET must be set before Triton is imported, so this module runs in its own process:
    TRITON_INTERPRET=1 pytest -p no:cacheprovider tests/kernels/interpret_checks.py
"""

from __future__ import annotations

import os

import pytest
import torch
import triton_checks as tc

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs TRITON_INTERPRET=1 set before triton is imported")


@pytest.mark.parametrize("N,H", [(0, 64), (1, 96), (33, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_permute(N, H, dtype):
    tc.check_permute("cpu", N, H, dtype)


@pytest.mark.parametrize("N,K", [(0, 2), (1, 1), (33, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
def test_unpermute_combine(N, K, dtype, weighted):
    tc.check_unpermute_combine("cpu", N, K, 200, dtype, weighted)


@pytest.mark.parametrize("M,F", [(1, 128), (9, 384), (3, 200)])
def test_silu_mul_quantize(M, F):
    tc.check_silu_mul_quantize("cpu", M, F)


@pytest.mark.parametrize("N,H,tile", [(1, 128, 128), (33, 300, 128), (5, 1024, 128), (33, 200, None),
                                      (2, 64, 64)])
def test_fp8(N, H, tile):
    tc.check_fp8("cpu", N, H, tile)


@pytest.mark.parametrize("counts,N,K", [([0, 5, 70, 1], 256, 256), ([3], 128, 128), ([0, 0, 65], 384, 384)])
def test_grouped_fp8_blockwise(counts, N, K):
    tc.check_grouped_fp8_blockwise("cpu", counts, N, K)


# The interpreter runs every program in Python (~50 ms each), so token counts stay small here; the GPU
# tests run the same check at full size.
@pytest.mark.parametrize("G,k,E,S,tokens,fp8", [
    (1, 2, 8, 10, [5], False),
    (2, 1, 8, 5, [33, 0], True),
    (2, 8, 16, 10, [1, 6], True),
    (4, 2, 8, 3, [3, 5, 0, 1], False),
    (3, 6, 12, 5, [2, 3, 4], True),
])
def test_symm_exchange_loopback(G, k, E, S, tokens, fp8):
    tc.symm_loopback_moe("cpu", G, k, E, S, tokens, fp8, H=128, F=32)


def test_symm_exchange_loopback_balanced_rule():
    tc.symm_loopback_moe("cpu", 2, 2, 8, 6, [5, 7], False, H=128, F=32, replica_rule="balanced")


def test_balanced_split_kernel():  # the interpreter runs the kernel's loop in Python: one small case
    tc.check_balanced_split("cpu", cases=1, max_experts=16, gpus=(6,))
