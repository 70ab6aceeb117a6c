"""The `expertmesh` command: planning commands from `expertmesh.placement`, `stats` from `expertmesh.cluster`,
`serve`, `infer` and `demo` from `expertmesh.cluster.serve`.

The control plane's pieces are mounted here, not imported by placement, so the planner stays free of
Redis; without the `stats` extra installed, `expertmesh stats` says how to get it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from expertmesh.cluster.serve.cli import register as register_serving
from expertmesh.placement.cli import app, register_stats_loader
from expertmesh.placement.exits import PlainCommand, exit_codes

__all__ = ["app", "main"]


def _mount_stats() -> None:
    # Importing the statistics CLI needs no redis: without the `stats` extra, a command that talks to
    # Redis fails with one line naming the package to install.
    from expertmesh.cluster.stats.cli import stats_app
    from expertmesh.cluster.stats.store import load_stats_url

    register_stats_loader(("redis", "rediss"), load_stats_url)
    app.add_typer(stats_app, name="stats")


_mount_stats()
register_serving(app)  # imports only typer here; each command imports what it needs when it runs


@app.command("quantize", cls=PlainCommand)
def quantize(
    source: Annotated[Path, typer.Argument(metavar="SOURCE", show_default=False,
                                           help="Hugging Face checkpoint folder (safetensors).")],
    dest: Annotated[Path, typer.Argument(metavar="DEST", show_default=False,
                                         help="Folder to write the FP8 checkpoint to (new or empty).")],
) -> None:
    """Write the block-scaled FP8 form of a checkpoint (E4M3 weights with one factor per 128 x 128 block, the
    format DeepSeek-V3 and Qwen3-FP8 ship); it serves at precision fp8 by default."""
    with exit_codes():
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise ValueError(f"{dest}: exists and is not an empty folder")
        if not (source / "config.json").is_file():
            raise ValueError(f"{source}: no config.json (expected a Hugging Face checkpoint folder)")
        from expertmesh.workers.fp8_checkpoint import write_fp8_checkpoint  # torch: only when converting

        write_fp8_checkpoint(source, dest, lambda done, total: typer.echo(f"{done}/{total} files", err=True))
        typer.echo(f"fp8 checkpoint\t{dest}")


def main() -> None:
    app()
