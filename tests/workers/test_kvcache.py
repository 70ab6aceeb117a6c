"""The paged KV cache's bookkeeping: blocks per sequence as the ledger counts them, reuse of freed blocks,
all-or-nothing admission, one allocation at setup, and the slots and tables a step sends to the device.

    .venv/bin/python -m pytest -q tests/workers/test_kvcache.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expertmesh.workers.kvcache import KVCacheFull, PagedKVCache
from expertmesh.workers.ledger import SequenceLedger


def cache(blocks: int = 8, block_size: int = 4) -> PagedKVCache:
    return PagedKVCache(num_layers=2, num_kv_heads=2, head_dim=8, block_size=block_size, num_blocks=blocks,
                        dtype=torch.float32, device="cpu")


def test_blocks_follow_the_ledgers_count_and_freed_blocks_are_reused():
    kv = cache()
    ledger = SequenceLedger(4, [8])
    steps = [[(1, [0] * 9), (2, [0] * 4)], [(1, [0]), (2, [0])], [(1, [0] * 3), (3, [0])]]
    for step in steps:
        kv.admit([s for s, _ in step], [len(t) for _, t in step])
        kv.commit([s for s, _ in step], [len(t) for _, t in step])
        ledger.commit([step])
        assert kv.used_blocks == ledger.used(0)
    assert kv.blocks(1) == [0, 1, 2, 5] and kv.blocks(2) == [3, 4] and kv.blocks(3) == [6]
    assert kv.free([2, 99]) == [99] and 2 not in kv
    assert kv.free_blocks == 3
    kv.admit([4], [8])  # the blocks of sequence 2 come back first, lowest first
    assert kv.blocks(4) == [3, 4]


def test_a_step_beyond_the_budget_is_refused_whole():
    kv = cache(blocks=3)
    kv.admit([1], [5])  # 2 blocks
    kv.commit([1], [5])
    with pytest.raises(KVCacheFull, match="needs 2 more KV blocks of 4 tokens, 1 of the worker's 3 are free"):
        kv.admit([1, 2], [4, 4])  # 9 tokens -> 1 more block for sequence 1, 1 for the new sequence 2
    assert 2 not in kv and kv.blocks(1) == [0, 1] and kv.free_blocks == 1  # nothing taken
    kv.admit([1], [4])  # exactly the last block
    assert kv.free_blocks == 0


def test_storage_is_allocated_once_and_never_again():
    kv = cache(blocks=16, block_size=2)
    storage = kv.storage.data_ptr()
    assert kv.storage.shape == (2, 2, 17, 2, 2, 8) and kv.scratch_block == 16  # + the scratch block
    for round_ in range(3):
        seqs = list(range(round_ * 100, round_ * 100 + 40))  # more sequences than the host table's first rows
        for s in seqs[:8]:
            kv.admit([s], [3])
            kv.commit([s], [3])
        kv.free(seqs[:8])
    assert kv.storage.data_ptr() == storage and kv.k[1].data_ptr() == kv.storage[1, 0].data_ptr()
    assert kv.free_blocks == 16 and kv.live == 0


def test_slots_and_tables_address_each_position():
    kv = cache(blocks=8, block_size=4)
    kv.admit([7, 8], [6, 2])
    slots = kv.slots([7, 8], np.array([0, 1, 2, 3, 4, 5, 0, 1]), counts=np.array([6, 2]))
    assert slots.tolist() == [0, 1, 2, 3, 4, 5, 8, 9]  # 7 holds blocks 0, 1; 8 holds block 2
    kv.commit([7, 8], [6, 2])
    kv.free([7])
    kv.admit([8, 9], [3, 1])  # 7's blocks are reused, lowest first: 8 grows into block 0, 9 takes block 1
    assert kv.slots([8, 9], np.array([4, 0])).tolist() == [0, 1 * 4]
    table = kv.table([9, 8], 3)
    assert table.dtype == np.int32 and table.tolist() == [[1, 8, 8], [2, 0, 8]]  # scratch block 8 past the blocks
