"""Writing a benchmark's results: `<name>.md` (the tables, then the hand-written reading) and `<name>.json`."""

from __future__ import annotations

import json
from pathlib import Path


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
