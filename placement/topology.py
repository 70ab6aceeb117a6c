"""Cluster topology as the planner sees it: GPUs on nodes, expert slots, link bandwidths, GPU speed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

__all__ = ["Topology", "TopologyError", "load_topology"]


class TopologyError(ValueError):
    """A topology that cannot exist; the message names the field."""


@dataclass(frozen=True)
class Topology:
    num_gpus: int
    num_nodes: int = 1
    # Bandwidths in GB/s (1e9 B/s), one direction per GPU. 370 is what NVLink 4 achieves for
    # all-to-all-like traffic (450 line rate, ~20% protocol overhead); 50 is one 400 Gb/s NIC per GPU.
    intra_node_gbps: float = 370.0
    inter_node_gbps: float = 50.0
    # Sustained grouped-GEMM rate per GPU (bf16 torch._grouped_mm measured 669 TFLOP/s on H200).
    gpu_tflops: float = 660.0
    # Memory limit: most expert slots one GPU can hold per layer; None = unlimited.
    max_slots_per_gpu: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_gpus", "num_nodes", "max_slots_per_gpu"):  # (a YAML `gpus: 8.5` must not pass)
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | np.integer)):
                raise TopologyError(f"{_YAML_NAME.get(name, name)}: expected an integer, got {value!r}")
        if self.num_gpus < 1:
            raise TopologyError(f"gpus: expected >= 1, got {self.num_gpus}")
        if self.num_nodes < 1 or self.num_gpus % self.num_nodes:
            raise TopologyError(
                f"nodes: expected a divisor of gpus={self.num_gpus}, got {self.num_nodes}"
            )
        for name in ("intra_node_gbps", "inter_node_gbps", "gpu_tflops"):
            value = getattr(self, name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                raise TopologyError(f"{name}: expected a positive, finite number, got {value!r}")
        if self.max_slots_per_gpu is not None and self.max_slots_per_gpu < 1:
            raise TopologyError(f"max_slots_per_gpu: expected >= 1, got {self.max_slots_per_gpu}")

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.num_nodes

    @property
    def node_of_gpu(self) -> np.ndarray:
        """int64 [G]: node index of every GPU (GPUs are numbered node-major)."""
        return np.arange(self.num_gpus) // self.gpus_per_node

    def bandwidth_matrix(self) -> np.ndarray:
        """float64 [G, G] GB/s between GPU pairs; the diagonal is +inf (no transfer)."""
        node = self.node_of_gpu
        bw = np.where(node[:, None] == node[None, :], self.intra_node_gbps, self.inter_node_gbps)
        np.fill_diagonal(bw, np.inf)
        return bw.astype(np.float64)

    def slots_per_gpu(self, num_slots: int) -> int:
        """Slots per GPU for R physical slots per layer, or a TopologyError saying why R does not fit."""
        if num_slots % self.num_gpus:
            raise TopologyError(
                f"redundant: experts + redundant = {num_slots} slots per layer must be divisible by "
                f"gpus={self.num_gpus}"
            )
        per_gpu = num_slots // self.num_gpus
        if self.max_slots_per_gpu is not None and per_gpu > self.max_slots_per_gpu:
            raise TopologyError(
                f"max_slots_per_gpu: {num_slots} slots on {self.num_gpus} GPUs need {per_gpu} per GPU, "
                f"more than the {self.max_slots_per_gpu} that fit"
            )
        return per_gpu


_YAML_NAME = {"num_gpus": "gpus", "num_nodes": "nodes"}

_FIELDS = {
    "gpus": "num_gpus",
    "nodes": "num_nodes",
    "intra_node_gbps": "intra_node_gbps",
    "inter_node_gbps": "inter_node_gbps",
    "gpu_tflops": "gpu_tflops",
    "max_slots_per_gpu": "max_slots_per_gpu",
}


def load_topology(path: str | Path) -> Topology:
    """Read a topology YAML: `gpus`, `nodes`, `intra_node_gbps`, `inter_node_gbps`, `gpu_tflops`,
    `max_slots_per_gpu`. Unknown keys are refused so typos do not pass silently."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise TopologyError(f"{path}: cannot read topology YAML ({exc})") from None
    if not isinstance(doc, dict):
        raise TopologyError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(doc) - set(_FIELDS))
    if unknown:
        raise TopologyError(f"{path}: unknown field(s) {unknown}; expected some of {sorted(_FIELDS)}")
    if "gpus" not in doc:
        raise TopologyError(f"{path}: missing field 'gpus'")
    try:
        return Topology(**{_FIELDS[k]: v for k, v in doc.items()})
    except TopologyError as exc:
        raise TopologyError(f"{path}: {exc}") from None
