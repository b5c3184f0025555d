"""Charges that could not reach Redis yet, settled as soon as it is back.

They come from requests served in fail-open mode while Redis was down, and from settlements
that failed after the response was sent. ``settle`` charges even without a hold and is
idempotent by request id, so retrying is always safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass

from spendgate.ledger import Ledger, Usage

from .metrics import SidecarMetrics

log = logging.getLogger("spendgate.sidecar.reconcile")


@dataclass(frozen=True)
class PendingCharge:
    customer_id: str
    request_id: str
    cost: int
    key_id: str
    usage: Usage


class PendingCharges:
    def __init__(self, ledger: Ledger, metrics: SidecarMetrics, *, interval_s: float = 0.5):
        self.ledger = ledger
        self.metrics = metrics
        self.interval_s = interval_s
        self._charges: OrderedDict[str, PendingCharge] = OrderedDict()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._charges)

    def add(self, charge: PendingCharge) -> None:
        self._charges[f"{charge.customer_id}/{charge.request_id}"] = charge
        self.metrics.pending_settlements.set(len(self._charges))

    def local_spend(self, customer_id: str) -> int:
        return sum(c.cost for c in self._charges.values() if c.customer_id == customer_id)

    async def flush(self) -> int:
        """Settle what is pending, oldest first; stops at the first Redis failure."""
        settled = 0
        for name, charge in list(self._charges.items()):
            try:
                await self.ledger.settle(
                    charge.customer_id,
                    charge.request_id,
                    charge.cost,
                    key_id=charge.key_id,
                    usage=charge.usage,
                )
            except Exception as error:
                self.metrics.redis_errors.labels("reconcile").inc()
                log.debug("reconcile deferred", extra={"error": repr(error)})
                break
            del self._charges[name]
            settled += 1
        self.metrics.pending_settlements.set(len(self._charges))
        if settled:
            log.info(
                "reconciled charges", extra={"settled": settled, "pending": len(self._charges)}
            )
        return settled

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reconcile")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if self._charges:
                await self.flush()

    async def stop(self, timeout_s: float) -> None:
        """Stop the loop and try once more, for up to ``timeout_s``, to settle everything."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._charges:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flush(), timeout_s)
        if self._charges:
            log.error(
                "charges not settled at shutdown",
                extra={
                    "pending": len(self._charges),
                    "request_ids": [c.request_id for c in self._charges.values()][:50],
                },
            )
