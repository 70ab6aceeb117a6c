"""One replica: an EP group, its scheduler, and the asyncio loop that steps it.

Each iteration, at a step boundary: sequences that ended (cancelled, past their deadline) leave; the
scheduler plans the step (`scheduler.py`) counting their blocks as free; the step runs
(`EPGroup.step_async`: awaits the workers' object refs, the loop never blocks on Ray), its workers first
dropping the finished and preempted sequences (no call of their own); its sampled tokens go to their
streams at once.

A failed group (a worker died, a step timed out) is re-created with the same config and plan. Its running
sequences go back to the waiting queue with prompt + tokens already streamed, so they are prefilled again
and their streams continue where they stopped: nothing is sent twice or lost, and greedy output equals an
undisturbed run. When `recovery.attempts` re-creations fail, every request of the replica ends with
`Unavailable` and the replica stays down.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable

from expertmesh.placement.plan import Placement
from expertmesh.workers.decode_graph import DecodeGraphs
from expertmesh.workers.group import EPGroup, GroupError
from expertmesh.workers.group_config import GroupConfig
from expertmesh.workers.recording import StatsSink
from expertmesh.workers.worker import StepOutput

from . import overlap
from .config import EngineConfig
from .metrics import EngineMetrics
from .routing_view import RoutingWindow
from .scheduler import Limits, Scheduler, StepPlan
from .sequence import Kind, Sequence, State
from .step_times import StepTimes
from .types import DeadlineExceeded, EngineError, FinishReason, Unavailable

__all__ = ["Replica"]

log = logging.getLogger("expertmesh.cluster.serve")


class Replica:
    def __init__(self, index: int, group_config: GroupConfig, engine_config: EngineConfig, plan: Placement | None,
                 make_sink: Callable[[int, int], StatsSink | None], metrics: EngineMetrics) -> None:
        self.index, self.config, self.engine_config = index, group_config, engine_config
        self.plan, self._make_sink, self.metrics = plan, make_sink, metrics
        self.group: EPGroup | None = None
        self.scheduler: Scheduler | None = None
        self.incarnation = 0
        self.ready = False
        self.failed: str | None = None  # why the replica gave up
        self.steps = 0
        self.preemptions = 0
        self.routing = RoutingWindow()
        self.times = StepTimes()
        self._inflight: overlap.InFlight | None = None  # a step sent and not landed (overlap_steps)
        self.overlapped = 0  # steps sent while another was in flight
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._to_free: list[int] = []
        self._ids = itertools.count()

    # ---- life cycle ----------------------------------------------------------------------------
    def _create(self) -> EPGroup:
        """Start the group (blocking: runs in a thread)."""
        group = EPGroup.create(self.config, plan=self.plan, sink=self._make_sink(self.index, self.incarnation))
        cfg = self.engine_config
        group.flat_tokens = cfg.decode_prefill_tokens  # steps mixing in short prompts: graphs
        # Every graph the steps can need, before serving: a capture inside a served step stalls every stream.
        group.capture_decode_graphs(min(cfg.max_running + cfg.decode_prefill_tokens, DecodeGraphs.max_batch))
        return group

    async def start(self) -> None:
        self.group = await asyncio.to_thread(self._create)
        self.plan = self.group.plan  # a re-created group serves the same plan
        g, cfg = self.group, self.engine_config
        budget = min(cfg.max_batch_tokens, g.max_tokens) if g.max_tokens else cfg.max_batch_tokens
        self.scheduler = Scheduler(Limits(workers=g.num_workers, block_size=g.ledger.block_size,
                                          max_batch_tokens=budget, max_running=cfg.max_running,
                                          decode_prefill_tokens=cfg.decode_prefill_tokens or None))
        self.ready = True
        self._task = asyncio.create_task(self._loop(), name=f"replica-{self.index}")

    async def stop(self) -> None:
        """End every request with Unavailable and shut the group down."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._inflight is not None and self.group.usable:
            with contextlib.suppress(Exception):  # its streams end Unavailable below either way
                await self._land()
        self.end_all(Unavailable("the engine stopped"))
        if self.group is not None and self.group.usable:
            await asyncio.to_thread(self.group.shutdown)
        self.ready = False

    # ---- requests ------------------------------------------------------------------------------
    @property
    def sequences(self) -> list[Sequence]:
        return [*self.scheduler.running, *self.scheduler.waiting]

    @property
    def outstanding(self) -> int:
        return sum(seq.outstanding for seq in self.sequences)

    def submit(self, seq: Sequence) -> None:
        self.scheduler.add(seq)
        self._wake.set()

    def wake(self) -> None:
        """A consumer gave up on a sequence: free it at the next boundary."""
        self._wake.set()

    def end_all(self, error: EngineError) -> None:
        for seq in self.sequences:
            self._end(seq, ("error", error, None), error.code)

    def _end(self, seq: Sequence, event: tuple, status: str) -> None:
        seq.state = State.DONE
        self.scheduler.remove(seq)
        if seq.seq_id is not None:
            self._to_free.append(seq.seq_id)
            seq.seq_id = None
        seq.events.put_nowait(event)
        self.metrics.requests.labels(kind=seq.kind.value, status=status).inc()
        self.metrics.e2e.observe(time.monotonic() - seq.submitted)

    # ---- the loop ------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while not self._stopping and self.failed is None:
            try:
                await self._iteration()
            except GroupError as err:
                await self._recover(err)
            except Exception as exc:  # noqa: BLE001 - a bug must end the streams, never hang them
                log.exception("replica %d: step failed", self.index)
                self.end_all(EngineError(f"internal error: {type(exc).__name__}: {exc}"))
                if self.group is not None and not self.group.usable:
                    await self._recover(exc)

    def _reap(self) -> None:
        """End the sequences a consumer gave up on or whose deadline passed."""
        now = time.monotonic()
        for seq in self.sequences:
            if seq.ending is not None:
                self._end(seq, ("error", seq.ending, None), seq.ending.code)
            elif seq.expired(now):
                error = DeadlineExceeded(f"deadline_s: the request's deadline passed after {seq.generated} tokens")
                self._end(seq, ("error", error, None), error.code)

    def _free_blocks(self) -> list[int]:
        """Each worker's free blocks, counting those of sequences that ended as free: the workers drop them
        (and the preempted) at the start of the next step, or by a call of their own when no step runs."""
        ledger = self.group.ledger
        free_blocks = [ledger.free_blocks(r) for r in range(self.group.num_workers)]
        for seq_id in self._to_free:
            if seq_id in ledger.home:
                free_blocks[ledger.home[seq_id]] += ledger.blocks_for(ledger.length[seq_id])
        return free_blocks

    async def _iteration(self) -> None:
        self._wake.clear()
        began = time.perf_counter()
        self._reap()
        group = self.group
        if self._inflight is not None and not overlap.safe(self.scheduler.running, self._free_blocks(),
                                                           group.ledger.blocks_for):
            await self._land()  # the plan may preempt: never a sequence with a step in flight
        plan = self.scheduler.schedule(self._free_blocks(), lambda: next(self._ids))
        self.preemptions += len(plan.freed)
        self.metrics.preemptions.inc(len(plan.freed))
        scores = any(seq.kind is Kind.SCORE for seq in plan.chunks)
        if self._inflight is not None and (scores or not plan.chunks):
            await self._land()
            plan.chunks = {seq: n for seq, n in plan.chunks.items() if not seq.done}
        free, self._to_free = [*self._to_free, *plan.freed], []
        if not plan.chunks:
            if free:
                await group.free_async(free)
            if self.sequences:
                await asyncio.sleep(0)  # e.g. only sequences preempted this step wait: admitted next time
            else:
                await self._wake.wait()
            return
        if self.engine_config.overlap_steps and not scores:
            await self._send(plan, free, began)
        else:
            await self._step(plan, free, began)

    def _routed(self) -> bool:
        return bool(self.engine_config.routing_every) and self.steps % self.engine_config.routing_every == 0

    async def _step(self, plan: StepPlan, free: list[int], began: float) -> None:
        """Run the plan's step and apply its outputs."""
        times, scheduled = self.times, time.perf_counter()
        inputs, sampling, score, _ = self._inputs(plan, self.group.num_workers)
        routed = self._routed()
        start = time.perf_counter()
        sent = self.group.send_step(inputs, sampling=sampling, return_logits=False,
                                    score=score if any(score) else None, routed=routed, free=free)
        sent_at = time.perf_counter()
        outs = await self.group.step_outputs(sent)
        done = time.perf_counter()
        self.metrics.step.observe(done - start)
        self.steps += 1
        if routed:
            self.routing.add([o.routed for o in outs])
        self._apply(plan, outs)
        end = time.perf_counter()
        times.add_step(outs, schedule=scheduled - began, inputs=start - scheduled, prepare=sent_at - start,
                       call=done - sent_at, apply=end - done, iteration=end - began)

    async def _send(self, plan: StepPlan, free: list[int], began: float) -> None:
        """Send the plan's step, then land the one in flight (overlap.py)."""
        times, scheduled = self.times, time.perf_counter()
        inputs, sampling, _, feed = self._inputs(plan, self.group.num_workers)
        routed = self._routed()
        start = time.perf_counter()
        step = overlap.InFlight(plan, self.group.send_step(inputs, sampling=sampling, return_logits=False,
                                                           routed=routed, free=free, feed=feed), routed)
        sent_at = time.perf_counter()
        overlap.advance(step)
        previous, self._inflight = self._inflight, step
        times.add(schedule=scheduled - began, inputs=start - scheduled, prepare=sent_at - start)
        if previous is not None:
            self.overlapped += 1
            await self._land(previous)
        times.add(iteration=time.perf_counter() - began)

    async def _land(self, step: overlap.InFlight | None = None) -> None:
        """Wait for a step in flight (the latest by default) and stream its tokens."""
        if step is None or step is self._inflight:
            step, self._inflight = self._inflight, None
        start = time.perf_counter()
        outs = await self.group.step_outputs(step.sent)
        done = time.perf_counter()
        self.metrics.step.observe(done - start)
        self.steps += 1
        if step.routed:
            self.routing.add([o.routed for o in outs])
        self._apply_landed(step, outs)
        self.times.add_step(outs, call=done - start, apply=time.perf_counter() - done)

    @staticmethod
    def _inputs(plan: StepPlan, workers: int) -> tuple[list, list, list[dict[int, int]], list[list[int]]]:
        """Each worker's (sequence id, new tokens), sampling parameters, scored sequences, and the sequences
        whose new token is a placeholder the worker fills (`overlap.py`)."""
        inputs: list[list] = [[] for _ in range(workers)]
        sampling: list[list] = [[] for _ in range(workers)]
        score: list[dict[int, int]] = [{} for _ in range(workers)]
        feed: list[list[int]] = [[] for _ in range(workers)]
        for seq, n in plan.chunks.items():
            end = seq.computed + n
            inputs[seq.home].append((seq.seq_id, seq.tokens[seq.computed:end]))
            sampling[seq.home].append(seq.sampling)
            if seq.kind is Kind.SCORE:
                score[seq.home][seq.seq_id] = seq.tokens[end] if end < len(seq.tokens) else -1
            elif seq.unknown and end > len(seq.tokens) - seq.unknown:
                feed[seq.home].append(seq.seq_id)
        return inputs, sampling, score, feed

    def _apply(self, plan: StepPlan, outs: list[StepOutput]) -> None:
        """Advance every sequence of the step; stream the tokens sampled for those whose prompt is done."""
        tokens = {s: t for o in outs for s, t in zip(o.seq_ids, o.tokens, strict=True)}
        logprobs = {s: v for o in outs for s, v in o.token_logprobs.items()}
        now = time.monotonic()
        for seq, n in plan.chunks.items():
            if seq.done:
                continue
            start, seq.computed = seq.computed, seq.computed + n
            if seq.kind is Kind.SCORE:
                lp = logprobs[seq.seq_id]
                # lp[j]: the token at start + 1 + j given everything before it
                seq.logprobs.extend(float(lp[j]) for j in range(n) if seq.prompt_len <= start + 1 + j < len(seq.tokens))
                if seq.computed == len(seq.tokens):
                    self._end(seq, ("score", list(seq.logprobs), None), "OK")
                continue
            if seq.computed < len(seq.tokens):
                continue  # a prompt chunk: the token sampled after it is not the sequence's
            token = tokens[seq.seq_id]
            seq.tokens.append(token)
            self._observe(seq, now)
            reason = seq.finish_reason()
            if reason is not None:
                self._end(seq, ("finish", [token], reason), "OK")
            else:
                seq.events.put_nowait(("tokens", [token], None))

    def _apply_landed(self, step: overlap.InFlight, outs: list[StepOutput]) -> None:
        """An overlapped step's tokens: each replaces its placeholder and is streamed. A sequence that stops
        here loses the placeholder a later step in flight holds (that step's row is dropped)."""
        tokens = {s: t for o in outs for s, t in zip(o.seq_ids, o.tokens, strict=True)}
        now = time.monotonic()
        for seq, index in step.samples.items():
            if seq.done or seq.seq_id != step.ids[seq]:  # ended, or reset by a recovery, since it was sent
                continue
            token = tokens[step.ids[seq]]
            seq.tokens[index] = token
            seq.unknown -= 1
            self._observe(seq, now)
            reason = (FinishReason.STOP if token in seq.stop_ids else
                      FinishReason.LENGTH if index + 1 - seq.prompt_len >= seq.max_new_tokens else None)
            if reason is not None:
                del seq.tokens[index + 1:]
                seq.unknown = 0
                self._end(seq, ("finish", [token], reason), "OK")
            else:
                seq.events.put_nowait(("tokens", [token], None))

    def _observe(self, seq: Sequence, now: float) -> None:
        self.metrics.generated_tokens.inc()
        if seq.last_token_at is None:
            self.metrics.ttft.observe(now - seq.submitted)
        else:
            self.metrics.inter_token.observe(now - seq.last_token_at)
        seq.last_token_at = now

    # ---- recovery ------------------------------------------------------------------------------
    async def _recover(self, error: BaseException) -> None:
        """Re-create the group; running sequences are queued again to be prefilled from their tokens."""
        self.ready = False
        self.metrics.recoveries.inc()
        log.warning("replica %d: group failed (%s); re-creating it", self.index, error)
        for seq in list(self.scheduler.running):
            self.scheduler.running.remove(seq)
            seq.reset()
            self.scheduler.add(seq)
        self._to_free = []
        self._inflight = None  # lost with the group; reset() dropped its placeholders
        self.routing = RoutingWindow()
        rec = self.engine_config.recovery
        for attempt in range(rec.attempts):
            if self._stopping:
                return
            self.incarnation += 1
            try:
                self.group = await asyncio.to_thread(self._create)
            except Exception as exc:  # noqa: BLE001 - every cause is retried the same way
                log.warning("replica %d: re-creation %d/%d failed: %s", self.index, attempt + 1, rec.attempts, exc)
                error = exc
                await asyncio.sleep(rec.backoff_s)
                continue
            self.ready = True
            log.warning("replica %d: group re-created (incarnation %d)", self.index, self.incarnation)
            return
        self.failed = f"its group failed and {rec.attempts} re-creations failed too (last: {error})"
        self.end_all(Unavailable(f"replica {self.index}: {self.failed}"))
