"""Refused requests, counted in memory and added to Redis once a second (bounded).

A refusal must cost the hot path nothing: ``count`` is a dict update; the flusher writes all
counts of the last interval in one pipelined round trip (``spendgate.accounting.refusals``).
Memory is bounded by ``max_keys`` distinct (customer, hour, reason, key, model) entries; beyond
that new entries are dropped and counted in ``spendgate_refusal_counts_dropped``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from spendgate.accounting.refusals import RefusalKey, add_refusals, hour_of
from spendgate.budget_tree import TreeIndex

log = logging.getLogger("spendgate.sidecar.refusals")

MAX_MODEL_LENGTH = 128


class RefusalCounter:
    def __init__(
        self,
        redis: Any,
        *,
        interval_s: float = 1.0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.time,
        on_drop: Callable[[int], None] | None = None,
        tree: TreeIndex | None = None,
    ) -> None:
        self.redis = redis
        self.tree = tree if tree is not None else TreeIndex(redis)  # the ledger's, shared
        self.interval_s = interval_s
        self.max_keys = max_keys
        self.clock = clock
        self.on_drop = on_drop
        self._counts: Counter[RefusalKey] = Counter()
        self._task: asyncio.Task[None] | None = None

    def count(self, customer_id: str, key_name: str, reason: str, model: str) -> None:
        entry = RefusalKey(
            customer_id, hour_of(int(self.clock() * 1000)), reason, key_name,
            model[:MAX_MODEL_LENGTH].replace("\t", " "),
        )  # fmt: skip
        if entry not in self._counts and len(self._counts) >= self.max_keys:
            if self.on_drop is not None:
                self.on_drop(1)
            return
        self._counts[entry] += 1
        if self._task is None:
            with contextlib.suppress(RuntimeError):  # no running loop: flushed on stop
                self._task = asyncio.get_running_loop().create_task(self._run())

    async def flush(self) -> None:
        counts, self._counts = self._counts, Counter()
        if not counts:
            return
        try:
            await add_refusals(self.redis, counts, self.tree)
        except Exception as error:  # Redis down: keep them for the next flush, bounded
            log.debug("refusal counts deferred", extra={"error": repr(error)})
            for entry, number in counts.items():
                if entry in self._counts or len(self._counts) < self.max_keys:
                    self._counts[entry] += number

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 2.0)
