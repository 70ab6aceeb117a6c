"""Routing statistics leave the workers through an injected sink (workers never import the control plane).

The driver passes a picklable sink, e.g. `expertmesh.cluster.RedisStatsSink(url=..., model=..., ...)`, to
`EPGroup.create`; every worker calls `sink.open(writer_id)` in its own process and hands each step's routed
expert ids to the recorder it gets back. The recorder turns them into counts, same-layer co-activation and
layer-to-layer transitions (DESIGN.md §3) and writes them when flushed.

On a GPU, a recorder that also takes counts (`add_counts`) gets them from `DeviceCounts` instead: the
worker counts each step where its ids already are (a few scatter-adds) and hands over one window's arrays
at flush. Counting a 4096-token step of a 58-layer, 256-expert, top-8 model on the CPU costs ~60 ms (numpy
bincount over ~21 M cells), more than the step itself.

In a group of W workers whose sink opens recorders for a layer share (`open(writer_id, group=...)`), the
workers sum their window's counts at flush (one all-reduce of the arrays they hold, in the lockstep step
that closes the window) and each flushes the rows of its share of the layers: every worker encodes and
sends 1/W of the group's window instead of a whole window of its own tokens, and a reader fetches one
window's worth per window instead of W (at DeepSeek-V3 size, 8 writers: ~0.75 instead of 3.3 MB each).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["StatsSink", "StatsRecorder", "CountingRecorder", "StepRecorder", "DeviceCounts"]


@runtime_checkable
class StatsRecorder(Protocol):
    def record(self, topk_ids: np.ndarray) -> None:
        """Add one step's routing: int [T, L, k] expert ids of this worker's tokens, every MoE layer."""
        ...

    def flush(self, window: int | None = None) -> None:
        """Close the window recorded since the last flush under the id `window` (the same id on every
        worker of a step, so the store sums their deltas); None lets the recorder choose (wall clock)."""
        ...

    def close(self, timeout_s: float = 10.0) -> object:
        """Flush what is left and stop (called once, at the worker's shutdown)."""
        ...


@runtime_checkable
class CountingRecorder(StatsRecorder, Protocol):
    """A recorder that also takes counts made elsewhere (`DeviceCounts.take`), for a share of the layers."""

    layers: tuple[int, int]  # [first, stop): the MoE layers it records (all of them unless a group's share)
    top1: bool  # whether it keeps top-1 transitions (a caller counting for it may skip them otherwise)

    def add_counts(self, counts: np.ndarray, pairs: np.ndarray, trans: np.ndarray, tokens: int,
                   trans_top1: np.ndarray | None = None) -> None: ...


@runtime_checkable
class StatsSink(Protocol):
    def open(self, writer_id: str, group: tuple[int, int] | None = None) -> StatsRecorder:
        """Called once in each worker process; `writer_id` names the worker (unique within the run). `group`
        = (rank, size) asks for a recorder of this worker's share of the layers (a `CountingRecorder` whose
        `layers` say which); a sink may answer with a recorder of every layer."""
        ...


class DeviceCounts:
    """One window's routing counts, accumulated on the ids' device (int32; a window holds < 2^31 tokens).

        counts [L, E]          tokens per expert and layer
        pairs  [L, E, E]       slots i < j of a token add one to (id_i, id_j), in the router's order
        trans  [L-1, E, E]     every expert of layer l times every expert of layer l + 1
        trans_top1 [L-1, E, E] the same from slot 0 (the router's first choice) only

    the layout `add_counts` of a recorder takes (it folds pairs into its triangle and checks duplicates).
    """

    # Tokens per pass: bounds the transition index tensor (T x k^2 x (L-1) int64, 30 MB at top-8, 58 layers).
    block = 1024

    def __init__(self, num_layers: int, num_experts: int, top_k: int, device: torch.device,
                 top1: bool = True) -> None:
        L, E = num_layers, num_experts
        self.shape = (L, E, top_k)
        self.counts = torch.zeros(L * E, dtype=torch.int32, device=device)
        self.pairs = torch.zeros(L * E * E, dtype=torch.int32, device=device)
        self.trans = torch.zeros(max(L - 1, 0) * E * E, dtype=torch.int32, device=device)
        self.trans_top1 = torch.zeros_like(self.trans) if top1 else None  # None: not counted, not handed over
        self.tokens = 0
        first, second = torch.triu_indices(top_k, top_k, 1, device=device)
        self._first, self._second = first, second
        self._layer = torch.arange(L, device=device)[:, None, None]

    def add(self, topk_ids: torch.Tensor) -> None:
        """Count one step: int [T, L, k] ids on this counter's device (the router's: in range, checked
        for duplicates when the window is folded)."""
        L, E, k = self.shape
        if topk_ids.dim() != 3 or tuple(topk_ids.shape[1:]) != (L, k):
            raise ValueError(f"topk_ids: expected shape [T, {L}, {k}], got {list(topk_ids.shape)}")
        for start in range(0, topk_ids.shape[0], self.block):
            x = topk_ids[start : start + self.block].to(torch.int64).permute(1, 2, 0)  # [L, k, T]
            rows = self._layer * E
            _scatter_count(self.counts, (x + rows).reshape(-1))
            _scatter_count(self.pairs, ((x[:, self._first] * E + x[:, self._second]) + rows * E).reshape(-1))
            if L > 1:  # [L-1, k, k, T]: (expert of layer l) * E + (expert of layer l + 1), offset per layer
                cells = x[:-1, :, None, :] * E + x[1:, None, :, :] + (self._layer[:-1, :, :, None] * E * E)
                _scatter_count(self.trans, cells.reshape(-1))
                if self.trans_top1 is not None:
                    _scatter_count(self.trans_top1, cells[:, 0].reshape(-1))
        self.tokens += int(topk_ids.shape[0])

    def take(self, reduce: Callable[[torch.Tensor], None] | None = None,
             layers: tuple[int, int] | None = None) -> dict:
        """{counts, pairs, trans, tokens}, and trans_top1 when counted, on the host (a recorder's
        `add_counts` keywords), and zeros behind them.

        reduce: sums a tensor over the group in place (every worker of the group calls `take` together);
        the tokens are then the group's, read from layer 0's counts (each token adds k there).
        layers: only the rows of the share [first, stop), and the transitions leaving them.
        """
        L, E, k = self.shape
        arrays = {"counts": self.counts, "pairs": self.pairs, "trans": self.trans}
        if self.trans_top1 is not None:
            arrays["trans_top1"] = self.trans_top1
        if reduce is not None:
            for t in arrays.values():
                reduce(t)
            self.tokens = int(self.counts[:E].sum()) // k
        first, stop = (0, L) if layers is None else layers
        moves = max(min(stop, L - 1) - first, 0)
        rows = {"counts": (first * E, stop * E, (stop - first, E)),
                "pairs": (first * E * E, stop * E * E, (stop - first, E, E)),
                "trans": (first * E * E, (first + moves) * E * E, (moves, E, E))}
        out = {}
        for name, t in arrays.items():
            a, b, shape = rows.get(name, rows["trans"])
            out[name] = t[a:b].to("cpu", copy=True).numpy().reshape(shape)  # copies: zeroed next
        out["tokens"] = self.tokens
        for t in arrays.values():
            t.zero_()
        self.tokens = 0
        return out


def _scatter_count(into: torch.Tensor, cells: torch.Tensor) -> None:
    """into[c] += 1 for every c in cells (repeats add up; integer adds are exact in any order)."""
    into.index_add_(0, cells, torch.ones(cells.shape, dtype=into.dtype, device=into.device))


class StepRecorder:
    """A worker's side of recording: record every serving step, flush every `flush_every` steps.

    Window ids are step counts divided by `flush_every`: workers run steps in lockstep, so the deltas of
    one window carry the same id everywhere.
    """

    def __init__(self, sink: StatsSink | None, writer_id: str, flush_every: int = 1,
                 shape: tuple[int, int, int] | None = None, device: torch.device | None = None,
                 device_counting: bool | None = None, group: tuple[int, int] | None = None,
                 reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        """group: (rank, size) of a group whose workers sum their counts with `reduce` (an in-place sum over
        the group, e.g. `torch.distributed.all_reduce`) and each flush one share of the layers: where the
        sink's `open` takes `group` and hands back a recorder of a share (its `layers`), which takes counts
        (`shape` given); else every worker writes its own tokens' windows."""
        if sink is not None and not isinstance(sink, StatsSink):
            raise TypeError(
                f"sink: expected an object with open(writer_id) -> recorder, got {type(sink).__name__}"
            )
        if flush_every < 1:
            raise ValueError(f"flush_every: expected >= 1 steps, got {flush_every}")
        self.share, self.reduce = None, reduce
        if sink is None:
            self.recorder = None
        elif group is not None and shape and reduce is not None:
            self.recorder = sink.open(writer_id, group=group)
            layers = tuple(self.recorder.layers) if isinstance(self.recorder, CountingRecorder) else (0, shape[0])
            self.share = None if layers == (0, shape[0]) else layers  # whole windows: the group must not sum
        else:
            self.recorder = sink.open(writer_id)
        self.flush_every = flush_every
        self.steps = 0
        self._unflushed = 0  # steps since the last flush (the same on every worker of a group)
        # Given (layers, experts, top_k), count on `device` when the recorder takes counts. Default: on a GPU
        # only; on the CPU numpy's bincount (the recorder's own counting) is ~10x faster than torch's
        # index_add_ (56 vs 649 ms for a 4096-token step of 58 layers x 256 experts, top-8). A group that
        # sums its counts needs them as tensors, also on the CPU.
        device = device or torch.device("cpu")
        if device_counting is None:
            device_counting = device.type == "cuda" or self.share is not None
        self.device_counts = None
        if device_counting and isinstance(self.recorder, CountingRecorder) and shape:
            # Skip the top-1 transitions where the recorder would drop them (RedisStatsSink.top1 off).
            self.device_counts = DeviceCounts(*shape, device=device, top1=self.recorder.top1)
        elif self.share is not None:
            raise TypeError("group: a recorder of a layer share must take counts (add_counts)")

    @property
    def recording(self) -> bool:
        """False without a sink: `record` then only counts the step (callers may skip reading ids back)."""
        return self.recorder is not None

    def record(self, topk_ids: torch.Tensor | None) -> None:
        """Count one step (every worker calls this every step, with or without tokens): int [T, L, k]."""
        if self.recorder is not None and topk_ids is not None and topk_ids.shape[0]:
            if self.device_counts is not None:
                self.device_counts.add(topk_ids)
            else:
                self.recorder.record(topk_ids.cpu().numpy().astype(np.int32))
        self.steps += 1
        self._unflushed += 1
        if self.steps % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        """Close the current window (a recorder ignores a window with nothing recorded). In a group that
        sums its counts, every worker calls this together: the sum is a collective."""
        if self.recorder is None or not self._unflushed:
            return
        self._unflushed = 0
        if self.share is not None:
            self.recorder.add_counts(**self.device_counts.take(self.reduce, self.share))
        elif self.device_counts is not None and self.device_counts.tokens:
            self.recorder.add_counts(**self.device_counts.take())
        self.recorder.flush((self.steps - 1) // self.flush_every)  # the window of the last step

    def close(self, timeout_s: float = 10.0) -> None:
        self.flush()
        if self.recorder is not None:
            self.recorder.close(timeout_s)
