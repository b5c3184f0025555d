"""Budget trees: where a budget sits (its ancestors), read from Redis and cached.

A budget with a parent keeps its keys under its root's hash tag (``spendgate.keys``), so the
ledger must know a budget's ancestors before it can name its keys. They are recorded in
``sg:tree`` by ``ConfigStore`` before the budget is configured. A budget can move
(``spendgate.tree_moves``), so the cache is only a guess: every script checks that the levels
it was given are the budget's current place (each level's ``cfg.parent`` names the next, none
is fenced by a move) and answers ``moved`` otherwise; the ledger then reads ``sg:tree`` again
and retries. A move also publishes ``customer:<id>`` on ``sg:config`` for every budget it
moved, and the sidecar forgets them (``forget``). A budget not found (single, a root, or not
applied yet) is cached briefly: a request against a budget applied since then finds no
configuration at the old place and looks again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .keys import TREE, CustomerKeys, decode_ancestors, for_customer

NOT_IN_A_TREE_TTL_S = 1.0


class TreeIndex:
    def __init__(self, redis: Any, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self._monotonic = monotonic
        self._known: dict[str, tuple[str, ...]] = {}
        self._single: dict[str, float] = {}  # customerId -> when it was found in no tree
        self._reading: dict[str, asyncio.Future[tuple[str, ...]]] = {}  # one read at a time

    def cached(self, customer_id: str) -> tuple[str, ...] | None:
        known = self._known.get(customer_id)
        if known is not None:
            return known
        seen = self._single.get(customer_id)
        if seen is not None and self._monotonic() - seen < NOT_IN_A_TREE_TTL_S:
            return ()
        return None

    async def ancestors(self, customer_id: str, *, fresh: bool = False) -> tuple[str, ...]:
        """Parent first, root last; ``()`` for a budget without a parent."""
        if not fresh:
            cached = self.cached(customer_id)
            if cached is not None:
                return cached
        reading = self._reading.get(customer_id)
        if reading is not None:  # concurrent requests of one customer share one read
            return await asyncio.shield(reading)
        future: asyncio.Future[tuple[str, ...]] = asyncio.get_running_loop().create_future()
        self._reading[customer_id] = future
        try:
            found = decode_ancestors(await self.redis.hget(TREE, customer_id))
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: the waiting callers (if any) raise it themselves
            raise
        finally:
            self._reading.pop(customer_id, None)
        future.set_result(found)
        self._remember(customer_id, found)
        return found

    async def prime(self, customer_ids: Sequence[str]) -> None:
        """Read where each of ``customer_ids`` sits in one round trip, for a pass over many
        budgets (the hold sweep) that would otherwise read them one by one."""
        if not customer_ids:
            return
        for customer_id, raw in zip(
            customer_ids, await self.redis.hmget(TREE, list(customer_ids)), strict=True
        ):
            self._remember(customer_id, decode_ancestors(raw))

    async def keys_of_many(self, customer_ids: Iterable[str]) -> dict[str, CustomerKeys]:
        """Each budget's keys where it sits, the ones not cached read in one round trip."""
        wanted = set(customer_ids)
        await self.prime(sorted(c for c in wanted if self.cached(c) is None))
        return {c: for_customer(c, self.cached(c) or ()) for c in wanted}

    def _remember(self, customer_id: str, found: tuple[str, ...]) -> None:
        if found:
            self._known[customer_id] = found
            self._single.pop(customer_id, None)
        else:
            self._known.pop(customer_id, None)  # it left its tree (became a root)
            self._single[customer_id] = self._monotonic()

    def forget(self, customer_id: str) -> None:
        """Drop what is cached of a budget (it moved): the next call reads ``sg:tree``."""
        self._known.pop(customer_id, None)
        self._single.pop(customer_id, None)

    def path(self, customer_id: str) -> tuple[str, ...]:
        """The budget and its ancestors as last read (for naming a refusing level)."""
        return (customer_id, *(self.cached(customer_id) or ()))


async def tree_keys(redis: Any, customer_id: str) -> CustomerKeys:
    """A budget's keys wherever it sits in its tree, read now (for readers off the hot path:
    the audit, the ledger CLI)."""
    return for_customer(customer_id, decode_ancestors(await redis.hget(TREE, customer_id)))
