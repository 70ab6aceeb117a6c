"""Writing a benchmark's results: `<name>.md` (the tables, then the hand-written reading) and `<name>.json`."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def write_report(results: str | Path, name: str, lines: list[str], payload: dict | None = None) -> Path:
    """results/<name>.md from `lines` plus results/<name>.notes.md (the reading of the numbers against the
    targets, written by hand after a run; kept across re-runs), and results/<name>.json from `payload`."""
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    notes = results / f"{name}.notes.md"
    if notes.exists():
        lines = [*lines, "", notes.read_text().rstrip()]
    md = results / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    if payload is not None:
        (results / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    return md


def placement_environment() -> dict:
    """Machine, versions (OR-Tools: the placement benchmarks' solver), command and date of a run."""
    import ortools

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"machine": f"{cpu}, {os.cpu_count()} cores", "python": platform.python_version(),
            "numpy": np.__version__, "ortools": ortools.__version__,
            "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M")}
