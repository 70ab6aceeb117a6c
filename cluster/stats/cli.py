"""`expertmesh stats ...`: routing statistics in Redis from the command line.

    expertmesh stats push TRACE --model M      replay a routing file into Redis as windows, once per file
    expertmesh stats show --model M            per-layer load table and heatmap of the last windows
    expertmesh stats export --model M --out stats.npz
    expertmesh stats compact --model M         merge window deltas, fold old windows into the decayed sum
    expertmesh stats reset --model M --yes     delete everything under the model/run prefix

The Redis URL comes from --redis or EXPERTMESH_REDIS_URL; --model/--run may also ride in the URL's query
(`redis://host:6379/0?model=M&run=R`). Results go to stdout (`--json` for machines), progress and tables to
stderr. Errors are one line, `error: <message>`, on stderr. Exit codes: 0 ok, 1 failure (Redis unreachable,
not our data, nothing stored), 2 usage or invalid input (a bad URL, file or option; the message names it).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console

from expertmesh.placement.cli.args import NumExpertsOpt, TopKOpt
from expertmesh.placement.exits import CLICK_EXCEPTION, EXIT_FAILURE, EXIT_USAGE, PlainCommand, PlainGroup
from expertmesh.placement.sources import load_routing
from expertmesh.placement.stats import save_stats
from expertmesh.placement.trace import TraceError

from .connect import ENV_URL, StatsEndpointError, StatsStoreError, StatsTarget, parse_target
from .keys import DEFAULT_DECAY
from .push import DEFAULT_WINDOW_TOKENS, push_routing
from .show import heatmap, layer_summary, load_table
from .store import FIRST_CONTACT_S, StatsStore

__all__ = ["stats_app"]


def _error(message: object, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


class _Group(PlainGroup):
    """Usage errors of the stats commands (a missing option, a value out of range) in the one error format,
    also when `stats_app` runs on its own (the root app's `PlainErrors` does it for `expertmesh stats`)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CLICK_EXCEPTION as exc:
            where = f"{ctx.command_path} {ctx.invoked_subcommand or ''}".strip()
            raise _error(f"{exc.format_message()} (see {where} --help)", exc.exit_code) from None


stats_app = typer.Typer(
    name="stats",
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    help="Routing statistics in Redis: push, show, export, compact, reset.",
)
# soft_wrap: messages stay one line (grep-able, copy-able URLs); tables still fit the terminal.
err = Console(stderr=True, soft_wrap=True)

RedisOpt = Annotated[
    str | None,
    typer.Option("--redis", envvar=ENV_URL, metavar="URL", show_default=False,
                 help="Redis URL, e.g. redis://host:6379/0 (rediss:// for TLS)."),
]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", metavar="NAME", help="Model name (the key prefix).")]
RunOpt = Annotated[str | None, typer.Option("--run", metavar="NAME", help="Run under the model (default: default).")]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Machine-readable result on stdout.")]
WindowsOpt = Annotated[int | None, typer.Option(min=1, metavar="N", help="Last N windows (default: all kept).")]


@contextlib.contextmanager
def _exit_codes() -> Iterator[None]:
    """Our exceptions as one `error:` line and the exit code the module docstring states."""
    try:
        yield
    except StatsEndpointError as exc:  # the URL reaches something else than it says: invalid input
        raise _error(exc, EXIT_USAGE) from None
    except StatsStoreError as exc:
        raise _error(exc, EXIT_FAILURE) from None
    except (ValueError, TraceError) as exc:
        raise _error(exc, EXIT_USAGE) from None
    except OSError as exc:  # a file that cannot be read or written (Redis's socket errors arrive as ours)
        raise _error(f"{exc.filename or ''}: {exc.strerror or exc}", EXIT_USAGE) from None


def _store(redis: str | None, model: str | None, run: str | None) -> tuple[StatsStore, StatsTarget]:
    target = parse_target(redis).with_overrides(model, run)
    target.require_model()
    store = StatsStore.open(target)
    store.ping(FIRST_CONTACT_S)
    return store, target


def _require(store: StatsStore) -> None:
    """Commands on existing statistics: a model or run that holds nothing is an error, not an empty success."""
    if store.header() is None:
        raise StatsStoreError(f"no statistics under {store.where}")


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _span(ids: list[int]) -> str:
    return f"{ids[0]}..{ids[-1]}" if ids else "none"


@stats_app.command("push", cls=PlainCommand)
def push(
    trace: Annotated[Path, typer.Argument(metavar="TRACE", show_default=False,
                                          help="Trace .npz, statistics .npz, router JSONL or folder, counts.")],
    redis: RedisOpt = None,
    model: ModelOpt = None,
    run: RunOpt = None,
    window_tokens: Annotated[int | None, typer.Option(
        min=1, metavar="N", help=f"Tokens per window (default: {DEFAULT_WINDOW_TOKENS}).")] = None,
    first_window: Annotated[int | None, typer.Option(
        min=0, metavar="ID", help="First window id (default: the newest + 1).")] = None,
    keep: Annotated[int | None, typer.Option(
        min=1, metavar="N", help="Windows kept, when this creates the store (default: 64, or all pushed).")] = None,
    decay: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, metavar="FACTOR",
        help=f"Per-window decay of the aggregate, when this creates the store (default: {DEFAULT_DECAY}).")] = None,
    top_k: TopKOpt = None,
    num_experts: NumExpertsOpt = None,
    replace: Annotated[bool, typer.Option(
        "--replace", metavar="", help="Take this file's earlier push out, then push it again.")] = False,
    append: Annotated[bool, typer.Option(
        "--append", metavar="", help="Push this file once more: its tokens count twice.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Replay a routing file into Redis as windows, as a writer records them; a file already pushed is not
    counted twice, and a push that stopped resumes."""
    with _exit_codes():
        if replace and append:
            raise ValueError("--replace and --append: give at most one")
        store, target = _store(redis, model, run)
        try:
            routing = load_routing(trace, top_k, num_experts)
        except EOFError:  # numpy on an empty .npz/.npy (typer would print a bare "Aborted.")
            raise ValueError(f"{trace}: empty file, not a routing trace or statistics") from None
        mode = "replace" if replace else "append" if append else "once"
        done = [0, 0]

        def progress(i: int, n: int) -> None:
            done[:] = [i, n]
            status.update(f"pushing {trace}: window {i}/{n}")

        try:
            with err.status(f"pushing {trace} to {target.display}") as status:
                report = push_routing(store, routing, window_tokens, first_window, keep,
                                      DEFAULT_DECAY if decay is None else decay, mode=mode,
                                      name=str(trace), progress=progress)
        except (StatsStoreError, KeyboardInterrupt) as exc:
            if isinstance(exc, StatsStoreError) and not done[0]:
                raise
            kind = StatsStoreError if isinstance(exc, KeyboardInterrupt) else type(exc)
            why = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
            raise kind(f"{why}; {done[0]} of {done[1] or '?'} windows written: run the same command again to "
                       f"push the rest (nothing is counted twice)") from None
    n, keep_n = len(report["windows"]), report["keep"]
    for flag, given, kept in (("--keep", keep, keep_n), ("--decay", decay, report["decay"])):
        if not report["created"] and given is not None and given != kept:
            err.print(f"[yellow]warning:[/yellow] {flag} {given} applies when a push creates the store; this one "
                      f"was created before with {flag} {kept}", highlight=False)
    if report["written"] and n > keep_n:
        err.print(f"[yellow]warning:[/yellow] pushed {n} windows but the store keeps {keep_n}: a snapshot "
                  f"holds the last {keep_n}, older ones go to the decayed aggregate")
    if as_json:
        _emit(report)
        return
    err.print(_push_message(report, trace, target.display), highlight=False, markup=False)
    print(f"{report['model']} {report['run']} windows {_span(report['windows'])}")


def _push_message(report: dict, trace: Path, display: str) -> str:
    """What a push did, in one line for people (`--json` has it for machines)."""
    n = len(report["windows"])
    where = f"model={report['model']} run={report['run']} at {display}"
    windows, written = _span(report["windows"]), _span(report["written"])
    latest = f" (the latest of {report['pushes']} pushes)" if report["pushes"] > 1 else ""
    before = _span(report["windows"][: n - len(report["written"])])
    return {
        "pushed": f"pushed {report['tokens']} tokens as {n} window(s) {windows} to {where}",
        "resumed": f"resumed {trace}: windows {before} were written before; wrote {written} to {where}",
        "replaced": f"replaced the earlier push of {trace}: its tokens are now in windows {windows} of {where}",
        "appended": f"appended {trace} once more as windows {windows}: its tokens count {report['pushes']} "
                    f"times in {where}",
        "already pushed": f"already pushed: {trace} ({report['tokens']} tokens) is in windows {windows}"
                          f"{latest} of {where}; nothing written (--append to count it again, --replace to "
                          f"push it anew)",
    }[report["action"]]


@stats_app.command("show", cls=PlainCommand)
def show(
    redis: RedisOpt = None,
    model: ModelOpt = None,
    run: RunOpt = None,
    windows: WindowsOpt = None,
    decayed: Annotated[bool, typer.Option(
        "--decayed", metavar="", help="Show the exponentially decayed aggregate instead.")] = False,
    width: Annotated[int, typer.Option(min=8, metavar="COLUMNS", help="Heatmap columns.")] = 64,
    as_json: JsonOpt = False,
) -> None:
    """Per-layer load table and heatmap of the statistics in Redis."""
    with _exit_codes():
        _window_choice(windows, decayed)
        store, target = _store(redis, model, run)
        stats = store.decayed() if decayed else store.snapshot(windows or target.windows)
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
    what = "decayed aggregate" if decayed else f"windows {_span(ids)} ({len(ids)} present)"
    title = f"{store.keys.model} / {store.keys.run}: {what}, {stats.tokens} tokens, top-{stats.top_k}"
    err.print(load_table(stats, title))
    err.print(heatmap(stats, width))
    bal = np.array([r["balancedness"] for r in rows])
    print(
        f"layers={stats.num_layers} experts={stats.num_experts} tokens={stats.tokens} "
        f"balancedness_mean={bal.mean():.4f} balancedness_worst={bal.min():.4f}"
    )


def _window_choice(windows: int | None, decayed: bool) -> None:
    if windows is not None and decayed:
        raise ValueError("--windows and --decayed: the decayed aggregate covers every window; give one of them")


def _writable_npz(out: Path) -> None:
    """--out is checked before anything is read: a .npz path in a folder that exists and can be written."""
    if out.suffix != ".npz":
        raise ValueError(f"--out: expected a path ending in .npz (numpy would add it), got {str(out)!r}")
    folder = out.parent
    if not folder.is_dir():
        raise ValueError(f"--out: folder {str(folder)!r} does not exist")
    if out.is_dir() or not os.access(folder, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"--out: cannot write {str(out)!r}")


@stats_app.command("export", cls=PlainCommand)
def export(
    out: Annotated[Path, typer.Option("--out", "-o", metavar="PATH", show_default=False,
                                      help="Statistics .npz to write (plan, evaluate and load_stats read it).")],
    redis: RedisOpt = None,
    model: ModelOpt = None,
    run: RunOpt = None,
    windows: WindowsOpt = None,
    decayed: Annotated[bool, typer.Option(
        "--decayed", metavar="", help="Export the decayed aggregate (float) instead.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the statistics in Redis to a .npz that `expertmesh plan` reads like a trace."""
    with _exit_codes():
        _window_choice(windows, decayed)
        _writable_npz(out)
        store, target = _store(redis, model, run)
        stats = store.decayed() if decayed else store.snapshot(windows or target.windows)
        save_stats(stats, out)
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
        err.print(f"wrote {stats.tokens} tokens of {store.keys.model}/{store.keys.run} to {out}", highlight=False)
        print(out)


@stats_app.command("compact", cls=PlainCommand)
def compact(redis: RedisOpt = None, model: ModelOpt = None, run: RunOpt = None, as_json: JsonOpt = False) -> None:
    """Merge each window's writer deltas; fold windows older than the kept ones into the decayed aggregate."""
    with _exit_codes():
        store, _ = _store(redis, model, run)
        _require(store)
        report = store.compact()
    if as_json:
        _emit(report)
    else:
        print(f"merged={report['merged']} folded={report['folded']} conflicts={report['conflicts']}")


@stats_app.command("reset", cls=PlainCommand)
def reset(
    redis: RedisOpt = None,
    model: ModelOpt = None,
    run: RunOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", metavar="", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete every key of the model/run (statistics, aggregate, writer marks, push records)."""
    with _exit_codes():
        store, target = _store(redis, model, run)
        if not yes:
            if not sys.stdin.isatty():
                raise ValueError("--yes: refusing to delete without it when not interactive")
            if not typer.confirm(f"delete all statistics of model={store.keys.model} run={store.keys.run} at "
                                 f"{target.display}?", err=True):
                raise _error("nothing deleted", EXIT_FAILURE)
        removed = store.reset()
        if removed == 0:
            raise StatsStoreError(f"no statistics under {store.where}; nothing removed")
    if as_json:
        _emit({"model": store.keys.model, "run": store.keys.run, "keys_removed": removed})
    else:
        print(f"removed {removed} keys of {store.keys.model}/{store.keys.run}")
