"""The torch replica rule equals placement's numpy rule exactly.

Run: pytest tests/kernels/test_kernels_replicas.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_cases import TOKEN_COUNTS, random_phy2log

from expertmesh.kernels import ExpertMap, choose_replicas, local_token_index
from expertmesh.placement import routing


@pytest.mark.parametrize("T", TOKEN_COUNTS)
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("G,nodes,S,E", [(1, 1, 8, 8), (2, 1, 5, 8), (4, 2, 20, 64), (8, 4, 36, 256)])
def test_choose_replicas_matches_numpy_rule(T, k, G, nodes, S, E):
    rng = np.random.default_rng(T * 1000 + k * 10 + G)
    emap = ExpertMap.from_phy2log(random_phy2log(rng, E, G, S), G, nodes, E)
    replicas = emap.replicas.numpy()
    assert (replicas.sum(1) > 1).any() or G * S == E  # the instances do carry replicas
    k = min(k, E)
    ids = np.array([rng.choice(E, k, replace=False) for _ in range(T)], dtype=np.int64).reshape(T, k)
    # Sources over all GPUs (the cost model's view) and one rank's tokens (the runtime's view).
    for source in (rng.integers(0, G, T), np.full(T, G - 1)):
        index = routing.local_token_index(source, G)
        want = routing.choose_replicas(ids, source, replicas, emap.node_of_gpu.numpy(), index)
        got = choose_replicas(torch.from_numpy(ids), torch.from_numpy(source), emap.replicas,
                              emap.node_of_gpu, torch.from_numpy(index))
        assert got.dtype == torch.int64 and got.shape == (T, k)
        assert np.array_equal(got.numpy(), want)


def test_choose_replicas_prefers_source_then_node_then_spreads():
    # GPUs {0, 1} on node 0 and {2, 3} on node 1; slots: GPU 0 {0, 1}, GPU 1 {0, 2}, GPU 2 {1, 2}, GPU 3 {3, 3}.
    emap = ExpertMap.from_phy2log(np.array([0, 1, 0, 2, 1, 2, 3, 3]), 4, num_nodes=2)
    ids = torch.tensor([[0], [1], [0], [0], [0], [0]])
    source = torch.tensor([1, 2, 2, 3, 3, 3])
    index = torch.tensor([0, 0, 1, 0, 1, 2])
    got = choose_replicas(ids, source, emap.replicas, emap.node_of_gpu, index)
    # expert 0 from GPU 1: its own replica. Expert 1 from GPU 2: its own. Expert 0 from node 1, which has
    # none: dealt over GPUs 0 and 1 by (token index + expert) mod 2.
    assert got.tolist() == [[1], [2], [1], [0], [1], [0]]


@pytest.mark.parametrize("T", TOKEN_COUNTS)
def test_local_token_index_matches_numpy(T):
    source = np.random.default_rng(T).integers(0, 5, T)
    got = local_token_index(torch.from_numpy(source), 5)
    assert np.array_equal(got.numpy(), routing.local_token_index(source, 5))
