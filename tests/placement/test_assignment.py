"""The priced assignment behind token-follow refinement, on instances small enough to enumerate.

    .venv/bin/python -m pytest tests/placement/test_assignment.py
"""

from __future__ import annotations

from itertools import permutations

import numpy as np
import pytest

from expertmesh.placement.assignment import assign_under_cap, repair_cap, transport


def _all_placements(n: int, parts: int, slots: int):
    """Every 0/1 [n, parts] placement of one copy per expert with exactly `slots` per part."""
    seen = set()
    for order in permutations(range(n)):
        part_of = tuple(np.argsort(order, kind="stable") // slots)  # expert -> part, slots per part
        if part_of in seen:
            continue
        seen.add(part_of)
        x = np.zeros((n, parts), dtype=np.int64)
        x[np.arange(n), part_of] = 1
        yield x


@pytest.mark.parametrize("seed", range(5))
def test_transport_is_the_cheapest_placement_with_exact_slot_counts(seed):
    rng = np.random.default_rng(seed)
    cost = rng.integers(0, 100, size=(6, 3))
    x = transport(cost, np.ones(6, dtype=np.int64), 2)
    assert (x.sum(1) == 1).all() and (x.sum(0) == 2).all()
    best = min(float((cost * y).sum()) for y in _all_placements(6, 3, 2))
    assert float((cost * x).sum()) == best


def test_transport_places_replicas_on_distinct_parts_and_honours_allowed_pairs():
    cost = np.array([[0, 0, 9], [5, 5, 5], [5, 5, 5], [5, 5, 0]])
    allowed = np.ones((4, 3), dtype=bool)
    allowed[1, 0] = False  # expert 1 may not go to part 0
    x = transport(cost, np.array([2, 1, 1, 2]), 2, allowed)
    assert (x <= 1).all() and (x.sum(1) == [2, 1, 1, 2]).all() and (x.sum(0) == 2).all()
    assert x[0, 0] == x[0, 1] == 1 and x[3, 2] == 1 and x[1, 0] == 0


@pytest.mark.parametrize("seed", range(6))
def test_assignment_under_a_binding_cap_finds_the_enumerated_optimum_and_a_valid_bound(seed):
    rng = np.random.default_rng(seed)
    n, parts, slots = 6, 3, 2
    value = rng.integers(0, 50, size=(n, parts)).astype(float)
    load = rng.integers(5, 30, size=n).astype(float)
    copy_load = np.broadcast_to(load[:, None], (n, parts))
    every = list(_all_placements(n, parts, slots))
    loads = [(copy_load * y).sum(0).max() for y in every]
    cap = float(np.sort(np.unique(loads))[1])  # tight: only the best-balanced placements keep it
    keep = [y for y, peak in zip(every, loads, strict=True) if peak <= cap]
    optimum = max(float((value * y).sum()) for y in keep)
    start = keep[0]
    result = assign_under_cap(value, copy_load, np.ones(n, dtype=np.int64), slots, cap, start, iterations=40)
    assert result.x is not None
    assert ((copy_load * result.x).sum(0) <= cap).all() and (result.x.sum(0) == slots).all()
    assert result.value == pytest.approx(float((value * result.x).sum()))
    assert result.bound >= optimum - 1e-6  # a Lagrangian bound never cuts off the optimum
    # On these tiny instances pricing plus repair reaches the optimum (and never returns less than the start).
    assert result.value == pytest.approx(optimum)


def test_repair_moves_load_off_the_heaviest_part_at_the_least_loss():
    # Part 0 holds the two heavy experts (load 20) over a cap of 15. Every trade of a heavy for a light
    # expert removes the overload; trading 1 for 2 loses 1, 1 for 3 loses 3, 0 for 2 or 3 loses 10 or 12.
    value = np.array([[10, 0], [1, 0], [0, 0], [0, 2]], dtype=float)
    load = np.array([10, 10, 5, 5], dtype=float)
    x = np.array([[1, 0], [1, 0], [0, 1], [0, 1]])
    fixed = repair_cap(x, value, np.broadcast_to(load[:, None], (4, 2)), 15.0)
    assert fixed.tolist() == [[1, 0], [0, 1], [1, 0], [0, 1]]
    assert repair_cap(x, value, np.broadcast_to(load[:, None], (4, 2)), 9.0) is None  # no placement keeps 9
