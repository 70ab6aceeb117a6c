"""Exporters: a plan in the files serving engines read.

- `sglang`: `{"physical_to_logical_map": [L][R]}`, the JSON `--init-expert-location` accepts (SGLang maps
  it with `init_by_mapping`; slot s belongs to EP rank s // (R / ep_size), as in our plans).
- `vllm`: the per-layer physical-to-logical list `[[...], ...]` proposed for EPLB's
  `initial_expert_map_path` (vllm-project/vllm PR #49572, open at the time of writing; mainline vLLM has no
  file-based placement yet, only `linear` / `round_robin`).
- `eplb`: DeepSeek EPLB's three outputs `phy2log`, `log2phy`, `logcnt`, for tools built around them.
"""

from __future__ import annotations

import json
from pathlib import Path

from .plan import Placement

__all__ = ["EXPORT_FORMATS", "export_document", "export_plan"]

EXPORT_FORMATS = ("sglang", "vllm", "eplb")


def export_document(plan: Placement, fmt: str) -> dict | list:
    if fmt == "sglang":
        return {"physical_to_logical_map": plan.phy2log.tolist()}
    if fmt == "vllm":
        return plan.phy2log.tolist()
    if fmt == "eplb":
        return {"phy2log": plan.phy2log.tolist(), "log2phy": plan.log2phy.tolist(), "logcnt": plan.logcnt.tolist()}
    raise ValueError(f"format: expected one of {EXPORT_FORMATS}, got {fmt!r}")


def export_plan(plan: Placement, fmt: str, path: str | Path) -> None:
    Path(path).write_text(json.dumps(export_document(plan, fmt)) + "\n")
