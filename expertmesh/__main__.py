"""`python -m expertmesh` runs the CLI."""

from expertmesh.cli import main

main()
