"""A pipelined connection that runs the ledger scripts on the sidecar's hot path.

redis-py's async client spends most of a request's Redis time in Python (pool checkout,
retries, packing). Every ledger call is a single EVALSHA, so the sidecar sends them down one
connection, many in flight at once, packed and parsed by hiredis, and matches replies to
callers in order. Anything else (configuration, pub/sub, Redis Cluster) stays on redis-py.

Errors are redis-py's exception types, so callers handle both transports alike. A call that
times out leaves its place in the queue; its late reply is read and dropped, keeping the
replies of later calls aligned.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any
from urllib.parse import unquote, urlparse

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.closed = asyncio.Event()

    def send(self, command: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(command)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            future = self.pending.popleft()
            if future.done():
                continue  # the caller gave up (timeout); its reply is dropped
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(_error(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        error = RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}")
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(error)


def _error(message: str) -> ResponseError:
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)


class ScriptChannel:
    """EVALSHA over one pipelined connection to a single Redis (not Cluster)."""

    def __init__(self, url: str, *, timeout_s: float = 0.5) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss"):
            raise ValueError(f"unsupported Redis URL scheme {parsed.scheme!r}")
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 6379
        self.username = unquote(parsed.username) if parsed.username else None
        self.password = unquote(parsed.password) if parsed.password else None
        self.db = int(parsed.path.lstrip("/") or 0)
        self.tls = parsed.scheme == "rediss"
        self.timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and not protocol.closed.is_set():
            return protocol
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            protocol = self._protocol
            if protocol is not None and not protocol.closed.is_set():
                return protocol
            self._protocol = await self._connect()
            return self._protocol

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                _, protocol = await loop.create_connection(
                    _Protocol,
                    self.host,
                    self.port,
                    ssl=ssl.create_default_context() if self.tls else None,
                )
        except (OSError, TimeoutError) as error:
            raise RedisConnectionError(
                f"cannot connect to Redis at {self.host}:{self.port}: {error!r}"
            ) from None
        if self.password is not None:
            auth = (
                ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
            )
            await self._send(protocol, auth)
        if self.db:
            await self._send(protocol, ("SELECT", self.db))
        return protocol

    async def _send(self, protocol: _Protocol, command: tuple[Any, ...]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        protocol.pending.append(future)
        protocol.send(hiredis.pack_command(command))
        try:
            async with asyncio.timeout(self.timeout_s):
                return await future
        except TimeoutError:
            future.cancel()
            raise RedisTimeoutError(f"Redis did not answer within {self.timeout_s}s") from None

    async def evalsha(self, sha: str, script: str, keys: list[str], args: list[Any]) -> Any:
        protocol = await self._connection()
        command = ("EVALSHA", sha, len(keys), *keys, *args)
        try:
            return await self._send(protocol, command)
        except NoScriptError:
            await self._send(protocol, ("SCRIPT", "LOAD", script))
            return await self._send(protocol, command)

    async def close(self) -> None:
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
            await protocol.closed.wait()
        self._protocol = None
