"""The `expertmesh` command: planning commands from `expertmesh.placement`, `stats` from `expertmesh.cluster`.

The control plane's pieces are mounted here, not imported by placement, so the planner stays free of
Redis; without the `stats` extra installed, `expertmesh stats` says how to get it.
"""

from __future__ import annotations

from expertmesh.placement.cli import app, register_stats_loader

__all__ = ["app", "main"]


def _mount_stats() -> None:
    # Importing the statistics CLI needs no redis: without the `stats` extra, a command that talks to
    # Redis fails with one line naming the package to install.
    from expertmesh.cluster.stats.cli import stats_app
    from expertmesh.cluster.stats.store import load_stats_url

    register_stats_loader(("redis", "rediss"), load_stats_url)
    app.add_typer(stats_app, name="stats")


_mount_stats()


def main() -> None:
    app()
