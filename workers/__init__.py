"""expertmesh.workers."""
