"""The paged-attention Triton kernels on Triton's CPU interpreter (run by test_paged_attention.py).

TRITON_INTERPRET must be set before Triton is imported, so this module runs in its own process:
    TRITON_INTERPRET=1 .venv/bin/python -m pytest -p no:cacheprovider tests/kernels/paged_interpret_checks.py
"""

from __future__ import annotations

import os

import paged_checks as pc
import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs TRITON_INTERPRET=1 set before triton is imported")

LENGTHS = [0, 1, 33, 16, 32, 17]  # empty, one token, odd, block boundaries of 16 and one past


@pytest.mark.parametrize("T,block_size,head_dim", [(1, 16, 64), (33, 16, 128), (33, 5, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv(T, block_size, head_dim, dtype):
    pc.check_write_kv("cpu", T, 2, block_size, head_dim, dtype, "triton")


@pytest.mark.parametrize("block_size,head_dim", [(16, 64), (5, 8), (1, 128)])
def test_gather_kv(block_size, head_dim):
    pc.check_gather_kv("cpu", LENGTHS, 2, block_size, head_dim, torch.bfloat16, "triton")


@pytest.mark.parametrize("family", list(pc.GQA))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_one_chunk_per_row(family, head_dim, dtype):
    pc.check_decode("cpu", LENGTHS, pc.GQA[family], 16, head_dim, dtype, "triton", splits=1)


@pytest.mark.parametrize("family", list(pc.GQA))
def test_decode_split_over_the_sequence(family):
    """Three uneven chunks per row, merged by their log-sum-exp."""
    pc.check_decode("cpu", LENGTHS, pc.GQA[family], 16, 64, torch.bfloat16, "triton", splits=3)


def test_decode_mostly_empty_chunks():
    """17 chunks of one 64-key tile: rows of length 0 and 1 leave every chunk but one empty."""
    pc.check_decode("cpu", [0, 1, 70], pc.GQA["mixtral"], 16, 64, torch.float32, "triton", splits=17)


@pytest.mark.parametrize("block_size,head_dim", [(5, 16), (4, 8), (1, 32)])
def test_decode_odd_blocks_and_small_heads(block_size, head_dim):
    """Block sizes that are not powers of two and head dims below tl.dot's 16 (the tiny test models)."""
    pc.check_decode("cpu", [1, 9, 20], (4, 2), block_size, head_dim, torch.float32, "triton", splits=2)


def test_decode_default_splits_and_a_long_row():
    pc.check_decode("cpu", [300], pc.GQA["qwen3"], 16, 128, torch.bfloat16, "triton")


@pytest.mark.parametrize("n", [1, 33])
def test_prefill(n):
    pc.check_prefill("cpu", [0, 16, 3], n, pc.GQA["mixtral"], 16, 64, torch.bfloat16, "triton")
