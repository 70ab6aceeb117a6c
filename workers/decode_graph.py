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
the executor bounds each rank's expert rows by G * B * k. Capture is not a group decision (each rank
captures a size the first time it meets it), so a capturing step must not run the layers more often than
a replay does: the step that captures returns its eager warm-up's outputs and the graph is first replayed
at the next step.

    inputs  int32 [4 + W, B]   row 0 token ids, 1 positions, 2 flat cache slots of the new keys
                               (block * block_size + offset), 3 lengths (position + 1), then the block
                               table transposed: row 4 + i holds every row's i-th block
            padding rows: token 0, position 0, the scratch block's first slot, length 1, table all scratch
    outputs final hidden states [B, H], routed ids int64 [B, L_moe, k]; the first n rows are the step's
            (the logits of those n rows are computed after the replay, outside the graph)

Mixed steps ("flat" steps, opt-in per step): a prefill chunk is n rows of one token each, row j at
position past + j attending over its first past + j + 1 keys through the sequence's block table. The
step's keys are all written before any row attends, so the decode kernel computes causal prefill
attention; such a step then runs at the same fixed shapes (and graphs) as a decode step, where a mixed
step would otherwise run eagerly (launch-bound, ~2x a graph's time on the benchmark shapes). Each row
reads its whole past, so only short chunks over short pasts qualify (`fixed_rows`); the logits are those
of each sequence's last row.

The paged cache is allocated once, so a graph's addresses stay valid as sequences grow: a size is captured
once and replayed until the executor's `version` changes (a new plan's shard, another exchange). The table
has W = min(cache blocks, GRAPH_KEYS / block_size) columns in every graph: a row never reads past its
length, so W costs only the input buffer, (4 + W) x 512 int32 shared by every size (33.5 MB at W = 16k),
and each step copies just its first 4 + w rows (w = blocks of its longest sequence; contiguous because the
table is stored transposed). A step with a sequence longer than GRAPH_KEYS runs the same computation
eagerly at its own width: its attention reads gigabytes per row, which dwarfs the launches a graph saves.
The first step at a new size runs eagerly (kernels compile outside the graph), is captured, and answers
with the eager run.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .moe import StepContext

if TYPE_CHECKING:
    from .model import MoEModel

__all__ = ["DecodeGraphs", "BATCH_SIZES", "GRAPH_KEYS", "FLAT_KEYS", "padded_batch", "fixed_rows", "group_rows"]

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, *range(8, 513, 8))
GRAPH_KEYS = 262_144  # longest sequence a captured step serves; longer ones run the step eagerly
HEADER = 4  # input rows before the block table
# Longest sequence (past + chunk) whose prefill chunk a flat step takes: its rows each read up to this many
# keys through the decode kernel (prefill attention reads them once per chunk instead).
FLAT_KEYS = 4096


def padded_batch(n: int) -> int:
    """The smallest of BATCH_SIZES >= n (n <= 512)."""
    if not 1 <= n <= BATCH_SIZES[-1]:
        raise ValueError(f"n: expected 1 <= rows <= {BATCH_SIZES[-1]}, got {n}")
    return BATCH_SIZES[bisect.bisect_left(BATCH_SIZES, n)]


def fixed_rows(lengths: np.ndarray, pasts: Sequence[int], prefill_tokens: int) -> int:
    """Rows of a fixed-shape step for one rank's sequences bringing `lengths` new tokens over `pasts`
    cached ones, or 0 when the step must take the variable path: decode-only steps always fit (up to
    `max_batch` rows); sequences bringing several tokens only in flat steps, up to `prefill_tokens` of
    them per step, each ending within FLAT_KEYS."""
    rows = int(lengths.sum())
    if not 0 < rows <= DecodeGraphs.max_batch:
        return 0
    multi = lengths > 1
    if not multi.any():
        return rows
    if int(lengths[multi].sum()) > prefill_tokens:
        return 0
    ends = np.asarray(pasts, dtype=np.int64)[multi] + lengths[multi]
    return rows if int(ends.max()) <= FLAT_KEYS else 0


def group_rows(packed: Sequence, lengths: Mapping[int, int], prefill_tokens: int) -> int:
    """The most rows of a rank when every rank's step (`PackedTokens`, pasts from `lengths`) fits
    `fixed_rows` (a rank without sequences always does), else 0."""
    most = 0
    for p in packed:
        if len(p.seq_ids):
            rows = fixed_rows(p.lengths, [lengths.get(s, 0) for s in p.seq_ids.tolist()], prefill_tokens)
            if not rows:
                return 0
            most = max(most, rows)
    return most


@dataclass
class _Entry:
    inputs: torch.Tensor  # int32 [4 + W, B] on the device (a view of the shared buffer)
    host: np.ndarray  # int32 [4 + W, B] (a view of the shared pinned buffer): the one copy per step
    host_tensor: torch.Tensor  # the same memory as a tensor, for the copy
    graph: torch.cuda.CUDAGraph | None = None
    hidden: torch.Tensor | None = None
    routed: torch.Tensor | None = None


class DecodeGraphs:
    max_batch = BATCH_SIZES[-1]

    def __init__(self, model: MoEModel, capture: bool) -> None:
        self.model = model
        self.capture = capture
        cache = model.cache
        self.width = min(cache.num_blocks, cache.blocks_for(GRAPH_KEYS))  # W: block-table columns of a graph
        pin = capture and torch.cuda.is_available()
        size = (HEADER + self.width) * self.max_batch
        self._device_buffer = torch.zeros(size, dtype=torch.int32, device=model.device)  # valid ids
        self._host_buffer = torch.zeros(size, dtype=torch.int32, pin_memory=pin)
        self.entries: dict[int, _Entry] = {}
        self.captures = 0  # graphs captured so far (tests and benchmarks read it)
        self.steps = 0  # steps run at fixed shapes, captured or not
        self.flat_steps = 0  # of those, steps that took prompt chunks as one-token rows
        self.long_steps = 0  # of those, steps with a sequence past the graphs' table, run eagerly at its width
        self._version: int | None = None
        self._pool = None

    def invalidate(self) -> None:
        self.entries.clear()
        self._pool = None

    def _entry(self, B: int) -> _Entry:
        entry = self.entries.get(B)
        if entry is None:
            shape, n = (HEADER + self.width, B), (HEADER + self.width) * B
            host = self._host_buffer[:n].view(shape)
            entry = _Entry(self._device_buffer[:n].view(shape), host.numpy(), host)
            self.entries[B] = entry
        return entry

    def run(self, tokens: np.ndarray, seq_ids: Sequence[int], positions: Sequence[int],
            batch: int = 0, counts: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [n, V], routed ids [rows, L_moe, k]) of n sequences, their cache blocks admitted.

        positions: each sequence's past length; counts: its new tokens (default one each; more: a flat
        step, one row per token); batch: the group's largest row count this step (several ranks; every
        rank pads to the same size, n may be 0), else 0.
        """
        n = len(seq_ids)
        last = None  # rows whose logits are the sequences' (None: every row, a decode step)
        if counts is not None and n and int(counts.max()) > 1:
            ends = np.cumsum(counts)
            last = ends - 1
            self.flat_steps += 1
            positions = np.repeat(np.asarray(positions, dtype=np.int64), counts) + np.arange(ends[-1]) - np.repeat(
                ends - counts, counts)
        else:
            counts = None
        rows = len(positions)
        B = padded_batch(max(rows, batch))
        self.steps += 1
        if self.model.executor.version != self._version:
            self.invalidate()
            self._version = self.model.executor.version
        cache = self.model.cache
        w = cache.blocks_for(max(positions, default=0) + 1)  # table columns this step reads
        if w > self.width:  # longer than any graph serves: the same step, eagerly, at its own width
            self.long_steps += 1
            inputs = np.empty((HEADER + w, B), dtype=np.int32)
            self._fill(inputs, tokens, seq_ids, positions, w, counts)
            hidden, routed = self._forward(torch.from_numpy(inputs).to(self.model.device))
            return self._outputs(hidden, routed, rows, last)
        entry = self._entry(B)
        self._fill(entry.host, tokens, seq_ids, positions, w, counts)
        size = (HEADER + w) * B  # only the rows this step reads: contiguous, the table being transposed
        entry.inputs.view(-1)[:size].copy_(entry.host_tensor.view(-1)[:size], non_blocking=True)
        if not (self.capture and self.model.executor.capturable):
            hidden, routed = self._forward(entry.inputs[: HEADER + w])
            return self._outputs(hidden, routed, rows, last)
        if entry.graph is None:
            hidden, routed = self._record(entry)
            return self._outputs(hidden, routed, rows, last)
        entry.graph.replay()
        # The outputs live in the graph's pool and the next replay (of any size) may overwrite them.
        return self._outputs(entry.hidden, entry.routed, rows, last, copy=True)

    def capture_sizes(self, rows: int) -> int:
        """Capture the graph of every batch size up to `rows` now (steps of padding rows only: they write
        and read just the scratch block), so that no served step pays for a capture (an eager step and a
        capture: tens of ms). Returns the graphs captured. Several ranks: every rank calls it with the same
        rows (the steps' MoE layers are collectives)."""
        if not (self.capture and self.model.executor.capturable):
            return 0
        if self.model.executor.version != self._version:
            self.invalidate()
            self._version = self.model.executor.version
        before = self.captures
        for B in BATCH_SIZES[: BATCH_SIZES.index(padded_batch(rows)) + 1]:
            entry = self._entry(B)
            if entry.graph is None and self.capture:
                self._fill(entry.host, np.zeros(0, np.int32), [], [], 1)
                size = (HEADER + 1) * B  # as `run` copies: the rows a step of one table column reads
                entry.inputs.view(-1)[:size].copy_(entry.host_tensor.view(-1)[:size])
                self._record(entry)
        return self.captures - before

    def _outputs(self, hidden: torch.Tensor, routed: torch.Tensor, rows: int, last: np.ndarray | None,
                 copy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the sequences' last rows (every row of a decode step) and the real rows' routed ids."""
        states = hidden[:rows] if last is None else hidden.index_select(0, torch.from_numpy(last).to(hidden.device))
        routed = routed[:rows]
        return self.model.logits(states), routed.clone() if copy else routed

    def _fill(self, host: np.ndarray, tokens: np.ndarray, seq_ids: Sequence[int], positions: Sequence[int],
              w: int, counts: np.ndarray | None = None) -> None:
        """Rows 0..4+w of the step's inputs: the real rows (one per new token), then padding rows on the
        scratch block."""
        cache = self.model.cache
        pos = np.asarray(positions, dtype=np.int64)
        n = len(pos)
        host[0, :n] = tokens
        host[1, :n] = pos
        host[2, :n] = cache.slots(seq_ids, pos, counts)
        host[3, :n] = pos + 1
        table = cache.table(seq_ids, w)
        host[HEADER : HEADER + w, :n] = (table if counts is None else np.repeat(table, counts, axis=0)).T
        host[:2, n:] = 0
        host[2, n:] = cache.scratch_block * cache.block_size
        host[3, n:] = 1
        host[HEADER : HEADER + w, n:] = cache.scratch_block  # (the torch path gathers every column)

    def _forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`decode_forward` of a step of B = inputs.shape[1] rows on every rank (B bounds the expert rows)."""
        return self.model.decode_forward(inputs, StepContext(fixed_batch=inputs.shape[1]))

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
