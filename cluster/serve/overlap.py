"""Overlapped steps (`EngineConfig.overlap_steps`): step N+1 is sent before step N's tokens are back.

A decode step is short (a few ms on the benchmark shapes) and the driver's work around it (planning,
packing, Ray's channels, streaming the tokens) is of the same order; run one after the other, the GPU idles
while the host works. Here the replica plans and sends step N+1 while step N runs, then waits for N:

- A sequence whose token step N samples is fed that token in step N+1 without the driver knowing it: the
  driver appends a placeholder (`Sequence.unknown`), and the worker feeds the token it sampled last for
  the sequence (`ExpertWorker.step(feed=...)`). When N's outputs land, the placeholder becomes the token
  and is streamed.
- A sequence that stops at step N (a stop token; its length limit is known ahead and never overshot) has
  already been sent with step N+1: that row's token is dropped, and the sequence is freed with the next
  step, as any finished one.
- Nothing is preempted while a step is in flight (`safe`): when the free blocks might not cover every
  running sequence's next chunk, the replica waits for the step first. Score requests also run after the
  step in flight lands (their log-probabilities come with the step's outputs).

Greedy output is unchanged: every step computes what it would have computed, one step earlier.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from expertmesh.workers.group import SentStep

from .scheduler import StepPlan
from .sequence import Kind, Sequence

__all__ = ["InFlight", "safe", "advance"]


@dataclass
class InFlight:
    """A step sent and not yet landed: its plan, the group's handle on it, and where each sequence's sampled
    token goes in `Sequence.tokens`."""

    plan: StepPlan
    sent: SentStep
    routed: bool = False
    ids: dict[Sequence, int] = field(default_factory=dict)
    samples: dict[Sequence, int] = field(default_factory=dict)


def safe(running: list[Sequence], free_blocks: list[int], blocks_for) -> bool:
    """Whether no running sequence can need a block its home lacks in the next plan (so it preempts
    nothing): per worker, the free blocks cover every running sequence's remaining tokens plus one."""
    need = [0] * len(free_blocks)
    for seq in running:
        need[seq.home] += blocks_for(seq.remaining) + 1
    return all(n <= f for n, f in zip(need, free_blocks, strict=True))


def advance(step: InFlight) -> None:
    """What the driver knows once the step is sent: each sequence's cache holds its chunk; one that samples
    gets a placeholder for the token, filled when the step lands."""
    for seq, n in step.plan.chunks.items():
        step.ids[seq] = seq.seq_id
        seq.computed += n
        if seq.kind is Kind.GENERATE and seq.computed == len(seq.tokens):
            step.samples[seq] = len(seq.tokens)
            seq.tokens.append(0)
            seq.unknown += 1
