"""The periodic sweep that releases expired holds of every customer, traffic or not.

``reserve`` releases a customer's expired holds on its next request; a quiet customer's holds
(left by a crashed or partitioned sidecar) would otherwise stay. Every sidecar runs the loop;
a short Redis lock lets one of them sweep per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from typing import Any

from spendgate import keys as rkeys
from spendgate.ledger import Ledger

log = logging.getLogger("spendgate.sidecar.sweep")

_BATCH = 500  # holds released per customer per script call


class HoldSweep:
    def __init__(self, redis: Any, ledger: Ledger, *, interval_ms: int) -> None:
        self.redis = redis
        self.ledger = ledger
        self.interval_ms = interval_ms
        self.owner = uuid.uuid4().hex
        self._task: asyncio.Task[None] | None = None

    async def sweep_once(self) -> int:
        """Release expired holds of every known customer; returns how many were released."""
        released = 0
        cursor: Any = 0
        while True:
            cursor, batch = await self.redis.hscan(rkeys.CUSTOMERS, cursor, count=200)
            customers = [raw.decode() if isinstance(raw, bytes) else str(raw) for raw in batch]
            await self.ledger.tree.prime(customers)
            for customer in customers:
                try:
                    while True:
                        count, left = await self.ledger.sweep(customer, _BATCH)
                        released += count
                        if not left or not count:
                            break
                except ValueError:
                    continue  # not a valid customer id: nothing of ours
            if not cursor or cursor == b"0":
                break
        if released:
            log.info("expired holds released", extra={"released": released})
        return released

    async def _locked_sweep(self) -> None:
        acquired = await self.redis.set(
            rkeys.SWEEP_LOCK, self.owner, nx=True, px=max(1, self.interval_ms - 100)
        )
        if acquired:
            await self.sweep_once()

    def start(self) -> None:
        if self.interval_ms > 0:
            self._task = asyncio.create_task(self._run(), name="hold-sweep")

    async def _run(self) -> None:
        while True:
            # Jitter spreads the sidecars; the lock lets one of them sweep per interval.
            await asyncio.sleep(self.interval_ms / 1000 * random.uniform(0.8, 1.2))
            try:
                await self._locked_sweep()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("hold sweep failed", extra={"error": repr(error)})

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
