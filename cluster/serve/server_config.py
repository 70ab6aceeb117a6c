"""`ServerConfig`: the gRPC server's settings, the `server:` section of `expertmesh serve --config`.

    server:
      address: 0.0.0.0          # 127.0.0.1 by default: reachable from this machine only
      port: 50051
      metrics_port: 9464        # Prometheus text at /metrics; null: no metrics port
      token: s3cret             # or EXPERTMESH_TOKEN; clients send "authorization: Bearer s3cret"
      tls: {cert: server.pem, key: server.key, client_ca: clients.pem}    # client_ca: mutual TLS
      max_message_bytes: 16777216
      grace_s: 30
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from expertmesh.schema import Config, ConfigError

__all__ = ["ServerConfig", "TlsConfig", "read_pem"]


class TlsConfig(Config):
    cert: str = Field(min_length=1)
    """PEM certificate chain of the server."""
    key: str = Field(min_length=1)
    """PEM private key of the certificate."""
    client_ca: str | None = None
    """PEM CA bundle; set: every client must present a certificate it signed (mutual TLS)."""


class ServerConfig(Config):
    address: str = Field("127.0.0.1", min_length=1)
    """Interface to listen on: 127.0.0.1 (this machine), 0.0.0.0 or [::] (every interface)."""
    port: int = Field(50051, ge=0, le=65535)
    """gRPC port; 0 picks a free one."""
    metrics_port: int | None = Field(9464, ge=0, le=65535)
    """Prometheus metrics at http://address:metrics_port/metrics; 0 picks a free one, null turns them off."""
    token: str | None = Field(None, min_length=1)
    """Bearer token every call but health and reflection must carry; null: no authentication."""
    tls: TlsConfig | None = None
    """Serve TLS instead of plaintext."""
    max_message_bytes: int = Field(16 * 2**20, ge=1024)
    """Largest message received or sent (a larger one ends the call RESOURCE_EXHAUSTED)."""
    max_concurrent_rpcs: int | None = Field(None, ge=1)
    """Calls in progress at once; beyond it new calls end RESOURCE_EXHAUSTED. null: the engine's queue decides."""
    grace_s: float = Field(30.0, ge=0)
    """On SIGTERM or Admin Drain: seconds running streams may take to finish while new ones are refused."""


def read_pem(field: str, path: str | None) -> bytes | None:
    """The bytes of a PEM file named by config field `field` (None stays None)."""
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path} ({exc.strerror})") from None
