"""Held-out and robust options of the planning commands: a second trace or a split of the one given, the
figures a plan gets on it, and the robust placers' options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..cost import CostParams, evaluate, expected_balance
from ..heldout import parse_split, split_trace
from ..plan import Placement
from ..robust import RobustOptions
from ..sources import load_routing
from ..stats import RoutingStats
from ..topology import Topology
from ..trace import Trace

__all__ = ["HeldOutOpt", "SplitOpt", "RobustOpt", "RobustSlackOpt", "ResamplesOpt",
           "held_out_sources", "held_out_figures", "expected_figure", "robust_options"]

_FLAG = ""

HeldOutOpt = Annotated[Path | None, typer.Option(
    "--held-out", metavar="TRACE", show_default=False,
    help="A second trace of the same model: every plan is also scored on it (held-out figures).")]
SplitOpt = Annotated[str | None, typer.Option(
    "--split", metavar="KIND:FRACTION", show_default=False,
    help="Split TRACE instead: sequence:F plans on a seeded random F of the sequences (sequence:F:SEED picks "
         "the seed), time:F on the first F of the tokens; the rest is held out.")]
RobustOpt = Annotated[bool | None, typer.Option(
    "--robust", metavar=_FLAG, show_default=False,
    help="ilp and eplb: keep balance under traffic like the trace's, not only the trace itself (needs a trace; "
         "ilp: home dataflow). compare: adds robust rows beside the plain ones.")]
RobustSlackOpt = Annotated[float | None, typer.Option(
    "--robust-slack", show_default=False,
    help="--robust ilp: in every resampled scenario, balancedness may fall this far below EPLB's (default 0.01).")]
ResamplesOpt = Annotated[int | None, typer.Option(
    "--resamples", show_default=False,
    help="--robust: sequence-level bootstrap scenarios (default 16; more hold balance better and keep fewer of "
         "ilp's copies cut: 32 matched eplb's held-out balance on the benchmark).")]

def robust_options(robust: bool | None, slack: float | None, resamples: int | None, dataflow: str = "home"
                   ) -> RobustOptions | None:
    """RobustOptions from the flags, or None without --robust (whose companions are then refused)."""
    if robust and dataflow != "home":
        raise ValueError("--robust: plans the home dataflow only (ilp's repair keeps co-activated pairs together); "
                         "drop --robust or use --dataflow home")
    if not robust:
        for flag, value in (("--robust-slack", slack), ("--resamples", resamples)):
            if value is not None:
                raise ValueError(f"{flag}: applies with --robust only")
        return None
    given = {"slack": slack, "resamples": resamples}
    try:
        return RobustOptions(**{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:  # name the flag, not the field
        flag = "--robust-slack" if str(exc).startswith("slack") else "--resamples"
        raise ValueError(f"{flag}: {str(exc).split(': ', 1)[-1]}") from None


def held_out_sources(source: Trace | RoutingStats, held_out: Path | None, split: str | None,
                     top_k: int | None = None, num_experts: int | None = None) -> tuple[Trace | RoutingStats,
                                                                                         Trace | None]:
    """(what plans and is scored in-sample, the held-out trace or None)."""
    if held_out is not None and split is not None:
        raise ValueError("--split: give --held-out TRACE or --split, not both")
    if split is not None:
        spec = parse_split(split)
        if not isinstance(source, Trace):
            raise ValueError("--split: needs per-token data (a trace), not statistics")
        return split_trace(source, spec)
    if held_out is None:
        return source, None
    other = load_routing(held_out, top_k, num_experts)
    if not isinstance(other, Trace):
        raise ValueError(f"--held-out: {held_out} holds statistics; a held-out score needs a trace")
    shape = (source.num_layers, source.num_experts)
    if (other.num_layers, other.num_experts) != shape:
        raise ValueError(f"--held-out: {held_out} has {other.num_layers} layers x {other.num_experts} experts, "
                         f"the data {shape[0]} x {shape[1]}")
    return source, other


def held_out_figures(plan: Placement, held: Trace, topo: Topology, params: CostParams, dataflow: str) -> dict:
    m = evaluate(held, plan, topo, params, dataflow).summary()
    return {"heldout_balancedness": m["balancedness"], "heldout_copies": m["copies"],
            "heldout_step_ms": m["step_ms"]}


def expected_figure(source: Trace | RoutingStats, plan: Placement) -> dict:
    """The cost model's expected held-out balancedness (resampled by sequence; traces only)."""
    return {"expected_balancedness": expected_balance(source, plan)} if isinstance(source, Trace) else {}
