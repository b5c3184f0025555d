"""A pipelined connection that runs the ledger scripts on the sidecar's hot path.

redis-py's async client spends most of a request's Redis time in Python (pool checkout,
retries, packing). Every ledger call is a single EVALSHA, so the sidecar sends them down one
connection, many in flight at once, packed and parsed by hiredis, and matches replies to
callers in order. On Redis Cluster, :class:`ClusterScriptChannel` keeps one such connection
per primary and sends each call to the node that owns its key's slot. Anything else
(configuration, pub/sub) stays on redis-py.

Errors are redis-py's exception types, so callers handle both transports alike. A call that
times out leaves its place in the queue; its late reply is read and dropped, keeping the
replies of later calls aligned.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any
from urllib.parse import quote, unquote, urlparse

import hiredis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.closed = asyncio.Event()
        self.outgoing: list[bytes] = []  # commands sent in this turn of the event loop

    def send(self, command: bytes) -> None:
        """Queue ``command``; every command queued in one turn of the event loop goes out in
        one write, so many calls in flight cost Redis one wake-up instead of one each."""
        if self.transport is None or self.transport.is_closing():
            return
        if not self.outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self.outgoing.append(command)

    def _flush(self) -> None:
        outgoing, self.outgoing = self.outgoing, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(outgoing))

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

    async def execute(self, *command: Any) -> Any:
        """Any one command (used for cluster discovery)."""
        return await self._send(await self._connection(), command)

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


class ClusterRedirect(ResponseError):
    """The slot is being migrated (ASK): the caller runs this one call over redis-py."""


class ClusterScriptChannel:
    """EVALSHA over one pipelined connection per Redis Cluster primary.

    Every ledger script touches the keys of one customer, which share a hash tag and so one
    slot: the call goes to the primary serving that slot (from ``CLUSTER SLOTS``). A ``MOVED``
    reply or a lost connection (failover) reloads the slot map and retries once: the scripts
    are idempotent. ``ASK`` (a slot in migration) raises :class:`ClusterRedirect`.
    """

    def __init__(self, url: str, *, timeout_s: float = 0.5) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss"):
            raise ValueError(f"unsupported Redis URL scheme {parsed.scheme!r}")
        self.scheme = parsed.scheme
        self.userinfo = parsed.netloc.rpartition("@")[0]
        self.seeds = [(parsed.hostname or "127.0.0.1", parsed.port or 6379)]
        self.timeout_s = timeout_s
        self._nodes: dict[tuple[str, int], ScriptChannel] = {}
        self._slots: list[tuple[str, int] | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._refreshing: asyncio.Lock | None = None
        self._loaded = False
        self._generation = 0

    def _node(self, address: tuple[str, int]) -> ScriptChannel:
        channel = self._nodes.get(address)
        if channel is None:
            host = f"[{address[0]}]" if ":" in address[0] else address[0]
            auth = f"{self.userinfo}@" if self.userinfo else ""
            url = f"{self.scheme}://{auth}{quote(host, safe='[]:')}:{address[1]}/0"
            channel = self._nodes[address] = ScriptChannel(url, timeout_s=self.timeout_s)
        return channel

    async def refresh(self) -> None:
        """Reload the slot map from any reachable node (once for all concurrent callers)."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        generation = self._generation
        async with self._refreshing:
            if self._generation != generation:
                return  # reloaded while this caller waited
            candidates = [*self._nodes, *self.seeds]
            last: Exception | None = None
            for address in dict.fromkeys(candidates):
                try:
                    reply = await self._node(address).execute("CLUSTER", "SLOTS")
                except (RedisConnectionError, RedisTimeoutError, ResponseError) as error:
                    last = error
                    continue
                slots: list[tuple[str, int] | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
                for start, end, primary, *_ in reply:
                    host = primary[0].decode() if isinstance(primary[0], bytes) else primary[0]
                    target = (host or address[0], int(primary[1]))
                    for slot in range(int(start), int(end) + 1):
                        slots[slot] = target
                self._slots, self._loaded = slots, True
                self._generation += 1
                return
            raise RedisConnectionError(f"no Redis Cluster node answered CLUSTER SLOTS: {last!r}")

    async def evalsha(self, sha: str, script: str, keys: list[str], args: list[Any]) -> Any:
        if not self._loaded:
            await self.refresh()
        slot = key_slot(keys[0].encode())
        for attempt in range(2):
            address = self._slots[slot]
            if address is None:
                raise RedisConnectionError(f"slot {slot} is not served by any node")
            try:
                return await self._node(address).evalsha(sha, script, keys, args)
            except RedisConnectionError:
                if attempt:
                    raise
            except ResponseError as error:
                message = str(error)
                if message.startswith("ASK "):
                    raise ClusterRedirect(message) from None
                if not message.startswith("MOVED ") or attempt:
                    raise
            await self.refresh()
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for channel in self._nodes.values():
            await channel.close()
        self._nodes.clear()
