"""The key/value cache of one worker's sequences: fixed-size blocks, allocated once at the worker's budget.

    k[layer], v[layer]   [num_blocks + 1, KVH, block_size, D]   (views of one allocation, made at setup)

A sequence holds a list of blocks (its block table): position p lives in block table[p // block_size] at
offset p % block_size. Blocks come from one free list and go back to it when the sequence is freed, so
the cache never allocates after setup and memory never grows. `num_blocks` is the worker's budget
(`GroupConfig.kv_blocks`, or what `kv_memory_fraction` leaves), counted exactly as the driver's
`SequenceLedger` counts it (ceil(length / block_size) per sequence): the driver refuses a step that would
exceed it, and `admit` refuses it again here, naming the numbers, should one arrive anyway.

The last block (`scratch_block`) belongs to no sequence: padding rows of fixed-shape decode steps write
their keys there and attend over it, so a padded step needs no branch.

Layout: a block keeps each KV head's block_size x D keys contiguous (D innermost), so the decode kernel's
program for one (sequence, KV head) reads block_size * D * 2 contiguous bytes per block (4 KiB at 16 x 128
bf16) and the write of one token touches KVH rows of D.

Block tables live on the host (a numpy table, one row per live sequence, grown on the host only); a step
sends the rows it needs (`table`) and each new token's flat cache slot, block * block_size + offset
(`slots`), to the device with its other inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["PagedKVCache", "SequenceError", "KVCacheFull", "DEFAULT_KV_BLOCKS", "blocks_for"]

DEFAULT_KV_BLOCKS = 4096  # a budget where none is given (CPU workers, local models): 64k tokens at 16 per block


class SequenceError(KeyError):
    """A step names a sequence the worker does not know, or one it already has as new."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence.
        return str(self.args[0])


class KVCacheFull(RuntimeError):
    """A step needs more KV blocks than the worker has free (the driver's ledger should have refused it)."""


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks holding `tokens` positions: ceil(tokens / block_size), the ledger's count."""
    return -(-tokens // block_size)


class PagedKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, num_blocks: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        if block_size < 1:
            raise ValueError(f"kv_block_size: expected a positive number of tokens, got {block_size}")
        if num_blocks < 1:
            raise ValueError(f"kv_blocks: expected at least one block, got {num_blocks}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size, self.num_blocks = block_size, num_blocks
        self.dtype, self.device = dtype, torch.device(device)
        # Zeros, not empty: masked keys never count, but a NaN bit pattern in V would still reach 0 x NaN in
        # the torch path's matmul over a gathered, masked block.
        self.storage = torch.zeros((num_layers, 2, num_blocks + 1, num_kv_heads, block_size, head_dim),
                                   dtype=dtype, device=self.device)
        self.k = [self.storage[layer, 0] for layer in range(num_layers)]
        self.v = [self.storage[layer, 1] for layer in range(num_layers)]
        self.scratch_block = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() hands out the lowest block first
        self.length: dict[int, int] = {}
        self._row: dict[int, int] = {}  # sequence -> its row of the host block table
        self._held = np.zeros(16, dtype=np.int64)  # blocks held, per row
        self._table = np.full((16, 16), self.scratch_block, dtype=np.int32)  # [rows, columns] block ids
        self._free_rows = list(range(15, -1, -1))

    # ---- what it holds ---------------------------------------------------------------------------
    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._row

    @property
    def live(self) -> int:
        return len(self._row)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)

    def blocks(self, seq_id: int) -> list[int]:
        """The block table of a live sequence."""
        row = self._row[seq_id]
        return self._table[row, : self._held[row]].tolist()

    # ---- a step's life: admit, run, commit -------------------------------------------------------
    def admit(self, seq_ids: Sequence[int], new_tokens: Sequence[int]) -> list[int]:
        """Give `seq_ids[i]` blocks for `new_tokens[i]` more positions (a new sequence starts empty).

        Returns each sequence's past length (lengths advance only in `commit`). All or nothing: a step that
        needs more blocks than are free raises `KVCacheFull` and changes nothing.
        """
        pasts = [self.length.get(s, 0) for s in seq_ids]
        need = [self.blocks_for(p + n) - (self._held[self._row[s]] if s in self._row else 0)
                for s, p, n in zip(seq_ids, pasts, new_tokens, strict=True)]
        total = int(sum(need))
        if total > len(self._free):
            raise KVCacheFull(
                f"kv_blocks: this step needs {total} more KV blocks of {self.block_size} tokens, "
                f"{len(self._free)} of the worker's {self.num_blocks} are free (the driver's ledger refuses "
                f"such steps; free or preempt sequences first)")
        for s, p, n in zip(seq_ids, pasts, need, strict=True):
            if s not in self._row:
                self._new_row(s)
            if n > 0:
                row = self._row[s]
                held = int(self._held[row])
                self._ensure_columns(held + n)
                self._table[row, held : held + n] = [self._free.pop() for _ in range(n)]
                self._held[row] = held + n
            self.length.setdefault(s, p)
        return pasts

    def commit(self, seq_ids: Sequence[int], new_tokens: Sequence[int]) -> None:
        for s, n in zip(seq_ids, new_tokens, strict=True):
            self.length[s] += n

    def free(self, seq_ids: Sequence[int]) -> list[int]:
        """Drop sequences and give their blocks back; returns the ids that were unknown (idempotent)."""
        unknown = []
        for s in seq_ids:
            row = self._row.pop(s, None)
            if row is None:
                unknown.append(s)
                continue
            del self.length[s]
            held = int(self._held[row])
            self._free.extend(self._table[row, :held][::-1].tolist())  # reused next, lowest first
            self._table[row, :held] = self.scratch_block
            self._held[row] = 0
            self._free_rows.append(row)
        return unknown

    # ---- what a step sends to the device ---------------------------------------------------------
    def rows(self, seq_ids: Sequence[int]) -> np.ndarray:
        return np.fromiter((self._row[s] for s in seq_ids), np.int64, len(seq_ids))

    def table(self, seq_ids: Sequence[int], width: int) -> np.ndarray:
        """int32 [N, width] block tables of `seq_ids` (admitted); columns past a sequence's blocks hold the
        scratch block, so every entry is a valid block id."""
        self._ensure_columns(width)
        return self._table[self.rows(seq_ids), :width]

    def slots(self, seq_ids: Sequence[int], positions: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
        """int64 flat cache slots (block * block_size + offset) of positions of admitted sequences.

        positions: int [T]; counts: how many of them belong to each sequence in order (default one each).
        """
        rows = self.rows(seq_ids)
        if counts is not None:
            rows = np.repeat(rows, counts)
        positions = np.asarray(positions, dtype=np.int64)
        blocks = self._table[rows, positions // self.block_size].astype(np.int64)
        return blocks * self.block_size + positions % self.block_size

    # ---- host bookkeeping ------------------------------------------------------------------------
    def _new_row(self, seq_id: int) -> None:
        if not self._free_rows:
            rows = self._table.shape[0]
            grown = np.full((2 * rows, self._table.shape[1]), self.scratch_block, dtype=np.int32)
            grown[:rows] = self._table
            self._table = grown
            self._held = np.concatenate([self._held, np.zeros(rows, dtype=np.int64)])
            self._free_rows = list(range(2 * rows - 1, rows - 1, -1))
        self._row[seq_id] = self._free_rows.pop()

    def _ensure_columns(self, width: int) -> None:
        cols = self._table.shape[1]
        if width > cols:
            grown = np.full((self._table.shape[0], max(width, 2 * cols)), self.scratch_block, dtype=np.int32)
            grown[:, :cols] = self._table
            self._table = grown

