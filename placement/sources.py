"""Importers: routing data in the formats people actually have, turned into a Trace or RoutingStats.

- canonical trace `.npz` (`topk_ids`, `seq_ids`, `num_experts`[, `topk_weights`])  -> Trace
- canonical statistics `.npz` (`counts`, `top_k`, `tokens`[, `coact`, `trans`])     -> RoutingStats
- per-token router logs as JSON Lines, one record per (token, layer) with `experts`, `gating_probs`, `layer`,
  `token_idx` and a sequence key (`dataset`, `problem_id`), as vLLM-patched Mixtral logging writes them -> Trace.
  They do not record how many experts the model has: records may carry `num_experts`, else the caller
  passes it (`--num-experts`); it is never guessed from the largest id seen (one bad id would widen the model).
- per-layer count matrices `{"counts": [[...]], "num_layers", "num_experts"}` (SGLang's expert
  distribution recorder, summed)                                                      -> RoutingStats
- DeepSpeed `exp_counts` logged per forward: JSON Lines `{"layer": l, "exp_counts": [...]}` or an `.npy`
  of shape [L, E] or [steps, L, E]                                                    -> RoutingStats

Every error is a TraceError naming the file (and the line, for line-based formats) and the field.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .stats import RoutingStats, load_stats
from .trace import Trace, TraceError, load_trace, open_npz

__all__ = [
    "load_routing",
    "load_router_jsonl",
    "load_count_matrix",
    "load_deepspeed_counts",
]


def load_routing(path: str | Path, top_k: int | None = None, num_experts: int | None = None
                 ) -> Trace | RoutingStats:
    """Open any supported routing file (or a folder of `*_routing.jsonl` logs) by its content. `top_k` and
    `num_experts` supply what a format does not record; where it does, they must agree with it."""
    path = Path(path)
    _check_positive("top_k", top_k)
    _check_positive("num_experts", num_experts)
    if path.is_dir():
        files = sorted(path.glob("*_routing.jsonl")) or sorted(path.glob("*.jsonl"))
        if not files:
            raise TraceError(f"{path}: folder holds no *.jsonl router logs")
        return load_router_jsonl(files, num_experts)
    if not path.exists():
        raise TraceError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with open_npz(path, "trace or statistics") as data:
            names = set(data.files)
        if "topk_ids" in names:
            source = load_trace(path)
        elif "counts" in names:
            source = load_stats(path)
        else:
            raise TraceError(f"{path}: .npz holds neither a trace (topk_ids) nor statistics (counts): {sorted(names)}")
    elif suffix == ".npy":
        source = load_deepspeed_counts(path, top_k)
    elif suffix == ".json":
        source = load_count_matrix(path, top_k)
    elif suffix == ".jsonl":
        if "exp_counts" not in _first_record(path):
            return load_router_jsonl([path], num_experts)
        source = load_deepspeed_counts(path, top_k)
    else:
        raise TraceError(f"{path}: unknown routing format {suffix!r}; expected .npz, .jsonl, .json or .npy")
    _check_agrees(path, source, top_k, num_experts)
    return source


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise TraceError(f"{name}: expected a positive integer, got {value!r}")


def _check_agrees(path: Path, source: Trace | RoutingStats, top_k: int | None, num_experts: int | None) -> None:
    """A value passed for a format that records it must match the file."""
    for name, given, recorded in (("top_k", top_k, source.top_k), ("num_experts", num_experts, source.num_experts)):
        if given is not None and given != recorded:
            raise TraceError(f"{path}: {name}: the file records {recorded}, but {given} was passed")


def _first_record(path: Path) -> dict:
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                return _record(line, f"{path}:{lineno}")
    raise TraceError(f"{path}: empty file")


def _record(line: str, where: str) -> dict:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not JSON ({exc})") from None
    if not isinstance(rec, dict):
        raise TraceError(f"{where}: expected a JSON object per line")
    return rec


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _router_record(rec: dict, where: str, k: int | None) -> tuple[int, list[int], list[float] | None]:
    """(layer, experts, gate weights) of one router record, each checked; `k` from earlier records."""
    for name in ("layer", "experts", "token_idx"):
        if name not in rec:
            raise TraceError(f"{where}: missing field {name!r}")
    experts = rec["experts"]
    if not isinstance(experts, list) or not experts or not all(_is_int(e) for e in experts):
        raise TraceError(f"{where}: experts: expected a non-empty list of integers, got {experts!r}")
    if k is not None and len(experts) != k:
        raise TraceError(f"{where}: experts: expected {k} ids like earlier records, got {len(experts)}")
    if min(experts) < 0:
        raise TraceError(f"{where}: experts: ids must be >= 0, got {experts}")
    if len(set(experts)) != len(experts):
        raise TraceError(f"{where}: experts: the same expert twice in {experts}; expected distinct experts")
    probs = rec.get("gating_probs")
    if probs is not None:
        if not isinstance(probs, list) or not all(_is_real_number(p) for p in probs):
            raise TraceError(f"{where}: gating_probs: expected a list of finite numbers, got {probs!r}")
        if len(probs) != len(experts):
            raise TraceError(f"{where}: gating_probs: expected {len(experts)} values, got {len(probs)}")
    for name in ("layer", "token_idx", "problem_id"):
        if name in rec and not (_is_int(rec[name]) and rec[name] >= 0):
            raise TraceError(f"{where}: {name}: expected a non-negative integer, got {rec[name]!r}")
    return rec["layer"], experts, probs


def _is_real_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _declared_experts(rec: dict, where: str, known: int | None) -> int | None:
    """A record's own `num_experts` (which must agree with what is known), or what is known."""
    if "num_experts" not in rec:
        return known
    value = rec["num_experts"]
    if not (_is_int(value) and value >= 1):
        raise TraceError(f"{where}: num_experts: expected a positive integer, got {value!r}")
    if known is not None and value != known:
        raise TraceError(f"{where}: num_experts: this record says {value}, expected {known}")
    return value


def load_router_jsonl(paths: list[Path] | list[str], num_experts: int | None = None) -> Trace:
    """Per-(token, layer) router records -> Trace. Tokens missing any layer are dropped (counted in meta).

    A token is keyed by (`dataset`, `problem_id`, `token_idx`); (`dataset`, `problem_id`) is its sequence.
    The number of experts is `num_experts`, or the records' own `num_experts` field; an id outside it is an
    error naming the first line that holds one.
    """
    rows: dict[tuple, dict[int, tuple[list[int], list[float] | None]]] = defaultdict(dict)
    num_layers, k = 0, None
    new_max: list[tuple[int, str]] = []  # (id, line) wherever the largest id so far first grows
    for p in map(Path, paths):
        with p.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{p}:{lineno}"
                rec = _record(line, where)
                layer, experts, probs = _router_record(rec, where, k)
                k = len(experts)
                num_experts = _declared_experts(rec, where, num_experts)
                if not new_max or max(experts) > new_max[-1][0]:
                    new_max.append((max(experts), where))
                key = (rec.get("dataset", p.stem), rec.get("problem_id", 0), rec["token_idx"])
                if layer in rows[key]:
                    raise TraceError(f"{where}: a second record for token {key} in layer {layer}")
                rows[key][layer] = (experts, probs)
                num_layers = max(num_layers, layer + 1)
    names = [str(p) for p in paths]
    if not rows:
        raise TraceError(f"{names}: no router records")
    if num_experts is None:
        raise TraceError(f"{names[0]}: num_experts: router logs do not record how many experts the model "
                         "has; pass it (--num-experts, e.g. 8 for Mixtral-8x7B)")
    for top, where in new_max:
        if top >= num_experts:
            raise TraceError(f"{where}: experts: id {top} is out of range for num_experts={num_experts}")
    return _router_trace(rows, num_layers, num_experts, names)


def _router_trace(rows: dict, num_layers: int, num_experts: int, names: list[str]) -> Trace:
    """The complete tokens of `rows` as a Trace, sorted by sequence and token."""
    complete = [key for key, layers in rows.items() if len(layers) == num_layers]
    dropped = len(rows) - len(complete)
    if not complete:
        raise TraceError(f"{names}: no token has all {num_layers} layers; cannot build a trace")
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
    meta = {"source": names, "dropped_incomplete_tokens": dropped, "tokens_read": len(rows),
            "sequences": len(seq_keys)}
    return Trace(ids, seq_ids, num_experts, weights, meta)


def _counts_to_stats(counts: np.ndarray, top_k: int | None, where: str) -> RoutingStats:
    if top_k is None:
        raise TraceError(f"{where}: top_k: count matrices do not record k; pass it (e.g. --top-k 8)")
    _check_positive("top_k", top_k)
    if counts.ndim != 2 or counts.shape[0] < 1 or counts.shape[1] < 1:
        raise TraceError(f"{where}: counts: expected shape [L, E] with L, E >= 1, got {list(counts.shape)}")
    if top_k > counts.shape[1]:
        raise TraceError(f"{where}: top_k: expected 1..{counts.shape[1]} (the experts per layer), got {top_k}")
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
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not a text (UTF-8 JSON) file") from None
    if isinstance(doc, dict) and str(doc.get("format", "")).startswith("expertmesh.plan"):
        raise TraceError(f"{path}: an expertmesh plan file, not routing data (pass it where a PLAN goes)")
    if not isinstance(doc, dict):
        raise TraceError(f"{path}: expected a JSON object {{\"counts\": [[...]], ...}}, got a {type(doc).__name__}")
    if "counts" not in doc:
        raise TraceError(f"{path}: missing field 'counts'")
    try:
        counts = np.asarray(doc["counts"], dtype=np.float64)
    except (TypeError, ValueError):
        raise TraceError(f"{path}: counts: expected a rectangular [L, E] list of numbers") from None
    for name, axis in (("num_layers", 0), ("num_experts", 1)):
        if name in doc and counts.ndim == 2 and doc[name] != counts.shape[axis]:
            raise TraceError(f"{path}: {name}: file says {doc[name]}, counts has {counts.shape[axis]}")
    recorded = doc.get("top_k")
    if recorded is not None and top_k is not None and recorded != top_k:
        raise TraceError(f"{path}: top_k: the file records {recorded!r}, but {top_k} was passed")
    return _counts_to_stats(counts, recorded if recorded is not None else top_k, str(path))


def load_deepspeed_counts(path: str | Path, top_k: int | None = None) -> RoutingStats:
    """DeepSpeed MoE `exp_counts` (tokens per expert per forward), summed over forwards."""
    path = Path(path)
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception:
            raise TraceError(f"{path}: not a numpy .npy array of counts") from None
        if not isinstance(arr, np.ndarray) or arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
            raise TraceError(f"{path}: expected a numeric .npy array of counts [L, E] or [steps, L, E]")
        arr = arr.astype(np.float64)
        if arr.ndim == 3:
            arr = arr.sum(0)
        return _counts_to_stats(arr, top_k, str(path))
    per_layer: dict[int, np.ndarray] = {}
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            rec = _record(line, where)
            if "layer" not in rec or "exp_counts" not in rec:
                raise TraceError(f"{where}: expected fields 'layer' and 'exp_counts'")
            layer = rec["layer"]
            if not (_is_int(layer) and layer >= 0):
                raise TraceError(f"{where}: layer: expected a non-negative integer, got {layer!r}")
            try:
                vec = np.asarray(rec["exp_counts"], dtype=np.float64)
            except (TypeError, ValueError):
                raise TraceError(f"{where}: exp_counts: expected a list of numbers") from None
            if vec.ndim != 1:
                raise TraceError(f"{where}: exp_counts: expected a flat list of numbers per expert")
            if layer in per_layer and per_layer[layer].shape != vec.shape:
                raise TraceError(f"{where}: exp_counts: expected {per_layer[layer].size} experts")
            per_layer[layer] = per_layer.get(layer, 0) + vec
    if not per_layer:
        raise TraceError(f"{path}: no exp_counts records")
    if sorted(per_layer) != list(range(len(per_layer))):
        raise TraceError(f"{path}: layer: expected layers 0..L-1, got {sorted(per_layer)}")
    return _counts_to_stats(np.stack([per_layer[i] for i in range(len(per_layer))]), top_k, str(path))
