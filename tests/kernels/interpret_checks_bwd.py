"""The backward Triton kernels on Triton's CPU interpreter, at small sizes (run by test_kernels_triton_interpret.py).

TRITON_INTERPRET must be set before Triton is imported, so this module runs in its own process:
    TRITON_INTERPRET=1 pytest -p no:cacheprovider tests/kernels/interpret_checks_bwd.py
"""

from __future__ import annotations

import os

import bwd_checks as bc
import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs TRITON_INTERPRET=1 set before triton is imported")


@pytest.mark.parametrize("N,K,H", [(0, 2, 64), (1, 1, 16), (33, 8, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
def test_unpermute_combine_backward(N, K, H, dtype, weighted):
    bc.check_unpermute_combine_backward("cpu", N, K, H, dtype, weighted)


@pytest.mark.parametrize("counts,N,K", [([0, 5, 70, 1], 64, 48), ([3], 16, 32), ([130, 0, 65], 96, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_wgrad(counts, N, K, dtype):
    bc.check_grouped_wgrad("cpu", counts, N, K, dtype)


@pytest.mark.parametrize("counts,N,K", [([0, 5, 70, 1], 128, 64), ([130, 0, 200], 64, 128)])
def test_fp8_wgrad_blockwise(counts, N, K):
    bc.check_fp8_wgrad_blockwise("cpu", counts, N, K)


@pytest.mark.parametrize("counts,N,K", [([0, 5, 40], 256, 128), ([3], 128, 128)])
def test_fp8_dgrad_transposed_weights(counts, N, K):
    bc.check_fp8_dgrad_transposed_weights("cpu", counts, N, K)


@pytest.mark.parametrize("G,k,E,S,tokens,fp8", [
    (1, 2, 8, 10, [4], False),
    (2, 2, 8, 5, [3, 0], False),
    (2, 1, 8, 5, [20, 30], True),  # FP8 errors are relative to the batch: enough tokens for a stable max
    (3, 4, 12, 5, [2, 1, 3], False),
])
def test_symm_exchange_loopback_backward(G, k, E, S, tokens, fp8):
    bc.symm_loopback_backward("cpu", G, k, E, S, tokens, fp8)


@pytest.mark.parametrize("M,N", [(1, 128), (130, 200), (256, 384)])
def test_fp8_training_quantisers(M, N):
    bc.check_fp8_training_quantisers("cpu", M, N)
