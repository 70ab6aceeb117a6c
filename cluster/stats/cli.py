"""`expertmesh stats ...`: routing statistics in Redis from the command line; `--stats redis://` for planning.

    expertmesh stats push TRACE --model M      replay a routing file into Redis as windows, as a writer would
    expertmesh stats show --model M            per-layer load table and heatmap of the last windows
    expertmesh stats export --model M --out stats.npz
    expertmesh stats compact --model M         merge window deltas, fold old windows into the decayed sum
    expertmesh stats reset --model M --yes     delete everything under the model/run prefix

The Redis URL comes from --redis or EXPERTMESH_REDIS_URL; --model/--run may also ride in the URL's query
(`redis://host:6379/0?model=M&run=R`). Results go to stdout (`--json` for machines), progress and tables to
stderr. Exit codes: 0 ok, 1 failure (unreachable, not our data, another shape), 2 usage.

`load_stats_url("redis://host:port/db?model=M[&run=R][&windows=N]")` is what `expertmesh plan/evaluate/
compare --stats` call: the exact `RoutingStats` of the last N windows (all kept ones by default).
"""

from __future__ import annotations

import json
import math
import secrets
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console

from expertmesh.placement.stats import RoutingStats, save_stats
from expertmesh.placement.trace import Trace, TraceError

from .connect import ENV_URL, StatsSchemaError, StatsStoreError, StatsTarget, parse_target
from .counting import WindowAccumulator
from .keys import DEFAULT_DECAY, DEFAULT_KEEP
from .show import heatmap, layer_summary, load_table
from .store import StatsStore
from .window import WindowCounts

__all__ = ["stats_app", "push_routing"]

stats_app = typer.Typer(
    name="stats",
    no_args_is_help=True,
    add_completion=False,
    help="Routing statistics in Redis: push, show, export, compact, reset.",
)
# soft_wrap: messages stay one line (grep-able, copy-able URLs); tables still fit the terminal.
err = Console(stderr=True, soft_wrap=True)

RedisOpt = Annotated[
    str | None,
    typer.Option("--redis", envvar=ENV_URL, help=f"Redis URL (redis:// or rediss://); default ${ENV_URL}."),
]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Model name (the key prefix).")]
RunOpt = Annotated[str | None, typer.Option("--run", help="Run name under the model [default: default].")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout.")]


def _load_routing(path: Path) -> Trace | RoutingStats:
    """Any routing file the planner reads (placement.sources when present, else the canonical trace)."""
    try:
        from expertmesh.placement.sources import load_routing
    except ImportError:  # the importers are optional for this command: canonical traces always work
        from expertmesh.placement.trace import load_trace as load_routing
    return load_routing(path)


def push_routing(
    store: StatsStore,
    routing: Trace | RoutingStats,
    window_tokens: int = 4096,
    first_window: int | None = None,
    keep: int | None = None,
    decay: float = DEFAULT_DECAY,
    writer: str | None = None,
    progress=None,
) -> dict:
    """Write a trace as consecutive windows of `window_tokens` tokens (or statistics as one window).

    Each window goes through the same path as a live writer's flush (one atomic script, idempotent by
    writer and seq), so a snapshot of all pushed windows equals `stats_from_trace(trace)` exactly.
    """
    if window_tokens < 1:
        raise ValueError(f"window_tokens: expected a positive integer, got {window_tokens}")
    if isinstance(routing, Trace):
        L, E, k = routing.num_layers, routing.num_experts, routing.top_k
        n = max(1, math.ceil(routing.num_tokens / window_tokens))
    else:
        L, E = routing.counts.shape
        k, n = routing.top_k, 1
    existing = store.header()
    header = store.ensure(L, E, k, keep or max(DEFAULT_KEEP, n), decay)
    first = header.head + 1 if first_window is None else int(first_window)
    writer = writer or f"push/{secrets.token_hex(4)}"
    for i in range(n):
        if isinstance(routing, Trace):
            acc = WindowAccumulator(L, E, k)
            acc.add(routing.topk_ids[i * window_tokens : (i + 1) * window_tokens])
            window = acc.take()
        else:
            window = WindowCounts.from_stats(routing)
        store.write(first + i, window, header=header, writer=writer, seq=i + 1)
        if progress is not None:
            progress(i + 1, n)
    return {
        "model": store.keys.model,
        "run": store.keys.run,
        "windows": list(range(first, first + n)),
        "tokens": int(routing.num_tokens if isinstance(routing, Trace) else routing.tokens),
        "layers": L,
        "experts": E,
        "top_k": k,
        "keep": header.keep,
        "created": existing is None,
    }


def _store(redis_url: str | None, model: str | None, run: str | None) -> tuple[StatsStore, StatsTarget]:
    try:
        target = parse_target(redis_url).with_overrides(model, run)
        target.require_model()
        return StatsStore.open(target), target
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _fail(exc: Exception) -> typer.Exit:
    kind = "not our data" if isinstance(exc, StatsSchemaError) else "error"
    err.print(f"[red]{kind}:[/red] {exc}", highlight=False)
    return typer.Exit(1)


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")


@stats_app.command("push")
def push(
    trace: Annotated[Path, typer.Argument(help="Trace .npz, stats .npz, router JSONL, counts.")],
    redis: RedisOpt = None,
    model: ModelOpt = None,
    run: RunOpt = None,
    window_tokens: Annotated[int, typer.Option(min=1, help="Tokens per window.")] = 4096,
    first_window: Annotated[int | None, typer.Option(min=0, help="First window id [newest + 1].")] = None,
    keep: Annotated[
        int | None, typer.Option(min=1, help="Windows kept, when this creates the store [max(64, windows)].")
    ] = None,
    decay: Annotated[float, typer.Option(min=0.0, max=1.0, help="Per-window decay of the aggregate.")] = (
        DEFAULT_DECAY
    ),
    as_json: JsonOpt = False,
) -> None:
    """Replay a routing file into Redis as windows, exactly as recorded by a writer."""
    store, target = _store(redis, model, run)
    try:
        routing = _load_routing(trace)
    except (TraceError, OSError) as exc:
        raise _fail(exc) from None
    try:
        with err.status(f"pushing {trace} to {target.display}") as status:
            report = push_routing(
                store,
                routing,
                window_tokens,
                first_window,
                keep,
                decay,
                progress=lambda i, n: status.update(f"pushing {trace}: window {i}/{n}"),
            )
    except (StatsStoreError, ValueError) as exc:
        raise _fail(exc) from None
    n = len(report["windows"])
    if n > report["keep"]:
        err.print(
            f"[yellow]warning:[/yellow] pushed {n} windows but the store keeps {report['keep']}: a "
            f"snapshot holds the last {report['keep']}, older ones go to the decayed aggregate"
        )
    if as_json:
        _emit(report)
    else:
        err.print(
            f"pushed {report['tokens']} tokens as {n} window(s) "
            f"{report['windows'][0]}..{report['windows'][-1]} "
            f"to model={report['model']} run={report['run']} at {target.display}",
            highlight=False,
        )
        print(f"{report['model']} {report['run']} windows {report['windows'][0]}..{report['windows'][-1]}")


@stats_app.command("show")
def show(
    redis: RedisOpt = None,
    model: ModelOpt = None,
    run: RunOpt = None,
    windows: Annotated[int | None, typer.Option(min=1, help="Last N windows [all kept].")] = None,
    decayed: Annotated[bool, typer.Option(help="Show the exponentially decayed aggregate instead.")] = False,
    width: Annotated[int, typer.Option(min=8, help="Heatmap columns.")] = 64,
    as_json: JsonOpt = False,
) -> None:
    """Per-layer load table and heatmap of the statistics in Redis."""
    store, target = _store(redis, model, run)
    try:
        stats = store.decayed() if decayed else store.snapshot(windows or target.windows)
    except StatsStoreError as exc:
        raise _fail(exc) from None
    rows = layer_summary(stats)
    if as_json:
        _emit(
            {
                "model": store.keys.model,
                "run": store.keys.run,
                "windows": stats.meta.get("windows"),
                "decayed": decayed,
                "tokens": stats.tokens,
                "layers": stats.num_layers,
                "experts": stats.num_experts,
                "top_k": stats.top_k,
                "per_layer": rows,
                "counts": np.asarray(stats.counts).tolist(),
            }
        )
        return
    ids = stats.meta.get("windows") or []
    what = "decayed aggregate" if decayed else f"windows {ids[0]}..{ids[-1]} ({len(ids)} present)"
    title = f"{store.keys.model} / {store.keys.run}: {what}, {stats.tokens} tokens, top-{stats.top_k}"
    err.print(load_table(stats, title))
    err.print(heatmap(stats, width))
    bal = np.array([r["balancedness"] for r in rows])
    print(
        f"layers={stats.num_layers} experts={stats.num_experts} tokens={stats.tokens} "
        f"balancedness_mean={bal.mean():.4f} balancedness_worst={bal.min():.4f}"
    )


@stats_app.command("export")
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Statistics .npz to write (load_stats reads it).")],
    redis: RedisOpt = None,
    model: ModelOpt = None,
    run: RunOpt = None,
    windows: Annotated[int | None, typer.Option(min=1, help="Last N windows [all kept].")] = None,
    decayed: Annotated[bool, typer.Option(help="Export the decayed aggregate (float) instead.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the statistics in Redis to a .npz that `expertmesh plan` reads like a trace."""
    store, target = _store(redis, model, run)
    try:
        stats = store.decayed() if decayed else store.snapshot(windows or target.windows)
        save_stats(stats, out)
    except (StatsStoreError, OSError) as exc:
        raise _fail(exc) from None
    report = {
        "out": str(out),
        "tokens": stats.tokens,
        "windows": stats.meta.get("windows"),
        "decayed": decayed,
        "layers": stats.num_layers,
        "experts": stats.num_experts,
        "top_k": stats.top_k,
    }
    if as_json:
        _emit(report)
    else:
        err.print(f"wrote {stats.tokens} tokens of {store.keys.model}/{store.keys.run} to {out}")
        print(out)


@stats_app.command("compact")
def compact(redis: RedisOpt = None, model: ModelOpt = None, run: RunOpt = None, as_json: JsonOpt = False) -> None:
    """Merge each window's writer deltas; fold windows older than the kept ones into the decayed aggregate."""
    store, _ = _store(redis, model, run)
    try:
        report = store.compact()
    except StatsStoreError as exc:
        raise _fail(exc) from None
    if as_json:
        _emit(report)
    else:
        print(f"merged={report['merged']} folded={report['folded']} conflicts={report['conflicts']}")


@stats_app.command("reset")
def reset(
    redis: RedisOpt = None,
    model: ModelOpt = None,
    run: RunOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete every key of the model/run (statistics, aggregate, writer marks)."""
    store, target = _store(redis, model, run)
    if not yes:
        if not sys.stdin.isatty():
            raise typer.BadParameter("refusing to delete without --yes when not interactive", param_hint="'--yes'")
        typer.confirm(
            f"delete all statistics of model={store.keys.model} run={store.keys.run} at {target.display}?",
            abort=True,
            err=True,
        )
    try:
        removed = store.reset()
    except StatsStoreError as exc:
        raise _fail(exc) from None
    if as_json:
        _emit({"model": store.keys.model, "run": store.keys.run, "keys_removed": removed})
    else:
        print(f"removed {removed} keys of {store.keys.model}/{store.keys.run}")
