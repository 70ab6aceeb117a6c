"""`ServeConfig`: the file `expertmesh serve --config` reads, the engine's settings plus a `server:` section.

    group: {model: /models/Mixtral-8x7B, workers: 2, device: cuda}    # EngineConfig (replicas, queue, ...)
    replicas: 1
    stats: {redis_url: redis://redis:6379/0}
    server: {address: 0.0.0.0, port: 50051, token: s3cret}           # ServerConfig

`ServeConfig.json_schema()` validates the file (and the Helm chart's serving values).
"""

from __future__ import annotations

from .config import EngineConfig
from .server_config import ServerConfig

__all__ = ["ServeConfig"]


class ServeConfig(EngineConfig):
    server: ServerConfig = ServerConfig()
    """The gRPC server in front of the engine."""

    @property
    def engine(self) -> EngineConfig:
        """The engine's part alone."""
        return EngineConfig.from_dict({k: v for k, v in self.to_dict().items() if k != "server"}, "engine")
