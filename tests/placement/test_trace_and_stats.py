"""Trace validation, statistics counting and the importers.

    .venv/bin/python -m pytest tests/placement/test_trace_and_stats.py
"""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest

from expertmesh.placement.sources import load_count_matrix, load_deepspeed_counts, load_routing
from expertmesh.placement.stats import RoutingStats, load_stats, save_stats, stats_from_trace
from expertmesh.placement.synthetic import SyntheticSpec, planted_clusters, synthetic_trace
from expertmesh.placement.trace import Trace, TraceError, load_trace, save_trace


def _ids(T=6, L=3, k=2, E=5, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)]) for _ in range(T)])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(topk_ids=np.zeros((4, 2)), seq_ids=np.zeros(4, int), num_experts=3), "topk_ids"),  # 2-D
        (dict(topk_ids=np.full((4, 2, 1), 3), seq_ids=np.zeros(4, int), num_experts=3), "topk_ids"),  # id = E
        (dict(topk_ids=np.full((4, 2, 1), -1), seq_ids=np.zeros(4, int), num_experts=3), "topk_ids"),
        (dict(topk_ids=np.zeros((4, 2, 2), int), seq_ids=np.zeros(4, int), num_experts=3), "twice"),
        (dict(topk_ids=np.zeros((4, 2, 1), int), seq_ids=np.zeros(3, int), num_experts=3), "seq_ids"),
        (dict(topk_ids=np.zeros((4, 2, 1), int), seq_ids=np.zeros(4, int), num_experts=0), "num_experts"),
        (dict(topk_ids=np.zeros((4, 2, 1), int), seq_ids=np.zeros(4, int), num_experts=3,
              topk_weights=np.zeros((4, 2))), "topk_weights"),
        (dict(topk_ids=np.zeros((4, 2, 1), float), seq_ids=np.zeros(4, int), num_experts=3), "integer"),
    ],
)
def test_bad_traces_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(TraceError, match=field):
        Trace(**kwargs)


def test_trace_file_round_trip_and_missing_fields(tmp_path):
    trace = Trace(_ids(), np.arange(6) // 2, 5, np.full((6, 3, 2), 0.5, np.float32))
    save_trace(trace, tmp_path / "t.npz")
    back = load_trace(tmp_path / "t.npz")
    assert np.array_equal(back.topk_ids, trace.topk_ids) and np.array_equal(back.seq_ids, trace.seq_ids)
    assert back.num_experts == 5 and np.array_equal(back.topk_weights, trace.topk_weights)
    np.savez(tmp_path / "bad.npz", topk_ids=trace.topk_ids, num_experts=5)
    with pytest.raises(TraceError, match="seq_ids"):
        load_trace(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(TraceError, match="not a readable"):
        load_trace(tmp_path / "junk.npz")


def test_home_gpus_deal_sequences_round_robin_in_order_of_appearance():
    trace = Trace(np.zeros((6, 1, 1), int), np.array([7, 7, 3, 9, 3, 1]), 1)
    # sequences in order of first appearance: 7, 3, 9, 1 -> GPUs 0, 1, 0, 1 on two GPUs
    assert trace.home_gpus(2).tolist() == [0, 0, 1, 0, 1, 1]


def test_stats_match_a_naive_count():
    ids = _ids(T=40, L=3, k=3, E=6, seed=1)
    stats = stats_from_trace(Trace(ids, np.zeros(40, int), 6))
    counts = np.zeros((3, 6), int)
    coact = np.zeros((3, 6, 6), int)
    trans = np.zeros((2, 6, 6), int)
    top1 = np.zeros((2, 6, 6), int)
    for t in range(40):
        for layer in range(3):
            for e in ids[t, layer]:
                counts[layer, e] += 1
            for a, b in combinations(ids[t, layer], 2):
                coact[layer, a, b] += 1
                coact[layer, b, a] += 1
            if layer < 2:
                for a in ids[t, layer]:
                    for b in ids[t, layer + 1]:
                        trans[layer, a, b] += 1
                for b in ids[t, layer + 1]:  # token-follow: the token sits on its top-1 expert's GPU
                    top1[layer, ids[t, layer, 0], b] += 1
    assert np.array_equal(stats.counts, counts)
    assert np.array_equal(stats.coact, coact)
    assert np.array_equal(stats.trans, trans)
    assert np.array_equal(stats.trans_top1, top1)
    assert np.array_equal(stats.follow_trans(), top1)
    # Without the top-1 counts (a source that lacks them), token-follow plans with their expectation.
    assert np.allclose(RoutingStats(counts, 3, 40, coact, trans).follow_trans(), trans / 3)
    assert stats.tokens == 40 and stats.top_k == 3


def test_stats_merge_is_a_sum_and_refuses_other_shapes(tmp_path):
    a = stats_from_trace(Trace(_ids(seed=1), np.zeros(6, int), 5))
    b = stats_from_trace(Trace(_ids(seed=2), np.zeros(6, int), 5))
    both = stats_from_trace(Trace(np.concatenate([_ids(seed=1), _ids(seed=2)]), np.zeros(12, int), 5))
    merged = a.merge(b)
    assert np.array_equal(merged.counts, both.counts) and np.array_equal(merged.trans, both.trans)
    assert np.array_equal(merged.trans_top1, both.trans_top1)
    assert np.array_equal(a.scaled(0.5).trans_top1, a.trans_top1 * 0.5)
    assert merged.tokens == 12
    other = stats_from_trace(Trace(_ids(E=6), np.zeros(6, int), 6))
    with pytest.raises(TraceError, match="do not match"):
        a.merge(other)
    save_stats(merged, tmp_path / "s.npz")
    back = load_stats(tmp_path / "s.npz")
    assert np.array_equal(back.coact, merged.coact) and back.tokens == 12
    assert np.array_equal(back.trans_top1, merged.trans_top1)
    # Merging with a window that lacks the top-1 counts drops them (a partial sum would be wrong).
    lacking = RoutingStats(b.counts, b.top_k, b.tokens, b.coact, b.trans)
    assert a.merge(lacking).trans_top1 is None and a.merge(lacking).trans is not None
    with pytest.raises(TraceError, match="coact"):
        RoutingStats(np.ones((2, 3)), 1, 3, coact=np.ones((2, 3, 4)))
    with pytest.raises(TraceError, match="trans_top1"):
        RoutingStats(np.ones((2, 3)), 1, 3, trans_top1=np.ones((2, 3, 3)))


def test_synthetic_trace_is_seeded_and_structured():
    spec = SyntheticSpec(num_experts=16, top_k=4, num_layers=3, num_tokens=2048, num_domains=4, seed=5)
    a, b = synthetic_trace(spec), synthetic_trace(spec)
    assert np.array_equal(a.topk_ids, b.topk_ids)
    assert not np.array_equal(a.topk_ids, synthetic_trace(SyntheticSpec(**{**spec.__dict__, "seed": 6})).topk_ids)
    # Planted co-activation: the strongest partners of an expert carry far more than a uniform share.
    coact = stats_from_trace(a).coact[0].astype(float)
    top3 = np.sort(coact, axis=1)[:, -3:].sum(1) / coact.sum(1)
    assert top3.mean() > 0.5  # uniform routing would give 3/15 = 0.2
    # The planted clusters are those partners: most of a token's pairs of experts share a cluster.
    cluster = planted_clusters(spec)
    assert cluster.shape == (3, 16) and (np.bincount(cluster[0]) == 4).all()
    same = cluster[np.arange(3)[None, :, None], a.topk_ids]  # [T, L, k] clusters of the chosen experts
    shared = (same[..., :, None] == same[..., None, :]).sum(axis=(-1, -2)) - spec.top_k
    assert shared.mean() / (spec.top_k * (spec.top_k - 1)) > 0.5  # uniform: 3/15 = 0.2 of the pairs
    with pytest.raises(TraceError, match="num_domains"):
        SyntheticSpec(num_experts=10, num_domains=4)


def test_real_mixtral_trace_imports(mixtral_dir):
    trace = load_routing(mixtral_dir, num_experts=8)
    # README: 333 + 244 tokens carry all 32 layers; 5 + 3 incomplete ones are dropped.
    assert trace.topk_ids.shape == (577, 32, 2)
    assert trace.num_experts == 8 and trace.meta["dropped_incomplete_tokens"] == 8
    assert len(np.unique(trace.seq_ids)) == 4
    assert np.allclose(trace.topk_weights.sum(-1), 1.0, atol=1e-4)  # renormalised top-2 gates
    assert (trace.topk_weights[..., 0] >= trace.topk_weights[..., 1]).all()  # highest gate first
    one = load_routing(mixtral_dir / "gsm8k_2_routing.jsonl", num_experts=8)
    assert one.num_tokens == 244


def test_real_qwen_counts_import_and_reproduce_the_source_imbalance(qwen_dir):
    from expertmesh.placement.baselines import contiguous
    from expertmesh.placement.cost import evaluate
    from expertmesh.placement.topology import Topology

    stats = load_count_matrix(qwen_dir / "counts57b.json", top_k=8)
    assert stats.counts.shape == (28, 64) and stats.tokens == 4_130_890 and not stats.has_pairs
    # The source's notes give contiguous-placement imbalance (max / mean GPU load, mean over layers):
    # 1.2177 at EP8, 1.1071 at EP4, 1.0210 at EP2. Our cost model must agree.
    for gpus, expected in ((8, 1.2177), (4, 1.1071), (2, 1.0210)):
        topo = Topology(gpus)
        m = evaluate(stats, contiguous(stats, topo, 64), topo)
        assert np.mean(1 / m.balancedness) == pytest.approx(expected, abs=5e-4)
    with pytest.raises(TraceError, match="top_k"):
        load_count_matrix(qwen_dir / "counts30b.json")


def test_count_matrix_and_deepspeed_errors_name_the_field(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"counts": [[1, 2], [3, 1]], "num_layers": 2, "num_experts": 2}))
    with pytest.raises(TraceError, match="layer 1 sums to 4"):
        load_count_matrix(path, top_k=1)
    path.write_text(json.dumps({"counts": [[1, 2], [3, 0]], "num_layers": 3}))
    with pytest.raises(TraceError, match="num_layers"):
        load_count_matrix(path, top_k=1)
    ds = tmp_path / "ds.jsonl"
    ds.write_text("\n".join(json.dumps({"layer": layer, "exp_counts": c}) for layer, c in
                            [(0, [3, 1]), (1, [2, 2]), (0, [1, 3]), (1, [0, 4])]))
    stats = load_deepspeed_counts(ds, top_k=2)
    assert stats.counts.tolist() == [[4, 4], [2, 6]] and stats.tokens == 4
    ds.write_text(json.dumps({"layer": 0}) + "\n")
    with pytest.raises(TraceError, match="exp_counts"):
        load_deepspeed_counts(ds, top_k=2)
    bad = tmp_path / "r.jsonl"
    bad.write_text(json.dumps({"layer": 0, "token_idx": 0, "experts": [0, "x"]}) + "\n")
    with pytest.raises(TraceError, match="experts"):
        load_routing(bad, num_experts=2)


def test_synthetic_model_seed_separates_the_router_from_the_sample():
    base = SyntheticSpec(num_experts=16, top_k=4, num_layers=2, num_tokens=4096, num_domains=4, seed=1, model_seed=7)
    a = stats_from_trace(synthetic_trace(base))
    b = stats_from_trace(synthetic_trace(SyntheticSpec(**{**base.__dict__, "seed": 2})))
    other = stats_from_trace(synthetic_trace(SyntheticSpec(**{**base.__dict__, "seed": 2, "model_seed": 8})))
    assert not np.array_equal(a.counts, b.counts)  # different tokens...
    # ...from the same router: its strongest pairs agree far better than another router's do.
    def top_pairs(s):
        c = s.coact[0].astype(float)
        return set(zip(*np.unravel_index(np.argsort(-c, axis=None)[:24], c.shape), strict=True))
    assert len(top_pairs(a) & top_pairs(b)) > 2 * len(top_pairs(a) & top_pairs(other))


def _router_log(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _records(tokens=6, layers=2, E=4):
    return [{"dataset": "d", "problem_id": 0, "token_idx": t, "layer": layer,
             "experts": [(t + layer) % E, (t + layer + 1) % E]} for t in range(tokens) for layer in range(layers)]


def test_router_logs_take_the_number_of_experts_from_the_caller_or_the_records_never_from_the_ids(tmp_path):
    records = _records()
    records[7]["experts"] = [99, 1]  # one bad id (line 8)
    log = _router_log(tmp_path / "r.jsonl", records)
    with pytest.raises(TraceError, match=r"r\.jsonl:8: experts: id 99 is out of range for num_experts=4"):
        load_routing(log, num_experts=4)
    with pytest.raises(TraceError, match="num_experts: router logs do not record"):
        load_routing(_router_log(tmp_path / "ok.jsonl", _records()))  # no guess from the largest id
    trace = load_routing(tmp_path / "ok.jsonl", num_experts=6)  # the model may have experts nobody chose
    assert trace.num_experts == 6 and trace.num_tokens == 6
    declared = [{**r, "num_experts": 4} for r in _records()]
    assert load_routing(_router_log(tmp_path / "d.jsonl", declared)).num_experts == 4
    with pytest.raises(TraceError, match="num_experts"):
        load_routing(tmp_path / "d.jsonl", num_experts=8)  # the caller and the file disagree
    twice = _records() + [_records()[0]]
    with pytest.raises(TraceError, match=r"t\.jsonl:13: a second record for token"):
        load_routing(_router_log(tmp_path / "t.jsonl", twice), num_experts=4)


def test_router_logs_count_the_tokens_they_drop(tmp_path):
    records = _records(tokens=5)
    del records[3]  # token 1 lacks layer 1
    trace = load_routing(_router_log(tmp_path / "r.jsonl", records), num_experts=4)
    assert trace.num_tokens == 4
    assert trace.meta["dropped_incomplete_tokens"] == 1 and trace.meta["tokens_read"] == 5


@pytest.mark.parametrize("content, message", [
    (bytes(range(256)) * 8, "not a readable trace or statistics .npz"),  # numpy would advise unpickling
    (b"", "empty file"),
])
def test_unreadable_npz_files_get_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "junk.npz"
    path.write_bytes(content)
    with pytest.raises(TraceError, match=message) as refused:
        load_routing(path)
    text = str(refused.value)
    assert str(path) in text and "\n" not in text and "pickle" not in text


def test_count_matrices_refuse_a_top_k_of_zero_without_numpy_warnings(tmp_path):
    import warnings

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"counts": [[1, 2], [2, 1]]}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy division warning would fail here
        with pytest.raises(TraceError, match="top_k: expected a positive integer"):
            load_count_matrix(path, top_k=0)
    path.write_text(json.dumps({"counts": [[1, 2], [2, 1]], "top_k": 1}))
    with pytest.raises(TraceError, match="top_k: the file records 1, but 3 was passed"):
        load_count_matrix(path, top_k=3)
