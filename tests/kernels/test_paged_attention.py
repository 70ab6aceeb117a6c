"""Paged attention: the torch references against a naive per-position loop (the Triton kernels run the same
checks on the interpreter: `paged_interpret_checks.py`, started by test_kernels_triton_interpret.py).

    .venv/bin/python -m pytest -q tests/kernels/test_paged_attention.py
"""

from __future__ import annotations

import paged_checks as pc
import pytest
import torch

from expertmesh.kernels.paged_attention import decode_attention, decode_splits, prefill_attention, write_kv

LENGTHS = [0, 1, 33, 16, 32, 17, 5]  # empty, one token, odd, block boundaries of 16 and one past


@pytest.mark.parametrize("T", [0, 1, 33])
@pytest.mark.parametrize("block_size", [16, 5])
def test_write_kv_reference(T, block_size):
    pc.check_write_kv("cpu", T, 2, block_size, 64, torch.float32, "torch")


@pytest.mark.parametrize("block_size", [16, 4, 5])
def test_gather_kv_reference(block_size):
    pc.check_gather_kv("cpu", LENGTHS, 2, block_size, 16, torch.float32, "torch")


@pytest.mark.parametrize("family", list(pc.GQA))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_reference(family, head_dim, dtype):
    pc.check_decode("cpu", LENGTHS, pc.GQA[family], 16, head_dim, dtype, "torch")


@pytest.mark.parametrize("family", list(pc.GQA))
@pytest.mark.parametrize("n", [1, 7, 33])
def test_prefill_reference(family, n):
    pc.check_prefill("cpu", [0, 16, 3], n, pc.GQA[family], 16, 64, torch.float32, "torch")


def test_splits_follow_the_shapes_only():
    cpu = torch.device("cpu")
    assert decode_splits(1, 8, 1 << 20, cpu) == 1  # 8 programs already fill the interpreter's 4 "SMs" twice
    assert decode_splits(1, 1, 1 << 20, cpu) == 8
    assert decode_splits(1, 1, 100, cpu) == 2  # no more chunks than the table's keys fill with tiles


def test_bad_inputs_name_the_argument():
    kc = torch.zeros(4, 2, 16, 8)
    table, lengths = torch.zeros(3, 2, dtype=torch.int32), torch.ones(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="k_cache, v_cache"):
        decode_attention(torch.zeros(3, 4, 8), kc, kc[:2], table, lengths)
    with pytest.raises(ValueError, match="q: expected"):
        decode_attention(torch.zeros(3, 3, 8), kc, kc, table, lengths)
    with pytest.raises(ValueError, match="block_tables"):
        decode_attention(torch.zeros(3, 4, 8), kc, kc, table.float(), lengths)
    with pytest.raises(ValueError, match="lengths"):
        decode_attention(torch.zeros(3, 4, 8), kc, kc, table, lengths[:2])
    with pytest.raises(ValueError, match="keys=40"):
        prefill_attention(torch.zeros(3, 1, 4, 8), kc, kc, table, lengths, 40)
    with pytest.raises(ValueError, match="k, v"):
        write_kv(kc, kc, torch.zeros(2, 2, 4), torch.zeros(2, 2, 4), torch.zeros(2, dtype=torch.int64))
