"""The balanced replica rule (routing.py, the run-time hedge) on hand-computed cases, and the cost model with it.

    .venv/bin/python -m pytest tests/placement/test_hedge_rule.py
"""

from __future__ import annotations

import numpy as np
import pytest

from expertmesh.placement.cost import CostParams, evaluate
from expertmesh.placement.plan import Placement
from expertmesh.placement.routing import (
    balanced_split,
    choose_balanced,
    choose_replicas,
    dispatch_counts,
    expected_load,
    local_token_index,
    route_counts,
)
from expertmesh.placement.stats import stats_from_trace
from expertmesh.placement.topology import Topology
from expertmesh.placement.trace import Trace


def _tokens(expert_by_source: dict[tuple[int, int], int]) -> tuple[np.ndarray, np.ndarray]:
    """(ids [T, 1], source [T]) with n tokens of expert e from source s for every (s, e): n."""
    ids, source = [], []
    for (s, e), n in expert_by_source.items():
        ids += [e] * n
        source += [s] * n
    return np.array(ids)[:, None], np.array(source)


def test_balanced_rule_reaches_the_optimum_the_fixed_rule_misses():
    # 2 GPUs: expert 0 only on GPU 0 (10 pairs), expert 1 only on GPU 1 (2), expert 2 on both (8), every
    # token from GPU 0. Best max load: (10 + 2 + 8) / 2 = 10, all of expert 2 on GPU 1.
    replicas = np.array([[1, 0], [0, 1], [1, 1]])
    ids, source = _tokens({(0, 0): 10, (0, 1): 2, (0, 2): 8})
    node = np.zeros(2, int)
    fixed = choose_replicas(ids, source, replicas, node, local_token_index(source, 2))
    assert np.bincount(fixed.ravel(), minlength=2).tolist() == [18, 2]  # locality first piles it on GPU 0
    gpus = choose_balanced(ids, source, replicas, node)
    assert np.bincount(gpus.ravel(), minlength=2).tolist() == [10, 10]
    assert gpus[ids[:, 0] == 2].ravel().tolist() == [1] * 8


def test_water_fill_splits_by_level_and_deals_the_remainder_in_gpu_order():
    # Expert 0 on GPUs 0, 1, 2 with levels 0, 3, 9 from single-host experts 1, 2: 7 pairs raise GPU 0 to
    # 5 and GPU 1 to 5 (cost 5 + 2 = 7).
    replicas = np.array([[1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    assert balanced_split(np.array([7, 0, 3, 9]), replicas).tolist() == [[5, 2, 0], [0, 0, 0], [0, 3, 0],
                                                                         [0, 0, 9]]
    # 8 pairs: level 5 costs 7, level 6 costs 9 > 8: the one left over goes to the lowest GPU at level 5.
    assert balanced_split(np.array([8, 0, 3, 9]), replicas)[0].tolist() == [6, 2, 0]
    # Heaviest replicated expert first: expert 1 (9 pairs) fills [5, 4] (its remainder to GPU 0), then expert
    # 0 (4 pairs) raises both to 6 (cost 1 + 2) and its remainder goes to GPU 0 again.
    both = np.array([[1, 1], [1, 1]])
    assert balanced_split(np.array([4, 9]), both).tolist() == [[2, 2], [5, 4]]


def test_balanced_rule_keeps_pairs_on_their_source_then_their_node():
    # 4 GPUs on 2 nodes, expert 0 on every GPU. Sources 0 and 1 bring 6 pairs each, 2 and 3 none: each GPU
    # serves 3. GPUs 0, 1 serve 3 of their own; the other 3 + 3 cross to node 1 (no capacity left on node 0).
    replicas = np.ones((1, 4), int)
    node = np.array([0, 0, 1, 1])
    ids, source = _tokens({(0, 0): 6, (1, 0): 6})
    gpus = choose_balanced(ids, source, replicas, node)
    assert np.bincount(gpus.ravel(), minlength=4).tolist() == [3, 3, 3, 3]
    assert gpus.ravel().tolist() == [0, 0, 0, 2, 2, 2, 1, 1, 1, 3, 3, 3]  # own share first, in token order
    # Even sources: nothing moves at all.
    ids, source = _tokens({(g, 0): 5 for g in range(4)})
    assert dispatch_counts(choose_balanced(ids, source, replicas, node), source, 4).trace() == 20
    # Node before the rest: GPU 0 brings 4, GPU 1 none, GPUs 2 and 3 two each; every GPU serves 2. GPU 0's
    # surplus of 2 goes to GPU 1 (its node), not across.
    ids, source = _tokens({(0, 0): 4, (2, 0): 2, (3, 0): 2})
    gpus = choose_balanced(ids, source, replicas, node)
    assert gpus.ravel().tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_balanced_rule_serves_every_pair_on_a_host_with_the_split_as_load():
    rng = np.random.default_rng(0)
    for _ in range(60):
        G = int(rng.choice([1, 2, 4, 6, 8]))
        nodes = int(rng.choice([n for n in (1, 2) if G % n == 0]))
        E, T = int(rng.integers(1, 16)), int(rng.integers(0, 80))
        k = int(rng.integers(1, min(E, 4) + 1))
        replicas = np.zeros((E, G), int)
        for e in range(E):
            replicas[e, rng.choice(G, rng.integers(1, G + 1), replace=False)] = 1
        ids = np.array([rng.choice(E, k, replace=False) for _ in range(T)], dtype=np.int64).reshape(T, k)
        source = rng.integers(0, G, T)
        gpus = choose_balanced(ids, source, replicas, np.arange(G) // (G // nodes))
        assert (replicas[ids, gpus] > 0).all()
        counts = route_counts(ids, source, E, G)
        split = balanced_split(counts.sum(0), replicas)
        for e in range(E):
            assert np.bincount(gpus[ids == e], minlength=G).tolist() == split[e].tolist()
        assert np.array_equal(expected_load(counts.sum(0), replicas, "balanced"), split.sum(0))


def test_cost_model_takes_the_rule_and_statistics_predict_the_trace_load_exactly():
    plan = Placement(np.array([[0, 1, 2, 2], [0, 2, 1, 2]]), 2)  # expert 2 on both GPUs, 3 experts
    rng = np.random.default_rng(1)
    ids = np.stack([np.stack([rng.choice(3, 2, replace=False) for _ in range(2)]) for _ in range(40)])
    ids[:25, :, 0], ids[:25, :, 1] = 2, rng.integers(0, 2, (25, 2))  # skewed: expert 2 hot
    trace = Trace(ids, np.arange(40) // 4, 3)
    topo, params = Topology(2), CostParams(hidden=8, ffn=16)
    fixed = evaluate(trace, plan, topo, params)
    balanced = evaluate(trace, plan, topo, params, replica_rule="balanced")
    assert balanced.balancedness.min() >= fixed.balancedness.min()
    stats = evaluate(stats_from_trace(trace), plan, topo, params, replica_rule="balanced")
    assert np.array_equal(stats.load, balanced.load)
    with pytest.raises(ValueError, match="replica_rule"):
        evaluate(trace, plan, topo, params, replica_rule="lplb")
