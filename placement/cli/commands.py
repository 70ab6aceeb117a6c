"""The planning commands: plan, evaluate, compare, export, trace info|convert, plan-demo.

Results go to stdout (labelled `key<TAB>value` lines, or `--json`), tables, notes, progress and errors to
stderr. Exit codes (exits.py): 0 ok, 1 failure, 2 usage or invalid input, 3 infeasible request.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..cost import CostParams, evaluate
from ..exits import PlainCommand, PlainErrors, PlainGroup, exit_codes, note
from ..export import check_export_path, export_plan
from ..ilp import IlpOptions, with_step_objective
from ..placers import STRATEGIES, InfeasibleError, place
from ..plan import load_plan, save_plan
from ..plot import load_heatmaps
from ..robust import RobustOptions
from ..stats import save_stats
from ..synthetic import SyntheticSpec, synthetic_trace
from ..topology import Topology, load_topology
from ..trace import Trace, save_trace
from .args import (
    Dataflow,
    DataflowOpt,
    ExportFormat,
    FfnOpt,
    GpusOpt,
    HiddenOpt,
    JsonOpt,
    MaxSlotsOpt,
    NodesOpt,
    NumExpertsOpt,
    ObjectiveOpt,
    PlanArg,
    PlotOpt,
    RedundantOpt,
    SeedOpt,
    SpreadOpt,
    StatsOpt,
    Strategy,
    TimeOpt,
    TopKOpt,
    TopologyOpt,
    TraceArg,
    WorkersOpt,
)
from .heldout import (
    HeldOutOpt,
    ResamplesOpt,
    RobustOpt,
    RobustSlackOpt,
    SplitOpt,
    expected_figure,
    held_out_figures,
    held_out_sources,
    robust_options,
)
from .inputs import as_stats, check_output, check_plot, ilp_options, load_source, placer_options, topology_from
from .report import err, fmt, legend, plan_row, print_json, table, tsv_lines

__all__ = ["app"]

app = typer.Typer(cls=PlainErrors, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
trace_app = typer.Typer(cls=PlainGroup, no_args_is_help=True, help="Inspect and convert routing traces and statistics.")
app.add_typer(trace_app, name="trace")

_PLANNING = {"infeasible": (InfeasibleError,)}


@contextlib.contextmanager
def _layer_progress(label: str, enabled: bool = True) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr, shown from the first finished layer (an early error leaves no trace)."""
    if not enabled:
        yield None
        return
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("layers"), TimeElapsedColumn())
    bar = Progress(*columns, console=err, transient=True)
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(label, total=total)
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()


# ilp's solver knobs change how it searches, not what a plan must satisfy: another placer notes and ignores
# them (scripts pass one set of flags to every strategy); the options that change the plan are refused.
_SOLVER_KNOBS = ("--time-limit", "--seed", "--workers")


def _refuse_unused(strategy: str, **given) -> None:
    """Options of another placer: refused where they would change the plan, noted where they would not."""
    for flag, value in given.items():
        owner = "eplb" if flag == "--spread-replicas" else "ilp"
        if value is None or strategy == owner:
            continue
        if flag in _SOLVER_KNOBS:
            note(f"{flag} applies to --strategy ilp only; {strategy} ignores it")
        else:
            raise ValueError(f"{flag}: applies to --strategy {owner} only, not {strategy}")


def _show(rows: dict[str, dict], title: str) -> None:
    err.print(table(rows, title))
    err.print(legend(), highlight=False)


def _title(topo: Topology, redundant: int) -> str:
    return f"{topo.num_gpus} GPUs / {topo.num_nodes} node(s), +{redundant} redundant slots"


def _run_placers(source, topo: Topology, names: list[str], redundant: int, ilp: IlpOptions,
                 spread: bool | None, robust: RobustOptions | None = None, held: Trace | None = None
                 ) -> tuple[dict, dict]:
    """Every placer's row (with --robust, "eplb robust" and "ilp robust" beside the plain ones), scored on
    `source` and, given one, on the held-out trace."""
    rows, panels = {}, {}
    runs = [(name, name, None) for name in names]
    runs += [(f"{name} robust", name, robust) for name in names if robust is not None and name in ("eplb", "ilp")]
    for label, name, robust_opts in runs:
        start = time.perf_counter()
        with _layer_progress(f"planning ({label})", name == "ilp") as progress:
            p = place(name, source, topo, redundant, placer_options(name, ilp, spread, robust_opts), progress)
        solve_s = time.perf_counter() - start
        metrics = evaluate(source, p, topo, ilp.params, ilp.dataflow)
        rows[label], panels[label] = {**plan_row(p, metrics, solve_s), **expected_figure(source, p)}, metrics
        if held is not None:
            rows[label].update(held_out_figures(p, held, topo, ilp.params, ilp.dataflow))
    return rows, panels


@app.command(cls=PlainCommand)
def plan(
    trace: TraceArg = None,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE", help="Plan JSON to write.")] = Path("plan.json"),
    strategy: Annotated[Strategy, typer.Option(
        "--strategy", "-s", metavar="PLACER", help="contiguous, round_robin, eplb or ilp.")] = Strategy.ilp,
    gpus: GpusOpt = None, nodes: NodesOpt = None, redundant: RedundantOpt = 0, topology: TopologyOpt = None,
    max_slots_per_gpu: MaxSlotsOpt = None, dataflow: DataflowOpt = Dataflow.home, objective: ObjectiveOpt = None,
    time_limit: TimeOpt = None, seed: SeedOpt = None, workers: WorkersOpt = None, spread_replicas: SpreadOpt = None,
    stats: StatsOpt = None, top_k: TopKOpt = None, num_experts: NumExpertsOpt = None,
    previous: Annotated[Path | None, typer.Option(
        "--previous", metavar="PLAN", help="The plan in service: ilp weighs moving experts; migration is reported.")
    ] = None,
    interval_tokens: Annotated[float | None, typer.Option(
        "--interval-tokens", show_default=False,
        help="ilp: tokens until the next re-placement; moves must pay back within them (default: 100x the "
             "data's tokens).")] = None,
    balance_slack: Annotated[float | None, typer.Option(
        "--balance-slack", show_default=False,
        help="ilp: balancedness may fall this far below EPLB's, per layer (default: 0.01).")] = None,
    robust: RobustOpt = None, robust_slack: RobustSlackOpt = None, resamples: ResamplesOpt = None,
    hidden: HiddenOpt = 4096, ffn: FfnOpt = 14336, json_out: JsonOpt = False, plot: PlotOpt = None,
) -> None:
    """Place experts on GPUs from routing data; write the plan JSON."""
    with exit_codes(**_PLANNING):
        _refuse_unused(strategy.value, **{"--objective": objective, "--time-limit": time_limit, "--seed": seed,
                                          "--workers": workers, "--interval-tokens": interval_tokens,
                                          "--balance-slack": balance_slack, "--spread-replicas": spread_replicas})
        check_output(out, "--out")
        check_plot(plot)
        robust_opts = robust_options(robust, robust_slack, resamples, dataflow.value)
        if robust_opts is not None and strategy.value not in ("ilp", "eplb"):
            raise ValueError(f"--robust: applies to --strategy ilp or eplb only, not {strategy.value}")
        params = CostParams(hidden=hidden, ffn=ffn)
        prev = load_plan(previous) if previous else None
        options = ilp_options(dataflow=dataflow.value, objective=objective, time_limit=time_limit, seed=seed,
                              workers=workers, params=params, previous=prev, interval_tokens=interval_tokens,
                              balance_slack=balance_slack)
        source = load_source(trace, stats, top_k, num_experts)
        topo = topology_from(gpus, nodes, topology, max_slots_per_gpu)
        start = time.perf_counter()
        with _layer_progress(f"planning ({strategy.value})", strategy == Strategy.ilp) as progress:
            result = place(strategy.value, source, topo, redundant,
                           placer_options(strategy.value, options, spread_replicas, robust_opts), progress)
        solve_s = time.perf_counter() - start
        metrics = evaluate(source, result, topo, params, dataflow.value, prev)
        row = {**plan_row(result, metrics, solve_s), **expected_figure(source, result)}
        result = result.with_report(metrics={**metrics.summary(), "colocated_replicas": result.colocated_replicas,
                                             **expected_figure(source, result)})
        save_plan(result, out)
        if plot:
            load_heatmaps({strategy.value: metrics}, plot, gpus_per_node=topo.gpus_per_node)
        if json_out:
            print_json({"plan": str(out), **row})
        else:
            _show({strategy.value: row}, _title(topo, redundant))
            print(f"plan\t{out}\nversion\t{result.version}")


@app.command("evaluate", cls=PlainCommand)
def evaluate_cmd(
    trace: TraceArg = None, plan_file: PlanArg = None, stats: StatsOpt = None, top_k: TopKOpt = None,
    num_experts: NumExpertsOpt = None, dataflow: DataflowOpt = Dataflow.home,
    previous: Annotated[Path | None, typer.Option("--previous", metavar="PLAN", help="Plan to count migration from.")
                        ] = None,
    topology: Annotated[Path | None, typer.Option(
        "--topology", metavar="YAML", help="Bandwidths and GPU speed for the step time (default: the plan's GPUs "
                                           "and nodes with default links).")] = None,
    held_out: HeldOutOpt = None, split: SplitOpt = None,
    hidden: HiddenOpt = 4096, ffn: FfnOpt = 14336, json_out: JsonOpt = False, plot: PlotOpt = None,
) -> None:
    """Score a plan on routing data with the cost model (and on held-out data: --held-out or --split)."""
    with exit_codes():
        if stats is not None and plan_file is None and trace is not None:
            trace, plan_file = None, trace  # `evaluate --stats URL PLAN`: the only positional is the plan
        if plan_file is None:
            raise ValueError("PLAN: pass the plan JSON to evaluate")
        check_plot(plot)
        p = load_plan(plan_file)
        topo = load_topology(topology) if topology else Topology(p.num_gpus, p.num_nodes)
        prev = load_plan(previous) if previous else None
        source, held = held_out_sources(load_source(trace, stats, top_k, num_experts), held_out, split, top_k,
                                        num_experts)
        params = CostParams(hidden=hidden, ffn=ffn)
        metrics = evaluate(source, p, topo, params, dataflow.value, prev)
        if plot:
            load_heatmaps({p.strategy: metrics}, plot, gpus_per_node=topo.gpus_per_node)
        row = {key: value for key, value in plan_row(p, metrics, float("nan")).items() if key != "solve_s"}
        row.update(expected_figure(source, p))
        if held is not None:
            row.update(held_out_figures(p, held, topo, params, dataflow.value))
        if json_out:
            print_json({"plan": str(plan_file), "strategy": p.strategy, **row,
                        "per_layer": {"balancedness": metrics.balancedness.tolist(),
                                      "copies": metrics.copies.tolist()}})
        else:
            _show({p.strategy: row}, f"plan {p.version}")
            for key, value in row.items():
                print(f"{key}\t{fmt(value, 4)}")


@app.command(cls=PlainCommand)
def compare(
    trace: TraceArg = None, stats: StatsOpt = None, top_k: TopKOpt = None, num_experts: NumExpertsOpt = None,
    gpus: GpusOpt = None, nodes: NodesOpt = None, redundant: RedundantOpt = 0, topology: TopologyOpt = None,
    max_slots_per_gpu: MaxSlotsOpt = None, dataflow: DataflowOpt = Dataflow.home, objective: ObjectiveOpt = None,
    time_limit: TimeOpt = None, seed: SeedOpt = None, workers: WorkersOpt = None, spread_replicas: SpreadOpt = None,
    hidden: HiddenOpt = 4096, ffn: FfnOpt = 14336,
    strategies: Annotated[str, typer.Option("--strategies", metavar="NAMES", help="Comma-separated placers.")
                          ] = ",".join(STRATEGIES),
    held_out: HeldOutOpt = None, split: SplitOpt = None, robust: RobustOpt = None,
    robust_slack: RobustSlackOpt = None, resamples: ResamplesOpt = None,
    json_out: JsonOpt = False,
    tsv: Annotated[bool, typer.Option("--tsv", metavar="", help="key=value lines on stdout, also in a terminal "
                                                                "(they are printed whenever stdout is not one).")
                   ] = False,
    plot: PlotOpt = None,
) -> None:
    """Run several placers on the same data and print one table (in-sample and, with --held-out or --split,
    held-out figures side by side)."""
    with exit_codes(**_PLANNING):
        names = [s.strip() for s in strategies.split(",") if s.strip()]
        if not names:
            raise ValueError(f"--strategies: expected one or more of {', '.join(STRATEGIES)}, got {strategies!r}")
        for name in names:
            if name not in STRATEGIES or names.count(name) > 1:
                problem = "named twice" if name in STRATEGIES else "unknown placer"
                raise ValueError(f"--strategies: {problem} {name!r}; expected some of {', '.join(STRATEGIES)}")
        check_plot(plot)
        options = ilp_options(dataflow=dataflow.value, objective=objective, time_limit=time_limit, seed=seed,
                              workers=workers, params=CostParams(hidden=hidden, ffn=ffn))
        robust_opts = robust_options(robust, robust_slack, resamples, dataflow.value)
        if robust_opts is not None and not {"ilp", "eplb"} & set(names):
            raise ValueError("--robust: applies to ilp and eplb; --strategies names neither")
        source, held = held_out_sources(load_source(trace, stats, top_k, num_experts), held_out, split, top_k,
                                        num_experts)
        topo = topology_from(gpus, nodes, topology, max_slots_per_gpu)
        rows, panels = _run_placers(source, topo, names, redundant, options, spread_replicas, robust_opts, held)
        if plot:
            load_heatmaps(panels, plot, _title(topo, redundant), topo.gpus_per_node)
        if json_out:
            print_json(rows)
            return
        _show(rows, _title(topo, redundant))
        if tsv or not sys.stdout.isatty():
            print("\n".join(tsv_lines(rows)))


@app.command(cls=PlainCommand)
def export(
    plan_file: PlanArg = None,
    fmt: Annotated[ExportFormat | None, typer.Option("--format", "-f", help="Target engine's file format.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", metavar="FILE", help="File to write.")] = None,
    first_moe_layer: Annotated[int, typer.Option(
        "--first-moe-layer", min=0, help="sglang: dense layers before the first MoE layer (DeepSeek-V3: 3); SGLang "
                                         "counts every layer, the plan only MoE layers.")] = 0,
) -> None:
    """Write a plan in the file format SGLang, vLLM or DeepSeek's EPLB tools read."""
    with exit_codes():
        for name, value in (("PLAN", plan_file), ("--format", fmt), ("--out", out)):
            if value is None:
                raise ValueError(f"{name}: missing; usage: expertmesh export PLAN --format FORMAT --out FILE")
        check_export_path(fmt.value, out, "--out")
        check_output(out, "--out")
        p = load_plan(plan_file)
        export_plan(p, fmt.value, out, first_moe_layer)
        print(f"export\t{out}")
        if fmt == ExportFormat.sglang:
            note(f"SGLang: --init-expert-location {out} --ep-num-redundant-experts {p.num_redundant} with "
                 f"--ep-size {p.num_gpus}; the file holds {first_moe_layer + p.num_layers} layers "
                 f"({first_moe_layer} dense first), which must equal the model's num_hidden_layers")


@trace_app.command("info", cls=PlainCommand)
def trace_info(trace: TraceArg = None, stats: StatsOpt = None, top_k: TopKOpt = None,
               num_experts: NumExpertsOpt = None, json_out: JsonOpt = False) -> None:
    """Shape, tokens and load skew of routing data."""
    with exit_codes():
        source = load_source(trace, stats, top_k, num_experts)
        s = as_stats(source)
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
            if "dropped_incomplete_tokens" in source.meta:
                info["dropped_incomplete_tokens"] = source.meta["dropped_incomplete_tokens"]
        if json_out:
            print_json(info)
        else:
            for key, value in info.items():
                print(f"{key}\t{f'{value:.3f}' if isinstance(value, float) else value}")


@trace_app.command("convert", cls=PlainCommand)
def trace_convert(
    trace: TraceArg = None,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE", help="Canonical .npz to write.")
                   ] = Path("trace.npz"),
    stats_only: Annotated[bool, typer.Option("--stats-only", metavar="", help="Write statistics, not per-token "
                                                                                "data.")] = False,
    stats: StatsOpt = None, top_k: TopKOpt = None, num_experts: NumExpertsOpt = None,
) -> None:
    """Convert any supported routing data to the canonical trace (or statistics) .npz."""
    with exit_codes():
        check_output(out, "--out", (".npz",))  # numpy would add .npz to any other name
        source = load_source(trace, stats, top_k, num_experts)
        if isinstance(source, Trace) and not stats_only:
            save_trace(source, out)
            print(f"trace\t{out}")
        else:
            save_stats(as_stats(source), out)
            print(f"stats\t{out}")


@app.command("plan-demo", cls=PlainCommand)
def plan_demo(out: Annotated[Path, typer.Option("--out", metavar="FOLDER", help="Folder for the demo's files.")
                        ] = Path("out/demo"),
         time_limit: TimeOpt = None) -> None:
    """Generate a structured trace (64 experts, top-8, 16 layers), compare every placer on 8 GPUs, and on
    16 GPUs over 2 nodes, and draw per-GPU load heatmaps."""
    with exit_codes(**_PLANNING):
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out: {out} is a file; expected a folder")
        options = ilp_options(dataflow="home", objective="traffic", time_limit=time_limit, seed=None, workers=None,
                              params=CostParams())
        out.mkdir(parents=True, exist_ok=True)
        spec = SyntheticSpec(num_experts=64, top_k=8, num_layers=16, num_tokens=4096, num_domains=4, seed=0)
        source = synthetic_trace(spec)
        save_trace(source, out / "trace.npz")
        err.print(f"[bold]expertmesh plan-demo[/]: synthetic trace {out / 'trace.npz'} "
                  f"({spec.num_tokens} tokens, {spec.num_layers} layers, {spec.num_experts} experts, top-{spec.top_k})")
        for gpus, nodes in ((8, 1), (16, 2)):
            _demo_topology(source, Topology(gpus, nodes), options, out)


def _demo_topology(source: Trace, topo: Topology, options: IlpOptions, out: Path) -> None:
    """The demo on one topology: every placer, plus ilp's own plan (objective traffic) beside the default."""
    rows, panels = _run_placers(source, topo, list(STRATEGIES[:-1]), 0, options, None)
    start = time.perf_counter()
    with _layer_progress("planning (ilp)") as progress:
        own = place("ilp", source, topo, 0, options, progress)
    chosen = with_step_objective(source, own, topo, options)
    solve_s = time.perf_counter() - start
    for name, p in (("ilp", chosen), ("ilp traffic", own)):
        panels[name] = evaluate(source, p, topo, options.params)
        rows[name] = plan_row(p, panels[name], solve_s)
    _show(rows, _title(topo, 0))
    png = out / f"load_{topo.num_gpus}gpu.png"
    load_heatmaps(panels, png, f"per-GPU load per layer, {topo.num_gpus} GPUs / {topo.num_nodes} node(s)",
                  topo.gpus_per_node)
    ilp_row, own_row, eplb_row = rows["ilp"], rows["ilp traffic"], rows["eplb"]
    print(f"{topo.num_gpus} GPUs: ilp step {ilp_row['step_ms']:.2f} ms vs eplb {eplb_row['step_ms']:.2f} "
          f"({len(chosen.solver.step_choice.layers_from_eplb)} of {own.num_layers} layers EPLB's); ilp --objective "
          f"traffic: copies/token {own_row['copies']:.2f} vs eplb {eplb_row['copies']:.2f} "
          f"({own_row['copies'] / eplb_row['copies'] - 1:+.0%}), step {own_row['step_ms']:.2f} ms; heatmap {png}")
