"""expertmesh.cluster.serve: the serving engine and its gRPC services.

The engine runs continuous batching over EP groups (paged-KV admission, replicas, recovery); the servicers
(Inference, Admin, health, reflection, metrics) are thin and delegate to it.

Layering: may import `expertmesh.placement`, `expertmesh.cluster.stats`, `expertmesh.workers` and the gRPC
stubs `expertmesh.protos`; never `expertmesh.cluster.controller`, which talks to it over Admin gRPC only.
"""
