"""Pushing routing data (a trace, or statistics) into the store as windows, once per source: `stats push`.

A source is what a file holds, not its name or format: the sha256 of the expert ids a trace's tokens chose,
or of a statistics file's counts. Its record under `:sources` (`keys`) names the writer that pushed it, the
first window, the tokens per window and how many windows are known written. Each window goes through the
same path as a live writer's flush (one atomic script, idempotent per writer and seq), so a snapshot of all
pushed windows equals `stats_from_trace(trace)` exactly, and:

    the same source again     writes nothing; the report says where it is (action "already pushed")
    a push that stopped       the next push of the source resumes after the last window known written; a
                              window written but not yet recorded is sent again and counted once
    mode="replace"            its earlier deltas are taken out (all or none), then it is pushed anew
    mode="append"             it is pushed once more, under a new writer: counted twice, on purpose
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets

import numpy as np

from expertmesh.placement.stats import RoutingStats
from expertmesh.placement.trace import Trace

from . import scripts
from .connect import StatsSchemaError, StatsStoreError
from .counting import WindowAccumulator
from .keys import DEFAULT_DECAY, DEFAULT_KEEP, DEFAULT_TTL_S, check_window_id, text
from .store import StatsStore
from .window import WindowCounts

__all__ = ["push_routing", "source_id", "MODES", "DEFAULT_WINDOW_TOKENS"]

MODES = ("once", "replace", "append")
DEFAULT_WINDOW_TOKENS = 4096


def source_id(routing: Trace | RoutingStats) -> str:
    """32 hex digits identifying what `routing` counts: the same tokens from any file, path or copy are one
    source; another top-k, number of experts or any other id is another."""
    digest = hashlib.sha256()
    if isinstance(routing, Trace):
        ids = np.ascontiguousarray(routing.topk_ids, dtype=np.int32)
        digest.update(f"trace {list(ids.shape)} experts={routing.num_experts}\n".encode())
        digest.update(ids.tobytes())
    else:
        window = WindowCounts.from_stats(routing)
        digest.update(f"stats k={window.top_k} tokens={window.tokens}\n".encode())
        for arr in (window.counts, window.coact, window.trans, window.trans_top1):
            digest.update(b"-" if arr is None else np.ascontiguousarray(arr, dtype=np.int64).tobytes())
    return digest.hexdigest()[:32]


def _window(routing: Trace | RoutingStats, window_tokens: int, i: int) -> WindowCounts:
    """Window i of a push: tokens [i * window_tokens, (i + 1) * window_tokens) of a trace; statistics are one."""
    if not isinstance(routing, Trace):
        return WindowCounts.from_stats(routing)
    acc = WindowAccumulator(routing.num_layers, routing.num_experts, routing.top_k)
    acc.add(routing.topk_ids[i * window_tokens : (i + 1) * window_tokens])
    return acc.take()


def push_routing(
    store: StatsStore,
    routing: Trace | RoutingStats,
    window_tokens: int | None = None,
    first_window: int | None = None,
    keep: int | None = None,
    decay: float = DEFAULT_DECAY,
    *,
    mode: str = "once",
    name: str | None = None,
    progress=None,
) -> dict:
    """Write `routing` as consecutive windows of `window_tokens` tokens (default 4096; statistics: one window),
    once per source (`mode` and the module's table say what a second push does).

    Returns a report: model, run, action (pushed, already pushed, resumed, replaced, appended), source,
    windows (ids holding this push), written (ids written by this call), tokens, layers, experts, top_k,
    keep, decay, created. Raises ValueError for empty input or arguments an interrupted push cannot resume with,
    StatsStoreError (and subclasses) for what Redis refuses. `progress(i, n)` after each window.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if window_tokens is not None and (int(window_tokens) != window_tokens or window_tokens < 1):
        raise ValueError(f"window_tokens: expected a positive integer, got {window_tokens!r}")
    if first_window is not None:
        check_window_id(first_window)
    trace = isinstance(routing, Trace)
    L, E = (routing.num_layers, routing.num_experts) if trace else routing.counts.shape
    tokens = int(routing.num_tokens if trace else routing.tokens)
    label = name or ("trace" if trace else "statistics")
    if tokens == 0:
        raise ValueError(f"{label}: holds no tokens; nothing to push")
    sid = source_id(routing)
    existing = store.header()
    planned = math.ceil(tokens / (window_tokens or DEFAULT_WINDOW_TOKENS)) if trace else 1
    header = store.ensure(L, E, routing.top_k, keep or max(DEFAULT_KEEP, planned), decay)
    record, push, action = _earlier_push(store, sid, mode, label, window_tokens if trace else None, first_window)
    if push is None:  # a new push
        push = {
            "writer": f"push/{sid[:12]}/{secrets.token_hex(3)}",
            "first": header.head + 1 if first_window is None else int(first_window),
            "windows": planned,
            "window_tokens": (window_tokens or DEFAULT_WINDOW_TOKENS) if trace else tokens,
            "done": 0,
        }
        record = record or {"name": label, "tokens": tokens, "pushes": []}
        record["pushes"].append(push)
        _save(store, sid, record)
    start, n = push["done"], push["windows"]
    for i in range(start, n):
        window = _window(routing, push["window_tokens"], i)
        store.write(push["first"] + i, window, header=header, writer=push["writer"], seq=i + 1)
        push["done"] = i + 1
        _save(store, sid, record)
        if progress is not None:
            progress(i + 1, n)
    ids = list(range(push["first"], push["first"] + n))
    return {
        "model": store.keys.model,
        "run": store.keys.run,
        "action": action,
        "source": sid,
        "name": record["name"],
        "pushes": len(record["pushes"]),
        "windows": ids,
        "written": ids[start:],
        "tokens": tokens,
        "layers": L,
        "experts": E,
        "top_k": routing.top_k,
        "keep": header.keep,
        "decay": header.decay,
        "created": existing is None,
    }


def _earlier_push(store: StatsStore, sid: str, mode: str, label: str, window_tokens: int | None,
                  first_window: int | None) -> tuple[dict | None, dict | None, str]:
    """(record, the push to continue or None for a new one, action) of a source about to be pushed: `mode`
    decides what happens to an earlier push of it (replace takes it out here)."""
    record = _record(store, sid)
    if record is None:
        return None, None, "pushed"
    if mode == "replace":
        _forget(store, sid, record, label)
        return None, None, "replaced"
    if mode == "append":
        return record, None, "appended"
    push = record["pushes"][-1]
    if window_tokens is not None and window_tokens != push["window_tokens"]:
        raise ValueError(
            f"window_tokens: {label} was pushed with {push['window_tokens']} tokens per window; leave it out "
            f"to {'resume' if push['done'] < push['windows'] else 'keep that push'}, or replace it (--replace)"
        )
    if first_window is not None and first_window != push["first"]:
        raise ValueError(f"first_window: {label} was pushed from window {push['first']}; leave it out, "
                         f"or replace it (--replace)")
    return record, push, "resumed" if push["done"] < push["windows"] else "already pushed"


def _record(store: StatsStore, sid: str) -> dict | None:
    with store._errors("read push records"):
        raw = store.client.hget(store.keys.sources, sid)
    if raw is None:
        return None
    try:
        record = json.loads(text(raw))
        if not record["pushes"] or not all({"writer", "first", "windows", "done"} <= set(p) for p in record["pushes"]):
            raise ValueError("no pushes")
        return record
    except (ValueError, KeyError, TypeError) as exc:
        raise StatsSchemaError(f"{store.where}: push record {sid} is not one expertmesh wrote ({exc})") from None


def _save(store: StatsStore, sid: str, record: dict) -> None:
    """The record, expiring with the windows it describes (a record must not outlive its counts)."""
    with store._errors("record push"):
        pipe = store.client.pipeline(transaction=True)
        pipe.hset(store.keys.sources, sid, json.dumps(record, sort_keys=True))
        pipe.expire(store.keys.sources, DEFAULT_TTL_S)
        pipe.execute()


def _forget(store: StatsStore, sid: str, record: dict, label: str) -> int:
    """Take every earlier push of the source out of its windows (one script: all or none)."""
    import redis

    deltas = []
    for push in record["pushes"]:
        for seq in range(1, push["windows"] + 1):
            deltas += [push["first"] + seq - 1, f"d:{push['writer']}:{seq}", int(seq <= push["done"])]
    writers = [push["writer"] for push in record["pushes"]]
    keys = store.keys
    with store._errors("replace push"):
        try:
            return int(store.client.eval(
                scripts.FORGET, 3, keys.index, keys.writers, keys.sources,
                keys.window_prefix, keys.blob_prefix, keys.applied_prefix, sid, len(writers), *writers, *deltas,
            ))
        except redis.exceptions.ResponseError as exc:
            if not str(exc).startswith("EMGONE"):
                raise
            raise StatsStoreError(
                f"cannot replace {label} under {store.where}: {str(exc).removeprefix('EMGONE ')}; nothing was "
                f"removed. Reset the run (expertmesh stats reset) or push under another --run"
            ) from None
