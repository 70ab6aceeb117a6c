"""expertmesh.cluster.controller: the rebalance loop.

It reads routing statistics, plans a new placement, orchestrates the migration through the serving
processes' Admin gRPC service, and discovers the topology (Ray, Kubernetes). It runs as its own small
process, without torch.

Layering: may import `expertmesh.placement`, `expertmesh.cluster.stats` and the gRPC stubs
`expertmesh.protos`; never `expertmesh.workers`, `expertmesh.kernels`, `expertmesh.cluster.serve` or torch.
"""
