"""Planning commands of the `expertmesh` CLI: plan, evaluate, compare, export, trace info|convert, demo.

Results go to stdout (`--json` for machines), tables and progress to stderr. Exit codes: 0 ok, 1 failure,
2 usage or invalid input (the message names the field), 3 infeasible request (no plan can exist).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .cost import CostParams, Metrics, evaluate
from .eplb import EplbOptions
from .export import EXPORT_FORMATS, export_plan
from .ilp import IlpOptions
from .placers import STRATEGIES, InfeasibleError, place
from .plan import Placement, PlanError, load_plan, save_plan
from .plot import load_heatmaps
from .sources import load_routing
from .stats import RoutingStats, save_stats, stats_from_trace
from .synthetic import SyntheticSpec, synthetic_trace
from .topology import Topology, TopologyError, load_topology
from .trace import Trace, TraceError, save_trace

__all__ = ["app", "register_stats_loader", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INFEASIBLE"]

EXIT_FAILURE, EXIT_USAGE, EXIT_INFEASIBLE = 1, 2, 3

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
trace_app = typer.Typer(no_args_is_help=True, help="Inspect and convert routing traces and statistics.")
app.add_typer(trace_app, name="trace")
# Wide enough for the comparison table when stderr is a file or pipe (rich assumes 80 columns there);
# soft_wrap keeps messages on one line (grep-able, copy-able paths and URLs).
err = Console(stderr=True, width=None if sys.stderr.isatty() else 150, soft_wrap=True)

# URL schemes (e.g. redis) whose statistics loaders the control plane registers; placement stays pure.
_STATS_LOADERS: dict[str, Callable[[str], RoutingStats]] = {}


def register_stats_loader(schemes: tuple[str, ...], loader: Callable[[str], RoutingStats]) -> None:
    for scheme in schemes:
        _STATS_LOADERS[scheme] = loader


class Strategy(StrEnum):
    contiguous = "contiguous"
    round_robin = "round_robin"
    eplb = "eplb"
    ilp = "ilp"


class Dataflow(StrEnum):
    home = "home"
    follow = "follow"


class ExportFormat(StrEnum):
    sglang = "sglang"
    vllm = "vllm"
    eplb = "eplb"


assert tuple(s.value for s in Strategy) == STRATEGIES and tuple(f.value for f in ExportFormat) == EXPORT_FORMATS


@contextlib.contextmanager
def _exit_codes() -> Iterator[None]:
    """Map our exceptions to exit codes with one clear line on stderr."""
    try:
        yield
    except InfeasibleError as exc:
        err.print(f"[bold red]infeasible:[/] {exc}")
        raise typer.Exit(EXIT_INFEASIBLE) from None
    except (TraceError, PlanError, TopologyError, ValueError) as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    except typer.Exit:
        raise
    except Exception as exc:  # connection failures and the like: the command could not run
        err.print(f"[bold red]failed:[/] {type(exc).__name__}: {exc}")
        raise typer.Exit(EXIT_FAILURE) from None


# ---- shared options ----------------------------------------------------------------------------------
TraceArg = Annotated[Path | None, typer.Argument(help="Routing trace or statistics file (.npz, .jsonl, .json, .npy) "
                                                      "or a folder of router logs.", show_default=False)]
StatsOpt = Annotated[str | None, typer.Option("--stats", help="Statistics instead of a file, e.g. "
                                                              "redis://host:6379/0?model=M.")]
TopKOpt = Annotated[int | None, typer.Option("--top-k", help="k, for count matrices that do not record it.")]
GpusOpt = Annotated[int | None, typer.Option("--gpus", "-g", help="GPUs in the EP group.")]
NodesOpt = Annotated[int, typer.Option("--nodes", "-n", help="Nodes the GPUs are spread over.")]
RedundantOpt = Annotated[int, typer.Option("--redundant", "-r", help="Extra expert slots per layer (replicas).")]
TopologyOpt = Annotated[Path | None, typer.Option("--topology", help="Topology YAML (overrides --gpus/--nodes).")]
MaxSlotsOpt = Annotated[int | None, typer.Option("--max-slots-per-gpu", help="Expert slots one GPU can hold.")]
DataflowOpt = Annotated[Dataflow, typer.Option("--dataflow", help="Traffic to minimise and report: home or follow.")]
TimeOpt = Annotated[float, typer.Option("--time-limit", help="Seconds the ilp placer may take (approximately).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Solver seed (plans are reproducible per seed).")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="Processes for the ilp placer (0 = all cores).")]
HiddenOpt = Annotated[int, typer.Option("--hidden", help="Model hidden size, for bytes and time.")]
FfnOpt = Annotated[int, typer.Option("--ffn", help="Expert FFN size, for compute time and migration bytes.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Write a per-GPU load heatmap PNG here.")]


def _load_source(trace: Path | None, stats: str | None, top_k: int | None) -> Trace | RoutingStats:
    if (trace is None) == (stats is None):
        raise ValueError("source: give exactly one of TRACE or --stats URL")
    if trace is not None:
        return load_routing(trace, top_k)
    scheme = stats.split("://", 1)[0] if "://" in stats else ""
    if scheme in _STATS_LOADERS:
        return _STATS_LOADERS[scheme](stats)
    if scheme:
        known = sorted(_STATS_LOADERS) or ["(none installed: pip install 'expertmesh[stats]')"]
        raise ValueError(f"--stats: unknown URL scheme {scheme!r}; expected one of {known}")
    return load_routing(Path(stats), top_k)


def _as_stats(source: Trace | RoutingStats) -> RoutingStats:
    return stats_from_trace(source) if isinstance(source, Trace) else source


def _topology(gpus: int | None, nodes: int, topology: Path | None, max_slots: int | None) -> Topology:
    if topology is not None:
        return load_topology(topology)
    if gpus is None:
        raise ValueError("gpus: pass --gpus G (or --topology FILE)")
    return Topology(gpus, nodes, max_slots_per_gpu=max_slots)


@contextlib.contextmanager
def _layer_progress(label: str, enabled: bool = True) -> Iterator[Callable[[int, int], None] | None]:
    if not enabled:
        yield None
        return
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("layers"), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


COLUMNS = [
    ("balancedness", "balance", 3), ("balancedness_worst", "worst", 3), ("copies", "copies", 3),
    ("internode_copies", "internode", 3), ("busiest_link_mb", "busiest MB", 2), ("follow_cross", "follow x", 3),
    ("step_ms", "step ms", 2), ("solve_s", "solve s", 2), ("gap", "gap", 3),
]


def _table(rows: dict[str, dict], title: str) -> Table:
    table = Table(title=title, title_style="bold", header_style="bold cyan")
    table.add_column("strategy")
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right")
    for name, row in rows.items():
        table.add_row(name, *(_fmt(row.get(key, float("nan")), d) for key, _, d in COLUMNS))
    return table


def _placer_options(strategy: str, options: IlpOptions) -> IlpOptions | EplbOptions | None:
    if strategy == "ilp":
        return options
    return EplbOptions(policy=options.eplb_policy) if strategy == "eplb" else None


def _plan_row(plan: Placement, metrics: Metrics, solve_s: float) -> dict:
    solver = plan.solver
    return {**metrics.summary(), "solve_s": solve_s, "gap": solver.gap if solver else float("nan"),
            "status": solver.status if solver else "n/a", "version": plan.version}


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _print_json(doc) -> None:
    sys.stdout.write(json.dumps(_jsonable(doc), indent=1) + "\n")


# ---- commands ----------------------------------------------------------------------------------------
@app.command()
def plan(
    trace: TraceArg = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Plan JSON to write.")] = Path("plan.json"),
    strategy: Annotated[Strategy, typer.Option("--strategy", "-s")] = Strategy.ilp,
    gpus: GpusOpt = None, nodes: NodesOpt = 1, redundant: RedundantOpt = 0, topology: TopologyOpt = None,
    max_slots_per_gpu: MaxSlotsOpt = None, dataflow: DataflowOpt = Dataflow.home, time_limit: TimeOpt = 10.0,
    seed: SeedOpt = 0, workers: WorkersOpt = 0, stats: StatsOpt = None, top_k: TopKOpt = None,
    previous: Annotated[Path | None, typer.Option("--previous", help="Current plan: weigh migration cost.")] = None,
    interval_tokens: Annotated[float | None, typer.Option(
        "--interval-tokens", help="Tokens until the next re-placement: moves must pay back within them "
                                  "(default: 100x the data's tokens).")] = None,
    balance_slack: Annotated[float, typer.Option(
        "--balance-slack", help="ilp: balancedness may fall this far below EPLB's per layer.")] = 0.01,
    hidden: HiddenOpt = 4096, ffn: FfnOpt = 14336, json_out: JsonOpt = False, plot: PlotOpt = None,
) -> None:
    """Place experts on GPUs from routing data; write the plan JSON."""
    with _exit_codes():
        source = _load_source(trace, stats, top_k)
        topo = _topology(gpus, nodes, topology, max_slots_per_gpu)
        params = CostParams(hidden=hidden, ffn=ffn)
        prev = load_plan(previous) if previous else None
        options = IlpOptions(dataflow=dataflow.value, time_limit=time_limit, seed=seed, workers=workers,
                             previous=prev, interval_tokens=interval_tokens, balance_slack=balance_slack,
                             params=params)
        start = time.perf_counter()
        with _layer_progress(f"planning ({strategy.value})", strategy == Strategy.ilp) as progress:
            result = place(strategy.value, _as_stats(source), topo, redundant, _placer_options(strategy.value, options),
                           progress)
        solve_s = time.perf_counter() - start
        metrics = evaluate(source, result, topo, params, dataflow.value, prev)
        result = result.with_report(metrics=metrics.summary())
        save_plan(result, out)
        if plot:
            load_heatmaps({strategy.value: metrics}, plot)
        row = _plan_row(result, metrics, solve_s)
        if json_out:
            _print_json({"plan": str(out), **row})
        else:
            err.print(_table({strategy.value: row}, f"{topo.num_gpus} GPUs / {topo.num_nodes} node(s)"))
            print(f"{out}\t{result.version}")


@app.command("evaluate")
def evaluate_cmd(
    trace: TraceArg = None,
    plan_file: Annotated[Path | None, typer.Argument(metavar="PLAN", help="Plan JSON.", show_default=False)] = None,
    stats: StatsOpt = None, top_k: TopKOpt = None, dataflow: DataflowOpt = Dataflow.home,
    previous: Annotated[Path | None, typer.Option("--previous", help="Plan to count migration from.")] = None,
    hidden: HiddenOpt = 4096, ffn: FfnOpt = 14336, json_out: JsonOpt = False, plot: PlotOpt = None,
) -> None:
    """Score a plan on routing data with the cost model."""
    with _exit_codes():
        if stats is not None and plan_file is None and trace is not None:
            trace, plan_file = None, trace  # `evaluate --stats URL PLAN`: the only positional is the plan
        if plan_file is None:
            raise ValueError("PLAN: pass the plan JSON to evaluate")
        source = _load_source(trace, stats, top_k)
        p = load_plan(plan_file)
        topo = Topology(p.num_gpus, p.num_nodes)
        metrics = evaluate(source, p, topo, CostParams(hidden=hidden, ffn=ffn), dataflow.value,
                           load_plan(previous) if previous else None)
        if plot:
            load_heatmaps({p.strategy: metrics}, plot)
        summary = metrics.summary()
        if json_out:
            _print_json({"plan": str(plan_file), "version": p.version, "strategy": p.strategy, **summary,
                         "per_layer": {"balancedness": metrics.balancedness.tolist(),
                                       "copies": metrics.copies.tolist()}})
        else:
            err.print(_table({p.strategy: {**summary, "gap": p.solver.gap if p.solver else float("nan")}},
                             f"plan {p.version}"))
            for key, value in summary.items():
                print(f"{key}\t{_fmt(value, 4)}")


@app.command()
def compare(
    trace: TraceArg = None, stats: StatsOpt = None, top_k: TopKOpt = None,
    gpus: GpusOpt = None, nodes: NodesOpt = 1, redundant: RedundantOpt = 0, topology: TopologyOpt = None,
    max_slots_per_gpu: MaxSlotsOpt = None, dataflow: DataflowOpt = Dataflow.home, time_limit: TimeOpt = 10.0,
    seed: SeedOpt = 0, workers: WorkersOpt = 0, hidden: HiddenOpt = 4096, ffn: FfnOpt = 14336,
    strategies: Annotated[str, typer.Option("--strategies", help="Comma-separated placers.")] = ",".join(STRATEGIES),
    json_out: JsonOpt = False, plot: PlotOpt = None,
) -> None:
    """Run every placer on the same data and print one table."""
    with _exit_codes():
        names = [s.strip() for s in strategies.split(",") if s.strip()]
        for name in names:
            if name not in STRATEGIES:
                raise ValueError(f"--strategies: unknown placer {name!r}; expected some of {list(STRATEGIES)}")
        source = _load_source(trace, stats, top_k)
        topo = _topology(gpus, nodes, topology, max_slots_per_gpu)
        rows, panels = _compare(source, topo, names, redundant,
                                IlpOptions(dataflow=dataflow.value, time_limit=time_limit, seed=seed,
                                           workers=workers, params=CostParams(hidden=hidden, ffn=ffn)))
        if plot:
            load_heatmaps(panels, plot)
        if json_out:
            _print_json(rows)
        else:
            err.print(_table(rows, f"{topo.num_gpus} GPUs / {topo.num_nodes} node(s), {redundant} redundant"))
            for name, row in rows.items():
                print(name + "\t" + "\t".join(f"{key}={_fmt(row.get(key), 4)}" for key, _, _ in COLUMNS))


def _compare(source, topo: Topology, names: list[str], redundant: int, options: IlpOptions):
    stats = _as_stats(source)
    rows, panels = {}, {}
    for name in names:
        start = time.perf_counter()
        with _layer_progress(f"planning ({name})", name == "ilp") as progress:
            p = place(name, stats, topo, redundant, _placer_options(name, options), progress)
        solve_s = time.perf_counter() - start
        metrics = evaluate(source, p, topo, options.params, options.dataflow)
        rows[name], panels[name] = _plan_row(p, metrics, solve_s), metrics
    return rows, panels


@app.command()
def export(
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN", help="Plan JSON.")],
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help="Target engine's file format.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="File to write.")],
) -> None:
    """Write a plan in the file format SGLang, vLLM or DeepSeek's EPLB tools read."""
    with _exit_codes():
        export_plan(load_plan(plan_file), fmt.value, out)
        print(out)


@trace_app.command("info")
def trace_info(trace: TraceArg = None, stats: StatsOpt = None, top_k: TopKOpt = None, json_out: JsonOpt = False):
    """Shape, tokens and load skew of routing data."""
    with _exit_codes():
        source = _load_source(trace, stats, top_k)
        s = _as_stats(source)
        counts = s.counts.astype(np.float64)
        skew = counts.max(1) / np.maximum(counts.mean(1), 1e-12)
        info = {
            "kind": "trace" if isinstance(source, Trace) else "stats",
            "layers": s.num_layers, "experts": s.num_experts, "top_k": s.top_k, "tokens": s.tokens,
            "has_pairs": s.has_pairs, "skew_mean": float(skew.mean()), "skew_max": float(skew.max()),
        }
        if isinstance(source, Trace):
            info["sequences"] = int(len(np.unique(source.seq_ids)))
            info["has_weights"] = source.topk_weights is not None
        if json_out:
            _print_json(info)
        else:
            for key, value in info.items():
                print(f"{key}\t{_fmt(value) if isinstance(value, float) else value}")


@trace_app.command("convert")
def trace_convert(
    trace: TraceArg = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Canonical .npz to write.")] = Path("trace.npz"),
    stats_only: Annotated[bool, typer.Option("--stats-only", help="Write statistics, not per-token data.")] = False,
    stats: StatsOpt = None, top_k: TopKOpt = None,
):
    """Convert any supported routing data to the canonical trace (or statistics) .npz."""
    with _exit_codes():
        source = _load_source(trace, stats, top_k)
        if isinstance(source, Trace) and not stats_only:
            save_trace(source, out)
        else:
            save_stats(_as_stats(source), out)
        print(out)


@app.command()
def demo(out: Annotated[Path, typer.Option("--out", help="Folder for the demo's files.")] = Path("out/demo"),
         time_limit: TimeOpt = 10.0) -> None:
    """Generate a structured trace (64 experts, top-8, 16 layers), compare every placer on 8 GPUs, and on
    16 GPUs over 2 nodes, and draw per-GPU load heatmaps."""
    with _exit_codes():
        out.mkdir(parents=True, exist_ok=True)
        spec = SyntheticSpec(num_experts=64, top_k=8, num_layers=16, num_tokens=4096, num_domains=4, seed=0)
        source = synthetic_trace(spec)
        save_trace(source, out / "trace.npz")
        err.print(f"[bold]expertmesh demo[/]: synthetic trace {out / 'trace.npz'} "
                  f"({spec.num_tokens} tokens, {spec.num_layers} layers, {spec.num_experts} experts, top-{spec.top_k})")
        for gpus, nodes in ((8, 1), (16, 2)):
            topo = Topology(gpus, nodes)
            rows, panels = _compare(source, topo, list(STRATEGIES), 0, IlpOptions(time_limit=time_limit))
            err.print(_table(rows, f"{gpus} GPUs / {nodes} node(s)"))
            png = out / f"load_{gpus}gpu.png"
            load_heatmaps(panels, png, f"per-GPU load per layer, {gpus} GPUs / {nodes} node(s)")
            ilp_row, eplb_row = rows["ilp"], rows["eplb"]
            print(f"{gpus} GPUs: ilp copies/token {ilp_row['copies']:.2f} vs eplb {eplb_row['copies']:.2f} "
                  f"({ilp_row['copies'] / eplb_row['copies'] - 1:+.0%}), balance {ilp_row['balancedness']:.3f} "
                  f"vs {eplb_row['balancedness']:.3f}; heatmap {png}")
