"""The real-Redis fixtures themselves: single server, restart on the same port, cluster."""

from __future__ import annotations

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
from redis.exceptions import RedisClusterException

from tests.support.redis_servers import RedisBinaryMissing, RedisCluster, RedisServer, RedisTarget

TWO_KEY_SCRIPT = """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('INCRBY', KEYS[2], ARGV[2])
return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2])}
"""


async def test_single_ping(redis_client: redis.asyncio.Redis) -> None:
    assert await redis_client.ping() is True
    await redis_client.set("k", b"\x00\xff")
    assert await redis_client.get("k") == b"\x00\xff"  # decode_responses=False


@pytest.mark.parametrize("run", [1, 2])
def test_redis_url_starts_empty(redis_url: str, run: int) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0  # whichever run goes second sees the first's key flushed
        client.set(f"leftover-{run}", 1)


def test_stop_start_same_port(fresh_redis_server: RedisServer) -> None:
    server = fresh_redis_server
    port, url = server.port, server.url
    with server.client(socket_timeout=1, socket_connect_timeout=1) as client:
        client.set("k", "v")
        server.stop()
        assert not server.is_running()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.start()
        assert (server.port, server.url) == (port, url)
        assert client.ping() is True  # redis-py reconnects
        assert client.get("k") is None  # no persistence: it came back empty


def test_freeze_thaw(fresh_redis_server: RedisServer) -> None:
    with fresh_redis_server.client(socket_timeout=0.2) as client:
        client.ping()
        fresh_redis_server.freeze()
        try:
            with pytest.raises(redis.TimeoutError):
                client.ping()
        finally:
            fresh_redis_server.thaw()
        assert client.ping() is True


def test_missing_binary_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPENDGATE_REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(RedisBinaryMissing, match="make test"):
        RedisServer()


@pytest.mark.cluster
async def test_cluster_hash_tags_spread_over_nodes(
    redis_cluster: RedisCluster, redis_cluster_url: str
) -> None:
    rc = redis.asyncio.cluster.RedisCluster.from_url(redis_cluster_url)
    try:
        for i in range(12):
            await rc.set(f"sg:{{cust{i}}}:balance", i)
        assert len(rc.get_primaries()) == 3
    finally:
        await rc.aclose()
    per_node = []
    for node in redis_cluster.nodes:
        with node.client() as c:
            per_node.append(c.dbsize())
    assert sum(per_node) == 12
    assert all(n > 0 for n in per_node), per_node  # different tags, different masters


@pytest.mark.cluster
async def test_cluster_eval_same_hash_tag(redis_cluster_url: str) -> None:
    rc = redis.asyncio.cluster.RedisCluster.from_url(redis_cluster_url)
    try:
        keys = ["sg:{acme}:a", "sg:{acme}:b"]
        assert await rc.eval(TWO_KEY_SCRIPT, 2, *keys, "x", 5) == [b"x", b"5"]
        assert await rc.eval(TWO_KEY_SCRIPT, 2, *keys, "y", 5) == [b"y", b"10"]
        with pytest.raises(RedisClusterException):  # different tags: refused client-side
            await rc.eval(TWO_KEY_SCRIPT, 2, "sg:{acme}:a", "sg:{globex}:b", "z", 1)
    finally:
        await rc.aclose()


@pytest.mark.cluster
def test_cluster_flushed_per_test(redis_cluster: RedisCluster, redis_cluster_url: str) -> None:
    for node in redis_cluster.nodes:
        with node.client() as c:
            assert c.dbsize() == 0
    assert redis_cluster.url == redis_cluster_url
    assert len(redis_cluster.startup_nodes) == 3


async def test_ledger_redis_both_kinds(
    ledger_redis: redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster,
    ledger_redis_target: RedisTarget,
) -> None:
    is_cluster = isinstance(ledger_redis, redis.asyncio.cluster.RedisCluster)
    assert is_cluster == ledger_redis_target.cluster
    assert await ledger_redis.eval(TWO_KEY_SCRIPT, 2, "sg:{c1}:x", "sg:{c1}:y", "v", 3) == [
        b"v",
        b"3",
    ]
