"""Where the statistics live: a Redis URL plus the model and run they belong to, and the errors for it.

    redis://[[user]:password@]host[:port][/db][?model=M&run=R&windows=N&cluster=1&...]
    rediss://...      the same over TLS (redis-py's ssl_* query options pass through, e.g. ssl_ca_certs)

`model`, `run`, `windows` and `cluster` are ours and are removed before the rest of the URL goes to
redis-py, whose options are checked when the URL is parsed (an unknown one is named then). Without a URL,
`EXPERTMESH_REDIS_URL` is used. Passwords never appear in messages (`masked`).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = [
    "ENV_URL",
    "StatsStoreError",
    "StatsUnavailableError",
    "StatsSchemaError",
    "StatsEndpointError",
    "StatsTarget",
    "parse_target",
    "masked",
    "check_name",
]

ENV_URL = "EXPERTMESH_REDIS_URL"
_NAME = re.compile(r"^[A-Za-z0-9._/\-]{1,200}$")
_OURS = ("model", "run", "windows", "cluster")
_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False, "": False}


class StatsStoreError(RuntimeError):
    """A statistics store operation failed; the message says what and where."""


class StatsUnavailableError(StatsStoreError):
    """Redis cannot be reached (refused, timed out, reset): it may be down or away for a while."""


class StatsEndpointError(StatsUnavailableError, ValueError):
    """The URL reaches a server that is not what it says: not Redis, no TLS for rediss://, not a Redis Cluster
    for ?cluster=1, credentials it refuses, a database it does not have.

    The URL is wrong rather than the server away: a ValueError too, so CLIs exit 2 (invalid input) for it.
    """


class StatsSchemaError(StatsStoreError):
    """Data under the prefix is not ours, is malformed, or has another shape than expected.

    A failure of the store's content, not of the caller's arguments: CLIs exit 1 for it, not 2 (usage).
    """


def masked(url: str) -> str:
    """The URL with its password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def check_name(field: str, value: str) -> str:
    """Model and run names go inside a Redis hash tag: no braces, no spaces, no colons' ambiguity."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{field}: expected 1-200 characters of letters, digits, '.', '_', '-', '/', got {value!r}")
    return value


@dataclass(frozen=True)
class StatsTarget:
    """A parsed stats URL: the redis-py URL (our options removed) and which statistics under it."""

    redis_url: str
    model: str | None = None
    run: str = "default"
    windows: int | None = None  # how many recent windows a snapshot reads (None: all kept)
    cluster: bool = False  # Redis Cluster: all keys of one model/run share a hash slot

    def with_overrides(self, model: str | None = None, run: str | None = None) -> StatsTarget:
        return replace(self, model=model or self.model, run=run or self.run)

    def require_model(self) -> str:
        if not self.model:
            raise ValueError(f"model: no model given for {masked(self.redis_url)}; pass --model M or add ?model=M")
        return self.model

    @property
    def display(self) -> str:
        return masked(self.redis_url)

    def connect(self, **options):
        """A redis-py client; `options` go to the client (timeouts, retry). Nothing is sent yet."""
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:
            raise StatsStoreError(
                f"the 'redis' package is needed for {self.display}: pip install 'expertmesh[stats]'"
            ) from exc

        # Our callers decide about retries (the recorder backs off and buffers); redis-py's own default
        # retries would block a serving loop for seconds while Redis is away.
        options.setdefault("retry", Retry(NoBackoff(), 0))
        options.setdefault("socket_connect_timeout", 2.0)
        options.setdefault("socket_timeout", 30.0)
        # Windows are megabytes: read the socket in 1 MiB chunks, not redis-py's 64 KiB (fewer copies).
        options.setdefault("socket_read_size", 2**20)
        if self.redis_url.startswith("rediss:") and not self.cluster and tls_refusal() is not None:
            options.setdefault("connection_class", tls_refusal()[0])
        try:
            if self.cluster:
                from redis.cluster import RedisCluster

                options.pop("health_check_interval", None)
                return RedisCluster.from_url(self.redis_url, **options)
            return redis.Redis.from_url(self.redis_url, **options)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"url: {self.display} is not a usable Redis URL ({exc})") from exc
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
            # RedisCluster contacts the cluster at construction (its exception is not a RedisError).
            if "cluster mode is not enabled" in str(exc).lower() or "cluster support disabled" in str(exc):
                raise StatsEndpointError(
                    f"url: {self.display} is a single Redis, not a Redis Cluster: remove ?cluster=1"
                ) from None
            raise StatsUnavailableError(f"cannot reach Redis Cluster at {self.display}: {exc}") from None


def parse_target(url: str | None = None) -> StatsTarget:
    """Parse a stats URL (or `EXPERTMESH_REDIS_URL` when `url` is None or empty)."""
    if not url:
        url = os.environ.get(ENV_URL, "")
        if not url:
            raise ValueError(f"url: no Redis URL given; pass --redis redis://host:port/db or set {ENV_URL}")
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"url: expected a redis:// or rediss:// URL, got {masked(url)!r}")
    if not parts.hostname:
        raise ValueError(f"url: no host in {masked(url)!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a non-numeric or out-of-range port
    except ValueError as exc:
        raise ValueError(f"url: bad port in {masked(url)!r} ({exc})") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"url: database must be a number (redis://host:port/0), got {path!r}")
    ours: dict[str, str] = {}
    rest: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in _OURS:
            ours[key] = value
        else:
            rest.append((key, value))
    model = check_name("model", ours["model"]) if ours.get("model") else None
    run = check_name("run", ours.get("run") or "default")
    windows = None
    if ours.get("windows"):
        if not ours["windows"].isdigit() or int(ours["windows"]) < 1:
            raise ValueError(f"windows: expected a positive integer, got {ours['windows']!r}")
        windows = int(ours["windows"])
    cluster = _FLAGS.get(ours.get("cluster", "").lower())
    if cluster is None:
        raise ValueError(f"cluster: expected 1/true/yes or 0/false/no, got {ours['cluster']!r}")
    if cluster and path not in ("", "0"):
        raise ValueError("url: Redis Cluster has only database 0")
    redis_url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest), ""))
    _check_redis_options(redis_url, masked(url))
    return StatsTarget(redis_url, model, run, windows, cluster)


def _check_redis_options(redis_url: str, shown: str) -> None:
    """redis-py's own query options: a wrong name or value is an error here, not a TypeError at the first
    command. Nothing is sent: a connection object connects on first use."""
    try:
        import redis
    except ImportError:
        return  # connect() names the package to install
    try:
        pool = redis.ConnectionPool.from_url(redis_url)
        pool.connection_class(**pool.connection_kwargs)
    except TypeError as exc:
        name = re.search(r"argument '(\w+)'", str(exc))
        raise ValueError(
            f"url: unknown query parameter {name.group(1) if name else str(exc)!r} in {shown}; expected "
            f"{', '.join(_OURS)} or a redis-py connection option (socket_timeout, ssl_ca_certs, ...)"
        ) from None
    except ValueError as exc:
        raise ValueError(f"url: {exc} ({shown})") from None


@functools.cache
def tls_refusal():
    """(connection class, its error) for rediss://: the TLS handshake runs under the connect timeout (redis-py
    gives it the read timeout: 30 s against a server without TLS), and a refusal says so. None where redis-py
    has no handshake hook to wrap (before 5.1)."""
    import ssl

    from redis.connection import SSLConnection
    from redis.exceptions import ConnectionError as RedisConnectionError

    if not hasattr(SSLConnection, "_wrap_socket_with_ssl"):
        return None

    class TLSRefusedError(RedisConnectionError):
        """The server at a rediss:// URL did not complete a TLS handshake, or its certificate is not trusted."""

    class TLSConnection(SSLConnection):
        def _wrap_socket_with_ssl(self, sock):
            sock.settimeout(self.socket_connect_timeout)
            try:
                tls = super()._wrap_socket_with_ssl(sock)
            except ssl.SSLCertVerificationError as exc:
                raise TLSRefusedError(
                    f"its certificate is not trusted ({exc.verify_message}): add ?ssl_ca_certs=/path/ca.pem, "
                    f"or ?ssl_cert_reqs=none to skip the check"
                ) from exc
            except (TimeoutError, ssl.SSLError, ConnectionError) as exc:
                why = (f"no TLS handshake within {self.socket_connect_timeout:g} s" if isinstance(exc, TimeoutError)
                       else f"{exc}")
                raise TLSRefusedError(f"TLS refused ({why}); for a server without TLS use redis://") from exc
            tls.settimeout(self.socket_timeout)
            return tls

    return TLSConnection, TLSRefusedError
