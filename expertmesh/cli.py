"""The `expertmesh` command: planning commands from `expertmesh.placement`, `stats` from `expertmesh.cluster`,
`serve`, `infer` and `serve-demo` from `expertmesh.cluster.serve`.

The control plane's pieces are mounted here, not imported by placement, so the planner stays free of
Redis; without the `stats` extra installed, `expertmesh stats` says how to get it.
"""

from __future__ import annotations

import typer

from expertmesh.cluster.serve.cli import register as register_serving
from expertmesh.placement.cli import EXIT_USAGE, app, register_stats_loader

__all__ = ["app", "main"]


def _mount_stats() -> None:
    try:
        from expertmesh.cluster.cli import load_stats_url, stats_app
    except ModuleNotFoundError as exc:
        if exc.name != "redis":
            raise
        missing = exc.name

        @app.command("stats", help="Routing statistics in Redis (needs: pip install 'expertmesh[stats]').")
        def stats_unavailable() -> None:
            typer.echo(f"expertmesh stats needs the '{missing}' package: pip install 'expertmesh[stats]'", err=True)
            raise typer.Exit(EXIT_USAGE)

        return
    register_stats_loader(("redis", "rediss"), load_stats_url)
    app.add_typer(stats_app, name="stats")


_mount_stats()
register_serving(app)  # imports only typer here; each command imports what it needs when it runs


def main() -> None:
    app()
