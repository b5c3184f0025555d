"""One way to turn a Redis URL into a redis-py asyncio client: the CLI, the operator and the
sidecar all call :func:`connect`.

URLs understood (what the Helm chart writes into the ``url`` key of the Redis Secret):

``redis://[[user]:password@]host[:6379][/db]`` and ``rediss://...`` (TLS)
    one Redis (a primary, or a proxy in front of one); with ``cluster=True``, any node of a
    Redis Cluster (redis-py discovers the others).
``redis+sentinel://[[user]:password@]host1[:26379],host2[:26379]/<master>[/<db>]``
    Redis Sentinel: the client asks the Sentinels for the current primary of ``<master>`` and
    follows failovers. ``rediss+sentinel://`` uses TLS towards the Sentinels and the primary.
    The credentials are the primary's (Sentinels usually take none); Sentinels that require
    authentication take ``?sentinel_username=...&sentinel_password=...``.
``unix:///path/to/redis.sock[?db=N]``
    a local socket (redis-py's own parsing).

Credentials are percent-decoded. :func:`parse_redis_url` does the parsing alone (no I/O) and
raises ``ValueError`` with a message that never contains the password.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio
import redis.asyncio.cluster
from redis.asyncio.sentinel import Sentinel

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
PLAIN_SCHEMES = ("redis", "rediss")
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    ssl: bool = False


def is_sentinel_url(url: str) -> bool:
    return urlsplit(url).scheme in SENTINEL_SCHEMES


def is_plain_url(url: str) -> bool:
    """A single Redis over TCP with nothing but host, credentials and db: what the sidecar's
    pipelined :class:`~spendgate.script_channel.ScriptChannel` can talk to by itself."""
    parts = urlsplit(url)
    return parts.scheme in PLAIN_SCHEMES and not parts.query


def _host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):  # [::1]:26379
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, ""
    if not host:
        raise ValueError(f"a Sentinel address without a host: {text!r}")
    if port and not port.isdigit():
        raise ValueError(f"a Sentinel address with a bad port: {text!r}")
    number = int(port) if port else SENTINEL_PORT
    if not 0 < number < 65536:
        raise ValueError(f"a Sentinel address with a bad port: {text!r}")
    return host, number


def parse_sentinel_url(url: str) -> SentinelTarget:
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"not a Sentinel URL (scheme {parts.scheme!r})")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    if not hosts:
        raise ValueError("a Sentinel URL needs at least one host:port")
    sentinels = tuple(_host_port(h.strip()) for h in hosts.split(",") if h.strip())
    master, _, db = parts.path.strip("/").partition("/")
    if not master:
        raise ValueError("a Sentinel URL needs the master's name: redis+sentinel://HOSTS/<master>")
    if db and not db.isdigit():
        raise ValueError(f"the database must be a number, got {db!r}")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(query) - {"sentinel_username", "sentinel_password"}
    if unknown:
        raise ValueError(f"unknown Sentinel URL options: {', '.join(sorted(unknown))}")
    return SentinelTarget(
        sentinels=sentinels,
        master=unquote(master),
        db=int(db or 0),
        username=username,
        password=password,
        sentinel_username=query.get("sentinel_username") or None,
        sentinel_password=query.get("sentinel_password") or None,
        ssl=parts.scheme == "rediss+sentinel",
    )


def parse_redis_url(url: str, *, cluster: bool = False) -> SentinelTarget | str:
    """The Sentinel target of a Sentinel URL, else the URL itself once its scheme is checked."""
    scheme = urlsplit(url).scheme
    if scheme in SENTINEL_SCHEMES:
        if cluster:
            raise ValueError("a Sentinel URL cannot be used with Redis Cluster")
        return parse_sentinel_url(url)
    if scheme not in (*PLAIN_SCHEMES, "unix"):
        allowed = ", ".join(f"{s}://" for s in (*PLAIN_SCHEMES, *SENTINEL_SCHEMES, "unix"))
        raise ValueError(f"unsupported scheme {scheme!r}: expected one of {allowed}")
    if cluster and scheme == "unix":
        raise ValueError("Redis Cluster needs a redis:// or rediss:// URL")
    return url


class SentinelRedis(redis.asyncio.Redis):
    """The primary's client; closing it also closes the connections to the Sentinels."""

    sentinel: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel is not None:
            sentinel, self.sentinel = self.sentinel, None
            await sentinel.aclose()


def connect(
    url: str,
    *,
    cluster: bool = False,
    timeout_s: float | None = None,
    connect_timeout_s: float | None = None,
    **options: Any,
) -> Any:
    """A redis-py asyncio client for ``url`` (no I/O yet: the first command connects).

    ``timeout_s``/``connect_timeout_s`` become ``socket_timeout``/``socket_connect_timeout``
    (also towards the Sentinels); other ``options`` go to the client unchanged (``retry``,
    ``health_check_interval``, ``max_connections``, ``decode_responses``, ...). Options that
    Redis Cluster does not take (``health_check_interval``) are dropped for it;
    ``max_connections`` is per node there.
    """
    target = parse_redis_url(url, cluster=cluster)
    if timeout_s is not None:
        options["socket_timeout"] = timeout_s
    if connect_timeout_s is not None:
        options["socket_connect_timeout"] = connect_timeout_s
    if cluster:
        options.pop("health_check_interval", None)
        return redis.asyncio.cluster.RedisCluster.from_url(url, **options)
    if isinstance(target, str):
        return redis.asyncio.Redis.from_url(url, **options)
    sentinel_options: dict[str, Any] = {
        key: value for key, value in options.items() if key.startswith("socket_")
    }
    if target.ssl:
        sentinel_options["ssl"] = True
    if target.sentinel_password is not None:
        sentinel_options["password"] = target.sentinel_password
        if target.sentinel_username is not None:
            sentinel_options["username"] = target.sentinel_username
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_options)
    client: SentinelRedis = sentinel.master_for(
        target.master,
        redis_class=SentinelRedis,
        db=target.db,
        username=target.username,
        password=target.password,
        ssl=target.ssl,
        **options,
    )
    client.sentinel = sentinel
    return client


__all__ = [
    "SentinelRedis",
    "SentinelTarget",
    "connect",
    "is_plain_url",
    "is_sentinel_url",
    "parse_redis_url",
    "parse_sentinel_url",
]
