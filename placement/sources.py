"""Importers: routing data in the formats people actually have, turned into a Trace or RoutingStats.

- canonical trace `.npz` (`topk_ids`, `seq_ids`, `num_experts`[, `topk_weights`])  -> Trace
- canonical statistics `.npz` (`counts`, `top_k`, `tokens`[, `coact`, `trans`])     -> RoutingStats
- per-token router logs as JSON Lines, one record per (token, layer) with `experts`, `gating_probs`, `layer`,
  `token_idx` and a sequence key (`dataset`, `problem_id`), as vLLM-patched Mixtral logging writes them -> Trace
- per-layer count matrices `{"counts": [[...]], "num_layers", "num_experts"}` (SGLang's expert
  distribution recorder, summed)                                                      -> RoutingStats
- DeepSpeed `exp_counts` logged per forward: JSON Lines `{"layer": l, "exp_counts": [...]}` or an `.npy`
  of shape [L, E] or [steps, L, E]                                                    -> RoutingStats
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .stats import RoutingStats, load_stats
from .trace import Trace, TraceError, load_trace

__all__ = [
    "load_routing",
    "load_router_jsonl",
    "load_count_matrix",
    "load_deepspeed_counts",
]


def load_routing(path: str | Path, top_k: int | None = None) -> Trace | RoutingStats:
    """Open any supported routing file (or a folder of `*_routing.jsonl` logs) by its content."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*_routing.jsonl")) or sorted(path.glob("*.jsonl"))
        if not files:
            raise TraceError(f"{path}: folder holds no *.jsonl router logs")
        return load_router_jsonl(files)
    if not path.exists():
        raise TraceError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            names = set(data.files)
        if "topk_ids" in names:
            return load_trace(path)
        if "counts" in names:
            return load_stats(path)
        raise TraceError(f"{path}: .npz holds neither a trace (topk_ids) nor statistics (counts): {sorted(names)}")
    if suffix == ".npy":
        return load_deepspeed_counts(path, top_k)
    if suffix == ".json":
        return load_count_matrix(path, top_k)
    if suffix == ".jsonl":
        first = _first_record(path)
        if "exp_counts" in first:
            return load_deepspeed_counts(path, top_k)
        return load_router_jsonl([path])
    raise TraceError(f"{path}: unknown routing format {suffix!r}; expected .npz, .jsonl, .json or .npy")


def _first_record(path: Path) -> dict:
    with path.open() as f:
        for line in f:
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TraceError(f"{path}:1: not JSON ({exc})") from None
                if not isinstance(rec, dict):
                    raise TraceError(f"{path}:1: expected a JSON object per line")
                return rec
    raise TraceError(f"{path}: empty file")


def load_router_jsonl(paths: list[Path] | list[str], num_experts: int | None = None) -> Trace:
    """Per-(token, layer) router records -> Trace. Tokens missing any layer are dropped (and counted in meta).

    A token is keyed by (`dataset`, `problem_id`, `token_idx`); (`dataset`, `problem_id`) is its sequence.
    """
    rows: dict[tuple, dict[int, tuple[list[int], list[float] | None]]] = defaultdict(dict)
    num_layers = 0
    k = None
    for p in map(Path, paths):
        with p.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{p}:{lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TraceError(f"{where}: not JSON ({exc})") from None
                for name in ("layer", "experts", "token_idx"):
                    if name not in rec:
                        raise TraceError(f"{where}: missing field {name!r}")
                experts = rec["experts"]
                if not isinstance(experts, list) or not experts or not all(isinstance(e, int) for e in experts):
                    raise TraceError(f"{where}: experts: expected a non-empty list of integers, got {experts!r}")
                if k is None:
                    k = len(experts)
                elif len(experts) != k:
                    raise TraceError(f"{where}: experts: expected {k} ids like earlier records, got {len(experts)}")
                probs = rec.get("gating_probs")
                if probs is not None and len(probs) != k:
                    raise TraceError(f"{where}: gating_probs: expected {k} values, got {len(probs)}")
                layer = rec["layer"]
                if not isinstance(layer, int) or layer < 0:
                    raise TraceError(f"{where}: layer: expected a non-negative integer, got {layer!r}")
                seq = (rec.get("dataset", p.stem), rec.get("problem_id", 0))
                rows[(*seq, rec["token_idx"])][layer] = (experts, probs)
                num_layers = max(num_layers, layer + 1)
    if not rows:
        raise TraceError(f"{[str(p) for p in paths]}: no router records")
    complete = [key for key, layers in rows.items() if len(layers) == num_layers]
    dropped = len(rows) - len(complete)
    if not complete:
        raise TraceError(f"no token has all {num_layers} layers; cannot build a trace")
    complete.sort(key=lambda key: (str(key[0]), key[1], key[2]))
    ids = np.array([[rows[key][layer][0] for layer in range(num_layers)] for key in complete], dtype=np.int32)
    have_probs = all(rows[key][layer][1] is not None for key in complete for layer in range(num_layers))
    weights = (
        np.array([[rows[key][layer][1] for layer in range(num_layers)] for key in complete], dtype=np.float32)
        if have_probs
        else None
    )
    seq_keys = {}
    seq_ids = np.array([seq_keys.setdefault(key[:2], len(seq_keys)) for key in complete], dtype=np.int32)
    E = int(ids.max()) + 1 if num_experts is None else num_experts
    meta = {"source": [str(p) for p in paths], "dropped_incomplete_tokens": dropped, "sequences": len(seq_keys)}
    return Trace(ids, seq_ids, E, weights, meta)


def _counts_to_stats(counts: np.ndarray, top_k: int | None, where: str) -> RoutingStats:
    if top_k is None:
        raise TraceError(f"{where}: top_k: count matrices do not record k; pass it (e.g. --top-k 8)")
    if counts.ndim != 2:
        raise TraceError(f"{where}: counts: expected shape [L, E], got {list(counts.shape)}")
    if not np.all(np.isfinite(counts)) or (counts < 0).any():
        raise TraceError(f"{where}: counts: expected finite, non-negative values")
    if not np.array_equal(counts, np.round(counts)):
        raise TraceError(f"{where}: counts: expected whole numbers of token-expert assignments")
    counts = np.round(counts).astype(np.int64)
    totals = counts.sum(1)
    # Every layer sees every token once with k choices; a different total means a corrupt or partial file.
    if not (totals == totals[0]).all():
        bad = int(np.argmax(totals != totals[0]))
        raise TraceError(f"{where}: counts: layer {bad} sums to {totals[bad]}, layer 0 to {totals[0]}; expected equal")
    if totals[0] % top_k:
        raise TraceError(f"{where}: top_k: layer total {totals[0]} is not a multiple of top_k={top_k}")
    return RoutingStats(counts, top_k, int(totals[0] // top_k), meta={"source": where})


def load_count_matrix(path: str | Path, top_k: int | None = None) -> RoutingStats:
    """`{"counts": [[...]], "num_layers": L, "num_experts": E[, "top_k": k]}` -> RoutingStats (no pairs)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or "counts" not in doc:
        raise TraceError(f"{path}: missing field 'counts'")
    try:
        counts = np.asarray(doc["counts"], dtype=np.float64)
    except (TypeError, ValueError):
        raise TraceError(f"{path}: counts: expected a rectangular [L, E] list of numbers") from None
    for name, axis in (("num_layers", 0), ("num_experts", 1)):
        if name in doc and counts.ndim == 2 and doc[name] != counts.shape[axis]:
            raise TraceError(f"{path}: {name}: file says {doc[name]}, counts has {counts.shape[axis]}")
    return _counts_to_stats(counts, doc.get("top_k", top_k), str(path))


def load_deepspeed_counts(path: str | Path, top_k: int | None = None) -> RoutingStats:
    """DeepSpeed MoE `exp_counts` (tokens per expert per forward), summed over forwards."""
    path = Path(path)
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False).astype(np.float64)
        if arr.ndim == 3:
            arr = arr.sum(0)
        return _counts_to_stats(arr, top_k, str(path))
    per_layer: dict[int, np.ndarray] = {}
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "layer" not in rec or "exp_counts" not in rec:
                raise TraceError(f"{path}:{lineno}: expected fields 'layer' and 'exp_counts'")
            vec = np.asarray(rec["exp_counts"], dtype=np.float64)
            layer = int(rec["layer"])
            if layer in per_layer and per_layer[layer].shape != vec.shape:
                raise TraceError(f"{path}:{lineno}: exp_counts: expected {per_layer[layer].size} experts")
            per_layer[layer] = per_layer.get(layer, 0) + vec
    if sorted(per_layer) != list(range(len(per_layer))):
        raise TraceError(f"{path}: layer: expected layers 0..L-1, got {sorted(per_layer)}")
    return _counts_to_stats(np.stack([per_layer[i] for i in range(len(per_layer))]), top_k, str(path))
