"""Decode steps at fixed shapes, replayed as CUDA graphs.

A decode step (every sequence brings one token) is launch-bound: ~350 kernels for ~1 ms of GPU work on
the benchmark shapes, so the host, not the GPU, set its pace. `DecodeGraphs` pads the step's B rows to a
batch size of `BATCH_SIZES` (as vLLM and SGLang do), runs `MoEModel.decode_forward` on fixed input buffers
and, on a GPU where the executor is capturable (bf16, one rank), captures that call once per padded size
and replays it: one launch per step. Elsewhere the same fixed-shape call runs eagerly.

    inputs  int64 [3, B]   token ids, cache positions, arena slots (padding: token 0, position 0, scratch slot)
    outputs final hidden states [B, H], routed ids int64 [B, L_moe, k]; the first n rows are the step's
            (the logits of those n rows are computed after the replay, outside the graph)

A graph bakes in the addresses of the cache arena, the weights and the expert shard. Graphs are dropped
and captured again when the arena is reallocated (it grows by doubling) or the executor's `version`
changes (a new plan's shard, another exchange). The first step at a new size runs eagerly once before
capture (kernels compile and pick their configurations outside the graph); that run writes the same keys
and values as the replay that follows, so it changes nothing.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .model import MoEModel

__all__ = ["DecodeGraphs", "BATCH_SIZES", "padded_batch"]

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, *range(8, 513, 8))


def padded_batch(n: int) -> int:
    """The smallest of BATCH_SIZES >= n (n <= 512)."""
    if not 1 <= n <= BATCH_SIZES[-1]:
        raise ValueError(f"n: expected 1 <= rows <= {BATCH_SIZES[-1]}, got {n}")
    return BATCH_SIZES[bisect.bisect_left(BATCH_SIZES, n)]


@dataclass
class _Entry:
    inputs: torch.Tensor  # int64 [3, B] on the device
    host: torch.Tensor  # int64 [3, B], pinned on a GPU: the one copy per step
    graph: torch.cuda.CUDAGraph | None = None
    hidden: torch.Tensor | None = None
    routed: torch.Tensor | None = None


class DecodeGraphs:
    max_batch = BATCH_SIZES[-1]

    def __init__(self, model: MoEModel, capture: bool) -> None:
        self.model = model
        self.capture = capture
        self.entries: dict[int, _Entry] = {}
        self.captures = 0  # graphs captured so far (tests and benchmarks read it)
        self._key: tuple | None = None
        self._pool = None

    def _current_key(self) -> tuple:
        arena = self.model.arena
        return (arena.k[0].data_ptr(), arena.slots, arena.capacity, getattr(self.model.executor, "version", 0))

    def invalidate(self) -> None:
        self.entries.clear()
        self._pool = None

    def run(self, tokens: np.ndarray, positions: list[int], slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [n, V], routed ids [n, L_moe, k]) of n one-token rows; cache room must be admitted."""
        n = len(slots)
        B = padded_batch(n)
        key = self._current_key()
        if key != self._key:
            self.invalidate()
            self._key = key
        entry = self.entries.get(B)
        if entry is None:
            pin = self.capture and torch.cuda.is_available()
            entry = _Entry(torch.empty((3, B), dtype=torch.int64, device=self.model.device),
                           torch.empty((3, B), dtype=torch.int64, pin_memory=pin))
            self.entries[B] = entry
        host = entry.host.numpy()
        host[0, :n] = tokens
        host[1, :n] = positions
        host[2, :n] = slots
        host[:2, n:] = 0
        host[2, n:] = self.model.arena.scratch_slot
        entry.inputs.copy_(entry.host, non_blocking=True)
        if not (self.capture and getattr(self.model.executor, "capturable", False)):
            hidden, routed = self.model.decode_forward(*entry.inputs)
            return self.model.logits(hidden[:n]), routed[:n]
        if entry.graph is None:
            try:
                self._record(entry)
            except RuntimeError as err:  # an op that cannot be captured: stay correct, say so once
                log.warning("decode steps run without CUDA graphs: capture failed (%s)", err)
                self.capture = False
                self.invalidate()
                return self.run(tokens, positions, slots)
        entry.graph.replay()
        # The outputs live in the graph's pool and the next replay (of any size) may overwrite them.
        return self.model.logits(entry.hidden[:n]), entry.routed[:n].clone()

    def _record(self, entry: _Entry) -> None:
        model = self.model
        side = torch.cuda.Stream(model.device)
        side.wait_stream(torch.cuda.current_stream(model.device))
        with torch.cuda.stream(side):
            model.decode_forward(*entry.inputs)  # warm-up outside the capture (same writes as the replay)
        torch.cuda.current_stream(model.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        entry.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(entry.graph, pool=self._pool):
            entry.hidden, entry.routed = model.decode_forward(*entry.inputs)
        self.captures += 1
        log.debug("captured a decode graph for batch %d (%d so far)", entry.inputs.shape[1], self.captures)
