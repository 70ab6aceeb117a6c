"""Generated from protos/expertmesh/v1/*.proto by `make protos`; do not edit."""
