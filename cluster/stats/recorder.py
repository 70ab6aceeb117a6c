"""Recording routing statistics where tokens are routed (EP workers, the training loop) into the Redis store.

Interface for the runtime (stable; `expertmesh.workers` receives the sink, it never imports this package):

    sink = RedisStatsSink(url="redis://redis:6379/0", model="mixtral-8x7b", run="serve-1",
                          num_layers=32, num_experts=8, top_k=2)   # frozen dataclass: pickles into Ray actors
    rec = sink.open(writer_id="ep-rank-3")   # inside the actor's own process (starts one sender thread)
    rec.record(topk_ids)                     # np.ndarray int [T, L, k], once per step: counts locally, no I/O
    rec.flush(window=step // 100)            # close the window; its delta goes to Redis in the background
    rec.close(timeout_s=5.0)                 # send what is still buffered (bounded wait), stop the thread
    rec.status()                             # RecorderStatus: sent, duplicates, pending, dropped, rejected

`record` counts exactly what `stats_from_trace` counts for the same tokens: expert loads, same-layer pairs
(each unordered pair of a token's experts) and layer l -> l+1 transitions (all k x k pairs). It raises
ValueError only for input that is wrong (shape, ids outside [0, E), an expert chosen twice by one token).

`flush(window)` closes the current window under the id `window`: every writer of the same window uses the
same id (a step counter divided by the window length, as above), and the store sums their deltas. Without an
id, the window is the wall-clock bucket `time // sink.window_seconds`. A flush with nothing recorded is a
no-op. `flush` only swaps the counting arrays for fresh ones and hands the closed window to the sender
thread, which encodes and sends it; it never blocks on the network and never raises because Redis is slow,
away, or restarting.

Delivery: the sender sends each delta as a staged SET and one atomic script in one round trip (a backlog
goes in one pipeline). Every delta carries (writer, incarnation, seq) and the writer's floor (its oldest unsettled
seq); the store applies each seq at most once, whatever order attempts arrive in, so a retry after a
timeout, a lost reply or a Redis restart never counts twice. While Redis is unreachable (or answers
-LOADING, -OOM, -BUSY) the deltas wait in a buffer bounded by `max_buffer_bytes` and `max_buffer_windows`;
when it is full the oldest delta is dropped and counted (`status().dropped`, a logged warning each time).
Retries back off from `min_backoff_s` to `max_backoff_s`; the buffer is sent in order when Redis answers.

A header of another shape under the same model/run (different layers, experts or top_k) or data that is
not ours makes `open` raise StatsSchemaError when Redis is reachable then; found later, the delta is
refused, counted as `rejected` and logged as an error (never retried, never merged). The store keeps, per
writer, its floor and the applied seqs above it (a small sorted set that expires with the windows).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass

import numpy as np

from .codec import encode_window
from .connect import ENV_URL, StatsSchemaError, StatsUnavailableError, check_name, parse_target
from .counting import WindowAccumulator
from .keys import DEFAULT_DECAY, DEFAULT_KEEP, DEFAULT_TTL_S, check_window_id, make_header
from .store import StatsStore, flush_reply
from .window import WindowCounts, layer_shares

__all__ = ["RedisStatsSink", "StatsRecorder", "RecorderStatus"]

log = logging.getLogger(__name__)
# Replies that mean "this store will never take this delta" (another shape, not ours): never retried.
_REFUSALS = ("EMSHAPE", "EMFOREIGN", "WRONGTYPE")
_WRITER = re.compile(r"^[A-Za-z0-9._\-/]{1,100}$")


@dataclass(frozen=True)
class RedisStatsSink:
    """Where and how a writer records: everything a Ray actor needs to open its own recorder."""

    url: str | None  # redis:// or rediss:// (None: EXPERTMESH_REDIS_URL in the recording process)
    model: str
    num_layers: int
    num_experts: int
    top_k: int
    run: str = "default"
    keep: int = DEFAULT_KEEP  # windows kept as they are (used when this writer creates the store)
    decay: float = DEFAULT_DECAY  # per-window decay of the aggregate (likewise)
    window_seconds: float = 60.0  # window id when flush() gets none: time // window_seconds
    ttl_s: int = DEFAULT_TTL_S  # a window key expires this long after its last delta
    # Also record trans_top1 (what token-follow plans read; without it they use trans / top_k). Off by
    # default: at DeepSeek-V3 size it makes a writer window ~40% larger and its encoding ~15 ms slower.
    top1: bool = False
    max_buffer_bytes: int = 256 * 2**20  # encoded deltas kept while Redis is away
    max_buffer_windows: int = 1024
    connect_timeout_s: float = 0.5
    op_timeout_s: float = 10.0
    min_backoff_s: float = 0.05
    max_backoff_s: float = 2.0

    def __post_init__(self) -> None:
        check_name("model", self.model)
        check_name("run", self.run)
        make_header(self.num_layers, self.num_experts, self.top_k, self.keep, self.decay)
        if self.url:
            parse_target(self.url)
        for name in ("window_seconds", "connect_timeout_s", "op_timeout_s", "min_backoff_s", "max_backoff_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        for name in ("ttl_s", "max_buffer_bytes", "max_buffer_windows"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")

    def open(self, writer_id: str | int, group: tuple[int, int] | None = None) -> StatsRecorder:
        """A recorder for this process. Raises StatsSchemaError if Redis answers with another shape.

        group: (rank, size) of a group of writers that sum their counts before each flush. Where every
        member gets layers (size <= the model's layers), the recorder keeps only this rank's share of them
        (`window.layer_shares`; its `layers` says which), and each member flushes one share of the group's
        window; elsewhere it records whole windows of its own tokens (`layers` is all of them), and the
        group must not sum.
        """
        layers = None
        if group is not None:
            rank, size = group
            if not 0 <= rank < size:
                raise ValueError(f"group: expected (rank, size) with 0 <= rank < size, got {group}")
            if 1 < size <= self.num_layers:
                layers = layer_shares(self.num_layers, size)[rank]
        return StatsRecorder(self, str(writer_id), layers)


@dataclass(frozen=True)
class RecorderStatus:
    windows: int  # windows closed by flush() with something in them
    sent: int  # deltas Redis applied
    duplicates: int  # deltas Redis had already applied (a retry after a lost reply)
    pending: int  # deltas buffered or in flight
    pending_bytes: int
    dropped: int  # oldest deltas given up because the buffer was full
    rejected: int  # deltas the store refused (another shape, not ours): never retried
    failures: int  # send attempts that did not reach Redis (each retried later)
    connected: bool  # the last attempt was taken by Redis
    last_error: str | None
    last_round_trip_s: float | None  # duration of the last successful send


@dataclass
class _Delta:
    seq: int
    window: int
    counts: WindowCounts | None  # until the sender thread has encoded it
    blob: bytes = b""

    @property
    def size(self) -> int:
        """Bytes it holds: the encoded blob, or the raw arrays before encoding."""
        if self.counts is None:
            return len(self.blob)
        c = self.counts
        return c.counts.nbytes + (c.coact.nbytes + c.trans.nbytes if c.has_pairs else 0)


class StatsRecorder:
    """Counts routing locally and ships closed windows to Redis from one background thread."""

    def __init__(self, sink: RedisStatsSink, writer_id: str, layers: tuple[int, int] | None = None) -> None:
        if not _WRITER.match(writer_id):
            raise ValueError(f"writer_id: expected 1-100 of letters, digits, '.', '_', '-', '/', got {writer_id!r}")
        self.sink = sink
        self.writer_id = writer_id
        # A new incarnation per open(): a restarted writer's seq numbers never collide with its predecessor's.
        self.writer_key = f"{writer_id}/{secrets.token_hex(6)}"
        self._acc = WindowAccumulator(sink.num_layers, sink.num_experts, sink.top_k, top1=sink.top1, layers=layers)
        self.layers = (self._acc.first, self._acc.stop)  # all of them unless this writer records a share
        self._header = make_header(sink.num_layers, sink.num_experts, sink.top_k, sink.keep, sink.decay)
        self._target = parse_target(sink.url or os.environ.get(ENV_URL, "")).with_overrides(sink.model, sink.run)
        self._store: StatsStore | None = None
        self._seq = 0
        self._windows = 0
        self._pending: collections.deque[_Delta] = collections.deque()
        self._pending_bytes = 0
        self._inflight: list[_Delta] = []
        self._counters = {"sent": 0, "duplicates": 0, "dropped": 0, "rejected": 0, "failures": 0}
        self._connected = False
        self._last_error: str | None = None
        self._round_trip: float | None = None
        self._backoff = 0.0
        self._retry_at = 0.0
        self._closing_deadline: float | None = None
        self._cond = threading.Condition()
        self._check_header()
        self._thread = threading.Thread(target=self._run, name=f"expertmesh-stats-{writer_id}", daemon=True)
        self._thread.start()

    def __reduce__(self):
        raise TypeError(
            "a StatsRecorder holds a thread and a connection: pickle the RedisStatsSink and open() it "
            "in the process that records"
        )

    # -- the caller's side ------------------------------------------------------------------------------

    def record(self, topk_ids: np.ndarray) -> None:
        """Count one step: topk_ids int [T, L, k]. Local only; ValueError for malformed input."""
        self._acc.add(topk_ids)

    @property
    def top1(self) -> bool:
        """Whether windows carry trans_top1 (`RedisStatsSink.top1`): a caller counting itself may skip it."""
        return self.sink.top1

    def add_counts(self, counts: np.ndarray, pairs: np.ndarray, trans: np.ndarray, tokens: int,
                   trans_top1: np.ndarray | None = None) -> None:
        """Add steps the caller counted itself (`WindowAccumulator.add_dense`'s layout, the rows of this
        recorder's layer share): a GPU worker counts on its device and hands over one window's arrays at
        flush, instead of ids every step."""
        self._acc.add_dense(counts, pairs, trans, tokens, trans_top1)

    def flush(self, window: int | None = None) -> None:
        """Close the current window under id `window`, queue its delta for Redis; never raises for Redis."""
        if window is None:
            window = int(time.time() // self.sink.window_seconds)
        window = check_window_id(window)
        if self._acc.tokens == 0:
            return
        delta = _Delta(0, window, self._acc.take())
        with self._cond:
            self._seq += 1
            delta.seq = self._seq
            self._windows += 1
            self._pending.append(delta)
            self._pending_bytes += delta.size
            self._enforce_bound()
            self._cond.notify_all()

    def status(self) -> RecorderStatus:
        with self._cond:
            return RecorderStatus(
                windows=self._windows,
                sent=self._counters["sent"],
                duplicates=self._counters["duplicates"],
                pending=len(self._pending) + len(self._inflight),
                pending_bytes=self._pending_bytes + sum(d.size for d in self._inflight),
                dropped=self._counters["dropped"],
                rejected=self._counters["rejected"],
                failures=self._counters["failures"],
                connected=self._connected,
                last_error=self._last_error,
                last_round_trip_s=self._round_trip,
            )

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until every closed window is acknowledged (or `timeout_s` passes); True when idle."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._pending or self._inflight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                if not self._thread.is_alive():
                    return False
                self._cond.wait(left if left is not None else 1.0)
            return True

    def close(self, timeout_s: float = 5.0) -> RecorderStatus:
        """Try to send what is buffered for up to `timeout_s`, then stop the sender. Never raises."""
        with self._cond:
            self._closing_deadline = time.monotonic() + max(timeout_s, 0.0)
            self._retry_at = min(self._retry_at, time.monotonic())  # one more attempt now
            self._cond.notify_all()
        self._thread.join(max(timeout_s, 0.0) + self.sink.op_timeout_s + 1.0)
        if self._store is not None:
            with contextlib.suppress(Exception):  # closing a dead connection may fail; nothing to do
                self._store.client.close()
        return self.status()

    def __enter__(self) -> StatsRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the sender thread ------------------------------------------------------------------------------

    def _connect(self) -> StatsStore:
        if self._store is None:
            client = self._target.connect(
                socket_connect_timeout=self.sink.connect_timeout_s, socket_timeout=self.sink.op_timeout_s
            )
            self._store = StatsStore(client, self.sink.model, self.sink.run, display=self._target.display)
        return self._store

    def _check_header(self) -> None:
        """At open: create or check the header when Redis answers; a wrong shape is the caller's to see."""
        try:
            self._connect().ensure(**self._header_kwargs())
            self._connected = True
        except StatsSchemaError:
            raise
        except StatsUnavailableError as exc:
            self._last_error = str(exc)
            log.warning(
                "stats writer %s: Redis not reachable at open (%s); recording locally and retrying",
                self.writer_id,
                exc,
            )

    def _header_kwargs(self) -> dict:
        h = self._header
        return {"layers": h.layers, "experts": h.experts, "top_k": h.top_k, "keep": h.keep, "decay": h.decay}

    def _enforce_bound(self) -> None:
        """Drop the oldest buffered deltas (never those in flight) beyond the limits; count and warn."""
        while len(self._pending) > 1 and (
            self._pending_bytes > self.sink.max_buffer_bytes or len(self._pending) > self.sink.max_buffer_windows
        ):
            old = self._pending.popleft()
            self._pending_bytes -= old.size
            self._counters["dropped"] += 1
            log.warning(
                "stats writer %s: buffer full (%d deltas, %d bytes); dropped window %d seq %d (%d in all)",
                self.writer_id,
                len(self._pending),
                self._pending_bytes,
                old.window,
                old.seq,
                self._counters["dropped"],
            )

    def _encode_pending(self) -> None:
        """Encode closed windows (outside the lock: numpy releases the GIL, the caller keeps counting)."""
        with self._cond:
            todo = [d for d in self._pending if d.counts is not None]
        encoded = [(d, encode_window(d.counts)) for d in todo]
        with self._cond:
            for d, blob in encoded:
                if d.counts is None:
                    continue
                raw = d.size
                d.blob, d.counts = blob, None
                if any(p is d for p in self._pending):  # not dropped meanwhile
                    self._pending_bytes += d.size - raw
            self._enforce_bound()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    closing = self._closing_deadline is not None
                    unencoded = any(d.counts is not None for d in self._pending)
                    if closing and (not self._pending or now >= self._closing_deadline):
                        return
                    if unencoded or (self._pending and now >= self._retry_at):
                        break
                    wait = None if not self._pending else self._retry_at - now
                    if closing:
                        wait = min(wait if wait is not None else 1.0, self._closing_deadline - now)
                    self._cond.wait(wait)
            if unencoded:
                self._encode_pending()
                continue
            with self._cond:
                batch: list[_Delta] = []
                size = 0
                # A backlog goes in one pipeline, capped so one round trip stays a reasonable size.
                while (
                    self._pending
                    and self._pending[0].counts is None
                    and (not batch or size + self._pending[0].size <= 64 * 2**20)
                ):
                    d = self._pending.popleft()
                    batch.append(d)
                    size += d.size
                self._pending_bytes -= size
                self._inflight = batch
            if not batch:
                continue
            unsettled = self._send(batch)
            with self._cond:
                self._inflight = []
                if unsettled:  # back to the front, in seq order, to be retried after the backoff
                    self._pending.extendleft(reversed(unsettled))
                    self._pending_bytes += sum(d.size for d in unsettled)
                    self._enforce_bound()
                self._cond.notify_all()

    def _send(self, batch: list[_Delta]) -> list[_Delta]:
        """Send deltas in seq order; returns those still unsettled (all of them when Redis was not reached)."""
        import redis

        started = time.perf_counter()
        floor = batch[0].seq  # the oldest unsettled delta: every earlier one was applied or given up
        try:
            store = self._connect()
            pipe = store.client.pipeline(transaction=False)
            for d in batch:
                for command in store.flush_commands(
                    self._header, d.window, d.blob, self.writer_key, d.seq, self.sink.ttl_s, floor
                ):
                    pipe.execute_command(*command)
            flat = pipe.execute(raise_on_error=False)
            replies = [flush_reply(flat[i : i + 2]) for i in range(0, len(flat), 2)]
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            # Includes -LOADING (a restarted Redis reading its data back): the outcome of each delta is
            # unknown, so all are retried; the store's per-seq dedup makes that safe.
            self._failed(exc)
            return batch
        except Exception as exc:  # noqa: BLE001 - the sender must outlive anything Redis or the network does
            log.exception("stats writer %s: unexpected error while sending", self.writer_id)
            self._failed(exc)
            return batch
        elapsed = time.perf_counter() - started
        unsettled: list[_Delta] = []
        transient: Exception | None = None
        with self._cond:
            if not self._connected and self._last_error:
                log.warning(
                    "stats writer %s: Redis answers again; %d buffered deltas sent",
                    self.writer_id,
                    len(batch),
                )
            self._connected, self._round_trip = True, elapsed
            for d, reply in zip(batch, replies, strict=True):
                log.debug("stats writer %s: seq %d window %d -> %r", self.writer_key, d.seq, d.window, reply)
                if isinstance(reply, Exception) and str(reply).startswith(_REFUSALS):
                    self._counters["rejected"] += 1
                    self._last_error = str(reply)
                    log.error("stats writer %s: the store refused window %d: %s", self.writer_id, d.window, reply)
                elif isinstance(reply, Exception):  # -OOM, -BUSY, -READONLY...: not applied, try again later
                    unsettled.append(d)
                    transient = reply
                elif (reply.decode() if isinstance(reply, bytes) else str(reply)) == "dup":
                    self._counters["duplicates"] += 1
                else:
                    self._counters["sent"] += 1
            if transient is None:
                self._backoff = 0.0
        if transient is not None:
            self._failed(transient, disconnect=False)
        return unsettled

    def _failed(self, exc: BaseException, disconnect: bool = True) -> None:
        log.debug("stats writer %s: send failed: %r", self.writer_key, exc)
        if disconnect and self._store is not None:
            with contextlib.suppress(Exception):  # the pool may already be broken
                self._store.client.connection_pool.disconnect()
        with self._cond:
            if self._connected or self._last_error is None:
                log.warning(
                    "stats writer %s: Redis did not take the deltas (%s); buffering and retrying", self.writer_id, exc
                )
            self._connected = False
            self._counters["failures"] += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
            self._backoff = min(max(self._backoff * 2, self.sink.min_backoff_s), self.sink.max_backoff_s)
            self._retry_at = time.monotonic() + self._backoff
