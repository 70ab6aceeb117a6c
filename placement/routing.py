"""Which replica serves each token: the one rule shared by the cost model, the kernels and the runtime.

Given a layer's routing `topk_ids` [T, k], the GPU each token starts from `source` [T] (its home GPU in the
home dataflow), and the layer's replica table `replicas` [E, G], every (token, expert) pair is served by:

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
"""

from __future__ import annotations

import numpy as np

__all__ = ["choose_replicas", "local_token_index", "dispatch_counts"]


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
