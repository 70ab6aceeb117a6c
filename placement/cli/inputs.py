"""What the planning commands read and where they write, checked before any solve: routing data (with a
note on what an importer dropped), the topology, the placers' options, output files and plot formats."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..cost import CostParams
from ..eplb import EplbOptions
from ..exits import note
from ..ilp import IlpOptions
from ..robust import RobustOptions
from ..sources import load_routing
from ..stats import RoutingStats, stats_from_trace
from ..topology import Topology, load_topology
from ..trace import Trace

__all__ = ["register_stats_loader", "load_source", "as_stats", "topology_from", "check_output", "check_plot",
           "ilp_options", "placer_options", "ILP_DEFAULTS"]

# URL schemes (e.g. redis) whose statistics loaders the control plane registers; placement stays pure.
_STATS_LOADERS: dict[str, Callable[[str], RoutingStats]] = {}

ILP_DEFAULTS = IlpOptions()


def register_stats_loader(schemes: tuple[str, ...], loader: Callable[[str], RoutingStats]) -> None:
    for scheme in schemes:
        _STATS_LOADERS[scheme] = loader


def as_stats(source: Trace | RoutingStats) -> RoutingStats:
    return stats_from_trace(source) if isinstance(source, Trace) else source


def load_source(trace: Path | None, stats: str | None, top_k: int | None = None,
                num_experts: int | None = None) -> Trace | RoutingStats:
    """TRACE or --stats URL (exactly one), refused when it holds no tokens; notes what an importer dropped."""
    if (trace is None) == (stats is None):
        raise ValueError("source: give exactly one of TRACE or --stats URL")
    if trace is not None:
        source, where = load_routing(trace, top_k, num_experts), str(trace)
    else:
        scheme = stats.split("://", 1)[0] if "://" in stats else ""
        if scheme in _STATS_LOADERS:
            if top_k is not None or num_experts is not None:
                raise ValueError("--stats: a statistics store records k and the experts; drop --top-k/--num-experts")
            source, where = _STATS_LOADERS[scheme](stats), "--stats"
        elif scheme:
            known = sorted(_STATS_LOADERS) or ["(none installed: pip install 'expertmesh[stats]')"]
            raise ValueError(f"--stats: unknown URL scheme {scheme!r}; expected one of {known}")
        else:
            source, where = load_routing(Path(stats), top_k, num_experts), stats
    if as_stats(source).is_empty:
        raise ValueError(f"{where}: holds no tokens; there is nothing to plan from or score")
    dropped = source.meta.get("dropped_incomplete_tokens", 0) if isinstance(source, Trace) else 0
    if dropped:
        note(f"{where}: dropped {dropped} of {source.meta.get('tokens_read', '?')} tokens that lack some of the "
             f"{source.num_layers} layers; using the {source.num_tokens} complete ones")
    return source


def topology_from(gpus: int | None, nodes: int | None, topology: Path | None, max_slots: int | None) -> Topology:
    if topology is not None:
        given = [flag for flag, value in (("--gpus", gpus), ("--nodes", nodes), ("--max-slots-per-gpu", max_slots))
                 if value is not None]
        if given:
            raise ValueError(f"--topology: the file sets the topology; drop {', '.join(given)} (or the file)")
        return load_topology(topology)
    if gpus is None:
        raise ValueError("gpus: pass --gpus G (or --topology FILE)")
    return Topology(gpus, 1 if nodes is None else nodes, max_slots_per_gpu=max_slots)


def check_output(path: Path, flag: str, suffixes: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, an output path that cannot be written (or lacks one of `suffixes`)."""
    if suffixes and path.suffix.lower() not in suffixes:
        raise ValueError(f"{flag}: expected a file name ending in {' or '.join(suffixes)}, got {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{flag}: {path} is a folder; expected a file name")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{flag}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag}: cannot write {path} (permission denied)")


def check_plot(path: Path | None) -> None:
    """A --plot file must be writable and in a format matplotlib writes."""
    if path is None:
        return
    from ..plot import plot_formats

    formats = plot_formats()
    if path.suffix.lower().lstrip(".") not in formats:
        raise ValueError(f"--plot: unknown image format {path.suffix or '(no suffix)'!r}; "
                         f"expected one of {', '.join('.' + f for f in formats)}")
    check_output(path, "--plot")


def ilp_options(*, dataflow: str, objective: str | None, time_limit: float | None, seed: int | None,
                workers: int | None, params: CostParams, **more) -> IlpOptions:
    """IlpOptions from the command line: options not given keep IlpOptions' defaults."""
    given = {"objective": objective, "time_limit": time_limit, "seed": seed, "workers": workers, **more}
    return IlpOptions(dataflow=dataflow, params=params, **{k: v for k, v in given.items() if v is not None})


def placer_options(strategy: str, ilp: IlpOptions, spread: bool | None, robust: RobustOptions | None = None
                   ) -> IlpOptions | EplbOptions | None:
    """Each placer's own options: ilp's, eplb's (--spread-replicas), none for the baselines; `robust` for
    ilp and eplb (--robust)."""
    if strategy == "ilp":
        return ilp if robust is None else replace(ilp, robust=robust)
    if strategy == "eplb":
        return EplbOptions(policy=ilp.eplb_policy, spread_replicas=bool(spread), robust=robust)
    return None
