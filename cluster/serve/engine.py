"""`Engine`: continuous batching over one or more EP groups (replicas), behind `types.InferenceEngine`.

    engine = await Engine.start(EngineConfig(group=GroupConfig(model=path, workers=2), replicas=2))
    async for chunk in engine.generate(GenerateRequest(prompt=Prompt(text="Hello"), max_new_tokens=32)):
        print(chunk.text, end="")
    result = await engine.score(ScoreRequest(prompt=Prompt(text="The sky is"), continuation=Prompt(text=" blue")))
    await engine.stop()

A request is checked (`validate.py`), refused at once when `max_waiting` requests already wait
(`QueueFull`), and queued on the serving replica with the fewest outstanding tokens (prompt tokens still
to prefill plus tokens still to generate). Each replica's loop (`replica.py`) schedules its steps
(`scheduler.py`). The stream's consumer waits for its events up to the request's deadline; closing the
stream (or cancelling its task) cancels the request, freed at the next step boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from expertmesh.placement.plan import Placement
from expertmesh.workers.config import read_model_config
from expertmesh.workers.recording import StatsSink
from expertmesh.workers.sampling import GREEDY

from .config import EngineConfig
from .detokenize import IncrementalDetokenizer
from .metrics import EngineMetrics
from .replica import Replica
from .sequence import Kind, Sequence, deadline_after
from .tokenizer import Tokenizer, eos_token_ids, max_positions
from .types import (
    Cancelled,
    Chunk,
    DeadlineExceeded,
    EngineError,
    EngineStatus,
    FinishReason,
    GenerateRequest,
    InvalidRequest,
    ModelInfo,
    QueueFull,
    ScoreRequest,
    ScoreResult,
    Unavailable,
    Usage,
)
from .validate import ServedModel, check_generate, check_score

__all__ = ["Engine"]


class Engine:
    """Implements `expertmesh.cluster.serve.types.InferenceEngine`; every method runs on one asyncio loop."""

    def __init__(self, config: EngineConfig, replicas: list[Replica], model: ServedModel, info: ModelInfo,
                 eos: tuple[int, ...], metrics: EngineMetrics) -> None:
        self.config, self.replicas, self.model, self.info = config, replicas, model, info
        self.eos, self.metrics = eos, metrics
        self.draining = False
        self.stopped = False
        self._arrivals = itertools.count()
        self._live: dict[str, Sequence] = {}  # request id -> its sequence, until the request ends
        metrics.watch(lambda: self._count("waiting"), lambda: self._count("running"),
                      lambda: self.status().kv_blocks_used, lambda: self.status().kv_blocks_total,
                      self.routing_figures)

    # ---- life cycle ----------------------------------------------------------------------------
    @classmethod
    async def start(cls, config: EngineConfig | str | Path, *, plan: Placement | None = None,
                    metrics: EngineMetrics | None = None) -> Engine:
        """Start every replica's group (one after the other; each in a thread) and their loops.

        plan: a `Placement` to serve instead of `config.group.plan`. The config may be a YAML/JSON file.
        """
        if not isinstance(config, EngineConfig):
            config = EngineConfig.load(config)
        group = config.group
        model_dir = Path(group.model)
        cfg = read_model_config(model_dir)
        tokenizer = Tokenizer(config.tokenizer) if config.tokenizer else Tokenizer.from_model_dir(model_dir)
        name = config.model_name or model_dir.resolve().name
        metrics = metrics or EngineMetrics()
        make_sink = _sink_factory(config, name, cfg)
        replicas = []
        try:
            for i in range(config.replicas):
                # Writer ids must differ between replicas: `<run>-r<i>/worker-<rank>`.
                stats = group.stats.replace(run=f"{group.stats.run}-r{i}") if config.replicas > 1 else group.stats
                replica = Replica(i, group.replace(stats=stats.to_dict()), config, plan, make_sink, metrics)
                replicas.append(replica)
                await replica.start()
        except BaseException:
            for replica in replicas:
                with contextlib.suppress(Exception):
                    await replica.stop()
            raise
        blocks = min(min(replica.group.ledger.blocks) for replica in replicas)
        context = blocks * group.kv_block_size
        positions = max_positions(model_dir)
        if positions is not None:
            context = min(context, positions)
        model = ServedModel(name=name, vocab_size=cfg.vocab_size, max_context=context, tokenizer=tokenizer)
        info = ModelInfo(name=name, family=cfg.family, num_experts=cfg.num_experts, top_k=cfg.top_k,
                         max_context=context, has_tokenizer=tokenizer is not None)
        return cls(config, replicas, model, info, eos_token_ids(model_dir), metrics)

    async def drain(self, grace_s: float) -> None:
        """Refuse new requests; let running ones finish for up to `grace_s` s, then end them Unavailable."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self._live and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for replica in self.replicas:
            replica.end_all(Unavailable("the server is draining: its grace period is over"))
            replica.wake()

    async def stop(self) -> None:
        if self.stopped:
            return
        self.draining = self.stopped = True
        for replica in self.replicas:
            await replica.stop()

    # ---- requests ------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.draining:
            raise Unavailable("the server is draining or stopped: no new requests")
        if all(r.failed for r in self.replicas):
            raise Unavailable("every replica failed: " + "; ".join(str(r.failed) for r in self.replicas))

    def _submit(self, request_id: str, kind: Kind, tokens: list[int], prompt_len: int, max_new: int,
                sampling, stop: set[int], deadline_s: float) -> tuple[Sequence, Replica]:
        """Queue a checked request on the replica with the fewest outstanding tokens."""
        self._check_open()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._live:
            raise InvalidRequest(f"request_id: {request_id!r} is already in flight")
        if self._count("waiting") >= self.config.max_waiting:
            raise QueueFull(f"the wait queue is full ({self.config.max_waiting} requests); retry later")
        seq = Sequence(request_id=request_id, kind=kind, arrival=next(self._arrivals), tokens=tokens,
                       prompt_len=prompt_len, max_new_tokens=max_new, sampling=sampling,
                       stop_ids=frozenset(stop), deadline=deadline_after(deadline_s))
        serving = [r for r in self.replicas if r.failed is None]
        replica = min(serving, key=lambda r: (not r.ready, r.outstanding, r.index))
        self._live[request_id] = seq
        self.metrics.prompt_tokens.inc(prompt_len)
        replica.submit(seq)
        return seq, replica

    @contextlib.contextmanager
    def _refusals(self, kind: Kind):
        """Count a request refused before it was queued (bad input, full queue, draining) by its code."""
        try:
            yield
        except EngineError as exc:
            self.metrics.requests.labels(kind=kind.value, status=exc.code).inc()
            raise

    def _give_up(self, seq: Sequence, replica: Replica, error: EngineError) -> None:
        """The consumer left (cancelled, deadline): free the sequence at the next step boundary."""
        if not seq.done and seq.ending is None:
            seq.ending = error
            replica.wake()

    async def _next_event(self, seq: Sequence) -> tuple:
        """The sequence's next event, or DeadlineExceeded at its deadline."""
        timeout = seq.deadline - time.monotonic()
        if timeout <= 0:
            raise DeadlineExceeded(f"deadline_s: the request's deadline passed after {seq.generated} tokens")
        try:
            return await asyncio.wait_for(seq.events.get(), None if timeout == float("inf") else timeout)
        except TimeoutError:
            raise DeadlineExceeded(
                f"deadline_s: the request's deadline passed after {seq.generated} tokens") from None

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        with self._refusals(Kind.GENERATE):
            prompt, sampling, stop = check_generate(request, self.model)
            if not request.ignore_eos:
                stop |= set(self.eos)
            seq, replica = self._submit(request.request_id, Kind.GENERATE, list(prompt), len(prompt),
                                        request.max_new_tokens, sampling, stop, request.deadline_s)
        detok = IncrementalDetokenizer(self.model.tokenizer, prompt) if self.model.tokenizer else None
        try:
            while True:
                kind, payload, reason = await self._next_event(seq)
                tokens = [] if kind == "error" else list(payload)
                while kind == "tokens" and not seq.events.empty():  # coalesce what a slow reader missed
                    kind, payload, reason = seq.events.get_nowait()
                    tokens += [] if kind == "error" else payload
                if kind == "error":
                    if tokens:  # tokens sampled before the error still reach the client
                        yield Chunk(tuple(tokens), detok.add(tokens) if detok else "")
                    raise payload
                text = detok.add(tokens) if detok else ""
                if kind == "finish":
                    text += detok.flush() if detok else ""
                    yield Chunk(tuple(tokens), text, FinishReason(reason),
                                Usage(prompt_tokens=seq.prompt_len, generated_tokens=seq.generated))
                    return
                yield Chunk(tuple(tokens), text)
        except DeadlineExceeded as exc:
            self._give_up(seq, replica, exc)
            raise
        finally:
            self._give_up(seq, replica, Cancelled("the client cancelled the request"))
            self._live.pop(seq.request_id, None)

    async def score(self, request: ScoreRequest) -> ScoreResult:
        with self._refusals(Kind.SCORE):
            prompt, continuation = check_score(request, self.model)
            seq, replica = self._submit(request.request_id, Kind.SCORE, prompt + continuation, len(prompt), 0,
                                        GREEDY, set(), request.deadline_s)
        try:
            kind, payload, _ = await self._next_event(seq)
            if kind == "error":
                raise payload
            return ScoreResult(logprobs=tuple(payload),
                               usage=Usage(prompt_tokens=len(prompt) + len(continuation), generated_tokens=0))
        except DeadlineExceeded as exc:
            self._give_up(seq, replica, exc)
            raise
        finally:
            self._give_up(seq, replica, Cancelled("the client cancelled the request"))
            self._live.pop(seq.request_id, None)

    # ---- introspection -------------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        return [self.info]

    def _count(self, which: str) -> int:
        return sum(len(getattr(r.scheduler, which)) for r in self.replicas if r.scheduler is not None)

    def status(self) -> EngineStatus:
        used = total = 0
        for r in self.replicas:
            if r.group is not None and r.ready:
                ledger = r.group.ledger
                used += sum(ledger.used(w) for w in range(len(ledger.blocks)))
                total += sum(ledger.blocks)
        first = self.replicas[0]
        return EngineStatus(
            ready=not self.stopped and all(r.ready for r in self.replicas),
            draining=self.draining,
            replicas=len(self.replicas),
            workers_per_replica=first.group.num_workers if first.group is not None else 0,
            waiting=self._count("waiting"),
            running=self._count("running"),
            kv_blocks_used=used,
            kv_blocks_total=total,
            preemptions=sum(r.preemptions for r in self.replicas),
            plan_version=self.plan().version if self.plan() is not None else "",
            extra={"replica_ready": [r.ready for r in self.replicas],
                   "replica_failed": [r.failed for r in self.replicas],
                   "incarnations": [r.incarnation for r in self.replicas],
                   "outstanding_tokens": [r.outstanding for r in self.replicas]},
        )

    def plan(self) -> Placement | None:
        """The placement every replica serves (None before the first group is up)."""
        return self.replicas[0].plan

    def routing_figures(self) -> tuple[list[float], list[float]]:
        """Per MoE layer (balancedness, copies per token) over the recent sampled steps, the mean over the
        replicas that have some (what the metrics export; [] before any)."""
        figures = [r.routing.figures(r.plan, r.config.replica_rule) for r in self.replicas
                   if r.plan is not None and r.routing.tokens]
        if not figures:
            return [], []
        return tuple([sum(col) / len(figures) for col in zip(*(f[i] for f in figures), strict=True)]
                     for i in (0, 1))


def _sink_factory(config: EngineConfig, name: str, cfg):
    """(replica, incarnation) -> the statistics sink of that group, or None without a Redis URL.

    Each incarnation of a group writes under its own run (`<run>.<n>` after a re-creation), so a re-created
    group's windows never add into the old group's."""
    settings = config.stats
    if settings.redis_url is None:
        return lambda replica, incarnation: None
    from expertmesh.cluster import RedisStatsSink

    base = RedisStatsSink(url=settings.redis_url, model=settings.model or name, num_layers=cfg.num_moe_layers,
                          num_experts=cfg.num_experts, top_k=cfg.top_k, run=settings.run)

    def make(replica: int, incarnation: int) -> StatsSink:
        run = settings.run if incarnation == 0 else f"{settings.run}.{incarnation}"
        return dataclasses.replace(base, run=run)

    return make
