"""expertmesh.placement."""
