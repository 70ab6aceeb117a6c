"""The planning CLI end to end: files in, plans and tables out, exit codes.

    .venv/bin/python -m pytest tests/placement/test_cli.py
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from expertmesh.cli import app
from expertmesh.placement.plan import load_plan
from expertmesh.placement.trace import save_trace

runner = CliRunner()


@pytest.fixture()
def trace_file(tmp_path, small_trace):
    path = tmp_path / "trace.npz"
    save_trace(small_trace, path)
    return path


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_plan_evaluate_export_round_trip(tmp_path, trace_file):
    out = tmp_path / "plan.json"
    r = run("plan", trace_file, "--gpus", 8, "--nodes", 2, "--strategy", "ilp", "--time-limit", 2, "--workers", 1,
            "--out", out, "--json", "--plot", tmp_path / "p.png")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    plan = load_plan(out)
    assert doc["version"] == plan.version and plan.strategy == "ilp" and plan.num_gpus == 8
    assert plan.metrics["balancedness"] == pytest.approx(doc["balancedness"])
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"

    r = run("evaluate", trace_file, out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["copies"] == pytest.approx(doc["copies"])

    r = run("export", out, "--format", "sglang", "--out", tmp_path / "sg.json")
    assert r.exit_code == 0
    assert json.loads((tmp_path / "sg.json").read_text())["physical_to_logical_map"] == plan.phy2log.tolist()


def test_compare_runs_every_placer(trace_file):
    r = run("compare", trace_file, "--gpus", 4, "--time-limit", 2, "--workers", 1, "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert set(rows) == {"contiguous", "round_robin", "eplb", "ilp"}
    assert rows["ilp"]["copies"] < rows["eplb"]["copies"]
    assert rows["ilp"]["balancedness"] >= rows["eplb"]["balancedness"] - 0.01


def test_trace_info_and_convert(tmp_path, trace_file, mixtral_dir):
    r = run("trace", "info", mixtral_dir, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert (info["layers"], info["experts"], info["top_k"], info["tokens"]) == (32, 8, 2, 577)
    r = run("trace", "convert", mixtral_dir / "humaneval_2_routing.jsonl", "--out", tmp_path / "h.npz")
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "h.npz")["topk_ids"].shape == (333, 32, 2)
    r = run("trace", "convert", trace_file, "--stats-only", "--out", tmp_path / "s.npz")
    assert r.exit_code == 0 and "coact" in np.load(tmp_path / "s.npz").files


def test_exit_codes(tmp_path, trace_file):
    bad = tmp_path / "bad.npz"
    np.savez(bad, topk_ids=np.zeros((2, 1, 1), int), num_experts=2)
    r = run("plan", bad, "--gpus", 2, "--out", tmp_path / "x.json")
    assert r.exit_code == 2 and "seq_ids" in r.output  # invalid input names the field
    r = run("plan", trace_file, "--gpus", 64, "--strategy", "eplb", "--out", tmp_path / "x.json")
    assert r.exit_code == 3 and "infeasible" in r.output  # 32 slots cannot fill 64 GPUs
    r = run("plan", trace_file, "--out", tmp_path / "x.json")
    assert r.exit_code == 2 and "gpus" in r.output
    r = run("plan", "--gpus", 2, "--out", tmp_path / "x.json")
    assert r.exit_code == 2 and "exactly one" in r.output
    r = run("plan", trace_file, "--gpus", 2, "--strategy", "magic")
    assert r.exit_code == 2  # usage error from the option parser
    r = run("plan", "--stats", "ftp://x/y", "--gpus", 2)
    assert r.exit_code == 2 and "unknown URL scheme" in r.output
    assert not (tmp_path / "x.json").exists()  # no failed command left a plan behind


def test_entry_point_runs_as_a_program(tmp_path, trace_file):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "expertmesh", "plan", str(trace_file), "--gpus", "4",
                           "--strategy", "eplb", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\t")[1].strip() == load_plan(out).version  # result on stdout
    assert "eplb" in proc.stderr  # the table goes to stderr


def test_topology_yaml_is_read_and_typos_are_refused(tmp_path, trace_file):
    topo = tmp_path / "topo.yaml"
    topo.write_text("gpus: 8\nnodes: 2\ninter_node_gbps: 25\n")
    r = run("plan", trace_file, "--topology", topo, "--strategy", "eplb", "--out", tmp_path / "p.json", "--json")
    assert r.exit_code == 0, r.output
    assert load_plan(tmp_path / "p.json").num_nodes == 2
    topo.write_text("gpus: 8\nnode: 2\n")
    r = run("plan", trace_file, "--topology", topo, "--out", tmp_path / "q.json")
    assert r.exit_code == 2 and "unknown field" in r.output and "node" in r.output
    topo.write_text("gpus: 8\nnodes: 3\n")
    r = run("plan", trace_file, "--topology", topo, "--out", tmp_path / "q.json")
    assert r.exit_code == 2 and "nodes" in r.output
