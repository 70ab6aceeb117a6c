"""The canonical routing trace: which experts each token chose in each MoE layer.

Notation used across `expertmesh.placement`:
    T tokens, L MoE layers, k experts per token (top-k), E logical experts per layer,
    G GPUs, N nodes, R physical slots per layer (R >= E; R - E are redundant), S = R / G.

File format (`.npz`, DESIGN.md §4):
    topk_ids      int32 [T, L, k]   expert chosen per token and layer, highest gate first
    seq_ids       int32 [T]         sequence each token belongs to
    num_experts   scalar            E
    topk_weights  float32 [T, L, k] optional gate weights
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Trace", "TraceError", "load_trace", "save_trace", "open_npz", "read_array"]


class TraceError(ValueError):
    """A trace or statistics file that does not match the contract; the message names the field."""


@dataclass(frozen=True)
class Trace:
    topk_ids: np.ndarray  # int32 [T, L, k]
    seq_ids: np.ndarray  # int32 [T]
    num_experts: int
    topk_weights: np.ndarray | None = None  # float32 [T, L, k]
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        ids = np.asarray(self.topk_ids)
        if ids.ndim != 3:
            raise TraceError(f"topk_ids: expected shape [T, L, k], got {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise TraceError(f"topk_ids: expected an integer array, got dtype {ids.dtype}")
        if int(self.num_experts) < 1:
            raise TraceError(f"num_experts: expected a positive integer, got {self.num_experts}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise TraceError(
                f"topk_ids: expert ids must lie in [0, {self.num_experts}), "
                f"found values in [{ids.min()}, {ids.max()}]"
            )
        if ids.shape[2] > self.num_experts:
            raise TraceError(f"topk_ids: k={ids.shape[2]} exceeds num_experts={self.num_experts}")
        if ids.shape[2] > 1 and ids.size:
            dup = np.argwhere((np.diff(np.sort(ids, axis=2), axis=2) == 0).any(axis=2))
            if dup.size:
                t, layer = dup[0]
                raise TraceError(
                    f"topk_ids: token {t} selects the same expert twice in layer {layer} "
                    f"({ids[t, layer].tolist()}); expected k distinct experts"
                )
        seq = np.asarray(self.seq_ids)
        if seq.shape != (ids.shape[0],):
            raise TraceError(f"seq_ids: expected shape [{ids.shape[0]}] (one per token), got {seq.shape}")
        if not np.issubdtype(seq.dtype, np.integer):
            raise TraceError(f"seq_ids: expected an integer array, got dtype {seq.dtype}")
        if self.topk_weights is not None:
            w = np.asarray(self.topk_weights)
            if w.dtype == bool or not (np.issubdtype(w.dtype, np.integer) or np.issubdtype(w.dtype, np.floating)):
                raise TraceError(f"topk_weights: expected numeric gate weights, got dtype {w.dtype}")
            if w.shape != ids.shape:
                raise TraceError(f"topk_weights: expected shape {ids.shape} like topk_ids, got {w.shape}")
            if not np.all(np.isfinite(w)):
                raise TraceError("topk_weights: contains NaN or infinite values")
            object.__setattr__(self, "topk_weights", w.astype(np.float32, copy=False))
        object.__setattr__(self, "topk_ids", ids.astype(np.int32, copy=False))
        object.__setattr__(self, "seq_ids", seq.astype(np.int32, copy=False))
        object.__setattr__(self, "num_experts", int(self.num_experts))

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[2]

    def home_gpus(self, num_gpus: int) -> np.ndarray:
        """int64 [T]: the home GPU of every token, sequences dealt round robin in order of first appearance.

        This is the data-parallel attention assignment the runtime uses when it knows nothing better.
        """
        _, first_index, inverse = np.unique(self.seq_ids, return_index=True, return_inverse=True)
        rank_by_appearance = np.argsort(np.argsort(first_index))
        return rank_by_appearance[inverse].astype(np.int64) % num_gpus

    def slice_tokens(self, start: int, stop: int) -> Trace:
        w = None if self.topk_weights is None else self.topk_weights[start:stop]
        return Trace(self.topk_ids[start:stop], self.seq_ids[start:stop], self.num_experts, w, dict(self.meta))


def save_trace(trace: Trace, path: str | Path) -> None:
    arrays = {
        "topk_ids": trace.topk_ids,
        "seq_ids": trace.seq_ids,
        "num_experts": np.int64(trace.num_experts),
    }
    if trace.topk_weights is not None:
        arrays["topk_weights"] = trace.topk_weights
    np.savez_compressed(path, **arrays)


def open_npz(path: str | Path, what: str) -> np.lib.npyio.NpzFile:
    """Open an `.npz` archive of plain arrays, or a TraceError that names the file and says what is wrong
    (never numpy's advice to unpickle: these files hold no objects). `what`: "trace", "statistics"..."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such {what} file" if not path.exists() else f"{path}: not a file")
    if path.stat().st_size == 0:
        raise TraceError(f"{path}: empty file; expected a {what} .npz")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception:  # random bytes, a truncated zip, a pickle: none of them is ours
        raise TraceError(f"{path}: not a readable {what} .npz (not a zip archive of numpy arrays)") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise TraceError(f"{path}: holds a single numpy array (.npy data), not a {what} .npz archive")
    return data


def read_array(data: np.lib.npyio.NpzFile, name: str, path: str | Path) -> np.ndarray:
    """One array of an open archive, or a TraceError naming the file and the field."""
    try:
        return data[name]
    except Exception:  # a corrupt member, or an object array
        raise TraceError(f"{path}: {name}: cannot be read as a plain numeric array") from None


def load_trace(path: str | Path) -> Trace:
    """Load a canonical `.npz` trace, refusing missing or malformed fields by name."""
    path = Path(path)
    with open_npz(path, "trace") as data:
        for name in ("topk_ids", "seq_ids", "num_experts"):
            if name not in data.files:
                raise TraceError(f"{path}: missing field {name!r} (have {sorted(data.files)})")
        num_experts = read_array(data, "num_experts", path)
        if num_experts.shape != () or not np.issubdtype(num_experts.dtype, np.integer):
            raise TraceError(f"{path}: num_experts: expected an integer scalar, got {num_experts!r}")
        weights = read_array(data, "topk_weights", path) if "topk_weights" in data.files else None
        return Trace(
            read_array(data, "topk_ids", path), read_array(data, "seq_ids", path), int(num_experts), weights,
            {"source": str(path)},
        )
