"""The pipelined script channel: ordering, reloads, timeouts, lost connections, AUTH/SELECT."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from spendgate.script_channel import ScriptChannel
from tests.support.redis_servers import RedisServer

ECHO = "return {KEYS[1], ARGV[1]}"
ECHO_SHA = hashlib.sha1(ECHO.encode()).hexdigest()


async def test_many_calls_in_flight_get_their_own_replies(redis_url: str) -> None:
    channel = ScriptChannel(redis_url)
    try:
        replies = await asyncio.gather(
            *(channel.evalsha(ECHO_SHA, ECHO, [f"k{i}"], [i]) for i in range(2000))
        )
        assert replies == [[f"k{i}".encode(), str(i).encode()] for i in range(2000)]
    finally:
        await channel.close()


async def test_calls_sent_together_leave_in_one_write(redis_url: str) -> None:
    channel = ScriptChannel(redis_url)
    try:
        await channel.evalsha(ECHO_SHA, ECHO, ["warm"], [0])
        protocol = channel._protocol
        assert protocol is not None and protocol.transport is not None
        writes: list[bytes] = []
        write = protocol.transport.write

        def counted(data: bytes) -> None:
            writes.append(bytes(data))
            write(data)

        protocol.transport.write = counted  # type: ignore[method-assign]
        replies = await asyncio.gather(
            *(channel.evalsha(ECHO_SHA, ECHO, [f"k{i}"], [i]) for i in range(100))
        )
        assert replies == [[f"k{i}".encode(), str(i).encode()] for i in range(100)]
        assert len(writes) == 1  # one syscall, one Redis wake-up, for all 100 calls
        assert writes[0].count(b"EVALSHA") == 100
    finally:
        await channel.close()


async def test_script_is_loaded_again_after_a_flush(redis_url: str) -> None:
    channel = ScriptChannel(redis_url)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert await channel.evalsha(ECHO_SHA, ECHO, ["a"], [1]) == [b"a", b"1"]
        await client.script_flush()
        assert await channel.evalsha(ECHO_SHA, ECHO, ["b"], [2]) == [b"b", b"2"]
    finally:
        await channel.close()
        await client.aclose()


async def test_script_errors_are_response_errors(redis_url: str) -> None:
    channel = ScriptChannel(redis_url)
    bad = "return redis.call('INCR', KEYS[1])"
    try:
        await channel.evalsha(hashlib.sha1(bad.encode()).hexdigest(), bad, ["s"], [])
        await redis.asyncio.Redis.from_url(redis_url).set("s", "text")
        with pytest.raises(ResponseError, match="not an integer"):
            await channel.evalsha(hashlib.sha1(bad.encode()).hexdigest(), bad, ["s"], [])
        assert await channel.evalsha(ECHO_SHA, ECHO, ["after"], [0]) == [b"after", b"0"]
    finally:
        await channel.close()


async def test_timeout_keeps_later_replies_aligned(fresh_redis_server: RedisServer) -> None:
    channel = ScriptChannel(fresh_redis_server.url, timeout_s=0.2)
    try:
        await channel.evalsha(ECHO_SHA, ECHO, ["warm"], [0])
        fresh_redis_server.freeze()
        with pytest.raises(RedisTimeoutError):
            await channel.evalsha(ECHO_SHA, ECHO, ["lost"], [1])
        fresh_redis_server.thaw()
        # The late reply to "lost" arrives first and must not be handed to this call.
        assert await channel.evalsha(ECHO_SHA, ECHO, ["next"], [2]) == [b"next", b"2"]
    finally:
        fresh_redis_server.thaw()
        await channel.close()


async def test_lost_connection_fails_fast_and_reconnects(fresh_redis_server: RedisServer) -> None:
    channel = ScriptChannel(fresh_redis_server.url, timeout_s=0.5)
    try:
        await channel.evalsha(ECHO_SHA, ECHO, ["a"], [1])
        fresh_redis_server.stop()
        with pytest.raises(RedisConnectionError):
            await channel.evalsha(ECHO_SHA, ECHO, ["b"], [2])
        fresh_redis_server.start()
        assert await channel.evalsha(ECHO_SHA, ECHO, ["c"], [3]) == [b"c", b"3"]
    finally:
        await channel.close()


async def test_password_and_database_from_the_url(fresh_redis_server: RedisServer) -> None:
    server = fresh_redis_server
    server.client().config_set("requirepass", "s3cret-pass")
    try:
        url = f"redis://:s3cret-pass@127.0.0.1:{server.port}/3"
        channel = ScriptChannel(url)
        await channel.evalsha(
            hashlib.sha1(b"return redis.call('SET', KEYS[1], ARGV[1])").hexdigest(),
            "return redis.call('SET', KEYS[1], ARGV[1])",
            ["where"],
            ["db3"],
        )
        await channel.close()
        check = redis.asyncio.Redis.from_url(url)
        assert await check.get("where") == b"db3"
        await check.aclose()
        with pytest.raises(ResponseError):
            wrong = ScriptChannel(f"redis://:wrong@127.0.0.1:{server.port}/0")
            await wrong.evalsha(ECHO_SHA, ECHO, ["x"], [1])
    finally:
        server.stop()  # its password would stop the fixture's own checks
