"""Routing statistics leave the workers through an injected sink (workers never import the control plane).

The driver passes a picklable sink, e.g. `expertmesh.cluster.recorder.RedisStatsSink(url, model, run)`, to
`EPGroup.create`; every worker calls `sink.open(writer_id)` in its own process and hands each step's routed
expert ids to the recorder it gets back. The recorder turns them into counts, same-layer co-activation and
layer-to-layer transitions (DESIGN.md §3) and writes them when flushed.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["StatsSink", "StatsRecorder", "StepRecorder"]


@runtime_checkable
class StatsRecorder(Protocol):
    def record(self, topk_ids: np.ndarray) -> None:
        """Add one step's routing: int [T, L, k] expert ids of this worker's tokens, every MoE layer."""
        ...

    def flush(self, window: int | None = None) -> None:
        """Close the window recorded since the last flush under the id `window` (the same id on every
        worker of a step, so the store sums their deltas); None lets the recorder choose (wall clock)."""
        ...


@runtime_checkable
class StatsSink(Protocol):
    def open(self, writer_id: str) -> StatsRecorder:
        """Called once in each worker process; `writer_id` names the worker (unique within the run)."""
        ...


class StepRecorder:
    """A worker's side of recording: record every serving step, flush every `flush_every` steps.

    Window ids are step counts divided by `flush_every`: workers run steps in lockstep, so the deltas of
    one window carry the same id everywhere. A recorder with `close(timeout_s)` is closed at shutdown.
    """

    def __init__(self, sink: StatsSink | None, writer_id: str, flush_every: int = 1) -> None:
        if sink is not None and not isinstance(sink, StatsSink):
            raise TypeError(
                f"sink: expected an object with open(writer_id) -> recorder, got {type(sink).__name__}"
            )
        if flush_every < 1:
            raise ValueError(f"flush_every: expected >= 1 steps, got {flush_every}")
        self.recorder = None if sink is None else sink.open(writer_id)
        self.flush_every = flush_every
        self.steps = 0

    @property
    def recording(self) -> bool:
        """False without a sink: `record` then only counts the step (callers may skip reading ids back)."""
        return self.recorder is not None

    def record(self, topk_ids: np.ndarray | None) -> None:
        """Count one step (every worker calls this every step, with or without tokens)."""
        if self.recorder is not None and topk_ids is not None and topk_ids.shape[0]:
            self.recorder.record(topk_ids)
        self.steps += 1
        if self.steps % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        """Close the current window (a recorder ignores a window with nothing recorded)."""
        if self.recorder is not None and self.steps:
            self.recorder.flush((self.steps - 1) // self.flush_every)  # the window of the last step

    def close(self, timeout_s: float = 10.0) -> None:
        self.flush()
        close = getattr(self.recorder, "close", None)
        if close is not None:
            close(timeout_s)
