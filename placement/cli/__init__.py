"""Planning commands of the `expertmesh` CLI: plan, evaluate, compare, export, trace info|convert, plan-demo.

    args      the arguments and options, declared once
    inputs    routing data, topology, placer options and output paths, checked before any solve
    report    the table (with its legend), key=value lines and JSON
    commands  the commands; errors and exit codes come from `expertmesh.placement.exits`
"""

from ..exits import EXIT_FAILURE, EXIT_INFEASIBLE, EXIT_USAGE
from .commands import app
from .inputs import register_stats_loader

__all__ = ["app", "register_stats_loader", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INFEASIBLE"]
