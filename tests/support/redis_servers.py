"""Real Redis processes for tests: a single server and a 3-master Redis Cluster.

The processes themselves are started by :mod:`spendgate.local_redis` (shared with
``make bench``): ``redis-server`` on free loopback ports in temporary directories, without
persistence, killed afterwards.

Fixtures (re-exported by ``tests/conftest.py``):

- ``redis_server`` (session): a :class:`RedisServer` shared by the whole run.
- ``redis_url`` (function): ``redis_server``'s URL, FLUSHALLed before the test.
- ``fresh_redis_server`` (function): a private :class:`RedisServer` the test may
  ``stop()``/``start()`` (same port) or ``freeze()``/``thaw()``.
- ``redis_cluster`` (session): a :class:`RedisCluster` of 3 masters, no replicas.
- ``redis_cluster_url`` (function): the first node's URL, all masters FLUSHALLed.
- ``redis_client`` (async, function): ``redis.asyncio.Redis`` on ``redis_url``.
- ``ledger_redis_target`` (function, params single/cluster): a :class:`RedisTarget`.
- ``ledger_redis`` (async, function, params single/cluster): ``redis.asyncio.Redis`` or
  ``redis.asyncio.cluster.RedisCluster`` -- the ledger suite runs against both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Literal, TypeVar

import pytest
import pytest_asyncio
import redis.asyncio
import redis.asyncio.cluster

from spendgate.local_processes import HOST, LIBC, die_with_parent, free_ports
from spendgate.local_redis import RedisBinaryMissing, RedisCluster, RedisServer
from spendgate.script_channel import ClusterScriptChannel, ScriptChannel

# Older names, still imported by tests and fakes.
_free_ports = free_ports
_die_with_parent = die_with_parent
_libc = LIBC

__all__ = [
    "HOST",
    "RedisBinaryMissing",
    "RedisCluster",
    "RedisServer",
    "RedisTarget",
]


@dataclass(frozen=True)
class RedisTarget:
    """Where a parametrized test's Redis lives: a single server or a cluster.

    ``pipelined`` is a single server whose ledger scripts run over the sidecar's pipelined
    ``ScriptChannel`` instead of redis-py.
    """

    kind: Literal["single", "pipelined", "cluster", "cluster_pipelined"]
    url: str

    def script_channel(
        self, timeout_s: float | None = None
    ) -> ScriptChannel | ClusterScriptChannel | None:
        options = {} if timeout_s is None else {"timeout_s": timeout_s}
        if self.kind == "pipelined":
            return ScriptChannel(self.url, **options)
        if self.kind == "cluster_pipelined":
            return ClusterScriptChannel(self.url, **options)
        return None

    @property
    def cluster(self) -> bool:
        return self.kind in ("cluster", "cluster_pipelined")

    def async_client(self) -> redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster:
        if self.cluster:
            return redis.asyncio.cluster.RedisCluster.from_url(self.url)
        return redis.asyncio.Redis.from_url(self.url)


# --------------------------------------------------------------------------- fixtures


_T = TypeVar("_T", RedisServer, RedisCluster)


def _started(factory: type[_T]) -> _T:
    try:
        obj = factory()
    except RedisBinaryMissing as e:
        pytest.fail(str(e), pytrace=False)
    obj.start()
    return obj


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = _started(RedisServer)
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if not redis_server.is_running():  # a test killed the shared server: revive it
        redis_server.start()
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
def fresh_redis_server() -> Iterator[RedisServer]:
    server = _started(RedisServer)
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    cluster = _started(RedisCluster)
    yield cluster
    cluster.close()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisCluster) -> str:
    redis_cluster.flushall()
    return redis_cluster.url


@pytest_asyncio.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=False)
    yield client
    await client.aclose()


@pytest.fixture(
    params=[
        "single",
        "pipelined",
        pytest.param("cluster", marks=pytest.mark.cluster),
        pytest.param("cluster_pipelined", marks=pytest.mark.cluster),
    ]
)
def ledger_redis_target(request: pytest.FixtureRequest) -> RedisTarget:
    # Resolved lazily so that `-m "not cluster"` never starts the cluster.
    if request.param in ("cluster", "cluster_pipelined"):
        return RedisTarget(request.param, request.getfixturevalue("redis_cluster_url"))
    return RedisTarget(request.param, request.getfixturevalue("redis_url"))


@pytest_asyncio.fixture
async def ledger_redis(
    ledger_redis_target: RedisTarget,
) -> AsyncIterator[redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster]:
    client = ledger_redis_target.async_client()
    yield client
    await client.aclose()
