"""The routing statistics store: windows of one model and run in Redis, read back as `RoutingStats`.

Windows have integer ids chosen by the writers (a step or time bucket; all writers of a window use the same
id). A flush is a SET of the encoded delta under a staging key and one Lua script that checks it was not
applied before, RENAMEs it to its blob key and lists it in the window: the whole delta appears at once or not
at all, so a reader never sees half of one. Blobs are keys of their own, not hash values, because Redis
takes a SET's argument as the value and RENAME moves it, where HSET (or a Lua script) copies megabytes: at
DeepSeek-V3 size that is the difference between 0.1 and 7 ms of Redis time per flush, which every other
writer queues behind. A snapshot lists the last N windows in one MULTI/EXEC, so it is a consistent cut: every
delta is either wholly in it or not at all; blobs never change once written, so fetching them afterwards
reads the same bytes (or finds one merged away by compaction, and lists again).

`keys` names the keys and the header; `retention` holds the decayed aggregate and compaction; `cache` what a
reader keeps between snapshots.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from expertmesh.placement.stats import RoutingStats

from . import retention, scripts
from .cache import SnapshotCache, naming
from .codec import CodecError, encode_window, sum_windows
from .connect import (
    StatsEndpointError,
    StatsSchemaError,
    StatsStoreError,
    StatsTarget,
    StatsUnavailableError,
    parse_target,
    tls_refusal,
)
from .keys import (
    DEFAULT_DECAY,
    DEFAULT_KEEP,
    DEFAULT_TTL_S,
    STAGE_TTL_S,
    StatsKeys,
    StoreHeader,
    check_window_id,
    make_header,
    text,
)
from .window import WindowCounts

__all__ = ["StatsStore", "flush_reply", "load_stats_url"]

_READ_ATTEMPTS = 5
FIRST_CONTACT_S = 2.0  # a command's first PING: a Redis answers in milliseconds


def _pairs(flat: list) -> dict:
    return {text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


class StatsStore:
    """Statistics of one model and run in Redis (not thread-safe; one store per thread or process)."""

    def __init__(
        self, client, model: str, run: str = "default", *, display: str = "redis", cache_bytes: int = 512 * 2**20
    ) -> None:
        self.client = client
        self.keys = StatsKeys(model, run)
        self.display = display  # the URL with the password masked, for messages
        self._cache = SnapshotCache(cache_bytes)

    @classmethod
    def open(
        cls,
        url: str | StatsTarget | None = None,
        model: str | None = None,
        run: str | None = None,
        cache_bytes: int = 512 * 2**20,
        **client_options,
    ) -> StatsStore:
        """A store from a URL (`connect` describes it), `model`/`run` overriding the URL's query.

        `cache_bytes`: encoded windows kept between snapshots (0: read everything every time).
        """
        target = url if isinstance(url, StatsTarget) else parse_target(url)
        target = target.with_overrides(model, run)
        client = target.connect(**client_options)
        return cls(client, target.require_model(), target.run, display=target.display, cache_bytes=cache_bytes)

    @property
    def where(self) -> str:
        return f"{self.display} model={self.keys.model} run={self.keys.run}"

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        import redis

        try:
            yield
        except redis.exceptions.AuthenticationError as exc:  # the URL's credentials: invalid input
            given = "no password was given (redis://:PASSWORD@host...)" if "@" not in self.display else f"{exc}"
            raise StatsEndpointError(f"{action}: Redis at {self.display} refused the credentials: {given}") from None
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            tls = tls_refusal()
            if tls is not None and isinstance(exc, tls[1]):
                raise StatsEndpointError(f"{action}: Redis at {self.display}: {exc}") from None
            hint = "is it running, is the URL right (--redis or EXPERTMESH_REDIS_URL)?"
            if isinstance(exc.__context__, ConnectionResetError) and self.display.startswith("redis:"):
                hint = "it closed the connection: if it expects TLS, use rediss://"
            raise StatsUnavailableError(f"{action}: cannot reach Redis at {self.display} ({exc}); {hint}") from exc
        except redis.exceptions.ResponseError as exc:
            reply = str(exc)
            if "DB index is out of range" in reply:
                raise StatsEndpointError(f"{action}: {self.display}: no such database on this server ({reply})") \
                    from None
            if reply.startswith(("EMFOREIGN", "EMSHAPE", "WRONGTYPE")):
                detail = reply.split(" ", 1)[1] if reply.startswith("EM") else reply  # our codes are for machines
                raise StatsSchemaError(f"{action}: {self.where}: {detail}") from None
            raise StatsStoreError(f"{action}: Redis at {self.display} answered: {reply}") from exc
        except redis.exceptions.InvalidResponse as exc:  # a server that answers, but not in Redis's protocol
            raise StatsEndpointError(
                f"{action}: {self.display} does not answer as Redis ({exc}); is the host and port right?"
            ) from None
        except CodecError as exc:
            raise StatsSchemaError(f"{action}: {self.where}: malformed window data ({exc})") from None

    def ping(self, timeout_s: float | None = None) -> None:
        """Check that Redis answers; within `timeout_s` when given (not on Redis Cluster): a port that accepts
        connections but never answers fails then, not after the read timeout that large replies need."""
        import redis

        client = self.client
        if timeout_s is not None and hasattr(client, "connection_pool"):
            pool = client.connection_pool
            kwargs = {**pool.connection_kwargs, "socket_timeout": timeout_s}
            client = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))
        try:
            with self._errors("connect"):
                try:
                    client.ping()
                except redis.exceptions.TimeoutError:
                    if timeout_s is None:
                        raise
                    raise StatsUnavailableError(
                        f"connect: Redis at {self.display} did not answer within {timeout_s:g} s; is the host and "
                        f"port right?"
                    ) from None
        finally:
            if client is not self.client:
                client.close()

    # -- header ------------------------------------------------------------------------------------------

    def header(self) -> StoreHeader | None:
        """The stored header, or None when nothing is stored under the prefix."""
        with self._errors("read header"):
            kind = text(self.client.type(self.keys.meta))
            if kind == "none":
                return None
            if kind != "hash":
                raise StatsSchemaError(
                    f"{self.where}: {self.keys.meta} is a Redis {kind}, not an expertmesh statistics header"
                )
            fields = {text(k): text(v) for k, v in self.client.hgetall(self.keys.meta).items()}
        return StoreHeader.parse(fields, self.where)

    def ensure(
        self, layers: int, experts: int, top_k: int, keep: int = DEFAULT_KEEP, decay: float = DEFAULT_DECAY
    ) -> StoreHeader:
        """Create the header, or check that the stored one has this shape (StatsSchemaError if not)."""
        wanted = make_header(layers, experts, top_k, keep, decay)
        with self._errors("create header"):
            flat = self.client.eval(scripts.ENSURE, 1, self.keys.meta, *wanted.args())
        return StoreHeader.parse({k: text(v) for k, v in _pairs(flat).items()}, self.where)

    # -- writing -----------------------------------------------------------------------------------------

    def flush_commands(
        self,
        header: StoreHeader,
        window_id: int,
        blob: bytes,
        writer: str,
        seq: int,
        ttl_s: int = DEFAULT_TTL_S,
        floor: int | None = None,
    ) -> list[tuple]:
        """The two commands that apply one delta (stage it, then the FLUSH script), for one pipeline.

        `floor`: the writer's oldest seq not yet settled (default `seq`: every earlier one is settled).
        `flush_reply` reads their two replies.
        """
        check_window_id(window_id)
        field = f"d:{writer}:{seq}"
        stage = self.keys.stage(f"{writer}:{seq}")
        keys = (
            self.keys.meta,
            self.keys.writers,
            self.keys.index,
            self.keys.window(window_id),
            self.keys.applied(writer),
            stage,
            self.keys.blob(window_id, field),
        )
        floor = seq if floor is None else floor
        args = (*header.args(), writer, int(seq), int(window_id), field, int(ttl_s), int(floor))
        return [("SET", stage, blob, "EX", STAGE_TTL_S), ("EVAL", scripts.FLUSH, len(keys), *keys, *args)]

    def write(
        self,
        window_id: int,
        window: WindowCounts,
        *,
        header: StoreHeader,
        writer: str,
        seq: int,
        ttl_s: int = DEFAULT_TTL_S,
        floor: int | None = None,
    ) -> bool:
        """Add one delta to a window, atomically and once: False if this (writer, seq) was applied before."""
        blob = encode_window(window)
        with self._errors(f"write window {window_id}"):
            pipe = self.client.pipeline(transaction=False)
            for command in self.flush_commands(header, window_id, blob, writer, seq, ttl_s, floor):
                pipe.execute_command(*command)
            reply = flush_reply(pipe.execute(raise_on_error=False))
            if isinstance(reply, Exception):
                raise reply
        return reply == "ok"

    def _present(self, wid: int, name: str, blob: bytes | None) -> bytes:
        if blob is None:
            raise StatsStoreError(
                f"{self.where}: {self.keys.window(wid)} lists field {name!r} but its blob "
                f"{self.keys.blob(wid, name)} is missing (deleted by something else, or expired)"
            )
        return blob

    def _fetch(self, names: list[tuple[int, str]], action: str = "read snapshot") -> list[bytes | None]:
        """The blobs of these (window, field) pairs; None where a blob is gone (merged or folded meanwhile)."""
        if not names:
            return []
        with self._errors(action):
            return self.client.mget([self.keys.blob(wid, name) for wid, name in names])

    # -- reading -----------------------------------------------------------------------------------------

    def _read(self, windows: int | None, with_agg: bool) -> tuple[StoreHeader, dict, list[tuple[int, dict]]]:
        """Header, aggregate and the fields of the wanted windows, listed in one MULTI/EXEC: a consistent cut.

        windows: n > 0 the last n (at most `keep`); None or 0 the last `keep`; -1 every window in the index
        (kept or not yet folded). MULTI rather than a Lua script: Redis streams the values straight into
        the reply instead of copying them through Lua strings (about 40% faster at DeepSeek-V3 sizes).
        """
        import redis

        for attempt in range(_READ_ATTEMPTS):
            last = attempt == _READ_ATTEMPTS - 1
            header = self.header()
            if header is None:
                raise StatsStoreError(f"no statistics under {self.where}")
            with self._errors("read snapshot"), self.client.pipeline(transaction=True) as pipe:
                try:
                    if windows == -1:
                        # The window list comes from the index: WATCH makes EXEC fail if it (or the
                        # aggregate) changes before the reads run, and we read again.
                        pipe.watch(self.keys.index, self.keys.agg)
                        ids = [int(text(m)) for m in pipe.zrange(self.keys.index, 0, -1)]
                        pipe.multi()
                    else:
                        n = header.keep if not windows or windows > header.keep else int(windows)
                        ids = list(range(max(0, header.head - n + 1), header.head + 1))
                    pipe.hgetall(self.keys.meta)
                    pipe.hgetall(self.keys.agg)
                    for wid in ids:
                        pipe.hkeys(self.keys.window(wid))
                    replies = pipe.execute()
                except redis.exceptions.WatchError:
                    continue
            meta = {text(k): text(v) for k, v in replies[0].items()}
            if not meta:
                raise StatsStoreError(f"no statistics under {self.where}")
            now = StoreHeader.parse(meta, self.where)
            if windows != -1 and now.head != header.head and not last:
                continue  # a newer window began meanwhile: read the latest N instead
            agg = {text(k): v for k, v in replies[1].items()} if with_agg else {}
            names = [(wid, text(f)) for wid, fields in zip(ids, replies[2:], strict=True) for f in fields]
            blobs = self._fetch(names)
            if any(b is None for b in blobs) and not last:
                continue  # compaction consumed some of these fields after we listed them: list again
            found: dict[int, dict] = {}
            for (wid, name), blob in zip(names, blobs, strict=True):
                found.setdefault(wid, {})[name] = self._present(wid, name, blob)
            return now, agg, sorted(found.items())
        raise StatsStoreError(f"read snapshot: {self.where} kept changing during {_READ_ATTEMPTS} attempts")

    def _sum(self, header: StoreHeader, fields_by_window: list[tuple[int, dict]], action: str) -> tuple:
        """Exact sum of every field of the given windows; also the deltas per window."""
        named = [(wid, name, blob) for wid, fields in fields_by_window for name, blob in fields.items()]
        with self._errors(action), naming(self, [(wid, name) for wid, name, _ in named]):
            total, info = sum_windows([b for _, _, b in named], header.layers, header.experts, header.top_k)
        tokens, deltas, pairs, top1 = 0, {wid: 0 for wid, _ in fields_by_window}, True, True
        for (wid, _, _), (tok, n, had_pairs, had_top1) in zip(named, info, strict=True):
            tokens += int(tok)
            deltas[wid] += n
            pairs &= had_pairs
            top1 &= had_top1
        window = WindowCounts(
            total.counts,
            header.top_k,
            tokens,
            total.coact if pairs else None,
            total.trans if pairs else None,
            deltas=sum(deltas.values()),
            trans_top1=total.trans_top1 if pairs and top1 else None,
        )
        return window, deltas

    def snapshot(self, windows: int | None = None) -> RoutingStats:
        """Exact sum of the last `windows` windows (default: all `keep`), as the `RoutingStats` of a trace.

        One MULTI/EXEC reads the header and the field names of those windows: that set is the consistent
        cut. Field values never change (every delta and every merged sum gets a fresh name), so only names
        this store has not seen are fetched, and a running exact total is corrected by what came and went:
        a controller re-reading the last N windows pays for the new window, not for all N.

        meta: model, run, source, windows (ids), deltas (writer flushes per window), head, keep.
        """
        cache = self._cache
        for attempt in range(_READ_ATTEMPTS):
            header = self.header()
            if header is None:
                raise StatsStoreError(f"no statistics under {self.where}")
            n = header.keep if not windows or windows > header.keep else int(windows)
            ids = list(range(max(0, header.head - n + 1), header.head + 1))
            with self._errors("read snapshot"), self.client.pipeline(transaction=True) as pipe:
                pipe.hgetall(self.keys.meta)
                for wid in ids:
                    pipe.hkeys(self.keys.window(wid))
                replies = pipe.execute()
            meta = {text(k): text(v) for k, v in replies[0].items()}
            if not meta:
                raise StatsStoreError(f"no statistics under {self.where}")
            now = StoreHeader.parse(meta, self.where)
            if now.head != header.head and attempt < _READ_ATTEMPTS - 1:
                continue  # a newer window began meanwhile: read the latest N instead
            current = {(wid, text(f)) for wid, names in zip(ids, replies[1:], strict=True) for f in names}
            missing = sorted(current - cache.blobs.keys())
            values = self._fetch(missing)
            if any(v is None for v in values) and attempt < _READ_ATTEMPTS - 1:
                continue  # compaction replaced some of these fields after we listed them: list again
            values = [self._present(wid, name, v) for (wid, name), v in zip(missing, values, strict=True)]
            break
        else:
            raise StatsStoreError(f"read snapshot: {self.where} kept changing during {_READ_ATTEMPTS} attempts")
        if not current:
            raise StatsStoreError(f"no windows under {self.where} (newest id {now.head})")
        window, field_deltas = cache.update(self, now, current, dict(zip(missing, values, strict=True)))
        per_window: dict[int, int] = {}
        for (wid, _), n_deltas in field_deltas.items():
            per_window[wid] = per_window.get(wid, 0) + n_deltas
        meta = {
            "model": self.keys.model,
            "run": self.keys.run,
            "source": self.display,
            "windows": sorted(per_window),
            "deltas": {str(k): v for k, v in sorted(per_window.items())},
            "head": now.head,
            "keep": now.keep,
        }
        return window.to_stats(meta)

    def decayed(self) -> RoutingStats:
        """The exponentially decayed aggregate as of the newest window (floating point counts)."""
        return retention.decayed(self)

    def window_ids(self) -> list[int]:
        with self._errors("list windows"):
            return [int(text(m)) for m in self.client.zrange(self.keys.index, 0, -1)]

    # -- maintenance -------------------------------------------------------------------------------------
    # -- maintenance -------------------------------------------------------------------------------------

    def compact(self) -> dict:
        """Merge each window's deltas into one field; fold windows older than the last `keep` into the sum
        (`retention.compact`). Returns counts of merged windows, folded windows and conflicts."""
        return retention.compact(self)

    def reset(self) -> int:
        """Delete everything under the prefix; returns the number of keys removed."""
        with self._errors("reset"):
            names = {self.keys.meta, self.keys.writers, self.keys.index, self.keys.agg, self.keys.sources}
            names.update(self.keys.window(int(text(m))) for m in self.client.zrange(self.keys.index, 0, -1))
            # Windows missing from the index (it is trimmed by compaction) and writers' sets are found by name.
            keys = self.keys
            for prefix in (keys.window_prefix, keys.blob_prefix, keys.stage_prefix, keys.applied_prefix):
                names.update(text(n) for n in self.client.scan_iter(match=prefix + "*", count=1000))
            return int(self.client.unlink(*names)) if names else 0

    def memory(self) -> dict:
        """Bytes Redis uses for each window (listing and blobs) and for the other keys (MEMORY USAGE, exact)."""

        def usage(key: str) -> int:
            return int(self.client.memory_usage(key, samples=0) or 0)

        with self._errors("memory usage"):
            windows = {}
            for wid in self.window_ids():
                names = [text(n) for n in self.client.hkeys(self.keys.window(wid))]
                windows[wid] = usage(self.keys.window(wid)) + sum(usage(self.keys.blob(wid, n)) for n in names)
            other = sum(usage(k) for k in (self.keys.meta, self.keys.writers, self.keys.index, self.keys.agg))
        return {"windows": windows, "other": other}


def load_stats_url(url: str) -> RoutingStats:
    """The exact `RoutingStats` behind `redis[s]://host:port/db?model=M[&run=R][&windows=N]`.

    Raises ValueError for a malformed URL (StatsEndpointError, also a ValueError, for a URL that reaches
    something else than Redis, or refused credentials or TLS), StatsUnavailableError when Redis cannot be
    reached, StatsSchemaError for data that is not ours or malformed, StatsStoreError when nothing is stored.
    """
    target = parse_target(url)
    target.require_model()
    store = StatsStore.open(target)
    try:
        store.ping(FIRST_CONTACT_S)
        stats = store.snapshot(target.windows)
    finally:
        store.client.close()
    if stats.tokens == 0:
        raise StatsStoreError(f"no tokens under {store.where}: nothing to plan from")
    return stats


def flush_reply(replies: list) -> str | Exception:
    """'ok' or 'dup' from the two replies of one delta's `flush_commands`, or the error that stopped it."""
    staged, applied = replies
    if isinstance(staged, Exception):
        return staged  # -OOM and the like: the script then found nothing staged; the SET's error says why
    return applied if isinstance(applied, Exception) else text(applied)

