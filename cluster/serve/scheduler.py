"""Iteration-level scheduling of one replica: which tokens of which sequences its next step feeds.

Rules, in order, per step (W workers, each with a budget of `max_batch_tokens` new tokens and the KV
blocks its ledger has free; a sequence's blocks live on its home worker):

1. Decode: every running sequence that waits for one token gets it, oldest first.
2. Prefill: running sequences part-way through their prompt get the next chunk, as much as the home's
   budget leaves, oldest first. A home that runs decodes in this step has at most `decode_prefill_tokens`
   of its budget left for prompts (rules 2 and 3): a long prompt then costs each running stream many
   short steps instead of one long one.
3. Admission: waiting sequences, oldest first, join while the replica runs fewer than `max_running`.
   A sequence goes to the worker with the most blocks left after what running prompts still need (fewest
   sequences on ties), and only when those blocks hold its whole prompt and one generated token; else it
   and everything behind it wait (first come, first served: no large prompt starves). Its first chunk
   is what that worker's budget leaves.

Preemption (by recompute, as vLLM does): when a running sequence needs a block its home does not have,
the newest running sequence on that home is preempted, again until the block is there; if the needy one
is itself the newest, it is the one preempted. A preempted sequence loses its cache, goes back to the
waiting queue in arrival order and is prefilled again from prompt + generated tokens when admitted. The
oldest sequence therefore always advances, and since the engine refuses a request whose prompt plus
`max_new_tokens` exceeds one worker's blocks, every admitted sequence finishes: no load exhausts the budget.
Sequences preempted in a step are not admitted again in the same step.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from .sequence import Sequence, State

__all__ = ["Scheduler", "StepPlan", "Limits"]


@dataclass(frozen=True)
class Limits:
    workers: int
    block_size: int
    max_batch_tokens: int  # new tokens per worker and step
    max_running: int
    decode_prefill_tokens: int | None = None  # prompt tokens per worker and step while it runs decodes


    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)


@dataclass
class StepPlan:
    chunks: dict[Sequence, int] = field(default_factory=dict)  # sequence -> new tokens it feeds
    freed: list[int] = field(default_factory=list)  # group ids of the sequences preempted in this plan
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.running: list[Sequence] = []  # arrival order
        self.waiting: list[Sequence] = []  # arrival order

    def add(self, seq: Sequence) -> None:
        """Queue a sequence (new, preempted or recovered) at its place in arrival order."""
        seq.state = State.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)

    def remove(self, seq: Sequence) -> None:
        for queue in (self.running, self.waiting):
            if seq in queue:
                queue.remove(seq)

    def schedule(self, free_blocks: list[int], next_id: Callable[[], int]) -> StepPlan:
        """Plan one step from each worker's free KV blocks; admitted sequences get a home and an id from
        `next_id`. Moves sequences between `running` and `waiting` as it admits and preempts."""
        lim = self.limits
        free = list(free_blocks)
        budget = [lim.max_batch_tokens] * lim.workers
        plan = StepPlan()

        def need(seq: Sequence, n: int) -> int:
            return lim.blocks_for(seq.computed + n) - lim.blocks_for(seq.computed)

        def preempt(victim: Sequence) -> None:
            h = victim.home
            n = plan.chunks.pop(victim, None)
            if n is not None:
                budget[h] += n
                free[h] += need(victim, n)
            free[h] += lim.blocks_for(victim.computed)
            self.running.remove(victim)
            plan.freed.append(victim.seq_id)
            plan.preempted.append(victim)
            victim.preemptions += 1
            victim.reset()
            self.add(victim)

        def place(seq: Sequence, n: int) -> None:
            h = seq.home
            while need(seq, n) > free[h]:
                others = [s for s in self.running if s.home == h and s is not seq]
                victim = others[-1] if others else None
                if victim is None or victim.arrival < seq.arrival:
                    preempt(seq)
                    return
                preempt(victim)
            free[h] -= need(seq, n)
            budget[h] -= n
            plan.chunks[seq] = n

        for decode in (True, False):
            if not decode and lim.decode_prefill_tokens is not None:
                # A worker running decodes takes fewer prompt tokens: its decodes wait for the whole step.
                for seq in plan.chunks:
                    budget[seq.home] = min(budget[seq.home], lim.decode_prefill_tokens)
            for seq in list(self.running):
                if seq.state is not State.RUNNING or (seq.remaining == 1) != decode or seq.exhausted:
                    continue
                n = min(seq.remaining, budget[seq.home])
                if n > 0:
                    place(seq, n)

        # Blocks that running prompts will still take (up to their first generated token).
        committed = [0] * lim.workers
        count = [0] * lim.workers
        for seq in self.running:
            fed = seq.computed + plan.chunks.get(seq, 0)
            committed[seq.home] += lim.blocks_for(len(seq.tokens) + 1) - lim.blocks_for(fed)
            count[seq.home] += 1
        for seq in list(self.waiting):
            if len(self.running) >= lim.max_running or seq in plan.preempted:
                break
            open_workers = [w for w in range(lim.workers) if budget[w] > 0]
            if not open_workers:
                break
            home = max(open_workers, key=lambda w: (free[w] - committed[w], -count[w], -w))
            total = lim.blocks_for(len(seq.tokens) + 1)
            if free[home] - committed[home] < total:
                break
            n = min(len(seq.tokens), budget[home])
            self.waiting.remove(seq)
            seq.home, seq.seq_id, seq.computed, seq.state = home, next_id(), 0, State.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            free[home] -= lim.blocks_for(n)
            budget[home] -= n
            committed[home] += total - lim.blocks_for(n)
            count[home] += 1
            plan.chunks[seq] = n
        return plan
