"""Decode steps at fixed shapes, replayed as CUDA graphs.

A decode step (every sequence brings one token) is launch-bound: ~350 kernels for ~1 ms of GPU work on
the benchmark shapes, so the host, not the GPU, set its pace. `DecodeGraphs` pads the step's rows to a
batch size B of `BATCH_SIZES` (as vLLM and SGLang do), runs `MoEModel.decode_forward` on fixed input
buffers and, on a GPU where the executor is capturable (bf16; one rank, or several ranks exchanging
through symmetric memory), captures that call once per padded size and replays it: one launch per step.
Elsewhere the same fixed-shape call runs eagerly.

Several ranks: every MoE layer is a collective, so all ranks of a step must run the same exchanges. The
driver decides for the whole group that a step is a fixed-shape decode step and passes the group's
largest batch (`batch`): every rank pads to the same B (a rank without sequences runs B padding rows) and
the executor bounds each rank's expert rows by G * B * k. Capture is not a group decision (a rank's
arena grows on its own), so a capturing step must not run the layers more often than a replay does: the
step that captures returns its eager warm-up's outputs and the graph is first replayed at the next step.

    inputs  int64 [3, B]   token ids, cache positions, arena slots (padding: token 0, position 0, scratch slot)
    outputs final hidden states [B, H], routed ids int64 [B, L_moe, k]; the first n rows are the step's
            (the logits of those n rows are computed after the replay, outside the graph)

A graph bakes in the addresses of the cache arena, the weights and the expert shard. Graphs are dropped
and captured again when the arena is reallocated (it grows by doubling) or the executor's `version`
changes (a new plan's shard, another exchange). The first step at a new size runs eagerly (kernels
compile and pick their configurations outside the graph), is captured, and answers with the eager run.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .moe import StepContext

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
        self.steps = 0  # steps run at fixed shapes, captured or not
        self._key: tuple | None = None
        self._pool = None

    def _current_key(self) -> tuple:
        arena = self.model.arena
        return (arena.k[0].data_ptr(), arena.slots, arena.capacity, self.model.executor.version)

    def invalidate(self) -> None:
        self.entries.clear()
        self._pool = None

    def run(self, tokens: np.ndarray, positions: list[int], slots: list[int],
            batch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [n, V], routed ids [n, L_moe, k]) of n one-token rows; cache room must be admitted.

        batch: the group's largest row count this step (several ranks; every rank pads to the same size,
        n may be 0), else 0.
        """
        n = len(slots)
        B = padded_batch(max(n, batch))
        self.steps += 1
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
        if not (self.capture and self.model.executor.capturable):
            hidden, routed = self._forward(entry.inputs)
            return self.model.logits(hidden[:n]), routed[:n]
        if entry.graph is None:
            hidden, routed = self._record(entry)
            return self.model.logits(hidden[:n]), routed[:n]
        entry.graph.replay()
        # The outputs live in the graph's pool and the next replay (of any size) may overwrite them.
        return self.model.logits(entry.hidden[:n]), entry.routed[:n].clone()

    def _forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`decode_forward` of a step of B = inputs.shape[1] rows on every rank (B bounds the expert rows)."""
        return self.model.decode_forward(*inputs, StepContext(fixed_batch=inputs.shape[1]))

    def _record(self, entry: _Entry) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the step eagerly, then capture it; returns the eager run's outputs."""
        model = self.model
        current = torch.cuda.current_stream(model.device)
        side = torch.cuda.Stream(model.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            hidden, routed = self._forward(entry.inputs)  # outside the capture: kernels compile here
        current.wait_stream(side)
        for t in (hidden, routed):
            t.record_stream(current)  # allocated on the side stream, read on this one
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                entry.hidden, entry.routed = self._forward(entry.inputs)
        except RuntimeError as err:  # an op that cannot be captured: stay correct, say so once
            log.warning("decode steps run without CUDA graphs: capture failed (%s)", err)
            self.capture = False
            self.invalidate()
        else:
            entry.graph = graph
            self.captures += 1
            log.debug("captured a decode graph for batch %d (%d so far)", entry.inputs.shape[1], self.captures)
        return hidden, routed
