"""The driver's record of a group's live sequences, and the checks a step's inputs pass before they leave it.

`SequenceLedger` mirrors what every worker's KV cache holds: each sequence's home worker (data-parallel
attention keeps its cache there), its cached length, and so the KV blocks it occupies out of the worker's
budget (`blocks_for(length)` = ceil(length / block_size), the same count the worker's cache allocates).
A step that would give a worker more blocks than it has is refused here, before any worker runs it: the
engine admits and preempts by these numbers, so no load pattern can exhaust a worker's memory.

`pack_inputs` validates a step's (sequence, new tokens) lists and packs each worker's share into arrays:
Ray ships arrays as raw buffers, where a 32k-token prefill as lists cost milliseconds of int conversion
and pickling on both sides, and a 256-sequence decode step one pickled object per sequence.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from .model import PackedTokens

__all__ = ["SequenceLedger", "KVBudgetError", "pack_inputs", "StepInputs"]

StepInputs = Sequence[Sequence[tuple[int, Sequence[int]]]]  # per worker: (sequence id, new token ids)


class KVBudgetError(ValueError):
    """A step would need more KV-cache blocks on a worker than it has."""


class SequenceLedger:
    def __init__(self, block_size: int, blocks: Sequence[int]) -> None:
        self.block_size = block_size
        self.blocks = list(blocks)  # per worker: KV-cache blocks in its budget
        self.home: dict[int, int] = {}
        self.length: dict[int, int] = {}
        self._used = [0] * len(self.blocks)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def used(self, rank: int) -> int:
        return self._used[rank]

    def free_blocks(self, rank: int) -> int:
        return self.blocks[rank] - self._used[rank]

    def check(self, inputs: StepInputs) -> None:
        """Refuse a step whose sequences would outgrow a worker's blocks (`KVBudgetError`, nothing recorded)."""
        for rank, batch in enumerate(inputs):
            need = sum(self.blocks_for(self.length.get(int(seq), 0) + len(tokens))
                       - self.blocks_for(self.length.get(int(seq), 0)) for seq, tokens in batch)
            if need > self.free_blocks(rank):
                raise KVBudgetError(
                    f"inputs: worker {rank} would need {need} more KV blocks of {self.block_size} tokens, "
                    f"{self.free_blocks(rank)} of its {self.blocks[rank]} are free; free or preempt sequences first")

    def commit(self, inputs: StepInputs) -> None:
        """Record a step the workers ran."""
        for rank, batch in enumerate(inputs):
            for seq, tokens in batch:
                seq = int(seq)
                before = self.length.get(seq, 0)
                self.home[seq] = rank
                self.length[seq] = before + len(tokens)
                self._used[rank] += self.blocks_for(before + len(tokens)) - self.blocks_for(before)

    def drop(self, seq_ids: Sequence[int]) -> dict[int, list[int]]:
        """Forget sequences; returns the known ones by home worker (unknown ids are ignored)."""
        by_rank: dict[int, list[int]] = {}
        for seq in seq_ids:
            seq = int(seq)
            rank = self.home.pop(seq, None)
            if rank is None:
                continue
            self._used[rank] -= self.blocks_for(self.length.pop(seq))
            by_rank.setdefault(rank, []).append(seq)
        return by_rank


def _bad_sequence(batch: Sequence[tuple[int, Sequence[int]]], vocab: int) -> int:
    """The first sequence of `batch` whose token ids are not integers in [0, vocab)."""
    for seq, tokens in batch:
        try:
            arr = np.asarray(tokens)
        except (TypeError, ValueError):
            return int(seq)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or (
                arr.size and (arr.min() < 0 or arr.max() >= vocab)):
            return int(seq)
    raise AssertionError("no bad sequence")  # only called when one exists


def pack_inputs(inputs: StepInputs, ledger: SequenceLedger, vocab: int, max_tokens: int = 0) -> list[PackedTokens]:
    """Validate a step's inputs against the ledger; returns each worker's share as `PackedTokens`."""
    if len(inputs) != len(ledger.blocks):
        raise ValueError(f"inputs: expected one list per worker ({len(ledger.blocks)}), got {len(inputs)}")
    seen: set[int] = set()
    packed: list[PackedTokens] = []
    for rank, batch in enumerate(inputs):
        seqs = [int(seq) for seq, _ in batch]
        lengths = np.fromiter((len(tokens) for _, tokens in batch), np.int64, len(batch))
        for seq, n in zip(seqs, lengths.tolist(), strict=True):
            if seq in seen:
                raise ValueError(f"inputs: sequence {seq} appears twice in one step")
            seen.add(seq)
            home = ledger.home.get(seq, rank)
            if home != rank:
                raise ValueError(f"inputs: sequence {seq} lives on worker {home}, the step gives it to {rank}")
            if n == 0:
                raise ValueError(f"inputs: sequence {seq} brings no new token")
        # One array of every token of the worker (not one per sequence: a 256-sequence decode step spent
        # ~0.4 ms converting them one by one); its dtype says whether they all were integers.
        try:
            flat = np.asarray(list(itertools.chain.from_iterable(tokens for _, tokens in batch)))
        except (TypeError, ValueError):  # ragged nesting, tokens that are not a sequence
            flat = np.zeros((1, 1), np.float32)
        bad = flat.size and (flat.ndim != 1 or not np.issubdtype(flat.dtype, np.integer)
                             or flat.min() < 0 or flat.max() >= vocab)
        if bad:
            raise ValueError(f"inputs: token ids of sequence {_bad_sequence(batch, vocab)} must be integers in "
                             f"[0, {vocab})")
        if max_tokens and flat.size > max_tokens:
            raise ValueError(f"inputs: worker {rank} gets more than max_tokens={max_tokens} new tokens")
        packed.append(PackedTokens(np.asarray(seqs, np.int64), lengths,
                                   flat.astype(np.int32) if flat.size else np.zeros(0, np.int32)))
    ledger.check(inputs)
    return packed
