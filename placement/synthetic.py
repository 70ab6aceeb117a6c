"""Seeded synthetic routing traces with planted structure (for tests, benchmarks and the demo).

Real routers show three things a placer can exploit or must respect, and this generator plants each:

- load skew: experts have Zipf-like popularity per layer, so balance needs replicas and careful packing;
- co-activation: every token has a latent *domain* (shared by its sequence, occasionally switching), and in
  each layer a domain prefers its own cluster of experts, so experts of one cluster are chosen together;
- cross-layer structure: the domain persists across layers, so the cluster used at layer l predicts the
  cluster at layer l+1 (clusters are shuffled per layer, so identity/contiguous placement does not
  accidentally match them).

`affinity` in [0, 1] sets how strongly a token stays inside its domain's cluster (0 = unstructured).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .trace import Trace, TraceError

__all__ = ["SyntheticSpec", "synthetic_trace", "planted_clusters"]


@dataclass(frozen=True)
class SyntheticSpec:
    num_experts: int = 64
    top_k: int = 8
    num_layers: int = 16
    num_tokens: int = 4096
    num_domains: int = 8  # clusters per layer; E must be divisible by it
    affinity: float = 0.85  # probability mass a token puts on its domain's cluster
    skew: float = 0.8  # Zipf exponent of expert popularity within a layer
    domain_skew: float = 0.6  # Zipf exponent of domain popularity
    tokens_per_sequence: int = 64
    switch_prob: float = 0.02  # chance a token leaves its sequence's domain
    seed: int = 0  # draws the tokens
    # Draws the "model": clusters and popularities. Two traces with the same model_seed and different
    # seeds are two samples of one router (planning on one, replaying the other is out-of-sample).
    model_seed: int | None = None  # None: the same as seed

    def __post_init__(self) -> None:
        if self.num_experts % self.num_domains:
            raise TraceError(
                f"num_domains: expected a divisor of num_experts={self.num_experts}, got {self.num_domains}"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise TraceError(f"top_k: expected 1..{self.num_experts}, got {self.top_k}")
        if not 0.0 <= self.affinity < 1.0:
            raise TraceError(f"affinity: expected a value in [0, 1), got {self.affinity}")
        for name in ("num_layers", "num_tokens", "tokens_per_sequence"):
            if getattr(self, name) < 1:
                raise TraceError(f"{name}: expected >= 1, got {getattr(self, name)}")


def _zipf(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** exponent
    return rng.permutation(w / w.sum())


def _model(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The "router" a spec draws: cluster [L, E] and popularity [L, E] of every expert, domain weights [D]."""
    model = np.random.default_rng(spec.seed if spec.model_seed is None else spec.model_seed)
    E, L, D = spec.num_experts, spec.num_layers, spec.num_domains
    # Cluster of every expert in every layer: a fresh random partition per layer.
    cluster = np.stack([model.permutation(E) % D for _ in range(L)])
    popularity = np.stack([_zipf(E, spec.skew, model) for _ in range(L)])
    return cluster, popularity, _zipf(D, spec.domain_skew, model)


def planted_clusters(spec: SyntheticSpec) -> np.ndarray:
    """int [L, E]: the domain whose cluster each expert belongs to in each layer (the planted co-activation
    structure; benchmarks compare placers with a placement that knows it)."""
    return _model(spec)[0]


def synthetic_trace(spec: SyntheticSpec) -> Trace:
    rng = np.random.default_rng([spec.seed, 1])
    E, L, k, T, D = spec.num_experts, spec.num_layers, spec.top_k, spec.num_tokens, spec.num_domains
    cluster, popularity, domain_p = _model(spec)

    seq_ids = np.arange(T) // spec.tokens_per_sequence
    seq_domain = rng.choice(D, size=seq_ids[-1] + 1, p=domain_p)
    domain = seq_domain[seq_ids]
    switch = rng.random(T) < spec.switch_prob
    domain[switch] = rng.integers(0, D, switch.sum())

    # Log-weights: popularity plus a bonus that puts `affinity` of the mass inside the domain's cluster
    # for an average-popularity expert. Gumbel-top-k then samples k distinct experts in gate order.
    bonus = np.log(spec.affinity * (D - 1) / (1 - spec.affinity)) if spec.affinity > 0 else 0.0
    log_pop = np.log(popularity)
    topk = np.empty((T, L, k), dtype=np.int32)
    weights = np.empty((T, L, k), dtype=np.float32)
    chunk = max(1, (1 << 22) // (L * E))  # bounds the [chunk, L, E] score arrays to ~32 MiB each
    for start in range(0, T, chunk):
        stop = min(start + chunk, T)
        dom = domain[start:stop]
        in_cluster = cluster[None, :, :] == dom[:, None, None]  # [t, L, E]
        logits = log_pop[None] + bonus * in_cluster
        scores = logits + rng.gumbel(size=logits.shape)
        top = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
        order = np.argsort(-np.take_along_axis(scores, top, -1), axis=-1)
        top = np.take_along_axis(top, order, -1)
        gate = np.take_along_axis(logits, top, -1)
        gate = np.exp(gate - gate.max(-1, keepdims=True))
        topk[start:stop] = top
        weights[start:stop] = gate / gate.sum(-1, keepdims=True)
    meta = {"synthetic": {k_: getattr(spec, k_) for k_ in spec.__dataclass_fields__}}
    return Trace(topk, seq_ids.astype(np.int32), E, weights, meta)
