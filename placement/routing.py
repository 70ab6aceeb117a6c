"""Which replica serves each token: the one rule shared by the cost model, the kernels and the runtime.

Two rules, picked by `replica_rule` (the plan's group config and the cost model's argument): "fixed", local
per source GPU, and "balanced" (the run-time hedge of issue 17), which splits every batch's pairs of a
replicated expert over its replicas by the batch's own load. Both have a torch twin in
`expertmesh.kernels.replicas`, tested equal to these on random instances.

**fixed.** Given a layer's routing `topk_ids` [T, k], the GPU each token starts from `source` [T] (its home
GPU in the home dataflow), and the layer's replica table `replicas` [E, G], every (token, expert) pair is
served by:

1. the replica on the token's source GPU, if there is one (no transfer at all);
2. else a replica on the source's node, if any (intra-node links are ~7x faster than the NIC);
3. among what is left, the (token_index + expert) mod n-th candidate in GPU order, which spreads a hot
   expert's tokens evenly over its replicas without any communication or randomness.

So an expert's load splits evenly over its replicas when source GPUs are uniform (DESIGN.md's load
definition). A tempting extra rule, "prefer a replica on a GPU the token visits anyway for another
expert", saves ~8-10% of copies but piles load onto the GPUs hosting a replicated expert's partners,
which is exactly where an affinity-aware placer puts it: measured balancedness fell 0.07-0.15 below the
planned one, so it is left out.

`token_index` is the token's position among the tokens of its source GPU in this step, so the runtime can
apply the rule with local information only, and a trace replay reproduces it exactly.

**balanced.** Computed from `counts` [G, E] (`route_counts`: pairs of each source GPU for each expert; the
runtime all-gathers it, one [E] row per rank, before the layout) and the replica table; every rank computes
the same integers, then places its own pairs. A "host" of e is a GPU with a replica of e (a second replica on
the same GPU adds nothing: `ExpertMap.local_slot`).

1. An expert with one host: all its pairs go there. Those loads are every GPU's starting level.
2. Replicated experts, by decreasing total pairs (ties: lower expert id first), each water-fill their total
   over their hosts: the hosts are raised to the largest common integer level L the total pays for
   (sum over hosts of max(L - level, 0) <= total); the remainder, fewer than the hosts at or below L, is one
   pair each to those hosts in GPU order. `split_passes(R)` = max(3, ceil(64 / R)) rounds over that order, R
   replicated experts: from the second on, an expert's share is taken off its hosts and filled again on top
   of the others' current shares (coordinate descent on the sum of squared loads), which the first greedy
   round alone leaves 0.03-0.05 short of. The split [E, G] depends only on each expert's total, not on where
   its pairs come from. (DeepSeek's LPLB solves this as an LP; an integer greedy is exactly reproducible in
   numpy and torch, and lands within 0.003 of the LP's balancedness on bench/hedge.py's held-out samples.)
3. Which pairs a host serves is then free, so locality is kept at no cost to balance: with the split fixed,
   (a) every host first serves its own source pairs (up to its share); (b) on each node, the remaining pairs
   of the node's sources (in GPU order) are laid end to end against the remaining shares of the node's hosts
   (in GPU order) and matched by overlap; (c) what is still left is matched the same way over all GPUs.
   That gives, per (source, expert), counts to: itself, then GPUs 0..G-1 of its node, then GPUs 0..G-1
   (`balanced_flows`); the source's pairs of the expert, in token order, take those destinations in turn.

Its load equals the split exactly, so `expected_load` is exact from counts alone. It needs one [G, E] int
all-gather per layer before dispatch (kernels/exchange.py `Exchange.gather_counts`).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "REPLICA_RULES", "choose_replicas", "local_token_index", "dispatch_counts", "route_counts", "balanced_split",
    "balanced_flows", "balanced_destinations", "choose_balanced", "serve_gpus", "expected_load", "check_rule",
    "SPLIT_PASSES", "SPLIT_STEPS", "split_passes", "DEFAULT_REPLICA_RULE",
]

REPLICA_RULES = ("fixed", "balanced")
# The rule the cost model and a group's config take when none is named: ONE constant, so predictions and the
# runtime agree by default. "fixed" until the balanced rule's per-layer cost is measured on a GPU (it adds an
# all-gather and the split to every layer of a plan with replicated experts; bench/hedge.py --timing).
DEFAULT_REPLICA_RULE = "fixed"
# Rounds of the water-fill over the R replicated experts: `split_passes(R)` = max(SPLIT_PASSES, ceil(SPLIT_STEPS /
# R)). One greedy round is 0.03-0.05 below the fixed rule's even split in-sample on eplb plans; later rounds
# refill each expert on top of the others' current shares (coordinate descent). With these, every held-out row of
# bench/results/hedge.md is within 0.003 of the LP optimum (in-sample, 256 experts: 0.012-0.017 below); few
# replicated experts sharing GPUs in chains (8 experts on 8 GPUs) converge slower and cost little per round: 8.
SPLIT_PASSES = 3
SPLIT_STEPS = 64


def local_token_index(source: np.ndarray, num_gpus: int) -> np.ndarray:
    """int64 [T]: position of each token among the tokens with the same source GPU (in order)."""
    source = np.asarray(source, dtype=np.int64)
    order = np.argsort(source, kind="stable")
    starts = np.searchsorted(source[order], np.arange(num_gpus))
    index = np.empty_like(source)
    index[order] = np.arange(source.size) - starts[source[order]]
    return index


def choose_replicas(
    topk_ids: np.ndarray,
    source: np.ndarray,
    replicas: np.ndarray,
    node_of_gpu: np.ndarray,
    token_index: np.ndarray,
) -> np.ndarray:
    """int64 [T, k]: the GPU that serves each (token, expert) pair under the rule above.

    topk_ids [T, k] expert ids; source [T] GPU of each token; replicas [E, G] replica counts (> 0 where
    the expert has a replica); node_of_gpu [G]; token_index [T] (see `local_token_index`).
    """
    ids = np.asarray(topk_ids, dtype=np.int64)
    source = np.asarray(source, dtype=np.int64)
    T, k = ids.shape
    G = replicas.shape[1]
    if T == 0:
        return np.zeros((0, k), dtype=np.int64)
    cand = replicas[ids] > 0  # [T, k, G]
    on_source = np.zeros((T, G), dtype=bool)
    on_source[np.arange(T), source] = True
    need = ~(cand & on_source[:, None, :]).any(-1)  # rule 1 failed

    node = np.asarray(node_of_gpu, dtype=np.int64)
    same_node = node[None, :] == node[source][:, None]  # [T, G]
    near = cand & same_node[:, None, :]  # rule 2
    pool = np.where(near.any(-1, keepdims=True), near, cand)
    n = pool.sum(-1)  # >= 1 since every expert has a replica
    pick = (np.asarray(token_index, dtype=np.int64)[:, None] + ids) % np.maximum(n, 1)  # rule 3
    rank = np.cumsum(pool, axis=-1) - 1
    spread = np.argmax(pool & (rank == pick[..., None]), axis=-1)
    return np.where(need, spread, source[:, None])


def dispatch_counts(gpus: np.ndarray, source: np.ndarray, num_gpus: int) -> np.ndarray:
    """int64 [G, G]: token copies sent from source GPU to destination GPU, one per distinct destination.

    gpus [T, k] from `choose_replicas`. The diagonal counts tokens served at their source (no transfer).
    """
    T, k = gpus.shape
    dest = np.zeros((T, num_gpus), dtype=bool)
    dest[np.repeat(np.arange(T), k), gpus.ravel()] = True
    pairs = np.zeros((num_gpus, num_gpus), dtype=np.int64)
    rows, cols = np.nonzero(dest)
    np.add.at(pairs, (np.asarray(source)[rows], cols), 1)
    return pairs


# ---- the balanced rule ("hedge") ---------------------------------------------------------------------------


def route_counts(topk_ids: np.ndarray, source: np.ndarray, num_experts: int, num_gpus: int) -> np.ndarray:
    """int64 [G, E]: token-expert pairs of each source GPU for each expert (the summary ranks all-gather)."""
    ids = np.asarray(topk_ids, dtype=np.int64)
    src = np.repeat(np.asarray(source, dtype=np.int64), ids.shape[1])
    flat = np.bincount(src * num_experts + ids.ravel(), minlength=num_gpus * num_experts)
    return flat.reshape(num_gpus, num_experts)


def _water_level(levels: np.ndarray, n: int) -> int:
    """The largest integer level L with sum(max(L - levels, 0)) <= n (levels non-empty)."""
    low = np.sort(levels)
    j = np.arange(1, low.size + 1)
    need = j * low - np.cumsum(low)  # water that raises the j lowest to the j-th lowest level
    J = int(np.count_nonzero(need <= n))
    return int(low[J - 1] + (n - need[J - 1]) // J)


def split_passes(replicated: int) -> int:
    """Rounds of the water-fill over `replicated` experts (see SPLIT_PASSES)."""
    return max(SPLIT_PASSES, -(-SPLIT_STEPS // max(replicated, 1)))


def balanced_split(totals: np.ndarray, replicas: np.ndarray, passes: int | None = None) -> np.ndarray:
    """int64 [E, G]: how many of expert e's pairs GPU g serves under the balanced rule (steps 1-2 above).

    totals [E] pairs per expert over all source GPUs; replicas [E, G] (> 0 where the expert has a replica);
    passes: rounds over the replicated experts (None: `split_passes`, the rule's own).
    """
    totals = np.asarray(totals, dtype=np.int64)
    hosts = np.asarray(replicas) > 0
    nhost = hosts.sum(1)
    split = np.where(hosts & (nhost == 1)[:, None], totals[:, None], 0).astype(np.int64)
    level = split.sum(0)
    multi = np.flatnonzero(nhost > 1)
    order = multi[np.argsort(-totals[multi], kind="stable")]
    for _ in range(split_passes(multi.size) if passes is None else passes):
        for e in order:
            g = np.flatnonzero(hosts[e])
            level[g] -= split[e, g]  # refill from scratch on top of everyone else's current share
            b, n = level[g], int(totals[e])
            lam = _water_level(b, n)
            a = np.maximum(lam - b, 0)
            eligible = b <= lam  # sum(a) + eligible.sum() > n: the remainder fits one each, lowest GPUs first
            a += eligible & (np.cumsum(eligible) <= n - a.sum())
            split[e, g] = a
            level[g] += a
    return split


def _intersect(src_len: np.ndarray, dst_len: np.ndarray, before_src: np.ndarray, before_dst: np.ndarray):
    """[E, G, G]: overlap of interval r of the sources with interval g of the destinations, laid end to end."""
    ps, qs = before_src, before_dst
    pe, qe = ps + src_len, qs + dst_len
    return np.maximum(np.minimum(pe[:, :, None], qe[:, None, :]) - np.maximum(ps[:, :, None], qs[:, None, :]), 0)


def balanced_flows(counts: np.ndarray, split: np.ndarray, node_of_gpu: np.ndarray) -> np.ndarray:
    """int64 [G, E, 2G + 1]: for source r and expert e, how many of its pairs (in token order) go to each
    destination of `balanced_destinations(r)` in turn: r itself, then GPUs 0..G-1 on r's node, then GPUs
    0..G-1 anywhere (step 3 above). counts [G, E] from `route_counts`, split [E, G] from `balanced_split`.
    """
    C = np.asarray(counts, dtype=np.int64).T  # [E, G] pairs by source
    A = np.asarray(split, dtype=np.int64)  # [E, G] pairs by server
    node = np.asarray(node_of_gpu, dtype=np.int64)
    G = A.shape[1]
    local = np.minimum(A, C)  # 3a: a GPU serves its own pairs first
    rc, ra = C - local, A - local
    same = node[:, None] == node[None, :]
    below = same & (np.arange(G)[:, None] < np.arange(G)[None, :])  # [g', g]: g' before g on g's node
    near = _intersect(rc, ra, rc @ below, ra @ below) * same  # 3b: node by node, sources and servers in order
    rc, ra = rc - near.sum(2), ra - near.sum(1)
    rest = _intersect(rc, ra, np.cumsum(rc, 1) - rc, np.cumsum(ra, 1) - ra)  # 3c: what is left, in order
    flows = np.concatenate([local[:, :, None], near, rest], 2)  # [E, G(source), 2G + 1]
    return flows.transpose(1, 0, 2)  # [G(source), E, 2G + 1]


def balanced_destinations(num_gpus: int) -> np.ndarray:
    """int64 [G, 2G + 1]: the destination of every column of `balanced_flows`, per source GPU."""
    G = num_gpus
    ramp = np.tile(np.arange(G), 2)
    return np.concatenate([np.arange(G)[:, None], np.broadcast_to(ramp, (G, 2 * G))], 1)


def choose_balanced(
    topk_ids: np.ndarray, source: np.ndarray, replicas: np.ndarray, node_of_gpu: np.ndarray
) -> np.ndarray:
    """int64 [T, k]: the GPU that serves each (token, expert) pair under the balanced rule (module docstring).

    Every source GPU's tokens are in `topk_ids` (the counts are taken from them), in each source's token order.
    """
    ids = np.asarray(topk_ids, dtype=np.int64)
    source = np.asarray(source, dtype=np.int64)
    T, k = ids.shape
    E, G = np.asarray(replicas).shape
    if T == 0:
        return np.zeros((0, k), dtype=np.int64)
    counts = route_counts(ids, source, E, G)
    flows = balanced_flows(counts, balanced_split(counts.sum(0), replicas), node_of_gpu)  # [G, E, 2G + 1]
    # The j-th pair of (source, expert) in token order is position j of that segment in the stable sort by
    # key; the segments' flows laid end to end give every position its column by one search.
    key = np.repeat(source, k) * E + ids.ravel()
    order = np.argsort(key, kind="stable")
    ends = np.cumsum(flows.reshape(-1))
    col = np.searchsorted(ends, np.arange(T * k), side="right")
    dest = np.empty(T * k, dtype=np.int64)
    dest[order] = balanced_destinations(G).reshape(-1)[(col // (E * (2 * G + 1))) * (2 * G + 1) + col % (2 * G + 1)]
    return dest.reshape(T, k)


def serve_gpus(
    topk_ids: np.ndarray,
    source: np.ndarray,
    replicas: np.ndarray,
    node_of_gpu: np.ndarray,
    token_index: np.ndarray,
    rule: str = DEFAULT_REPLICA_RULE,
) -> np.ndarray:
    """int64 [T, k]: `choose_replicas` (rule "fixed") or `choose_balanced` (rule "balanced")."""
    check_rule(rule)
    if rule == "balanced":
        return choose_balanced(topk_ids, source, replicas, node_of_gpu)
    return choose_replicas(topk_ids, source, replicas, node_of_gpu, token_index)


def expected_load(counts: np.ndarray, replicas: np.ndarray, rule: str = DEFAULT_REPLICA_RULE) -> np.ndarray:
    """float64 [G]: a layer's load from statistics (no per-token data). fixed: each expert's count split
    evenly over its replicas (the rule's expectation for uniform sources); balanced: `balanced_split`, which
    depends on the totals only, so it is exact for a batch with these counts (decayed, fractional counts are
    rounded to integers first)."""
    check_rule(rule)
    if rule == "balanced":
        return balanced_split(np.rint(counts).astype(np.int64), replicas).sum(0).astype(np.float64)
    rep = np.asarray(replicas, dtype=np.float64)
    return np.asarray(counts, dtype=np.float64) @ (rep / rep.sum(-1, keepdims=True))


def check_rule(rule: str) -> None:
    if rule not in REPLICA_RULES:
        raise ValueError(f"replica_rule: expected one of {REPLICA_RULES}, got {rule!r}")
