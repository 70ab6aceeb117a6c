"""The planning commands' arguments and options, declared once and shared by every command that takes them."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from ..export import EXPORT_FORMATS
from ..ilp.options import OBJECTIVES
from ..placers import STRATEGIES

__all__ = [
    "Strategy", "Dataflow", "Objective", "ExportFormat", "TraceArg", "PlanArg", "StatsOpt", "TopKOpt",
    "NumExpertsOpt", "GpusOpt", "NodesOpt", "RedundantOpt", "TopologyOpt", "MaxSlotsOpt", "DataflowOpt",
    "ObjectiveOpt", "TimeOpt", "SeedOpt", "WorkersOpt", "SpreadOpt", "HiddenOpt", "FfnOpt", "JsonOpt", "PlotOpt",
]


class Strategy(StrEnum):
    contiguous = "contiguous"
    round_robin = "round_robin"
    eplb = "eplb"
    ilp = "ilp"


class Dataflow(StrEnum):
    home = "home"
    follow = "follow"


class Objective(StrEnum):
    step = "step"
    traffic = "traffic"


class ExportFormat(StrEnum):
    sglang = "sglang"
    vllm = "vllm"
    eplb = "eplb"


assert tuple(s.value for s in Strategy) == STRATEGIES and tuple(f.value for f in ExportFormat) == EXPORT_FORMATS
assert tuple(o.value for o in Objective) == OBJECTIVES

_FLAG = ""  # metavar of an on/off flag: nothing to show after its name

TraceArg = Annotated[Path | None, typer.Argument(
    metavar="TRACE", show_default=False,
    help="Routing data: a trace or statistics file (.npz, .jsonl, .json, .npy) or a folder of router logs.")]
PlanArg = Annotated[Path | None, typer.Argument(metavar="PLAN", show_default=False, help="Plan JSON file.")]
StatsOpt = Annotated[str | None, typer.Option(
    "--stats", metavar="URL", help="Statistics from a store instead of TRACE, e.g. redis://host:6379/0?model=M")]
TopKOpt = Annotated[int | None, typer.Option(
    "--top-k", min=1, help="Experts per token (k), for count matrices, which do not record it.")]
NumExpertsOpt = Annotated[int | None, typer.Option(
    "--num-experts", min=1, help="Experts per MoE layer, for router logs, which do not record it (Mixtral: 8).")]
GpusOpt = Annotated[int | None, typer.Option("--gpus", "-g", min=1, help="GPUs in the EP group.")]
NodesOpt = Annotated[int | None, typer.Option(
    "--nodes", "-n", min=1, show_default=False, help="Nodes the GPUs are spread over (default: 1).")]
RedundantOpt = Annotated[int, typer.Option(
    "--redundant", "-r", min=0, help="Extra expert slots per layer, for replicas (experts + redundant must "
                                     "divide over the GPUs).")]
TopologyOpt = Annotated[Path | None, typer.Option(
    "--topology", metavar="YAML", help="Topology file (gpus, nodes, bandwidths...); instead of --gpus/--nodes.")]
MaxSlotsOpt = Annotated[int | None, typer.Option("--max-slots-per-gpu", min=1, help="Expert slots one GPU can hold.")]
DataflowOpt = Annotated[Dataflow, typer.Option(
    "--dataflow", help="Traffic to minimise and report: home (every layer from the token's GPU) or follow.")]
ObjectiveOpt = Annotated[Objective | None, typer.Option(
    "--objective", show_default=False,
    help="ilp: step (default): its plan, with EPLB's layers where needed to predict a step time no slower than "
         "EPLB's; traffic: its own plan, the least traffic under the balance cap.")]
TimeOpt = Annotated[float | None, typer.Option(
    "--time-limit", metavar="SECONDS", show_default=False,
    help="ilp: seconds the solve may take, about (default: 10).")]
SeedOpt = Annotated[int | None, typer.Option(
    "--seed", min=0, show_default=False, help="ilp: solver seed; plans repeat per seed (default: 0).")]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", min=0, show_default=False, help="ilp: processes solving layers; 0 (the default) = one per core.")]
SpreadOpt = Annotated[bool | None, typer.Option(
    "--spread-replicas", metavar=_FLAG, show_default=False,
    help="eplb: never two copies of an expert on one GPU (DeepSeek's EPLB may; ilp and round_robin never do).")]
HiddenOpt = Annotated[int, typer.Option("--hidden", min=1, help="Model hidden size, for bytes and time.")]
FfnOpt = Annotated[int, typer.Option("--ffn", min=1, help="Expert FFN size, for compute time and migration bytes.")]
JsonOpt = Annotated[bool, typer.Option("--json", metavar=_FLAG, help="Machine-readable JSON on stdout.")]
PlotOpt = Annotated[Path | None, typer.Option(
    "--plot", metavar="FILE", help="Also draw per-GPU load heatmaps (.png, .pdf, .svg ...).")]
