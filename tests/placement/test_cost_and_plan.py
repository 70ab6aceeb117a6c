"""The cost model on hand-computed cases, the replica-choice rule, the plan file and the exporters.

    .venv/bin/python -m pytest tests/placement/test_cost_and_plan.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from expertmesh.placement.cost import CostParams, evaluate
from expertmesh.placement.export import export_document
from expertmesh.placement.plan import Placement, PlanError, load_plan, save_plan
from expertmesh.placement.routing import choose_replicas, dispatch_counts, local_token_index
from expertmesh.placement.stats import stats_from_trace
from expertmesh.placement.topology import Topology
from expertmesh.placement.trace import Trace


def test_replica_rule_prefers_source_then_same_node_then_rotates():
    # 4 GPUs on 2 nodes. Expert 0: GPUs 0 and 3. Expert 1: GPU 3 only. Expert 2: GPUs 1 and 2.
    replicas = np.zeros((3, 4), int)
    replicas[0, [0, 3]] = 1
    replicas[1, 3] = 1
    replicas[2, [1, 2]] = 1
    node = np.array([0, 0, 1, 1])
    ids = np.array([[0, 2],   # source 0 holds expert 0 -> 0; expert 2: same node as source -> GPU 1
                    [0, 1],   # source 1: expert 0 on its node at GPU 0; expert 1 only on GPU 3
                    [2, 1],   # source 3: expert 2 on GPUs 1, 2: GPU 2 is on the source's node
                    [0, 2],   # source 2: expert 0 on GPUs 0, 3: GPU 3 shares the node
                    [2, 0]])  # source 0 again: expert 2 -> GPU 1 (node 0), expert 0 -> home
    source = np.array([0, 1, 3, 2, 0])
    gpus = choose_replicas(ids, source, replicas, node, local_token_index(source, 4))
    assert gpus.tolist() == [[0, 1], [0, 3], [2, 3], [3, 2], [1, 0]]
    # Rule 3: replicas on equal footing are dealt by (token index + expert) mod n, spreading load evenly.
    picks = choose_replicas(np.zeros((8, 1), int), np.zeros(8, int), np.array([[0, 1, 1, 1]]), np.zeros(4, int),
                            np.arange(8))
    assert np.bincount(picks.ravel(), minlength=4).tolist() == [0, 3, 3, 2]
    assert dispatch_counts(gpus, source, 4).sum() == 10  # one copy per (token, distinct destination GPU)


def test_cost_model_on_a_hand_computed_trace():
    # 2 GPUs, 1 node, 4 experts: GPU 0 holds {0, 1}, GPU 1 holds {2, 3}; two layers, top-2.
    plan = Placement(np.array([[0, 1, 2, 3], [0, 1, 2, 3]]), 2)
    ids = np.array([
        [[0, 1], [0, 2]],  # seq 0 -> home GPU 0: layer 0 local; layer 1 needs GPU 1 once
        [[2, 3], [2, 3]],  # seq 1 -> home GPU 1: all local
        [[0, 2], [1, 0]],  # seq 2 -> home GPU 0: layer 0 one copy to GPU 1; layer 1 local
        [[1, 3], [3, 1]],  # seq 3 -> home GPU 1: one copy to GPU 0 in both layers
    ])
    trace = Trace(ids, np.arange(4), 4)
    params = CostParams(hidden=8, ffn=16, dispatch_bytes=2, combine_bytes=2)
    topo = Topology(2, intra_node_gbps=1.0, gpu_tflops=1.0)
    m = evaluate(trace, plan, topo, params, keep_pairs=True)
    assert m.load.tolist() == [[4, 4], [4, 4]]
    assert m.balancedness.tolist() == [1.0, 1.0]
    assert m.copies.tolist() == [0.5, 0.5]  # one copy each: layer 0 tokens 2, 3; layer 1 tokens 0, 3
    assert m.dispatch_pairs[0].tolist() == [[2, 1], [1, 2]]
    assert m.internode_copies.tolist() == [0.0, 0.0]
    assert m.busiest_link_bytes[0] == 1 * 8 * 2  # one copy of 8 bf16 elements through each port
    assert m.dispatch_s[0] == pytest.approx(16 / 1e9)
    assert m.compute_s[0] == pytest.approx(4 * 6 * 8 * 16 / 1e12)
    # Follow: after layer 0 a token sits on its top-1 expert's GPU: 0, 1, 0, 0; layer-1 experts elsewhere:
    # token 0: expert 2 (GPU 1) -> 1/2; token 1: none; token 2: none; token 3: expert 3 on GPU 1 -> 1/2.
    assert m.follow_cross.tolist() == [0.25]


def test_layer_0_copies_match_the_hand_count():
    plan = Placement(np.array([[0, 1, 2, 3]]), 2)
    trace = Trace(np.array([[[0, 1]], [[2, 3]], [[0, 2]], [[1, 3]]]), np.arange(4), 4)
    m = evaluate(trace, plan, Topology(2))
    assert m.copies.tolist() == [0.5]  # tokens 2 and 3 each send one copy


def test_internode_copies_count_nodes_and_hierarchical_ports():
    # 4 GPUs on 2 nodes, one expert per GPU. A token at GPU 0 choosing experts on GPUs 2 and 3 crosses
    # the NIC once (to GPU 2, its proxy on node 1), which forwards to GPU 3 over NVLink.
    plan = Placement(np.array([[0, 1, 2, 3]]), 4, 2)
    trace = Trace(np.array([[[2, 3]]]), np.array([0]), 4)
    topo = Topology(4, 2, intra_node_gbps=10.0, inter_node_gbps=1.0)
    m = evaluate(trace, plan, topo, CostParams(hidden=1, dispatch_bytes=1))
    assert m.copies.tolist() == [2.0] and m.internode_copies.tolist() == [1.0]
    assert m.dispatch_s[0] == pytest.approx(1 / 1e9)  # one byte over the 1 GB/s NIC


def test_stats_evaluation_splits_replicated_experts_and_counts_migration():
    trace = Trace(np.array([[[0, 1]], [[0, 2]], [[0, 3]], [[1, 2]]]), np.arange(4), 4)
    stats = stats_from_trace(trace)
    plan = Placement(np.array([[0, 1, 0, 2, 3, 0]]), 2)  # expert 0 on both GPUs (twice on GPU 0)
    m = evaluate(stats, plan, Topology(2))
    # expert 0: 3 tokens over 3 replicas, 2 on GPU 0 -> GPU 0: 2 + expert 1's 2; GPU 1: 1 + 2 (expert 2) + 1
    assert m.load.tolist() == [[4.0, 4.0]]
    assert np.isnan(m.copies).all()
    previous = Placement(np.array([[0, 1, 2, 3, 0, 0]]), 2)
    params = CostParams(hidden=2, ffn=3, weight_bytes=1)
    moved = evaluate(stats, plan, Topology(2), params, previous=previous).migration_bytes
    # GPU 0: {0, 1, 2} -> {0, 1, 0}, a second copy of expert 0 arrives; GPU 1: {3, 0, 0} -> {2, 3, 0},
    # expert 2 arrives. Two experts' weights move.
    assert moved == 2 * params.expert_bytes


def test_plan_file_round_trip_and_validation(tmp_path):
    plan = Placement(np.array([[1, 0, 2, 1], [2, 1, 0, 0]]), 2, strategy="x", metrics={"a": np.float64(1.5)})
    save_plan(plan, tmp_path / "p.json")
    back = load_plan(tmp_path / "p.json")
    assert np.array_equal(back.phy2log, plan.phy2log) and back.version == plan.version
    assert back.metrics["a"] == 1.5
    assert back.logcnt.tolist() == [[1, 2, 1], [2, 1, 1]]
    assert back.log2phy[0].tolist() == [[1, -1], [0, 3], [2, -1]]

    doc = json.loads((tmp_path / "p.json").read_text())
    doc["phy2log"][0][0] = 0  # edited without updating the version
    with pytest.raises(PlanError, match="version"):
        Placement.from_json(doc)
    with pytest.raises(PlanError, match="no slot for expert 2"):
        Placement(np.array([[0, 1, 1, 0]]), 2, num_experts=3)
    with pytest.raises(PlanError, match="num_gpus"):
        Placement(np.array([[0, 1, 2]]), 2)
    with pytest.raises(PlanError, match="format"):
        Placement.from_json({"phy2log": [[0]]})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plan(tmp_path / "bad.json")


def test_exporters_write_what_engines_read():
    plan = Placement(np.array([[1, 0, 1, 2]]), 2)
    assert export_document(plan, "sglang") == {"physical_to_logical_map": [[1, 0, 1, 2]]}
    assert export_document(plan, "vllm") == [[1, 0, 1, 2]]
    eplb = export_document(plan, "eplb")
    assert eplb["logcnt"] == [[1, 2, 1]] and eplb["log2phy"] == [[[1, -1], [0, 2], [3, -1]]]
    with pytest.raises(ValueError, match="format"):
        export_document(plan, "trt")


def _plan_doc(tmp_path):
    plan = Placement(np.tile(np.arange(8), (3, 1)), 4)
    save_plan(plan, tmp_path / "p.json")
    return json.loads((tmp_path / "p.json").read_text())


def test_plan_files_name_the_row_that_is_short_and_refuse_non_integers(tmp_path):
    doc = _plan_doc(tmp_path)
    short = {**doc, "phy2log": [row[:-1] for row in doc["phy2log"]]}
    with pytest.raises(PlanError, match=r"phy2log: row 0 has 7 slots, expected 8"):
        Placement.from_json(short)  # not "num_gpus", which is right
    ragged = json.loads(json.dumps(doc))
    ragged["phy2log"][2].pop()
    with pytest.raises(PlanError, match="row 2 has 7 slots"):
        Placement.from_json(ragged)
    for bad in (1.5, "7", True, 7.0):
        edited = json.loads(json.dumps(doc))
        edited["phy2log"][1][3] = bad
        with pytest.raises(PlanError, match=r"phy2log: row 1 holds .*expected integer expert ids"):
            Placement.from_json(edited)  # never coerced to an integer
    (tmp_path / "short.json").write_text(json.dumps(short))
    with pytest.raises(PlanError, match=r"short\.json: phy2log: row 0"):
        load_plan(tmp_path / "short.json")  # the file is named too


def test_sglang_export_covers_dense_layers_and_needs_a_json_name(tmp_path):
    from expertmesh.placement.export import export_plan

    plan = Placement(np.array([[1, 0, 1, 2], [2, 2, 0, 1]]), 2)
    doc = export_document(plan, "sglang", first_moe_layer=3)
    rows = doc["physical_to_logical_map"]
    assert rows[:3] == [[0, 1, 2, 0]] * 3  # dense layers: SGLang's own trivial map, slot s -> s mod E
    assert rows[3:] == plan.phy2log.tolist()
    with pytest.raises(ValueError, match="only the sglang format counts dense layers"):
        export_document(plan, "vllm", first_moe_layer=3)
    with pytest.raises(ValueError, match=r"SGLang reads --init-expert-location as a file only when the path ends"):
        export_plan(plan, "sglang", tmp_path / "plan.txt")  # SGLang would parse the name as inline JSON
    assert not (tmp_path / "plan.txt").exists()
    export_plan(plan, "sglang", tmp_path / "plan.json")
    assert json.loads((tmp_path / "plan.json").read_text())["physical_to_logical_map"] == plan.phy2log.tolist()


def test_heatmaps_share_one_fixed_scale_mark_nodes_and_skip_figures_statistics_lack():
    import matplotlib.pyplot as plt

    from expertmesh.placement.plot import LOAD_SCALE, heatmap_figure

    trace = Trace(np.array([[[0, 1]], [[0, 2]], [[0, 3]], [[1, 2]]]), np.arange(4), 4)
    topo = Topology(4, 2)
    even, skewed = Placement(np.array([[0, 1, 2, 3]]), 4, 2), Placement(np.array([[1, 0, 3, 2]]), 4, 2)
    panels = {"a": evaluate(trace, even, topo), "b": evaluate(stats_from_trace(trace), skewed, topo)}
    fig = heatmap_figure(panels, "t", gpus_per_node=2)
    try:
        images = [ax.images[0] for ax in fig.axes if ax.images]
        assert len(images) == 2
        for image in images:  # the same scale whatever the data: load / mean, centred at 1.0
            norm = image.norm
            assert (norm.vmin, norm.vcenter, norm.vmax) == LOAD_SCALE
        panel_axes = [ax for ax in fig.axes if ax.images]
        assert all([line.get_xdata()[0] for line in ax.lines] == [1.5] for ax in panel_axes)  # node boundary
        titles = [ax.get_title() for ax in panel_axes]
        assert "copies" in titles[0] and "nan" not in titles[1]  # statistics have no copies to show
        assert "mean / max" in fig._suptitle.get_text()
    finally:
        plt.close(fig)
