"""Local exhaustion on the money path: too many Redis calls in flight in this process.

It is backpressure, not an unreachable Redis: callers wait (up to the Redis timeout) for a
slot, and past that get :class:`LocalExhaustion`, which the sidecar answers with 503 and
``Retry-After``. It never counts as "billing store unavailable", so it never triggers
fail-open.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class LocalExhaustion(Exception):
    """No slot for a Redis call within the wait; deliberately not a ``RedisError``."""


class CallLimiter:
    """At most ``size`` calls at once; the rest wait up to ``wait_s`` for a slot."""

    def __init__(self, size: int, *, wait_s: float) -> None:
        if size <= 0:
            raise ValueError(f"the Redis pool size must be positive, got {size}")
        self.size = size
        self.wait_s = wait_s
        self._slots = asyncio.Semaphore(size)
        self.waiting = 0

    @property
    def in_use(self) -> int:
        return self.size - self._slots._value

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self.waiting += 1
        try:
            async with asyncio.timeout(self.wait_s):
                await self._slots.acquire()
        except TimeoutError:
            raise LocalExhaustion(f"all {self.size} Redis slots busy for {self.wait_s}s") from None
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()
