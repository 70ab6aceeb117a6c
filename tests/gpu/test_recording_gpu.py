"""Routing counts on the GPU (`DeviceCounts`) equal the host's numpy counting, whole and as a group's share.

    python -m pytest tests/gpu/test_recording_gpu.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu]

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from expertmesh.cluster.stats.counting import WindowAccumulator  # noqa: E402
from expertmesh.cluster.stats.window import layer_shares  # noqa: E402
from expertmesh.workers.recording import DeviceCounts  # noqa: E402

L, E, K = 6, 64, 8


def ids_for(seed: int, T: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((T, L, E)), axis=2)[:, :, :K].astype(np.int32)


@pytest.mark.parametrize("parts", [1, 3])
def test_device_counts_equal_numpy_counting(parts):
    steps = [ids_for(s, T) for s, T in ((0, 1500), (1, 1), (2, 2600))]
    device = DeviceCounts(L, E, K, torch.device("cuda"))
    for ids in steps:
        device.add(torch.from_numpy(ids).cuda())
    twice = parts > 1  # a group of two identical workers: the reduce doubles every array

    def reduce(t: torch.Tensor) -> None:
        t.mul_(2)

    share = layer_shares(L, parts)[-1]
    got = device.take(reduce if twice else None, share)
    want = WindowAccumulator(L, E, K, layers=share)
    for ids in steps * (2 if twice else 1):
        want.add(ids)
    acc = WindowAccumulator(L, E, K, layers=share)
    acc.add_dense(**got)
    ref, out = want.take(), acc.take()
    assert out.tokens == ref.tokens == sum(len(s) for s in steps) * (2 if twice else 1)
    for name in ("counts", "coact", "trans", "trans_top1"):
        np.testing.assert_array_equal(getattr(out, name), getattr(ref, name), err_msg=name)
    assert int(device.counts.sum()) == 0 and device.tokens == 0  # zeroed for the next window
