"""The cost model (DESIGN.md §4): one definition of a plan's quality, used by the CLI, benchmarks and controller.

For a trace (exact, per token) or routing statistics (expected values, no per-token data) and a plan, per
MoE layer l:

- load[l, g]: token-expert assignments processed on GPU g. From a trace, the replica-choice rule of
  `routing.py` decides which replica serves each pair; from statistics, an expert's count is split evenly
  over its replicas (the rule's expectation when home GPUs are uniform).
- balancedness[l] = mean(load) / max(load).
- copies[l]: mean over tokens of distinct GPUs other than the source that a token is sent to (dispatch
  deduplicates per destination GPU).
- internode_copies[l]: mean over tokens of distinct *nodes* other than the source's that it is sent to.
  Dispatch across nodes is hierarchical, as in DeepEP: one copy crosses the NIC per destination node and
  is forwarded over NVLink inside it. (Counting GPUs instead would make the figure |GPUs| x (N-1)/N for
  uniformly spread home GPUs, which no node-aware placement could change.)
- busiest_link_bytes[l]: bytes through the busiest GPU port (NVLink or NIC, either direction).
- follow_cross[l-1], l >= 1: in the token-follow dataflow the token sits on the GPU of its top-1 expert of
  the previous layer; the share of its layer-l experts served elsewhere.
- time: compute_s = max_g load x 6 x hidden x ffn / GPU FLOP/s (SwiGLU: three GEMMs); dispatch_s and
  combine_s = the slowest GPU port: every GPU has one NVLink port (intra-node) and one NIC (inter-node),
  each with its own bandwidth per direction (NVSwitch gives every pair the full port rate, so a port, not a
  pair, is what saturates; the NIC and NVLink stages are pipelined).
  step_s = sum over layers of compute + dispatch + combine.
- migration_bytes: expert weights that must be copied to a GPU that did not already hold them.

Statistics-based evaluation reports load and balance exactly in expectation, `coact_cut` (share of
same-layer co-activated pairs split across GPUs) and `trans_cut` (share of layer-to-layer pairs split
across GPUs); traffic needs per-token data, so those fields are NaN there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .plan import Placement
from .routing import DEFAULT_REPLICA_RULE, check_rule, dispatch_counts, expected_load, local_token_index, serve_gpus
from .stats import RoutingStats, stats_from_trace
from .topology import Topology
from .trace import Trace

__all__ = ["CostParams", "Metrics", "evaluate", "migration_bytes", "DATAFLOWS"]
__all__ += ["EXPECTED_RESAMPLES", "expected_balance"]  # held-out estimate (scenarios.py)

DATAFLOWS = ("home", "follow")


@dataclass(frozen=True)
class CostParams:
    hidden: int = 4096
    ffn: int = 14336
    dispatch_bytes: float = 2.0  # per element on the wire: 2 for BF16, 1 + 4/128 for FP8 with 1x128 scales
    combine_bytes: float = 2.0
    weight_bytes: float = 2.0  # per expert weight element, for migration

    def __post_init__(self) -> None:
        for name in ("hidden", "ffn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        for name in ("dispatch_bytes", "combine_bytes", "weight_bytes"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: expected a positive, finite number of bytes, got {value!r}")

    @property
    def expert_bytes(self) -> float:
        return 3 * self.hidden * self.ffn * self.weight_bytes

    @property
    def flops_per_assignment(self) -> float:
        return 6.0 * self.hidden * self.ffn


@dataclass(frozen=True)
class Metrics:
    load: np.ndarray  # [L, G]
    balancedness: np.ndarray  # [L]
    copies: np.ndarray  # [L] (NaN without per-token data)
    internode_copies: np.ndarray  # [L]
    busiest_link_bytes: np.ndarray  # [L]
    follow_cross: np.ndarray  # [L-1]
    compute_s: np.ndarray  # [L]
    dispatch_s: np.ndarray  # [L]
    combine_s: np.ndarray  # [L]
    dispatch_pairs: np.ndarray | None = None  # [L, G, G] token copies source -> destination (traces only)
    coact_cut: float = float("nan")
    trans_cut: float = float("nan")
    migration_bytes: float = 0.0

    @property
    def step_s(self) -> float:
        return float(np.sum(self.compute_s + self.dispatch_s + self.combine_s))

    def summary(self) -> dict:
        """Flat, JSON-friendly figures: means over layers unless the name says otherwise."""
        def mean(a):
            return float(np.mean(a)) if np.size(a) else float("nan")

        return {
            "balancedness": mean(self.balancedness),
            "balancedness_worst": float(np.min(self.balancedness)),
            "copies": mean(self.copies),
            "internode_copies": mean(self.internode_copies),
            "busiest_link_mb": mean(self.busiest_link_bytes) / 1e6,
            "follow_cross": mean(self.follow_cross),
            "coact_cut": self.coact_cut,
            "trans_cut": self.trans_cut,
            "compute_ms": float(np.sum(self.compute_s)) * 1e3,
            "a2a_ms": float(np.sum(self.dispatch_s + self.combine_s)) * 1e3,
            "step_ms": self.step_s * 1e3,
            "migration_gb": self.migration_bytes / 1e9,
        }


def _balancedness(load: np.ndarray) -> np.ndarray:
    peak = load.max(-1)
    return np.where(peak > 0, load.mean(-1) / np.where(peak > 0, peak, 1), 1.0)


@dataclass(frozen=True)
class _PortCopies:
    """Token copies through every GPU port for one exchange: NVLink out/in and NIC out/in, each [G]."""

    nvlink_out: np.ndarray
    nvlink_in: np.ndarray
    nic_out: np.ndarray
    nic_in: np.ndarray

    def seconds(self, topo: Topology, bytes_per_copy: float) -> float:
        """The slowest port (stages are pipelined, so the exchange takes as long as its busiest port)."""
        nvlink = max(self.nvlink_out.max(), self.nvlink_in.max()) / (topo.intra_node_gbps * 1e9)
        nic = max(self.nic_out.max(), self.nic_in.max()) / (topo.inter_node_gbps * 1e9)
        return float(max(nvlink, nic) * bytes_per_copy)

    def busiest(self) -> float:
        return float(max(a.max() for a in (self.nvlink_out, self.nvlink_in, self.nic_out, self.nic_in)))


def _port_copies(dest: np.ndarray, src: np.ndarray, topo: Topology) -> _PortCopies:
    """Hierarchical dispatch (DeepEP's internode design): a token crosses the NIC once per destination
    node, to the GPU with its source's local index there (the proxy), which forwards it over NVLink to
    the other destination GPUs of that node; same-node destinations get it over NVLink directly.

    dest [T, G] bool: GPUs that serve the token; src [T] its source GPU.
    """
    G, per_node = topo.num_gpus, topo.gpus_per_node
    node = topo.node_of_gpu
    T = len(src)
    remote = dest.copy()
    remote[np.arange(T), src] = False
    t, g = np.nonzero(remote)
    same = node[g] == node[src[t]]
    proxy = node[g] * per_node + src[t] % per_node
    # One NIC copy per (token, destination node): the proxies of a token's other-node destinations.
    key = np.unique(t[~same] * G + proxy[~same])
    nic_src, nic_dst = src[key // G], key % G
    forward = ~same & (g != proxy)
    out_gpu = np.concatenate([src[t[same]], proxy[forward]])
    in_gpu = np.concatenate([g[same], g[forward]])
    return _PortCopies(
        np.bincount(out_gpu, minlength=G), np.bincount(in_gpu, minlength=G),
        np.bincount(nic_src, minlength=G), np.bincount(nic_dst, minlength=G),
    )


def _reverse(p: _PortCopies) -> _PortCopies:
    """Combine retraces dispatch: every port carries the same copies in the other direction."""
    return _PortCopies(p.nvlink_in, p.nvlink_out, p.nic_in, p.nic_out)


def migration_bytes(plan: Placement, previous: Placement, params: CostParams) -> float:
    """Bytes of expert weights copied to GPUs that did not hold that expert before (per layer, summed)."""
    if previous.phy2log.shape[0] != plan.phy2log.shape[0] or previous.num_experts != plan.num_experts:
        raise ValueError(
            f"previous plan: expected {plan.num_layers} layers x {plan.num_experts} experts, "
            f"got {previous.num_layers} x {previous.num_experts}"
        )
    if previous.num_gpus != plan.num_gpus:
        # A different GPU count moves everything: every slot is filled anew.
        return float(plan.num_layers * plan.num_slots * params.expert_bytes)
    new = np.maximum(plan.replicas - previous.replicas, 0).sum()
    return float(new * params.expert_bytes)


def evaluate(
    source: Trace | RoutingStats,
    plan: Placement,
    topology: Topology,
    params: CostParams = CostParams(),
    dataflow: str = "home",
    previous: Placement | None = None,
    keep_pairs: bool = False,
    replica_rule: str = DEFAULT_REPLICA_RULE,
) -> Metrics:
    """Score `plan` on `source`. `dataflow` picks which traffic the time and copy figures describe;
    `replica_rule` which replica serves a pair ("fixed" | "balanced", routing.py): the runtime's rule."""
    if dataflow not in DATAFLOWS:
        raise ValueError(f"dataflow: expected one of {DATAFLOWS}, got {dataflow!r}")
    check_rule(replica_rule)
    L, E = (source.num_layers, source.num_experts)
    if (plan.num_layers, plan.num_experts) != (L, E):
        raise ValueError(
            f"plan: has {plan.num_layers} layers x {plan.num_experts} experts, "
            f"the routing data {L} x {E}"
        )
    if plan.num_gpus != topology.num_gpus or plan.num_nodes != topology.num_nodes:
        raise ValueError(
            f"plan: made for {plan.num_gpus} GPUs on {plan.num_nodes} nodes, topology has "
            f"{topology.num_gpus} on {topology.num_nodes}"
        )
    mig = migration_bytes(plan, previous, params) if previous is not None else 0.0
    if isinstance(source, Trace):
        m = _evaluate_trace(source, plan, topology, params, dataflow, keep_pairs, replica_rule)
    else:
        m = _evaluate_stats(source, plan, topology, params, replica_rule)
    return Metrics(**{**m.__dict__, "migration_bytes": mig})


def _evaluate_trace(
    trace: Trace, plan: Placement, topo: Topology, params: CostParams, dataflow: str, keep_pairs: bool,
    rule: str = DEFAULT_REPLICA_RULE,
) -> Metrics:
    L, G = trace.num_layers, plan.num_gpus
    node = topo.node_of_gpu
    replicas = plan.replicas
    home = trace.home_gpus(G)
    home_index = local_token_index(home, G)
    T = trace.num_tokens

    load = np.zeros((L, G))
    copies, internode, busiest = np.zeros(L), np.zeros(L), np.zeros(L)
    dispatch_s, combine_s = np.zeros(L), np.zeros(L)
    follow_cross = np.zeros(max(L - 1, 0))
    all_pairs = np.zeros((L, G, G), dtype=np.int64) if keep_pairs else None

    follow_src = home
    for layer in range(L):
        ids = trace.topk_ids[:, layer]
        home_gpus = serve_gpus(ids, home, replicas[layer], node, home_index, rule)
        if layer == 0:
            follow_gpus = home_gpus
        else:
            follow_gpus = serve_gpus(
                ids, follow_src, replicas[layer], node, local_token_index(follow_src, G), rule
            )
            follow_cross[layer - 1] = float(np.mean(follow_gpus != follow_src[:, None])) if T else 0.0
        src, gpus = (home, home_gpus) if dataflow == "home" else (follow_src, follow_gpus)
        follow_src = follow_gpus[:, 0]

        load[layer] = np.bincount(gpus.ravel(), minlength=G)
        dest = np.zeros((T, G), dtype=bool)
        dest[np.repeat(np.arange(T), gpus.shape[1]), gpus.ravel()] = True
        if keep_pairs:
            all_pairs[layer] = dispatch_counts(gpus, src, G)
        on_src = np.zeros_like(dest)
        on_src[np.arange(T), src] = True
        copies[layer] = (dest & ~on_src).sum() / max(T, 1)
        node_hit = np.stack([dest[:, node == n].any(1) for n in range(topo.num_nodes)], 1)
        node_hit[np.arange(T), node[src]] = False
        internode[layer] = node_hit.sum() / max(T, 1)
        ports = _port_copies(dest, src, topo)
        busiest[layer] = ports.busiest() * params.hidden * params.dispatch_bytes
        dispatch_s[layer] = ports.seconds(topo, params.hidden * params.dispatch_bytes)
        combine_s[layer] = _reverse(ports).seconds(topo, params.hidden * params.combine_bytes)

    compute_s = load.max(1) * params.flops_per_assignment / (topo.gpu_tflops * 1e12)
    cuts = _pair_cuts(stats_from_trace(trace), replicas)
    return Metrics(
        load, _balancedness(load), copies, internode, busiest, follow_cross, compute_s, dispatch_s,
        combine_s, all_pairs, *cuts,
    )


def _pair_cuts(stats: RoutingStats, replicas: np.ndarray) -> tuple[float, float]:
    """Share of co-activated (same layer) and transition (next layer) pairs whose experts share no GPU."""
    if not stats.has_pairs:
        return float("nan"), float("nan")
    present = (replicas > 0).astype(np.float64)  # [L, E, G]
    together = np.einsum("leg,lfg->lef", present, present) > 0  # [L, E, E]: share at least one GPU
    total = stats.coact.sum()
    coact_cut = float((stats.coact * ~together).sum() / total) if total else 0.0
    if stats.num_layers > 1:
        across = np.einsum("leg,lfg->lef", present[:-1], present[1:]) > 0
        total = stats.trans.sum()
        trans_cut = float((stats.trans * ~across).sum() / total) if total else 0.0
    else:
        trans_cut = 0.0
    return coact_cut, trans_cut


def _evaluate_stats(stats: RoutingStats, plan: Placement, topo: Topology, params: CostParams,
                    rule: str = DEFAULT_REPLICA_RULE) -> Metrics:
    L = stats.num_layers
    load = np.stack([expected_load(stats.counts[layer], plan.replicas[layer], rule) for layer in range(L)])
    nan = np.full(L, np.nan)
    compute_s = load.max(1) * params.flops_per_assignment / (topo.gpu_tflops * 1e12)
    coact_cut, trans_cut = _pair_cuts(stats, plan.replicas)
    return Metrics(
        load, _balancedness(load), nan, nan.copy(), nan.copy(), np.full(max(L - 1, 0), np.nan),
        compute_s, nan.copy(), nan.copy(), None, coact_cut, trans_cut,
    )


EXPECTED_RESAMPLES = 32  # scenarios behind `expected_balance` (its mean moved < 0.003 from 32 to 64 resamples)


def expected_balance(source: Trace, plan: Placement, resamples: int = EXPECTED_RESAMPLES, seed: int = 0) -> float:
    """The balancedness `plan` can expect on held-out traffic of the router behind `source`: the mean over
    layers and over sequence-level bootstrap scenarios pushed out to a held-out sample's spread
    (scenarios.py), an expert's count split evenly over its replicas. Compare with `evaluate`'s in-sample
    balancedness; the gap is what the plan bet on this sample."""
    from .scenarios import scenario_balance, scenario_counts

    return float(scenario_balance(plan, scenario_counts(source, resamples, seed)).mean())
