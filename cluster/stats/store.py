"""The routing statistics store: windows of one model and run in Redis, read back as `RoutingStats`.

Keys, all under the prefix `expertmesh:{<model>:<run>}` (the braces are a Redis Cluster hash tag: one slot, so
every multi-key script below is atomic on a single server and on a cluster alike):

    :meta        hash    schema, layers, experts, top_k, keep (N windows), decay, head (newest id), created
    :w:<id>      hash    the window's listing: one field per writer delta ("d:<writer>:<seq>") or merged sum
                         ("m:<token>"), value its size in bytes. The window is the sum of its fields' blobs.
    :b:<id>:<field> string  the encoded window (`codec`) of that field. Listing and blobs expire after ttl,
                         the listing first.
    :s:<writer>:<seq> string  a delta staged by its writer for the flush script (short TTL)
    :windows     zset    window ids present (score = id)
    :writers     hash    writer -> floor: its oldest unsettled seq (every lower seq was applied or given up)
    :applied:<writer> zset  seqs >= floor that were applied: with the floor, a retried flush counts once
    :agg         hash    blob (float window), ref (window id its weights refer to), ver, folded

Windows have integer ids chosen by the writers (a step or time bucket; all writers of a window use the same
id). A flush is a SET of the encoded delta under a staging key and one Lua script that checks it was not
applied before, RENAMEs it to its blob key and lists it in the window: the whole delta appears at once or not
at all, so a reader never sees half of one. Blobs are keys of their own, not hash values, because Redis
takes a SET's argument as the value and RENAME moves it, where HSET (or a Lua script) copies megabytes: at
DeepSeek-V3 size that is the difference between 0.1 and 7 ms of Redis time per flush, which every other
writer queues behind. A snapshot lists the last N windows in one MULTI/EXEC, so it is a consistent cut: every
delta is either wholly in it or not at all; blobs never change once written, so fetching them afterwards
reads the same bytes (or finds one merged away by compaction, and lists again).

Retention: the last `keep` windows by id are kept as they are. `compact()` (the controller calls it each
loop; `expertmesh stats compact` by hand) sums each window's deltas into one field, and folds windows that
fell out of the last `keep` into the aggregate, weighting window w by decay ** (ref - w). Window keys expire
after `ttl_s` whether or not anyone compacts, so old windows never pile up.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from expertmesh.placement.stats import RoutingStats

from . import scripts
from .codec import CodecError, accumulator_for, add_window_into, encode_window, sum_windows, value_bounds
from .connect import (
    StatsSchemaError,
    StatsStoreError,
    StatsTarget,
    StatsUnavailableError,
    check_name,
    parse_target,
)
from .window import WindowCounts, pair_count

__all__ = [
    "SCHEMA",
    "StatsKeys",
    "StoreHeader",
    "StatsStore",
    "flush_reply",
    "DEFAULT_KEEP",
    "DEFAULT_DECAY",
    "DEFAULT_TTL_S",
    "load_stats_url",
]

SCHEMA = "expertmesh.routing-stats/1"
DEFAULT_KEEP = 64
DEFAULT_DECAY = 0.9
DEFAULT_TTL_S = 7 * 24 * 3600
STAGE_TTL_S = 600  # a staged delta whose flush script never ran (writer killed in between) goes away
MAX_WINDOW_ID = 2**53 - 1  # Lua numbers are doubles: ids stay exact up to here
_READ_ATTEMPTS = 5


@dataclass(frozen=True)
class StatsKeys:
    model: str
    run: str = "default"

    def __post_init__(self) -> None:
        check_name("model", self.model)
        check_name("run", self.run)

    @property
    def prefix(self) -> str:
        return f"expertmesh:{{{self.model}:{self.run}}}"

    @property
    def meta(self) -> str:
        return self.prefix + ":meta"

    @property
    def writers(self) -> str:
        return self.prefix + ":writers"

    @property
    def index(self) -> str:
        return self.prefix + ":windows"

    @property
    def agg(self) -> str:
        return self.prefix + ":agg"

    @property
    def window_prefix(self) -> str:
        return self.prefix + ":w:"

    def window(self, window_id: int) -> str:
        return f"{self.window_prefix}{int(window_id)}"

    @property
    def blob_prefix(self) -> str:
        return self.prefix + ":b:"

    def blob(self, window_id: int, field: str) -> str:
        return f"{self.blob_prefix}{int(window_id)}:{field}"

    @property
    def stage_prefix(self) -> str:
        return self.prefix + ":s:"

    def stage(self, name: str) -> str:
        return self.stage_prefix + name

    @property
    def applied_prefix(self) -> str:
        return self.prefix + ":applied:"

    def applied(self, writer: str) -> str:
        return self.applied_prefix + writer


@dataclass(frozen=True)
class StoreHeader:
    layers: int
    experts: int
    top_k: int
    keep: int
    decay: float
    head: int  # newest window id, -1 before the first
    created: float

    @classmethod
    def parse(cls, fields: dict, where: str) -> StoreHeader:
        def get(name: str, kind):
            raw = fields.get(name)
            if raw is None:
                raise StatsSchemaError(f"{where}: header field {name!r} missing")
            try:
                return kind(raw)
            except ValueError:
                raise StatsSchemaError(f"{where}: header field {name!r}: expected a number, got {raw!r}") from None

        schema = fields.get("schema")
        if schema != SCHEMA:
            raise StatsSchemaError(f"{where}: not expertmesh statistics (schema {schema!r}, expected {SCHEMA!r})")
        return cls(
            get("layers", int),
            get("experts", int),
            get("top_k", int),
            get("keep", int),
            get("decay", float),
            get("head", int),
            get("created", float),
        )

    def args(self) -> list:
        """ARGV[1..7] of the scripts that create or check a header."""
        return [
            SCHEMA,
            self.layers,
            self.experts,
            self.top_k,
            self.keep,
            repr(self.decay),
            repr(self.created),
        ]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: list) -> dict:
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


class StatsStore:
    """Statistics of one model and run in Redis (not thread-safe; one store per thread or process)."""

    def __init__(
        self, client, model: str, run: str = "default", *, display: str = "redis", cache_bytes: int = 512 * 2**20
    ) -> None:
        self.client = client
        self.keys = StatsKeys(model, run)
        self.display = display  # the URL with the password masked, for messages
        self._cache = _SnapshotCache(cache_bytes)

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
        except redis.exceptions.AuthenticationError as exc:
            raise StatsUnavailableError(f"{action}: Redis at {self.display} refused the credentials ({exc})") from exc
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise StatsUnavailableError(
                f"{action}: cannot reach Redis at {self.display} ({exc}); is it running, is the URL right "
                f"(--redis or EXPERTMESH_REDIS_URL)?"
            ) from exc
        except redis.exceptions.ResponseError as exc:
            text = str(exc)
            if text.startswith(("EMFOREIGN", "EMSHAPE", "WRONGTYPE")):
                raise StatsSchemaError(f"{action}: {self.where}: {text}") from None
            raise StatsStoreError(f"{action}: Redis at {self.display} answered: {text}") from exc
        except CodecError as exc:
            raise StatsSchemaError(f"{action}: {self.where}: malformed window data ({exc})") from None

    def ping(self) -> None:
        with self._errors("ping"):
            self.client.ping()

    # -- header ------------------------------------------------------------------------------------------

    def header(self) -> StoreHeader | None:
        """The stored header, or None when nothing is stored under the prefix."""
        with self._errors("read header"):
            kind = _text(self.client.type(self.keys.meta))
            if kind == "none":
                return None
            if kind != "hash":
                raise StatsSchemaError(
                    f"{self.where}: {self.keys.meta} is a Redis {kind}, not an expertmesh statistics header"
                )
            fields = {_text(k): _text(v) for k, v in self.client.hgetall(self.keys.meta).items()}
        return StoreHeader.parse(fields, self.where)

    def ensure(
        self, layers: int, experts: int, top_k: int, keep: int = DEFAULT_KEEP, decay: float = DEFAULT_DECAY
    ) -> StoreHeader:
        """Create the header, or check that the stored one has this shape (StatsSchemaError if not)."""
        wanted = make_header(layers, experts, top_k, keep, decay)
        with self._errors("create header"):
            flat = self.client.eval(scripts.ENSURE, 1, self.keys.meta, *wanted.args())
        return StoreHeader.parse({k: _text(v) for k, v in _pairs(flat).items()}, self.where)

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
                        ids = [int(_text(m)) for m in pipe.zrange(self.keys.index, 0, -1)]
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
            meta = {_text(k): _text(v) for k, v in replies[0].items()}
            if not meta:
                raise StatsStoreError(f"no statistics under {self.where}")
            now = StoreHeader.parse(meta, self.where)
            if windows != -1 and now.head != header.head and not last:
                continue  # a newer window began meanwhile: read the latest N instead
            agg = {_text(k): v for k, v in replies[1].items()} if with_agg else {}
            names = [(wid, _text(f)) for wid, fields in zip(ids, replies[2:], strict=True) for f in fields]
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
        with self._errors(action), _naming(self, [(wid, name) for wid, name, _ in named]):
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
            meta = {_text(k): _text(v) for k, v in replies[0].items()}
            if not meta:
                raise StatsStoreError(f"no statistics under {self.where}")
            now = StoreHeader.parse(meta, self.where)
            if now.head != header.head and attempt < _READ_ATTEMPTS - 1:
                continue  # a newer window began meanwhile: read the latest N instead
            current = {(wid, _text(f)) for wid, names in zip(ids, replies[1:], strict=True) for f in names}
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
        """The exponentially decayed aggregate as of the newest window (floating point counts).

        sum over every window ever written of decay ** (head - id) * window: kept windows are read as
        they are, older ones through the folded aggregate, so it is exact whether or not compaction ran.
        """
        header, agg, found = self._read(-1, with_agg=True)
        L, E, k = header.layers, header.experts, header.top_k
        total = _float_zeros(L, E, k)
        tokens, pairs, top1 = 0.0, True, True
        with self._errors("read decayed aggregate"):
            for wid, fields in found:
                win, _ = self._sum(header, [(wid, fields)], "read decayed aggregate")
                factor = header.decay ** (header.head - wid)
                _axpy(total, win, factor)
                tokens += factor * win.tokens
                pairs &= win.has_pairs
                top1 &= win.has_top1
            if agg.get("blob"):
                ref = int(_text(agg["ref"]))
                part = _float_zeros(L, E, k)
                tok, _, had, had_top1 = add_window_into(part, agg["blob"])
                factor = header.decay ** max(header.head - ref, 0)
                _axpy(total, part, factor)
                tokens += factor * tok
                pairs &= had
                top1 &= had_top1
        if not found and not agg.get("blob"):
            raise StatsStoreError(f"no windows under {self.where}")
        window = WindowCounts(
            total.counts,
            k,
            int(round(tokens)),
            total.coact if pairs else None,
            total.trans if pairs else None,
            trans_top1=total.trans_top1 if pairs and top1 else None,
        )
        stats = window.to_stats(
            {
                "model": self.keys.model,
                "run": self.keys.run,
                "source": self.display,
                "decay": header.decay,
                "head": header.head,
                "decayed": True,
            }
        )
        return stats

    def window_ids(self) -> list[int]:
        with self._errors("list windows"):
            return [int(_text(m)) for m in self.client.zrange(self.keys.index, 0, -1)]

    # -- maintenance -------------------------------------------------------------------------------------

    def compact(self) -> dict:
        """Merge each window's deltas into one field; fold windows older than the last `keep` into the sum.

        Safe to run from several processes and while writers flush: every change is a compare-and-set
        script that gives up (and is retried at the next call) when what it read has changed.
        Returns counts of merged windows, folded windows and conflicts.
        """
        header = self.header()
        if header is None:
            return {"merged": 0, "folded": 0, "conflicts": 0}
        first_kept = header.head - header.keep + 1
        report = {"merged": 0, "folded": 0, "conflicts": 0}
        to_fold: list[tuple[int, list[str], WindowCounts]] = []
        for wid in self.window_ids():
            with self._errors(f"compact window {wid}"):
                names = sorted(_text(n) for n in self.client.hkeys(self.keys.window(wid)))
            blobs = self._fetch([(wid, name) for name in names], f"compact window {wid}")
            if any(b is None for b in blobs):
                report["conflicts"] += 1  # a field went away between listing and reading: next time
                continue
            fields = dict(zip(names, blobs, strict=True))
            if wid < first_kept:
                win, _ = self._sum(header, [(wid, fields)], f"compact window {wid}") if fields else (None, None)
                to_fold.append((wid, sorted(fields), win))
                continue
            if len(fields) < 2:
                continue
            win, _ = self._sum(header, [(wid, fields)], f"compact window {wid}")
            name = f"m:{secrets.token_hex(8)}"
            stage = self.keys.stage(name)
            with self._errors(f"compact window {wid}"):
                pipe = self.client.pipeline(transaction=False)
                pipe.set(stage, encode_window(win), ex=STAGE_TTL_S)
                pipe.eval(scripts.MERGE, 2, self.keys.window(wid), stage, self.keys.blob(wid, ""), name, *names)
                ok = pipe.execute()[1]
            report["merged" if ok else "conflicts"] += 1
        if to_fold:
            report["folded"], report["conflicts"] = self._fold(header, to_fold), report["conflicts"]
            if report["folded"] == 0:
                report["conflicts"] += 1
        return report

    def _fold(self, header: StoreHeader, to_fold: list[tuple[int, list[str], WindowCounts | None]]) -> int:
        L, E, k = header.layers, header.experts, header.top_k
        with self._errors("fold windows"):
            agg = {_text(n): v for n, v in self.client.hgetall(self.keys.agg).items()}
        ver = _text(agg.get("ver", b""))
        total = _float_zeros(L, E, k)
        tokens, pairs, top1, ref = 0.0, True, True, None
        if agg.get("blob"):
            with self._errors("fold windows"):
                tokens, _, pairs, top1 = add_window_into(total, agg["blob"])
            ref = int(_text(agg["ref"]))
        newest = max(wid for wid, _, _ in to_fold)
        new_ref = newest if ref is None else max(ref, newest)
        if ref is not None and new_ref != ref:
            _scale(total, header.decay ** (new_ref - ref))
            tokens *= header.decay ** (new_ref - ref)
        for wid, _, win in to_fold:
            if win is None:
                continue
            factor = header.decay ** (new_ref - wid)
            _axpy(total, win, factor)
            tokens += factor * win.tokens
            pairs &= win.has_pairs
            top1 &= win.has_top1
        blob = encode_window(
            WindowCounts(total.counts, k, 0, total.coact if pairs else None, total.trans if pairs else None, deltas=0,
                         trans_top1=total.trans_top1 if pairs and top1 else None),
            tokens=tokens,
        )
        folded = int(_text(agg.get("folded", b"0"))) + len(to_fold)
        args = [ver, blob, new_ref, folded, self.keys.window_prefix, self.keys.blob_prefix]
        for wid, names, _ in to_fold:
            args += [wid, len(names), *names]
        with self._errors("fold windows"):
            ok = self.client.eval(scripts.FOLD, 2, self.keys.agg, self.keys.index, *args)
        return len(to_fold) if ok else 0

    def reset(self) -> int:
        """Delete everything under the prefix; returns the number of keys removed."""
        with self._errors("reset"):
            names = {self.keys.meta, self.keys.writers, self.keys.index, self.keys.agg}
            names.update(self.keys.window(int(_text(m))) for m in self.client.zrange(self.keys.index, 0, -1))
            # Windows missing from the index (it is trimmed by compaction) and writers' sets are found by name.
            keys = self.keys
            for prefix in (keys.window_prefix, keys.blob_prefix, keys.stage_prefix, keys.applied_prefix):
                names.update(_text(n) for n in self.client.scan_iter(match=prefix + "*", count=1000))
            return int(self.client.unlink(*names)) if names else 0

    def memory(self) -> dict:
        """Bytes Redis uses for each window (listing and blobs) and for the other keys (MEMORY USAGE, exact)."""

        def usage(key: str) -> int:
            return int(self.client.memory_usage(key, samples=0) or 0)

        with self._errors("memory usage"):
            windows = {}
            for wid in self.window_ids():
                names = [_text(n) for n in self.client.hkeys(self.keys.window(wid))]
                windows[wid] = usage(self.keys.window(wid)) + sum(usage(self.keys.blob(wid, n)) for n in names)
            other = sum(usage(k) for k in (self.keys.meta, self.keys.writers, self.keys.index, self.keys.agg))
        return {"windows": windows, "other": other}


def load_stats_url(url: str) -> RoutingStats:
    """The exact `RoutingStats` behind `redis[s]://host:port/db?model=M[&run=R][&windows=N]`.

    Raises ValueError for a malformed URL, StatsUnavailableError when Redis cannot be reached,
    StatsSchemaError for data that is not ours or malformed, StatsStoreError when nothing is stored.
    """
    target = parse_target(url)
    target.require_model()
    store = StatsStore.open(target)
    try:
        return store.snapshot(target.windows)
    finally:
        store.client.close()


def flush_reply(replies: list) -> str | Exception:
    """'ok' or 'dup' from the two replies of one delta's `flush_commands`, or the error that stopped it."""
    staged, applied = replies
    if isinstance(staged, Exception):
        return staged  # -OOM and the like: the script then found nothing staged; the SET's error says why
    return applied if isinstance(applied, Exception) else _text(applied)


def make_header(
    layers: int, experts: int, top_k: int, keep: int = DEFAULT_KEEP, decay: float = DEFAULT_DECAY
) -> StoreHeader:
    """A header for a new store, validated field by field."""
    for name, value in (("layers", layers), ("experts", experts), ("top_k", top_k), ("keep", keep)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if top_k > experts:
        raise ValueError(f"top_k: expected at most experts={experts}, got {top_k}")
    if not (0.0 < float(decay) <= 1.0) or math.isnan(decay):
        raise ValueError(f"decay: expected a factor in (0, 1], got {decay!r}")
    return StoreHeader(int(layers), int(experts), int(top_k), int(keep), float(decay), -1, time.time())


def check_window_id(window_id: int) -> int:
    if isinstance(window_id, bool) or int(window_id) != window_id or not 0 <= window_id <= MAX_WINDOW_ID:
        raise ValueError(f"window: expected an integer id in [0, 2**53), got {window_id!r}")
    return int(window_id)


def _float_zeros(L: int, E: int, k: int) -> WindowCounts:
    trans = (max(L - 1, 0), E * E)
    return WindowCounts(
        np.zeros((L, E)), k, 0, np.zeros((L, pair_count(E))), np.zeros(trans), deltas=0, trans_top1=np.zeros(trans)
    )


def _axpy(total: WindowCounts, win: WindowCounts, factor: float) -> None:
    """total += factor * win, in place (float accumulators)."""
    total.counts[:] += factor * win.counts
    if total.has_pairs and win.has_pairs:
        total.coact[:] += factor * win.coact
        total.trans[:] += factor * win.trans
    if total.has_top1 and win.has_top1:
        total.trans_top1[:] += factor * win.trans_top1


def _scale(total: WindowCounts, factor: float) -> None:
    total.counts[:] *= factor
    if total.has_pairs:
        total.coact[:] *= factor
        total.trans[:] *= factor
    if total.has_top1:
        total.trans_top1[:] *= factor


class _SnapshotCache:
    """Encoded fields seen by the last snapshot and their exact running sum (int64).

    A field's bytes never change once written, so a field name identifies its value for good. The sums of
    coact/trans run over the fields that have pairs; the result has pairs only when every field has them.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._reset()

    def _reset(self) -> None:
        self.blobs: dict[tuple[int, str], bytes] = {}
        self.deltas: dict[tuple[int, str], int] = {}
        self.total: WindowCounts | None = None
        self.shape: tuple[int, int, int] | None = None
        self.tokens = 0
        self.no_pairs = 0  # included fields without pair statistics
        self.no_top1 = 0  # included fields without trans_top1

    def update(
        self, store: StatsStore, header: StoreHeader, current: set, fetched: dict
    ) -> tuple[WindowCounts, dict[tuple[int, str], int]]:
        """(exact sum over the `current` fields, deltas per field), reusing what the last call summed.

        The result's coact is the cache's own array: turn it into RoutingStats before the next update.
        """
        shape = (header.layers, header.experts, header.top_k)
        blobs = {**self.blobs, **fetched}
        gone, new = set(self.deltas) - current, current - set(self.deltas)
        with store._errors("read snapshot"):
            if self.total is None or self.shape != shape or len(gone) + len(new) >= len(current):
                self._recompute(store, shape, current, blobs)
            else:
                for key in sorted(gone):
                    self._apply(store, key, blobs[key], sign=-1)
                for key in sorted(new):
                    self._apply(store, key, blobs[key], sign=+1)
        pairs = self.no_pairs == 0
        top1 = pairs and self.no_top1 == 0
        t = self.total
        # coact is not copied: the caller's to_stats expands it into a fresh [L, E, E] array anyway.
        result = WindowCounts(
            t.counts.copy(),
            header.top_k,
            self.tokens,
            t.coact if pairs else None,
            t.trans.copy() if pairs else None,
            deltas=sum(self.deltas.values()),
            trans_top1=t.trans_top1.copy() if top1 else None,
        )
        deltas = dict(self.deltas)
        kept = {key: blobs[key] for key in current}
        if sum(len(b) for b in kept.values()) <= self.max_bytes:
            self.blobs = kept
        else:
            self._reset()  # too big to keep: the next snapshot starts from scratch
        return result, deltas

    def _recompute(self, store: StatsStore, shape: tuple[int, int, int], current: set, blobs: dict) -> None:
        keys = sorted(current)
        with _naming(store, keys):
            acc, info = sum_windows([blobs[key] for key in keys], *shape)
        self._reset()
        self.shape = shape
        for key, (tokens, n_deltas, had_pairs, had_top1) in zip(keys, info, strict=True):
            self.deltas[key] = n_deltas
            self.tokens += int(tokens)
            self.no_pairs += not had_pairs
            self.no_top1 += not had_top1
        self.total = WindowCounts(
            acc.counts.astype(np.int64), shape[2], 0, acc.coact.astype(np.int64), acc.trans.astype(np.int64),
            trans_top1=acc.trans_top1.astype(np.int64),
        )

    def _apply(self, store: StatsStore, key: tuple[int, str], blob: bytes, sign: int) -> None:
        with _naming(store, [key]):
            part = accumulator_for(value_bounds(blob), *self.shape)
            tokens, n_deltas, had_pairs, had_top1 = add_window_into(part, blob)
        op = np.add if sign > 0 else np.subtract
        op(self.total.counts, part.counts, out=self.total.counts, casting="unsafe")
        if had_pairs:
            op(self.total.coact, part.coact, out=self.total.coact, casting="unsafe")
            op(self.total.trans, part.trans, out=self.total.trans, casting="unsafe")
        if had_top1:
            op(self.total.trans_top1, part.trans_top1, out=self.total.trans_top1, casting="unsafe")
        self.tokens += sign * int(tokens)
        self.no_pairs += sign * (not had_pairs)
        self.no_top1 += sign * (not had_top1)
        if sign > 0:
            self.deltas[key] = n_deltas
        else:
            del self.deltas[key]


@contextlib.contextmanager
def _naming(store: StatsStore, keys: list[tuple[int, str]]) -> Iterator[None]:
    """Codec errors name the window key and field they came from (`keys[error.index]`, or the only one)."""
    try:
        yield
    except CodecError as exc:
        wid, field = keys[exc.index if exc.index is not None else 0]
        raise CodecError(f"{store.keys.window(wid)} field {field!r}: {exc}") from None
