"""Held-out splits, load scenarios and robust placement: tiny instances with known answers, then the API.

    .venv/bin/python -m pytest tests/placement/test_robust.py
"""

from __future__ import annotations

import numpy as np
import pytest

from expertmesh.placement.cost import expected_balance
from expertmesh.placement.eplb import EplbOptions
from expertmesh.placement.heldout import SplitSpec, parse_split, split_trace
from expertmesh.placement.ilp import IlpOptions
from expertmesh.placement.placers import place
from expertmesh.placement.robust import RobustOptions, robust_caps, robust_layer, tighten_layer
from expertmesh.placement.robust_plan import scenarios_for
from expertmesh.placement.scenarios import sampling_units, scenario_balance, scenario_counts
from expertmesh.placement.stats import stats_from_trace
from expertmesh.placement.topology import Topology
from expertmesh.placement.trace import Trace

# Four experts on two GPUs, two slots each; pairs {0, 1} and {2, 3} are chosen together.
PAIRS = np.array([[0, 10, 0, 0], [10, 0, 0, 0], [0, 0, 0, 10], [0, 0, 10, 0]], dtype=float)
TOGETHER = np.array([[1, 0], [1, 0], [0, 1], [0, 1]])  # pairs co-located: the least traffic
MIXED = np.array([[1, 0], [0, 1], [1, 0], [0, 1]])  # one expert of each pair per GPU
# In-sample every expert carries 1; in the scenarios one pair's traffic doubles, then the other's.
SHIFTING = np.array([[1, 1, 1, 1], [2, 2, 1, 1], [1, 1, 2, 2]], dtype=float)


def test_robust_layer_splits_pairs_whose_load_moves_together():
    caps = robust_caps(SHIFTING, MIXED, 0.01)
    x, ok = robust_layer(TOGETHER, PAIRS, SHIFTING, caps)
    assert ok
    # Co-located pairs put 4 of 6 on one GPU when a pair's traffic doubles: each GPU must hold one of each.
    assert (x.sum(1) == 1).all() and (x.sum(0) == 2).all()
    assert x[0] @ x[1] == 0 and x[2] @ x[3] == 0


def test_robust_layer_keeps_pairs_together_when_load_does_not_move():
    steady = np.ones((3, 4))
    x, ok = robust_layer(MIXED, PAIRS, steady, robust_caps(steady, MIXED, 0.01))
    assert ok
    assert x[0] @ x[1] == 1 and x[2] @ x[3] == 1  # the improve phase put both pairs back together


def test_robust_layer_reports_caps_it_cannot_meet():
    caps = robust_caps(SHIFTING, MIXED, 0.0) * 0.9  # below the best arrangement's peak
    _, ok = robust_layer(TOGETHER, PAIRS, SHIFTING, caps)
    assert not ok


def test_tighten_layer_lowers_every_scenario_peak():
    rng = np.random.default_rng(0)
    scen = rng.gamma(2.0, 1.0, size=(6, 8)) * np.linspace(1, 3, 8)
    x = np.repeat(np.eye(4, dtype=np.int64), 2, axis=0)  # experts 2g, 2g+1 on GPU g
    before, after = scen @ x, scen @ tighten_layer(x, scen)
    assert (after.max(1) <= before.max(1) + 1e-9).all() and after.max(1).sum() < before.max(1).sum()


def test_split_by_sequence_and_time(small_trace):
    a, b = split_trace(small_trace, parse_split("sequence:0.25:3"))
    sa, sb = set(a.seq_ids.tolist()), set(b.seq_ids.tolist())
    assert not sa & sb and sa | sb == set(small_trace.seq_ids.tolist())
    assert len(sa) == round(0.25 * len(sa | sb)) and a.num_tokens + b.num_tokens == small_trace.num_tokens
    again, _ = split_trace(small_trace, SplitSpec("sequence", 0.25, 3))
    assert np.array_equal(again.topk_ids, a.topk_ids)  # seeded: the same split every time
    first, rest = split_trace(small_trace, parse_split("time:0.5"))
    assert np.array_equal(first.topk_ids, small_trace.topk_ids[:512]) and rest.num_tokens == 512


@pytest.mark.parametrize("text, message", [("sequence", "KIND:FRACTION"), ("seq:0.5", "kind"),
                                           ("time:1", "strictly between"), ("time:x", "number"),
                                           ("sequence:0.5:-1", "seed")])
def test_parse_split_names_the_flag(text, message):
    with pytest.raises(ValueError, match=f"--split: .*{message}"):
        parse_split(text)


def test_scenarios_of_identical_sequences_do_not_vary():
    ids = np.tile(np.array([[[0, 1]], [[2, 3]]], dtype=np.int32), (20, 1, 1))  # 20 copies of one 2-token sequence
    trace = Trace(ids, np.repeat(np.arange(20), 2).astype(np.int32), 4)
    counts = stats_from_trace(trace).counts
    assert np.allclose(scenario_counts(trace, 5, seed=1), counts[None])
    assert np.allclose(scenario_counts(trace, 5, inflate=0.0), counts[None])


def test_few_sequences_resample_blocks(small_trace):
    two = Trace(small_trace.topk_ids, (np.arange(1024) // 512).astype(np.int32), 32)
    units = sampling_units(two)
    assert units.max() + 1 == 64 and (np.bincount(units) == 16).all()  # 1024 / (4 x 16) tokens a block
    assert np.ptp(scenario_counts(two, 8).sum(-1)) > 0  # blocks vary where two whole sequences barely would


def test_robust_options_are_checked():
    for bad in ({"resamples": 0}, {"slack": 1.0}, {"inflate": -1.0}, {"scenarios": -np.ones((1, 2, 3))}):
        with pytest.raises(ValueError):
            RobustOptions(**bad)
    with pytest.raises(ValueError, match="home dataflow"):
        IlpOptions(dataflow="follow", robust=RobustOptions())


def test_robust_eplb_never_raises_a_scenario_peak(small_trace):
    topo = Topology(8, 1)
    plain = place("eplb", small_trace, topo, 0)
    robust = place("eplb", small_trace, topo, 0, EplbOptions(robust=RobustOptions(resamples=8)))
    scen = scenarios_for(RobustOptions(resamples=8), small_trace)  # the same draws robust eplb planned on
    assert (scenario_balance(robust, scen) >= scenario_balance(plain, scen) - 1e-9).all()
    assert scenario_balance(robust, scen).mean() > scenario_balance(plain, scen).mean()
    assert robust.options["robust"]["resamples"] == 8


def test_robust_ilp_keeps_eplb_balance_in_every_scenario(small_trace):
    topo, slack = Topology(8, 1), 0.01
    robust = RobustOptions(resamples=8, slack=slack)
    options = IlpOptions(objective="traffic", time_limit=1, workers=1)
    plain = place("ilp", small_trace, topo, 0, options)
    plan = place("ilp", small_trace, topo, 0, IlpOptions(objective="traffic", time_limit=1, workers=1,
                                                         robust=robust))
    scen = scenarios_for(robust, small_trace)
    from expertmesh.placement.ilp.planner import _eplb_plans

    _, reference = _eplb_plans(stats_from_trace(small_trace), topo, 32, options)
    ours, theirs = scenario_balance(plan, scen), scenario_balance(reference, scen)
    assert (ours >= theirs - slack - 1e-9).all()
    assert not (scenario_balance(plain, scen) >= theirs - slack - 1e-9).all()  # the plain plan breaks it
    assert expected_balance(small_trace, plan) > expected_balance(small_trace, plain)


def test_robust_needs_a_trace_or_scenarios(small_trace):
    stats, topo = stats_from_trace(small_trace), Topology(8, 1)
    with pytest.raises(ValueError, match="robust: needs a trace"):
        place("eplb", stats, topo, 0, EplbOptions(robust=RobustOptions()))
    given = scenario_counts(small_trace, 4)
    plan = place("eplb", stats, topo, 0, EplbOptions(robust=RobustOptions(scenarios=given)))
    assert plan.options["robust"]["scenarios"] == 4
