"""The key/value cache of one worker's sequences: a batch-major arena per attention layer.

    k[layer], v[layer]   [S, KVH, C, D]   S slots (one per live sequence), capacity C positions

A sequence owns one slot from its first step until it is freed. The arena grows by doubling (slots or
capacity) and is released when the last sequence is freed, so memory is (live slots) x (longest sequence):
no paging. Sequences admitted together get consecutive slots, so a decode step over them reads the cache
through a view instead of gathering it. The highest slot is scratch, owned by no sequence: the padding rows
of a fixed-size decode batch (CUDA graphs) write their keys there.
"""

from __future__ import annotations

import torch

__all__ = ["KVArena", "SequenceError"]


class SequenceError(KeyError):
    """A step names a sequence the worker does not know, or one it already has as new."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence.
        return str(self.args[0])


class KVArena:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.slot_of: dict[int, int] = {}
        self.length: dict[int, int] = {}
        self._free_slots: list[int] = []
        self._slots = 0
        self._capacity = 0

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self.slot_of

    @property
    def live(self) -> int:
        return len(self.slot_of)

    @property
    def slots(self) -> int:
        """Slots allocated, the scratch slot included (0 while nothing is allocated)."""
        return self._slots

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def scratch_slot(self) -> int:
        return self._slots - 1

    def _allocate(self, slots: int, capacity: int) -> None:
        """Grow the arena to at least (slots, capacity), copying what it holds."""
        if slots <= self._slots and capacity <= self._capacity:
            return
        new_slots = max(slots, 2 * self._slots if slots > self._slots else self._slots, 1)
        new_cap = max(capacity, 2 * self._capacity if capacity > self._capacity else self._capacity, 16)
        shape = (new_slots, self.num_kv_heads, new_cap, self.head_dim)
        for store in (self.k, self.v):
            for layer in range(self.num_layers):
                # Zeros, not empty: padded keys are masked, but 0 x NaN garbage in V would still be NaN.
                fresh = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if layer < len(store):
                    old = store[layer]
                    fresh[: old.shape[0], :, : old.shape[2]] = old
                    store[layer] = fresh
                else:
                    store.append(fresh)
        # The old scratch slot becomes an ordinary one (a sequence writes each position before reading it);
        # the new highest slot is the scratch.
        self._free_slots.extend(range(max(self._slots - 1, 0), new_slots - 1))
        self._free_slots.sort(reverse=True)  # pop() hands out the lowest slot: consecutive admissions
        self._slots, self._capacity = new_slots, new_cap

    def admit(self, seq_ids: list[int], new_tokens: list[int]) -> tuple[list[int], list[int]]:
        """Reserve room for `new_tokens[i]` more positions of `seq_ids[i]` (a new sequence gets a slot).

        Returns (slot, past length) per sequence; lengths advance only in `commit`.
        """
        new = [s for s in seq_ids if s not in self.slot_of]
        need_slots = self.live + len(new) + 1  # + the scratch slot
        pasts = [self.length.get(s, 0) for s in seq_ids]
        need_cap = max((p + n for p, n in zip(pasts, new_tokens, strict=True)), default=0)
        if need_slots > self._slots or need_cap > self._capacity:
            self._allocate(need_slots, need_cap)
        for s in new:
            self.slot_of[s] = self._free_slots.pop()
            self.length[s] = 0
        return [self.slot_of[s] for s in seq_ids], pasts

    def commit(self, seq_ids: list[int], new_tokens: list[int]) -> None:
        for s, n in zip(seq_ids, new_tokens, strict=True):
            self.length[s] += n

    def free(self, seq_ids: list[int]) -> list[int]:
        """Drop sequences; returns the ids that were unknown (freeing is idempotent)."""
        unknown = []
        for s in seq_ids:
            slot = self.slot_of.pop(s, None)
            if slot is None:
                unknown.append(s)
                continue
            del self.length[s]
            self._free_slots.append(slot)
        self._free_slots.sort(reverse=True)
        if not self.slot_of:  # release the memory between workloads
            self.k, self.v, self._free_slots = [], [], []
            self._slots = self._capacity = 0
        return unknown
