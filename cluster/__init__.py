"""expertmesh.cluster."""
