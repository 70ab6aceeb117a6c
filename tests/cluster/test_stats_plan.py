"""Acceptance: `expertmesh plan/evaluate/compare --stats redis://...` after `stats push TRACE` equal TRACE.

    .venv/bin/python -m pytest -q tests/cluster/test_stats_plan.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from expertmesh.cli import app
from expertmesh.placement.plan import load_plan
from expertmesh.placement.trace import Trace, save_trace


def make_trace(T=240, L=3, E=8, k=2, seed=7):
    rng = np.random.default_rng(seed)
    # Skewed and correlated across layers, so balance, co-activation and transitions all matter.
    popularity = rng.dirichlet(np.full(E, 0.7), size=L)
    ids = np.empty((T, L, k), np.int32)
    for layer in range(L):
        noisy = np.log(popularity[layer])[None, :] + rng.gumbel(size=(T, E))
        ids[:, layer] = np.argsort(-noisy, axis=1)[:, :k]
    return Trace(ids, np.arange(T, dtype=np.int32) // 16, E)


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def pushed(redis_url, tmp_path):
    path = tmp_path / "trace.npz"
    save_trace(make_trace(), path)
    invoke("stats", "push", path, "--redis", redis_url, "--model", "planned", "--window-tokens", 50)
    return path, f"{redis_url}?model=planned"


@pytest.mark.parametrize("strategy,dataflow", [("eplb", "home"), ("ilp", "home"), ("ilp", "follow")])
def test_plan_from_redis_equals_plan_from_trace(pushed, tmp_path, strategy, dataflow):
    """Token-follow plans read the top-1 transitions (trans_top1): Redis must hold them as the trace has them.
    ilp's own plan (objective traffic): the step objective needs per-token data, which statistics do not hold."""
    trace, url = pushed
    common = ["--gpus", 4, "--strategy", strategy, "--redundant", 4, "--seed", 0, "--workers", 1, "--json",
              "--dataflow", dataflow, *(["--objective", "traffic"] if strategy == "ilp" else [])]
    invoke("plan", trace, "--out", tmp_path / "a.json", *common)
    invoke("plan", "--stats", url, "--out", tmp_path / "b.json", *common)
    a, b = load_plan(tmp_path / "a.json"), load_plan(tmp_path / "b.json")
    np.testing.assert_array_equal(a.phy2log, b.phy2log)
    assert a.version == b.version


def test_evaluate_and_compare_accept_stats_urls(pushed, tmp_path):
    trace, url = pushed
    invoke("plan", trace, "--out", tmp_path / "p.json", "--gpus", 4, "--strategy", "eplb")
    npz = tmp_path / "stats.npz"
    invoke("stats", "export", "--redis", url, "--out", npz)  # the same statistics as a file
    from_redis = json.loads(invoke("evaluate", "--stats", url, tmp_path / "p.json", "--json").stdout)
    from_file = json.loads(invoke("evaluate", npz, tmp_path / "p.json", "--json").stdout)
    assert from_redis == {**from_file, "plan": from_redis["plan"]}

    args = ["--gpus", 4, "--strategies", "contiguous,eplb", "--json"]
    rows_redis = json.loads(invoke("compare", "--stats", url, *args).stdout)
    rows_file = json.loads(invoke("compare", npz, *args).stdout)
    for name in ("contiguous", "eplb"):
        for key in ("balancedness", "copies", "version"):
            if key in rows_file[name]:
                assert rows_redis[name][key] == rows_file[name][key], (name, key)


def test_mismatched_store_fails_the_plan_cleanly(redis_url, tmp_path):
    import redis

    redis.Redis.from_url(redis_url).set("expertmesh:{junk:default}:meta", "not ours")
    result = CliRunner().invoke(app, ["plan", "--stats", f"{redis_url}?model=junk", "--gpus", "2"])
    assert result.exit_code == 1
    assert "not an expertmesh statistics header" in result.output
