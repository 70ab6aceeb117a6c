"""Layouts against per-token loops: destinations, rows, counts (= the cost model's), expert grouping.

Run: pytest tests/kernels/test_kernels_layout.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_cases import TOKEN_COUNTS, naive_layout, random_phy2log, random_routing

from expertmesh.kernels import ExpertMap, build_expert_layout, build_layout
from expertmesh.placement.plan import Placement

CASES = [  # (G, nodes, S, E): one GPU, replicas on 2 GPUs, two nodes, a DeepSeek-like 256 experts
    (1, 1, 8, 8),
    (2, 1, 5, 8),
    (4, 2, 18, 64),
    (8, 2, 36, 256),
]


@pytest.mark.parametrize("T", TOKEN_COUNTS)
@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize("G,nodes,S,E", CASES)
def test_layout_matches_per_token_loop(T, k, G, nodes, S, E):
    rng = np.random.default_rng(7 * T + k + G)
    gen = torch.Generator().manual_seed(T + k)
    phy2log = random_phy2log(rng, E, G, S)
    emap = ExpertMap.from_phy2log(phy2log, G, nodes, E)
    ids, weights = random_routing(gen, T, E, k, skew=True)
    rank = G - 1
    lay = build_layout(ids, weights, emap, rank)
    want = naive_layout(ids, phy2log, E, G, nodes, rank)
    for name in ("gpus", "slots", "dests", "dest_rows", "send_counts"):
        assert np.array_equal(getattr(lay, name).numpy(), want[name]), name
    # The runtime's per-destination counts are the cost model's dispatch_counts row, exactly.
    assert np.array_equal(lay.send_counts.numpy(), want["dispatch_counts"])
    assert lay.send_counts.sum() >= T and lay.send_counts.sum() <= T * min(k, G)

    # Send buffer: destination-major, tokens in order; metadata keeps only pairs served there.
    index = lay.send_index()
    rows = []
    for d in range(G):
        rows += [t for t in range(T) if d in want["gpus"][t]]
    assert index.tolist() == rows
    slots, w = lay.send_meta(index)
    dest_of_row = np.repeat(np.arange(G), want["send_counts"])
    for r, t in enumerate(rows):
        for j in range(k):
            here = want["gpus"][t, j] == dest_of_row[r]
            assert slots[r, j] == (want["slots"][t, j] if here else -1)
            assert w[r, j] == (weights[t, j] if here else 0.0)


def test_layout_from_placement_and_every_pair_served_by_its_expert():
    phy2log = np.array([[0, 1, 2, 3, 0, 4, 5, 6, 7, 3]])
    plan = Placement(phy2log, num_gpus=2)
    emap = ExpertMap.from_placement(plan, 0)
    assert np.array_equal(emap.replicas.numpy(), plan.replicas[0])
    ids, weights = random_routing(torch.Generator().manual_seed(0), 33, 8, 3)
    lay = build_layout(ids, weights, emap, 1)
    served = emap.slot_expert[lay.gpus, lay.slots]
    assert torch.equal(served, ids)


def test_local_slot_is_lowest_slot_of_the_expert():
    emap = ExpertMap.from_phy2log(np.array([2, 1, 2, 0, 3, 3, 1, 0]), 2)  # S = 4
    assert emap.local_slot[:, 0].tolist() == [3, 1, 0, -1]
    assert emap.local_slot[:, 1].tolist() == [3, 2, -1, 0]


def _naive_expert_layout(slots, valid, S, align):
    N, k = slots.shape
    groups = [[(i, j) for i in range(N) for j in range(k) if valid[i] and slots[i, j] == s] for s in range(S)]
    counts = [len(g) for g in groups]
    padded = [-(-c // align) * align for c in counts]
    return groups, counts, np.cumsum(padded)


@pytest.mark.parametrize("N", [0, 1, 33, 300])
@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize("align", [1, 16])
def test_expert_layout_groups_pairs_by_slot(N, k, align):
    S = 12
    gen = torch.Generator().manual_seed(N * k + align)
    # Slots 0..S-1, -1 for pairs served elsewhere; slots 5 and 9 never occur (empty experts).
    slots = torch.randint(-1, S, (N, k), generator=gen)
    slots[(slots == 5) | (slots == 9)] = -1
    valid = torch.rand(N, generator=gen) > 0.2
    el = build_expert_layout(slots, S, valid, align)
    groups, counts, ends = _naive_expert_layout(slots.numpy(), valid.numpy(), S, align)
    assert el.counts.tolist() == counts and el.counts[5] == 0 and el.counts[9] == 0
    assert el.offsets.dtype == torch.int32 and el.offsets.tolist() == ends.tolist()
    assert el.num_rows == (ends[-1] if S else 0)
    starts = np.concatenate([[0], ends[:-1]])
    want_rows = np.full(el.num_rows, -1)
    want_pos = np.full((N, k), -1)
    for s, group in enumerate(groups):
        for n, (i, j) in enumerate(group):
            want_rows[starts[s] + n] = i
            want_pos[i, j] = starts[s] + n
    assert np.array_equal(el.row_index.numpy(), want_rows)
    assert np.array_equal(el.pair_pos.numpy(), want_pos)


@pytest.mark.parametrize("N", [0, 1, 33, 300])
@pytest.mark.parametrize("k", [1, 8])
def test_expert_layout_when_every_pair_is_local_equals_the_general_one(N, k):
    S = 12
    slots = torch.randint(0, S, (N, k), generator=torch.Generator().manual_seed(N + k))
    slots[slots == 5] = 4  # an expert without tokens
    general = build_expert_layout(slots, S)
    for max_rows in (None, N * k + 3):
        lean = build_expert_layout(slots, S, max_rows=max_rows, all_valid=True)
        assert torch.equal(lean.counts, general.counts) and torch.equal(lean.offsets, general.offsets)
        assert torch.equal(lean.pair_pos, general.pair_pos)
        assert lean.row_index[: N * k].tolist() == general.row_index.tolist()
        assert lean.row_index[N * k :].tolist() == [-1] * (lean.num_rows - N * k)


def test_expert_layout_max_rows_skips_the_host_read():
    slots = torch.tensor([[0, 1], [1, -1]])
    el = build_expert_layout(slots, 2, max_rows=8)
    assert el.num_rows == 8 and el.row_index.tolist() == [0, 0, 1] + [-1] * 5


def test_bad_inputs_name_the_field():
    emap = ExpertMap.from_phy2log(np.arange(8), 2)
    ids = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="topk_weights"):
        build_layout(ids, torch.ones(4, 3), emap, 0)
    with pytest.raises(ValueError, match="topk_ids"):
        build_layout(ids + 8, torch.ones(4, 2), emap, 0)
    with pytest.raises(ValueError, match="topk_ids"):
        build_layout(ids.float(), torch.ones(4, 2), emap, 0)
    with pytest.raises(ValueError, match="rank"):
        build_layout(ids, torch.ones(4, 2), emap, 2)
    with pytest.raises(ValueError, match="phy2log"):
        ExpertMap.from_phy2log(np.array([0, 1, 3, 3]), 2, num_experts=4)  # expert 2 has no slot
    with pytest.raises(ValueError, match="num_gpus"):
        ExpertMap.from_phy2log(np.arange(9), 2)
    with pytest.raises(ValueError, match="align"):
        build_expert_layout(torch.zeros(2, 2, dtype=torch.int64), 2, align=0)
