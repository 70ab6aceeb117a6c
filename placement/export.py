"""Exporters: a plan in the files serving engines read.

- `sglang`: `{"physical_to_logical_map": [layers][R]}`, the JSON `--init-expert-location` accepts (SGLang maps
  it with `init_by_mapping`; slot s belongs to EP rank s // (R / ep_size), as in our plans). SGLang reads
  the option as a file only when the path ends in `.json` (or `.pt`, a torch file), so the file must be
  named `*.json`. Its map has a row for every layer of the model, dense ones too, while a plan covers the
  MoE layers: with `first_moe_layer` = K, the first K rows are SGLang's own trivial map (slot s holds
  expert s mod E), which it never reads for a dense layer.
- `vllm`: the per-layer physical-to-logical list `[[...], ...]` proposed for EPLB's
  `initial_expert_map_path` (vllm-project/vllm PR #49572, open at the time of writing; mainline vLLM has no
  file-based placement yet, only `linear` / `round_robin`).
- `eplb`: DeepSeek EPLB's three outputs `phy2log`, `log2phy`, `logcnt`, for tools built around them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .plan import Placement

__all__ = ["EXPORT_FORMATS", "export_document", "export_plan", "check_export_path"]

EXPORT_FORMATS = ("sglang", "vllm", "eplb")


def export_document(plan: Placement, fmt: str, first_moe_layer: int = 0) -> dict | list:
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format: expected one of {EXPORT_FORMATS}, got {fmt!r}")
    if isinstance(first_moe_layer, bool) or not isinstance(first_moe_layer, int) or first_moe_layer < 0:
        raise ValueError(f"first_moe_layer: expected an integer >= 0, got {first_moe_layer!r}")
    if first_moe_layer and fmt != "sglang":
        raise ValueError(f"first_moe_layer: only the sglang format counts dense layers, not {fmt}")
    if fmt == "sglang":
        dense = np.tile(np.arange(plan.num_slots) % plan.num_experts, (first_moe_layer, 1))
        return {"physical_to_logical_map": np.concatenate([dense, plan.phy2log]).tolist()}
    if fmt == "vllm":
        return plan.phy2log.tolist()
    return {"phy2log": plan.phy2log.tolist(), "log2phy": plan.log2phy.tolist(), "logcnt": plan.logcnt.tolist()}


def check_export_path(fmt: str, path: str | Path, field: str = "path") -> None:
    """Refuse a file name the target engine would not read as a file (`field` names it in the message)."""
    suffix = Path(path).suffix.lower()
    if fmt == "sglang" and suffix != ".json":
        raise ValueError(
            f"{field}: SGLang reads --init-expert-location as a file only when the path ends in .json or .pt "
            f"(otherwise as inline JSON); this export writes JSON, so name it *.json, got {str(path)!r}"
        )


def export_plan(plan: Placement, fmt: str, path: str | Path, first_moe_layer: int = 0) -> None:
    check_export_path(fmt, path)
    document = export_document(plan, fmt, first_moe_layer)
    Path(path).write_text(json.dumps(document) + "\n")
