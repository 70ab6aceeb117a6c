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
from expertmesh.placement.trace import Trace, save_trace

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
    r = run("evaluate", trace_file, out)  # key<TAB>value lines, also for fields a plan may lack
    assert r.exit_code == 0, r.output
    assert f"copies\t{doc['copies']:.4f}" in r.stdout.splitlines()

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
    r = run("trace", "info", mixtral_dir, "--num-experts", 8, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert (info["layers"], info["experts"], info["top_k"], info["tokens"]) == (32, 8, 2, 577)
    r = run("trace", "convert", mixtral_dir / "humaneval_2_routing.jsonl", "--num-experts", 8, "--out",
            tmp_path / "h.npz")
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
    assert proc.stdout.splitlines() == [f"plan\t{out}", f"version\t{load_plan(out).version}"]  # labelled
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


def _one_error_line(result, code: int) -> str:
    """The command failed with `code` and said so in exactly one `error: ...` line on stderr, nothing else."""
    assert result.exit_code == code, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not any(box in result.stderr for box in "╭│╰") and "Error:" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("args, code, says", [
    (["--time-limit", "inf"], 2, "time_limit"),  # would never return
    (["--time-limit", "nan"], 2, "time_limit"),
    (["--redundant", "-8"], 2, "--redundant"),  # invalid input, not an infeasible request
    (["--top-k", "0"], 2, "--top-k"),
    (["--strategy", "magic"], 2, "--strategy"),
    (["--gpus", "64"], 3, "infeasible"),
    (["--strategy", "eplb", "--objective", "traffic"], 2, "--objective: applies to --strategy ilp only"),
    (["--strategy", "ilp", "--spread-replicas"], 2, "--spread-replicas: applies to --strategy eplb only"),
])
def test_bad_plan_options_get_one_error_line_and_the_documented_exit_code(tmp_path, trace_file, args, code, says):
    base = ["--gpus", 4] if "--gpus" not in args else []
    r = run("plan", trace_file, *base, *args, "--out", tmp_path / "p.json")
    assert says in _one_error_line(r, code)
    assert not (tmp_path / "p.json").exists()


def test_solver_knobs_of_another_placer_are_noted_not_refused(tmp_path, trace_file):
    r = run("plan", trace_file, "--gpus", 4, "--strategy", "eplb", "--seed", 3, "--out", tmp_path / "p.json")
    assert r.exit_code == 0 and "note: --seed applies to --strategy ilp only; eplb ignores it" in r.stderr


def test_outputs_are_checked_before_the_solve(tmp_path, trace_file, monkeypatch):
    from expertmesh.placement.cli import commands

    def no_solve(*args, **kwargs):
        raise AssertionError("solved before checking the outputs")

    monkeypatch.setattr(commands, "place", no_solve)
    r = run("plan", trace_file, "--gpus", 4, "--out", tmp_path / "missing" / "p.json")
    assert "--out: folder" in _one_error_line(r, 2)
    r = run("plan", trace_file, "--gpus", 4, "--out", tmp_path / "p.json", "--plot", tmp_path / "load.bogus")
    assert "--plot: unknown image format '.bogus'" in _one_error_line(r, 2)
    r = run("compare", trace_file, "--gpus", 4, "--plot", tmp_path / "load.bogus")
    assert "--plot" in _one_error_line(r, 2)


def test_compare_refuses_an_empty_placer_list(trace_file):
    for strategies in ("", " , ", "eplb,eplb"):
        assert "--strategies" in _one_error_line(run("compare", trace_file, "--gpus", 4, "--strategies", strategies), 2)


def test_bad_routing_and_plan_files_get_one_line_naming_the_file(tmp_path, trace_file):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(bytes(range(256)) * 8)
    line = _one_error_line(run("plan", junk, "--gpus", 2), 2)
    assert str(junk) in line and "pickle" not in line
    empty = tmp_path / "empty.npz"
    save_trace(Trace(np.zeros((0, 2, 1), int), np.zeros(0, int), 4), empty)
    assert "holds no tokens" in _one_error_line(run("plan", empty, "--gpus", 2), 2)
    out = tmp_path / "plan.json"
    assert run("plan", trace_file, "--gpus", 4, "--strategy", "eplb", "--out", out).exit_code == 0
    doc = json.loads(out.read_text())
    doc["phy2log"] = [row[:-1] for row in doc["phy2log"]]
    out.write_text(json.dumps(doc))
    assert "row 0 has 31 slots, expected 32" in _one_error_line(run("evaluate", trace_file, out), 2)


def test_router_logs_need_the_number_of_experts_and_say_what_they_drop(tmp_path, mixtral_dir):
    line = _one_error_line(run("trace", "info", mixtral_dir), 2)
    assert "--num-experts" in line
    r = run("trace", "info", mixtral_dir, "--num-experts", 8)
    assert r.exit_code == 0
    assert "note: " in r.stderr and "dropped 8 of 585 tokens" in r.stderr
    assert "dropped_incomplete_tokens\t8" in r.stdout


def test_plans_report_co_located_replicas(tmp_path, trace_file):
    r = run("compare", trace_file, "--gpus", 4, "--redundant", 4, "--strategies", "contiguous,round_robin,eplb",
            "--json")
    rows = json.loads(r.stdout)
    assert all(isinstance(row["colocated_replicas"], int) for row in rows.values())
    assert rows["round_robin"]["colocated_replicas"] == 0  # vLLM's dealing would put experts 0-3 twice on GPUs 0-3
    r = run("plan", trace_file, "--gpus", 4, "--redundant", 4, "--strategy", "eplb", "--spread-replicas",
            "--out", tmp_path / "p.json")
    assert r.exit_code == 0 and "co-located copies" in r.stderr
    assert load_plan(tmp_path / "p.json").metrics["colocated_replicas"] == 0


def test_compare_prints_key_value_lines_only_off_a_terminal_and_its_table_fits_80_columns(trace_file):
    from rich.console import Console

    from expertmesh.placement.cli.report import table

    r = run("compare", trace_file, "--gpus", 4, "--strategies", "contiguous,eplb")
    assert r.exit_code == 0
    assert [line.split("\t")[0] for line in r.stdout.splitlines()] == ["contiguous", "eplb"]  # not a terminal
    assert "balance (mean/max)" in r.stderr and "solver gap" in r.stderr  # the table and its legend
    rows = {name: {"balancedness": 0.93456, "gap": 0.123456} for name in ("contiguous", "round_robin", "eplb", "ilp")}
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(table(rows, "title"))
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "round_robin" in text and "…" not in text and text.count("0.123") == 4


def test_export_to_sglang_needs_a_json_name_and_covers_dense_layers(tmp_path, trace_file):
    plan = tmp_path / "plan.json"
    assert run("plan", trace_file, "--gpus", 4, "--strategy", "eplb", "--out", plan).exit_code == 0
    line = _one_error_line(run("export", plan, "--format", "sglang", "--out", tmp_path / "loc.txt"), 2)
    assert line.startswith("error: --out: ") and ".json or .pt" in line
    r = run("export", plan, "--format", "sglang", "--out", tmp_path / "loc.json", "--first-moe-layer", 1)
    assert r.exit_code == 0 and r.stdout == f"export\t{tmp_path / 'loc.json'}\n"
    assert "--init-expert-location" in r.stderr
    rows = json.loads((tmp_path / "loc.json").read_text())["physical_to_logical_map"]
    assert len(rows) == 1 + load_plan(plan).num_layers and rows[0] == list(range(32))


def test_help_shows_uppercase_placeholders_and_no_types_for_flags():
    import re

    r = runner.invoke(app, ["plan", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "plan [OPTIONS] [TRACE]" in r.stdout
    assert "<bool>" not in r.stdout
    assert not re.search(r"\w \.(\s|$)", r.stdout)  # no "[default: x]" eaten as markup, leaving "over ."
    assert "redis://host:6379/0?model=M" in r.stdout
    r = runner.invoke(app, ["evaluate", "--help"], env={"COLUMNS": "200"})
    assert "[TRACE] [PLAN]" in r.stdout
    r = runner.invoke(app, ["export", "--help"], env={"COLUMNS": "200"})
    assert "[PLAN]" in r.stdout and "{PLAN}" not in r.stdout


def test_compare_and_evaluate_held_out(tmp_path, trace_file):
    r = run("compare", trace_file, "--gpus", 8, "--strategies", "eplb,ilp", "--split", "sequence:0.5", "--robust",
            "--resamples", 4, "--time-limit", 1, "--workers", 1, "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert set(rows) == {"eplb", "ilp", "eplb robust", "ilp robust"}
    for row in rows.values():  # in-sample and held-out figures side by side
        assert 0 < row["heldout_balancedness"] <= 1 and 0 < row["expected_balancedness"] <= 1
        assert row["heldout_copies"] > 0 and row["heldout_step_ms"] > 0
    plan_path = tmp_path / "plan.json"
    assert run("plan", trace_file, "--gpus", 8, "--strategy", "eplb", "--robust", "--out", plan_path).exit_code == 0
    saved = load_plan(plan_path)
    assert saved.options["robust"]["resamples"] == 16 and 0 < saved.metrics["expected_balancedness"] <= 1
    r = run("evaluate", trace_file, plan_path, "--held-out", trace_file, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # held out on the same tokens: the in-sample figures again
    assert (doc["heldout_copies"], doc["heldout_balancedness"]) == pytest.approx((doc["copies"], doc["balancedness"]))
    r = run("evaluate", trace_file, plan_path, "--split", "time:0.5", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["heldout_balancedness"] != pytest.approx(doc["balancedness"])


def test_held_out_errors_name_the_flag(tmp_path, trace_file):
    wrong = tmp_path / "wrong.npz"
    save_trace(Trace(np.zeros((4, 2, 1), dtype=np.int32), np.arange(4, dtype=np.int32), 32), wrong)
    for args, flag in ((("--split", "sideways:0.5"), "--split"), (("--split", "time:0"), "--split"),
                       (("--held-out", wrong), "--held-out"), (("--held-out", wrong, "--split", "time:0.5"), "--split"),
                       (("--resamples", 4), "--resamples"), (("--robust", "--robust-slack", 2), "--robust-slack"),
                       (("--robust", "--dataflow", "follow"), "--robust")):
        r = run("compare", trace_file, "--gpus", 4, "--strategies", "eplb", *args)
        assert r.exit_code == 2, (args, r.output)
        assert r.output.strip().splitlines()[-1].startswith(f"error: {flag}"), r.output
