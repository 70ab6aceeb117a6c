"""`expertmesh demo` (what `make demo` runs), end to end in a process of its own as a user runs it: its own
Ray, its own redis-server, the tiny model on 2 CPU workers, a burst over gRPC, placements from Redis.

    .venv/bin/python -m pytest -q tests/serve/test_demo.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from expertmesh.placement import STRATEGIES


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server (make test installs it)")
def test_the_demo_serves_a_burst_and_plans_from_the_routing_it_recorded() -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-m", "expertmesh", "demo", "--requests", "8", "--max-new-tokens", "4",
                           "--gpus", "2", "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout)
    burst = figures["burst"]
    assert burst["requests"] == 8 and burst["generated_tokens"] == 8 * 4  # every stream answered in full
    rows = {r["strategy"]: r for r in figures["placements"]}
    assert set(rows) == set(STRATEGIES)  # every placer planned from the statistics the workers wrote
    for r in rows.values():
        assert 0 < r["balancedness"] <= 1
    assert rows["eplb"]["balancedness"] >= rows["contiguous"]["balancedness"] - 1e-9  # replicas only help
