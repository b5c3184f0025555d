"""One asyncio.Lock per customer id: two budgets claiming one customer never race."""

from __future__ import annotations

import asyncio


class KeyedLocks:
    """One asyncio.Lock per key (customer id): two budgets claiming one customer never race."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def __call__(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def forget(self, key: str) -> None:
        lock = self._locks.get(key)
        if lock is not None and not lock.locked():
            del self._locks[key]


__all__ = ["KeyedLocks"]
