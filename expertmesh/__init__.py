"""expertmesh: expert-parallel orchestration for Mixture-of-Experts models.

Subpackages (each a top-level folder of the repository):
    expertmesh.placement  pure planning: traces, statistics, topology, cost model, placers, plan files
    expertmesh.cluster    control plane: Redis statistics store
    expertmesh.workers    data plane: Ray expert workers, model code, dispatcher
    expertmesh.kernels    Triton/torch kernels with their references
"""

import os as _os

__version__ = "0.1.0"

# Installed packages carry the subpackages inside this folder. In a plain source checkout used without
# installing (PYTHONPATH=<repo>, as on a GPU machine that cannot pip install), they are the repository's
# top-level folders: look there too.
_here = _os.path.dirname(_os.path.abspath(__file__))
_repo = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "placement")) and _os.path.isdir(_os.path.join(_repo, "placement")):
    __path__.append(_repo)
