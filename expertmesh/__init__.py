"""expertmesh: expert-parallel orchestration for Mixture-of-Experts models.

Subpackages (each a top-level folder of the repository):
    expertmesh.placement  pure planning: traces, statistics, topology, cost model, placers, plan files
    expertmesh.cluster    control plane: Redis statistics store
    expertmesh.workers    data plane: Ray expert workers, model code, dispatcher
    expertmesh.kernels    Triton/torch kernels with their references
"""

__version__ = "0.1.0"
