"""Placers: EPLB's published example, invariants of every placer, and the ILP on instances with a known optimum.

    .venv/bin/python -m pytest tests/placement/test_placers.py
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from expertmesh.placement.cost import evaluate
from expertmesh.placement.eplb import rebalance_experts, replicate_experts
from expertmesh.placement.ilp import IlpOptions, ilp
from expertmesh.placement.placers import STRATEGIES, InfeasibleError, place
from expertmesh.placement.stats import RoutingStats, stats_from_trace
from expertmesh.placement.topology import Topology
from expertmesh.placement.trace import Trace

QUICK = IlpOptions(time_limit=2.0, workers=1)


def test_eplb_reproduces_deepseeks_published_example():
    weight = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                       [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 4, 2, 8)
    assert phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    # The derived maps agree with phy2log.
    for layer in range(2):
        for expert in range(12):
            slots = log2phy[layer, expert][log2phy[layer, expert] >= 0]
            assert len(slots) == logcnt[layer, expert]
            assert (phy2log[layer, slots] == expert).all()


def test_replication_minimises_the_heaviest_replica():
    rng = np.random.default_rng(0)
    for _ in range(20):
        w = rng.integers(1, 100, size=(1, 5)).astype(float)
        _, _, cnt = replicate_experts(w, 8)
        # Exhaustive check: no other count vector summing to 8 (each >= 1) has a lighter heaviest replica.
        options = [np.array(c) + 1 for c in np.ndindex(4, 4, 4, 4, 4) if sum(c) == 3]
        best = min((w[0] / c).max() for c in options)
        assert (w[0] / cnt[0]).max() == pytest.approx(best)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("gpus, nodes, redundant", [(4, 1, 0), (8, 2, 8), (8, 1, 16)])
def test_every_placer_gives_every_expert_a_slot_and_fills_every_gpu(small_trace, strategy, gpus, nodes, redundant):
    stats = stats_from_trace(small_trace)
    topo = Topology(gpus, nodes)
    plan = place(strategy, stats, topo, redundant, QUICK if strategy == "ilp" else None)
    E, R = stats.num_experts, stats.num_experts + redundant
    assert plan.phy2log.shape == (stats.num_layers, R)
    assert (plan.logcnt >= 1).all() and (plan.logcnt.sum(1) == R).all()  # replica budget used exactly
    assert (plan.replicas.sum(1) == R // gpus).all()  # every GPU holds exactly S slots in every layer
    assert plan.num_gpus == gpus and plan.num_nodes == nodes and plan.num_experts == E
    assert plan.strategy == strategy


def test_infeasible_requests_are_refused():
    stats = RoutingStats(np.ones((2, 8)), 2, 8)
    with pytest.raises(InfeasibleError, match="divisible"):
        place("eplb", stats, Topology(16), 0)  # 8 slots cannot fill 16 GPUs evenly
    with pytest.raises(InfeasibleError, match="max_slots_per_gpu"):
        place("ilp", stats, Topology(2, max_slots_per_gpu=3), 0)  # 4 experts per GPU do not fit in 3 slots
    # A negative slot count is invalid input (exit 2 in the CLI), not an infeasible request (exit 3).
    with pytest.raises(ValueError, match="redundant") as refused:
        place("contiguous", stats, Topology(2), -2)
    assert not isinstance(refused.value, InfeasibleError)


def _pair_stats(coact_pairs: dict[tuple[int, int], int], counts: list[int], L: int = 1) -> RoutingStats:
    E = len(counts)
    coact = np.zeros((L, E, E), dtype=np.int64)
    for (a, b), w in coact_pairs.items():
        coact[:, a, b] = coact[:, b, a] = w
    return RoutingStats(np.tile(counts, (L, 1)), 2, sum(counts) // 2, coact, np.zeros((L - 1, E, E), int))


def test_ilp_finds_the_known_optimum_when_co_activation_allows_it():
    # Experts {0,1}, {2,3}, {4,5} are chosen together; equal loads, so co-locating each pair is optimal
    # and balanced: no pair is split.
    stats = _pair_stats({(0, 1): 50, (2, 3): 50, (4, 5): 50, (0, 2): 3, (1, 4): 2}, [10] * 6)
    plan = ilp(stats, Topology(3), 6, QUICK)
    gpu_of = plan.phy2log[0].reshape(3, 2)
    groups = sorted(tuple(sorted(g)) for g in gpu_of.tolist())
    assert groups == [(0, 1), (2, 3), (4, 5)]
    assert plan.solver.status == "OPTIMAL"


def test_ilp_respects_the_balance_cap_even_when_affinity_pulls_against_it():
    # Experts 0 and 1 always go together but are the two heaviest: co-locating them would leave one GPU
    # at 2x the mean. The known optimum under the cap splits them and pairs each with a light expert.
    stats = _pair_stats({(0, 1): 100, (0, 2): 10, (1, 3): 10}, [40, 40, 10, 10])
    plan = ilp(stats, Topology(2), 4, QUICK)
    groups = sorted(tuple(sorted(g)) for g in plan.phy2log[0].reshape(2, 2).tolist())
    assert groups == [(0, 2), (1, 3)]


def test_ilp_is_never_worse_than_its_eplb_hint_and_keeps_balance(small_trace):
    stats = stats_from_trace(small_trace)
    topo = Topology(8, 2)
    for redundant in (0, 8):
        eplb_plan = place("eplb", stats, topo, redundant)
        # With replicas the default plans no allowance (see IlpOptions); with one, the structure is found.
        plan = place("ilp", stats, topo, redundant, replace(QUICK, replica_balance_slack=0.01))
        assert plan.solver.layer_cost <= plan.solver.eplb_layer_cost + 1e-9
        ours, theirs = evaluate(stats, plan, topo), evaluate(stats, eplb_plan, topo)
        assert (ours.balancedness >= theirs.balancedness - 0.01 - 1e-9).all()
        assert ours.coact_cut < theirs.coact_cut  # the planted structure is there to be found


def test_ilp_is_deterministic_for_a_seed(small_trace):
    stats = stats_from_trace(small_trace)
    a = ilp(stats, Topology(8), 32, IlpOptions(time_limit=2.0, workers=2, seed=1))
    b = ilp(stats, Topology(8), 32, IlpOptions(time_limit=2.0, workers=2, seed=1))
    assert np.array_equal(a.phy2log, b.phy2log)


def test_ilp_without_pairs_balances_at_least_as_well_as_eplb():
    rng = np.random.default_rng(4)
    stats = RoutingStats(rng.zipf(1.6, size=(3, 24)).clip(max=500) * 8, 8, 1000)  # count matrix only
    topo = Topology(6)
    ours = evaluate(stats, ilp(stats, topo, 24, QUICK), topo)
    theirs = evaluate(stats, place("eplb", stats, topo, 0), topo)
    assert (ours.balancedness >= theirs.balancedness - 1e-9).all()


def test_decomposed_and_flat_stage_one_both_give_valid_plans(small_trace):
    stats = stats_from_trace(small_trace)
    topo = Topology(8, 2)
    for decompose in (True, False):
        plan = ilp(stats, topo, 32, IlpOptions(time_limit=2.0, workers=1, decompose=decompose))
        assert plan.options["decompose"] is decompose
        assert (plan.replicas.sum(1) == 4).all()
        m = evaluate(stats, plan, topo)
        assert (m.balancedness >= evaluate(stats, place("eplb", stats, topo), topo).balancedness - 0.0101).all()


def test_follow_mode_maps_groups_so_tokens_find_their_next_experts():
    # Two domains of tokens: A uses experts {0,1} then {2,3}; B uses {2,3} then {0,1}. In the follow
    # dataflow the optimum puts layer 1's {2,3} where layer 0's {0,1} is: no token leaves its GPU.
    half = np.array([[[0, 1], [2, 3]]] * 50 + [[[2, 3], [0, 1]]] * 50)
    trace = Trace(half, np.arange(100), 4)
    stats = stats_from_trace(trace)
    topo = Topology(2)
    plan = ilp(stats, topo, 4, IlpOptions(time_limit=2.0, workers=1, dataflow="follow"))
    m = evaluate(trace, plan, topo, dataflow="follow")
    assert m.follow_cross[0] == 0.0
    contiguous = evaluate(trace, place("contiguous", stats, topo), topo, dataflow="follow")
    assert contiguous.follow_cross[0] == 1.0  # {0,1} stays on GPU 0 in both layers: everyone moves


def test_migration_term_keeps_a_good_previous_plan_in_place(small_trace):
    stats = stats_from_trace(small_trace)
    topo = Topology(8)
    current = ilp(stats, topo, 32, QUICK)
    # Same statistics, a short horizon: moving anything cannot pay back, so nothing moves.
    again = ilp(stats, topo, 32, IlpOptions(time_limit=2.0, workers=1, previous=current,
                                            interval_tokens=stats.tokens))
    assert evaluate(stats, again, topo, previous=current).migration_bytes == 0.0
    with pytest.raises(ValueError, match="previous"):
        ilp(stats, Topology(4), 32, IlpOptions(previous=current))


def test_follow_refinement_aligns_every_layer_with_its_neighbours_in_parallel():
    # Domain A uses {0,1}, {2,3}, {0,2}, {1,3} through four layers, domain B the complements. Stage 3 refines
    # even layers, then odd ones, in two processes; the optimum keeps every token on its GPU throughout.
    a = [[0, 1], [2, 3], [0, 2], [1, 3]]
    b = [[2, 3], [0, 1], [1, 3], [0, 2]]
    trace = Trace(np.array([a] * 50 + [b] * 50), np.arange(100), 4)
    stats = stats_from_trace(trace)
    topo = Topology(2)
    plan = ilp(stats, topo, 4, IlpOptions(time_limit=2.0, workers=2, dataflow="follow"))
    assert evaluate(trace, plan, topo, dataflow="follow").follow_cross.tolist() == [0.0, 0.0, 0.0]
    contiguous = evaluate(trace, place("contiguous", stats, topo), topo, dataflow="follow")
    assert contiguous.follow_cross.max() == 1.0


def test_tiny_solver_budgets_keep_the_local_search_answer_without_cp_sat():
    from expertmesh.placement.ilp.subproblem import MIN_BUDGET, subproblem
    from expertmesh.placement.partition import PartitionProblem

    pb = PartitionProblem(np.ones(4, int), np.array([4, 3, 2, 1]), 2, 2, 1, 6, np.array([[0, 1]]), np.array([5]))
    start = np.array([[1, 0], [0, 1], [0, 1], [1, 0]])
    x, reports = subproblem(pb, None, 0, MIN_BUDGET / 2, start=start)
    assert np.array_equal(x, start) and reports == []
    x, reports = subproblem(pb, None, 0, 1.0, start=start)
    assert [r.status for r in reports] == ["OPTIMAL"] and pb.feasible(x)


def test_copy_loads_follow_the_arrivals_of_replicated_experts_only():
    from expertmesh.placement.ilp.layer import LayerJob, follow_copy_load

    # Expert 0 (120 tokens, 2 copies) has all its tokens arriving on GPU 0; expert 1 (60, 1 copy) likewise.
    arrivals = np.array([[120.0, 0, 0], [60, 0, 0], [0, 30, 30]])
    job = LayerJob(layer=0, load=np.array([60.0, 60, 60]), replicas=np.array([2, 1, 1]), pairs=np.zeros((0, 2), int),
                   pair_weight=np.zeros(0, int), eplb=np.ones((3, 3), int), start=np.ones((3, 3), int), reward=None,
                   arrivals=arrivals, num_nodes=1, slots_per_gpu=1, slack=0.01, node_penalty=0, decompose=False,
                   seed=0, flat_competes=True, budget=1.0)
    load = follow_copy_load(job, 1.0, arrivals)
    # Replicated: w/r + (1 - 1/r)(A - w/G) = 60 + 0.5 (120 - 40) on GPU 0, 60 - 20 elsewhere; singles: w.
    assert load.tolist() == [[100, 40, 40], [60, 60, 60], [60, 60, 60]]
    uniform = follow_copy_load(job, 1.0, np.full((3, 3), 40.0))
    assert uniform[0].tolist() == [60, 60, 60]  # uniform arrivals: the even split of the home dataflow
    assert follow_copy_load(replace(job, replicas=np.ones(3, int)), 1.0, arrivals) is None


def test_partition_keeps_the_cap_on_part_dependent_copy_loads():
    from expertmesh.placement.cpsat_models import partition
    from expertmesh.placement.local_search import greedy_partition, improve_by_swaps
    from expertmesh.placement.partition import PartitionProblem

    # Two GPUs, two slots each; expert 0 has a copy on both. Its copy on GPU 0 carries 8 (the tokens
    # arriving there), on GPU 1 only 2. Experts 1 (5) and 2 (1) are co-activated with weight 10: together
    # they would fit on GPU 1 only by the plain even split (0's copy 5 + 5 + 1 > cap 9 either way), so the
    # cap forces 1 onto GPU 1 (2 + 5) and 2 onto GPU 0 (8 + 1).
    load_at = np.array([[8, 2], [5, 5], [1, 1]])
    pb = PartitionProblem(np.array([2, 1, 1]), np.array([5, 5, 1]), 2, 2, 1, 9, np.array([[1, 2]]), np.array([10]),
                          load_at=load_at)
    best = np.array([[1, 1], [0, 1], [1, 0]])
    assert pb.feasible(best) and not pb.feasible(np.array([[1, 1], [1, 0], [0, 1]]))
    x, report = partition(pb, np.array([[1, 1], [1, 0], [0, 1]]), budget=1.0)
    assert np.array_equal(x, best) and report.status == "OPTIMAL"
    assert np.array_equal(greedy_partition(pb), best)
    assert np.array_equal(improve_by_swaps(pb, best), best)


def test_home_dataflow_with_replicas_plans_no_balance_allowance(small_trace):
    stats = stats_from_trace(small_trace)
    topo = Topology(8)
    plan, eplb_plan = place("ilp", stats, topo, 8, QUICK), place("eplb", stats, topo, 8)
    ours, theirs = evaluate(stats, plan, topo).load, evaluate(stats, eplb_plan, topo).load
    assert (ours.max(1) <= theirs.max(1) * (1 + 1e-5)).all()  # no heavier GPU than EPLB's, layer by layer
    loose = place("ilp", stats, topo, 8, replace(QUICK, replica_balance_slack=0.01))
    assert evaluate(stats, loose, topo).coact_cut <= evaluate(stats, plan, topo).coact_cut


def test_ilp_follow_aligns_layers_by_where_tokens_sit_their_top_1_expert():
    # Two layers of 4 equally loaded experts on 2 GPUs. trans_top1[e, f]: tokens whose top-1 expert in
    # layer 0 is e (so they sit on e's GPU) that want f in layer 1; trans adds the pairs of their other
    # expert. Enumerated: the top-1 counts are best served by {0,1}|{2,3} in both layers (480 of 1,160
    # local), while trans alone prefers {0,3}|{1,2} (which keeps only 360 local): planned from trans alone,
    # the ILP misses the top-1 optimum.
    top1 = np.array([[80, 60, 50, 20], [30, 0, 0, 0], [10, 80, 60, 90], [50, 60, 90, 70]])
    other = np.array([[180, 150, 150, 270], [60, 240, 180, 0], [90, 240, 150, 0], [210, 210, 240, 30]])
    counts = np.full((2, 4), 100)
    coact = np.zeros((2, 4, 4), dtype=np.int64)
    with_top1 = RoutingStats(counts, 2, 200, coact, (top1 + other)[None], trans_top1=top1[None])
    without = RoutingStats(counts, 2, 200, coact, (top1 + other)[None])
    options = replace(QUICK, dataflow="follow")

    def groups(plan):
        return [sorted(sorted(g) for g in plan.phy2log[layer].reshape(2, 2).tolist()) for layer in range(2)]

    def local(plan):
        gpu = [np.argmax(plan.replicas[layer], axis=1) for layer in range(2)]
        return sum(top1[e, f] for e in range(4) for f in range(4) if gpu[0][e] == gpu[1][f])

    plan = ilp(with_top1, Topology(2), 4, options)
    assert groups(plan) == [[[0, 1], [2, 3]]] * 2 and local(plan) == 480
    assert local(ilp(without, Topology(2), 4, options)) < 480


def test_decomposed_stage_one_falls_back_to_the_flat_heuristic_where_node_sets_do_not_pack():
    # A node partition must still pack onto its GPUs under the cap, which the node model cannot see. On this
    # layer (128 experts on 16 GPUs / 2 nodes) the node cap has to tighten; the flat heuristic (GPUs with the
    # node penalty) then competes, and without it the decomposition ends ~57% worse on the layer objective.
    from expertmesh.placement.ilp.decompose import decomposed
    from expertmesh.placement.ilp.layer import LayerJob, layer_problem
    from expertmesh.placement.ilp.stage1 import strong_pairs
    from expertmesh.placement.ilp.subproblem import heuristic
    from expertmesh.placement.synthetic import SyntheticSpec, synthetic_trace

    trace = synthetic_trace(SyntheticSpec(num_experts=128, top_k=8, num_layers=1, num_tokens=2048, num_domains=16,
                                          seed=6))
    stats = stats_from_trace(trace)
    hint = place("eplb", stats, Topology(16, 2), 0)
    pairs, weight, _ = strong_pairs(stats.coact[0], 8)
    objective = {}
    for competes in (True, False):
        job = LayerJob(layer=0, load=stats.counts[0].astype(float), replicas=hint.logcnt[0], pairs=pairs,
                       pair_weight=weight, eplb=hint.replicas[0], start=hint.replicas[0], num_nodes=2, slots_per_gpu=8,
                       slack=0.01, node_penalty=7, decompose=True, seed=0, flat_competes=competes, budget=0.0)
        whole = layer_problem(job)
        x, _ = decomposed(job, whole)
        assert whole.feasible(x)
        objective[competes] = whole.objective(x)
    assert objective[True] <= whole.objective(heuristic(whole, job.start))
    assert objective[True] < 0.8 * objective[False]


def test_ilp_follow_reports_the_priced_assignments_bound(small_trace):
    # Stage 3's layers are solved by the priced assignment where CP-SAT does not run (here: a budget below
    # its minimum, so stage 2's three assignments would be the only reports); their Lagrangian bounds enter
    # the plan's bound, which never exceeds its objective.
    stats = stats_from_trace(small_trace)
    plan = ilp(stats, Topology(8), 32, IlpOptions(dataflow="follow", time_limit=0.1, workers=1))
    assert plan.solver.subproblems >= stats.num_layers  # one report per refined layer at least
    assert plan.solver.bound <= plan.solver.objective + 1e-6
    assert 0 <= plan.solver.gap < 0.5



def _follow_instance():
    """16 experts top-4, 6 layers, 4 domains on 4 GPUs: a first stage-3 start that the second one beats."""
    from expertmesh.placement.synthetic import SyntheticSpec, synthetic_trace

    return synthetic_trace(SyntheticSpec(num_experts=16, top_k=4, num_layers=6, num_tokens=512, num_domains=4,
                                         tokens_per_sequence=16, seed=0))


def test_ilp_follow_forward_chain_beats_stage_2s_plan():
    trace = _follow_instance()
    stats, topo = stats_from_trace(trace), Topology(4)
    options = IlpOptions(dataflow="follow", time_limit=1.0, workers=1)
    one = ilp(stats, topo, 16, replace(options, follow_starts=1))
    two = ilp(stats, topo, 16, replace(options, follow_starts=2))
    # Two starts: stage 2's plan, then the forward chain (each layer in turn assigned to the tokens arriving
    # from its predecessor, then swept), which keeps more tokens on their GPUs and wins.
    first, second = two.solver.follow_starts.values
    assert second > first and two.solver.follow_starts.best == 1
    # One start is the forward chain alone: also better than stage 2's plan.
    assert one.solver.follow_starts.values[0] > first
    # ...and keeps every layer within the balance allowance of EPLB's.
    eplb_bal = evaluate(trace, place("eplb", stats, topo), topo, dataflow="follow").balancedness
    for plan in (one, two):
        assert (evaluate(trace, plan, topo, dataflow="follow").balancedness >= eplb_bal - 0.01 - 1e-9).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_ilp_follow_reaches_the_exact_optimum_with_one_expert_per_gpu(seed):
    """One expert per GPU and no replicas: follow_cross depends on each layer pair only through the
    relative permutation of their GPUs, so the optimum is every pair's best assignment. ilp solves exactly
    that and says OPTIMAL; here the optimum is found independently by trying all 720 permutations of 6
    experts. (The same argument bounds the benchmark's 8x32 row on 8 GPUs.)"""
    import itertools

    from expertmesh.placement.synthetic import SyntheticSpec, synthetic_trace

    E = 6
    trace = synthetic_trace(SyntheticSpec(num_experts=E, top_k=2, num_layers=5, num_tokens=512, num_domains=3,
                                          seed=seed))
    ids = trace.topk_ids
    T, L, k = ids.shape
    perms = np.array(list(itertools.permutations(range(E))))
    best = []
    for layer in range(1, L):  # tokens (top-1 expert a at layer-1, pair b at layer) that can stay on a GPU
        stay = np.zeros((E, E))
        np.add.at(stay, (np.repeat(ids[:, layer - 1, 0], k), ids[:, layer].reshape(-1)), 1)
        best.append(1 - stay[np.arange(E)[None, :], perms].sum(1).max() / (T * k))
    topo = Topology(E)
    plan = ilp(stats_from_trace(trace), topo, E, IlpOptions(dataflow="follow", time_limit=5.0, workers=1))
    got = evaluate(trace, plan, topo, dataflow="follow").follow_cross
    np.testing.assert_allclose(got, best, atol=1e-12)
    assert plan.solver.status == "OPTIMAL" and plan.solver.gap == 0.0
    assert plan.solver.objective == pytest.approx(float(np.sum(best)) * T * k)  # crossing (token, pair)s
    # Statistics without top-1 transitions (e.g. from Redis without top1): the same exact solve on their
    # expectation trans / k, optimal for that objective.
    stats = replace(stats_from_trace(trace), trans_top1=None)
    expected = ilp(stats, topo, E, IlpOptions(dataflow="follow", time_limit=5.0, workers=1))
    stay = sum(stats.trans[layer][np.arange(E)[None, :], perms].sum(1).max() for layer in range(L - 1)) / k
    assert expected.solver.status == "OPTIMAL"
    assert expected.solver.staying_tokens == pytest.approx(stay)
    rows = expected.phy2log  # GPU g holds rows[l][g]: the staying tokens of the plan itself
    assert sum(stats.trans[layer][rows[layer], rows[layer + 1]].sum() for layer in range(L - 1)) / k == \
        pytest.approx(stay)


@pytest.mark.parametrize("redundant", [0, 4])
def test_ilp_follow_starts_never_lose_to_the_first_and_repeat_under_the_seed(redundant):
    trace = _follow_instance()
    stats, topo = stats_from_trace(trace), Topology(4)
    options = IlpOptions(dataflow="follow", time_limit=1.0, workers=2, follow_starts=3, seed=7)
    a, b = ilp(stats, topo, 16 + redundant, options), ilp(stats, topo, 16 + redundant, options)
    assert np.array_equal(a.phy2log, b.phy2log)
    assert a.solver.follow_starts == b.solver.follow_starts
    values = a.solver.follow_starts.values
    assert len(values) == 3 and values[a.solver.follow_starts.best] == max(values)


def test_contiguous_plan_needs_no_statistics_and_is_the_contiguous_placer():
    from expertmesh.placement.baselines import contiguous, contiguous_plan

    plan = contiguous_plan(3, 8, 4)
    assert plan.phy2log.tolist() == [list(range(8))] * 3 and plan.num_gpus == 4 and plan.strategy == "contiguous"
    stats = RoutingStats(np.ones((3, 8)), 2, 4)
    assert np.array_equal(contiguous(stats, Topology(4), 8).phy2log, plan.phy2log)
    with pytest.raises(ValueError, match="num_gpus"):
        contiguous_plan(3, 8, 3)  # 8 experts do not divide over 3 GPUs


def _colocated_layers(plan) -> int:
    """GPU-layers where a GPU holds an expert twice."""
    return int((plan.replicas > 1).any(1).sum())


def test_spread_replicas_moves_second_copies_apart_and_keeps_every_slot():
    from expertmesh.placement.spread import spread_replicas

    # 4 GPUs x 3 slots: expert 0 twice on GPU 0, expert 1 twice on GPU 1; expert 5 has 5 copies (> 4 GPUs:
    # some must share a GPU, so its copies may absorb a swap).
    row = np.array([0, 0, 2, 1, 1, 3, 4, 5, 5, 5, 5, 5])
    out = spread_replicas(row[None], 4)[0]
    assert sorted(out.tolist()) == sorted(row.tolist())  # every copy kept, slots per GPU unchanged
    held = np.zeros((6, 4), int)
    np.add.at(held, (out, np.arange(12) // 3), 1)
    assert (held[:5] <= 1).all() and held[5].sum() == 5  # only the crowded expert shares a GPU
    # Within groups of 2 GPUs (nodes of 2 x 2 slots), copies stay in their group.
    grouped = spread_replicas(np.array([[0, 0, 1, 2, 3, 3, 4, 5]]), 4, gpus_per_group=2)[0]
    assert sorted(grouped[:4].tolist()) == [0, 0, 1, 2] and sorted(grouped[4:].tolist()) == [3, 3, 4, 5]
    assert all(len(set(grouped[g * 2:g * 2 + 2])) == 2 for g in range(4))


def test_round_robin_never_puts_two_copies_of_an_expert_on_one_gpu():
    stats = RoutingStats(np.ones((2, 8), int) * 4, 2, 16)
    plan = place("round_robin", stats, Topology(4), 4)  # vLLM's dealing puts experts 0-3 twice on GPUs 0-3
    assert plan.colocated_replicas == 0 and _colocated_layers(plan) == 0
    assert (plan.logcnt[:, :4] == 2).all() and (plan.logcnt[:, 4:] == 1).all()  # the same experts replicated
    assert (plan.replicas.sum(1) == 3).all()


def test_eplb_keeps_deepseeks_co_located_copies_by_default_and_spreads_them_on_request():
    from expertmesh.placement.eplb import EplbOptions

    # DeepSeek's packing gives expert 0 (the heaviest) three copies, two of them on GPU 3.
    stats = RoutingStats(np.array([[170, 128, 102, 54, 62, 10, 16, 4]]), 2, 273)
    deepseek = place("eplb", stats, Topology(4), 4)
    assert deepseek.colocated_replicas == 1  # fidelity to the reference
    spread = place("eplb", stats, Topology(4), 4, EplbOptions(spread_replicas=True))
    assert spread.colocated_replicas == 0
    assert np.array_equal(spread.logcnt, deepseek.logcnt)  # the same replicas, moved apart
    with pytest.raises(ValueError, match="options: eplb takes EplbOptions"):
        place("eplb", stats, Topology(4), 4, QUICK)  # another placer's options are refused, not ignored


@pytest.mark.parametrize("seed", range(4))
def test_ilp_never_co_locates_replicas(seed):
    rng = np.random.default_rng(seed)
    counts = (rng.zipf(1.5, size=(3, 12)).clip(max=400) * 2).astype(int)  # a few very hot experts
    counts[:, 0] = counts.max() * 3  # one expert hot enough for EPLB to give it several copies
    stats = RoutingStats(counts, 2, int(counts[0].sum()) // 2)
    for gpus, nodes, redundant in ((4, 1, 4), (4, 2, 8), (6, 1, 6)):
        plan = place("ilp", stats, Topology(gpus, nodes), redundant, QUICK)
        capped = plan.logcnt <= gpus  # only an expert with more copies than GPUs may share one
        assert (plan.replicas[capped] <= 1).all(), (gpus, nodes, redundant)


def test_real_qwen_counts_plan_no_co_located_replicas_with_ilp_and_round_robin(qwen_dir):
    from expertmesh.placement.eplb import EplbOptions
    from expertmesh.placement.sources import load_count_matrix

    stats = load_count_matrix(qwen_dir / "counts57b.json", top_k=8)
    topo = Topology(16, 2)
    assert _colocated_layers(place("eplb", stats, topo, 16)) == 21  # DeepSeek's behaviour, kept by default
    assert place("eplb", stats, topo, 16, EplbOptions(spread_replicas=True)).colocated_replicas == 0
    assert place("round_robin", stats, topo, 16).colocated_replicas == 0  # was every GPU-layer
    assert place("ilp", stats, topo, 16, replace(QUICK, time_limit=4.0)).colocated_replicas == 0  # was 3


def test_empty_routing_data_is_refused():
    empty = RoutingStats(np.zeros((2, 8), int), 2, 0)
    for strategy in STRATEGIES:
        with pytest.raises(ValueError, match="no tokens"):
            place(strategy, empty, Topology(4))


def test_ilp_step_objective_is_never_predicted_slower_than_eplb(small_trace):
    """Compute-bound sizes can make the solver's plan slower than EPLB's: the default objective then takes
    the fewest layers from EPLB that bring the predicted step time down to EPLB's, and otherwise keeps the
    solver's plan as it is; "traffic" always keeps it."""
    from expertmesh.placement.cost import CostParams
    from expertmesh.placement.eplb import EplbOptions

    params = CostParams(hidden=4096, ffn=14336)
    slower = []  # instances where the solver's own plan is predicted slower than EPLB's
    for gpus, nodes, dataflow in ((8, 1, "home"), (8, 2, "home"), (4, 1, "follow")):
        topo = Topology(gpus, nodes)
        options = replace(QUICK, params=params, dataflow=dataflow, time_limit=1.0)
        own = place("ilp", small_trace, topo, 0, replace(options, objective="traffic"))
        chosen = place("ilp", small_trace, topo, 0, options)
        eplb = place("eplb", small_trace, topo, 0, EplbOptions(spread_replicas=True))
        step = {name: evaluate(small_trace, p, topo, params, dataflow).step_s
                for name, p in (("own", own), ("chosen", chosen), ("eplb", eplb))}
        assert step["chosen"] <= step["eplb"] * (1 + 1e-12), (gpus, nodes, dataflow)
        choice = chosen.solver.step_choice
        assert choice.step_ms == pytest.approx(step["chosen"] * 1e3)
        assert choice.eplb_step_ms == pytest.approx(step["eplb"] * 1e3)
        assert own.solver.step_choice is None and chosen.options["objective"] == "step"
        layers = set(choice.layers_from_eplb)
        for layer in range(small_trace.num_layers):  # every layer is one of the two arrangements
            source = eplb if layer in layers else own
            assert np.array_equal(chosen.phy2log[layer], source.phy2log[layer])
        slower.append(step["own"] > step["eplb"])
        if not slower[-1]:
            assert not layers  # no slower than EPLB: the solver's plan, untouched
    assert any(slower)  # the selection matters here
    # From statistics alone there is no per-token traffic to predict a step with: the solver's plan.
    from_stats = place("ilp", stats_from_trace(small_trace), Topology(8), 0, QUICK)
    assert from_stats.solver.step_choice is None
