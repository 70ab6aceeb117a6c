"""The replica-choice rule in torch: which GPU serves each (token, expert) pair.

This is `expertmesh.placement.routing.choose_replicas` (numpy, used by the cost model) rewritten as
vectorised torch that runs on any device without a host sync, so the runtime applies *exactly* the rule
the planner's cost model predicted with (the tests compare the two on random instances). The rule, in
order of preference, for a pair whose expert has no replica on the token's source GPU:

1. the replica on the source GPU (no transfer);
2. a replica on the source's node, if any;
3. the (token_index + expert) mod n-th remaining candidate in GPU order.

Shapes: T tokens, k experts per token, E logical experts, G GPUs of the EP group.
"""

from __future__ import annotations

import torch

from ._scan import cumsum_first, cumsum_last

__all__ = ["choose_replicas", "local_token_index"]


def local_token_index(source: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """int64 [T]: position of each token among the tokens with the same source GPU, in order.

    On one rank of the runtime every token has the same source, so this is simply `arange(T)`.
    """
    source = source.to(torch.int64)
    onehot = torch.nn.functional.one_hot(source, num_gpus)  # [T, G]
    before = cumsum_first(onehot) - onehot
    return before.gather(1, source[:, None]).squeeze(1)


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim (0 when there is none), like numpy's argmax on bool."""
    return torch.argmax(mask.to(torch.uint8), dim=-1)


def choose_replicas(
    topk_ids: torch.Tensor,
    source: torch.Tensor,
    replicas: torch.Tensor,
    node_of_gpu: torch.Tensor,
    token_index: torch.Tensor,
) -> torch.Tensor:
    """int64 [T, k]: the GPU that serves each (token, expert) pair.

    topk_ids [T, k] expert ids; source [T] GPU of each token; replicas [E, G] replica counts (> 0 where
    the expert has a replica); node_of_gpu [G]; token_index [T] (see `local_token_index`). All tensors on
    one device; the result is on that device. No host synchronisation.
    """
    ids = topk_ids.to(torch.int64)
    source = source.to(torch.int64)
    T, k = ids.shape
    G = replicas.shape[1]
    if T == 0:
        return torch.zeros((0, k), dtype=torch.int64, device=ids.device)
    cand = replicas.to(ids.device)[ids] > 0  # [T, k, G]
    on_source = torch.nn.functional.one_hot(source, G).bool()  # [T, G]
    need = ~(cand & on_source[:, None, :]).any(-1)  # rule 1 failed

    node = node_of_gpu.to(device=ids.device, dtype=torch.int64)
    same_node = node[None, :] == node[source][:, None]  # [T, G]
    near = cand & same_node[:, None, :]  # rule 2
    pool = torch.where(near.any(-1, keepdim=True), near, cand)
    n = pool.sum(-1)
    pick = (token_index.to(device=ids.device, dtype=torch.int64)[:, None] + ids) % n.clamp(min=1)  # rule 3
    rank = cumsum_last(pool.to(torch.int64)) - 1
    spread = _first_true(pool & (rank == pick[..., None]))
    return torch.where(need, spread, source[:, None])
