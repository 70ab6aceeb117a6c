"""The `ilp` placer: MoETuner's two stages, extended with replicas, co-activation, node topology, migration
and a token-follow refinement.

    options     IlpOptions
    stage1      per-layer jobs: EPLB's replica counts, strongest co-activation pairs, migration reward
    layer       one layer's partition problem under the balance cap, its solve, the process pool
    subproblem  local search and greedy starts, then CP-SAT;  decompose: nodes first, then GPUs
    stage2      token-follow: each layer's groups mapped onto GPUs to follow the tokens
    follow      token-follow stage 3: per-layer assignments against the neighbours, from several starts
    exact       token-follow with one expert per GPU, solved exactly
    report      the plan's SolverReport from its subproblems;  planner: `ilp()`, the stages in order
    selection   the default objective: EPLB's layers where needed for a step time no slower than EPLB's

Stage 1, per layer (layers run in parallel processes): group the layer's expert replicas into one group
per GPU. Every group holds exactly S replicas and at most `cap` load, where `cap` keeps the layer's
balancedness within `balance_slack` of EPLB's at the same slot budget. Where MoETuner only balances, we
minimise the co-activation weight of expert pairs split across GPUs, which is what the home dataflow pays
for (a token is copied once per distinct GPU among its experts), with pairs split across nodes costing
`intra/inter bandwidth` times more. Above 16 GPUs on several nodes the grouping is decomposed: replicas to
nodes first, then to the GPUs of each node. Without pair statistics (count matrices), stage 1 minimises
the heaviest GPU, i.e. it is MoETuner's balanced grouping.

Stage 2, layer after layer (token-follow dataflow): map each layer's groups onto GPUs, one-to-one,
minimising the traffic from where tokens are after layer l-1 to the GPUs of their layer-l experts plus the
busiest bandwidth-weighted GPU pair (MoETuner's objective). In the home dataflow every layer's dispatch
starts at the token's home GPU, so the mapping does not change traffic and stage 2 is skipped.

Stage 3 (token-follow only): with its two neighbours fixed, a layer's follow objective is a value per
(expert, GPU): tokens that arrive on g from their top-1 expert of layer l-1 and want e, plus tokens of e
that go on to experts of layer l+1 on g (`RoutingStats.follow_trans`). Each layer is re-solved as an
assignment under the cap (assignment.py), without stage 1's co-activation pairs, which would pin stage 1's
groups. Red-black sweeps refine even layers against their odd neighbours, then odd against even. With
replicas a copy serves the tokens already on its GPU first (routing.py, rule 1), so its load depends on
where layer l-1 leaves them: stage 3 gives every copy a GPU-dependent load, and a last pass in layer order
repairs (or re-solves) any layer whose copies break the cap behind its final predecessor. Sweeps settle in
local optima, so stage 3 restarts (`follow_starts`): stage 2's plan, the forward chain (every layer in turn
assigned to the tokens arriving from its predecessor, which lands in a better basin), then kicks of the best
plan so far; the plan keeping the most tokens on their GPU between layers wins. Where one start fits, it is
the forward chain.

Replicas and balance: where tokens start from their home GPU, a replica's load depends on where tokens are
homed, which statistics do not record, so those layers are planned with `replica_balance_slack` (default 0:
no heavier GPU than EPLB's). All copies of a replicated expert stay in one node (`replica_group`), so the
replica rule's preference for the token's own node splits their load evenly.

One expert per GPU (token-follow, one node, no replicas, no previous plan): solved exactly (exact.py).

Migration: with a previous plan, every expert left on a GPU that holds it already is rewarded by the bytes
it would cost to move, converted to token copies over the horizon `interval_tokens`; parts are then
labelled by the previous plan's GPUs, so stage 1 decides what moves.

Every subproblem starts from the best of local search from EPLB's plan, an affinity greedy and LPT packing,
runs CP-SAT on a deterministic time budget with a fixed seed, and a layer keeps its starting arrangement
whenever the solver's is not better on the same whole-layer objective. That start is EPLB's plan with its
copies spread apart, so no GPU ever holds two copies of an expert that has no more copies than GPUs.

Objective: the solver minimises traffic under the balance cap; on a compute-bound layer EPLB's arrangement
can still be predicted faster. By default (objective "step", given a trace) the solver's plan takes as few
of EPLB's layers as the cost model needs to predict a step time no slower than EPLB's (spread apart where
DeepSeek's EPLB co-locates copies); "traffic" returns the solver's own plan.
"""

from .options import IlpOptions
from .planner import ilp, with_robust, with_step_objective

__all__ = ["IlpOptions", "ilp", "with_step_objective", "with_robust"]
