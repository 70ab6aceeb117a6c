"""expertmesh.kernels."""
