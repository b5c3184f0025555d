"""Settling an admitted request: price how it ended, then charge it off the response's path.

:meth:`Settlement.finish` prices the outcome and starts the settle in a background task (the
app drains them on shutdown); a settle Redis cannot take now is kept for reconciliation.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from redis.exceptions import RedisError

from spendgate.backpressure import LocalExhaustion
from spendgate.ledger import Ledger, TreeMoving, Usage
from spendgate.models import UsageHeaders

from .billing import Metered, measure, price_outcome
from .config_cache import ConfigCache
from .expression_pricing import report_cost_error
from .front import context
from .metering import ResponseTap
from .metrics import SidecarMetrics
from .reconcile import PendingCharge, PendingCharges
from .settings import SidecarSettings

log = logging.getLogger("spendgate.sidecar")


class Settlement:
    def __init__(
        self,
        settings: SidecarSettings,
        ledger: Ledger,
        config: ConfigCache,
        metrics: SidecarMetrics,
        pending: PendingCharges,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.config = config
        self.metrics = metrics
        self.pending = pending
        self.background: set[asyncio.Task[None]] = set()

    def finish(
        self,
        metered: Metered,
        upstream: aiohttp.ClientResponse | None,
        tap: ResponseTap | None,
        *,
        outcome: str,
    ) -> int:
        """Price how the request ended and settle it in the background; returns the cost."""
        headers = upstream.headers if upstream is not None else None
        measured = measure(metered, headers, tap, self._usage_headers())
        status = upstream.status if upstream is not None else 0
        cost, usage = price_outcome(
            metered, measured, tap, outcome, self.settings.pod, status=status, headers=headers
        )
        report_cost_error(
            metered.form, self.metrics,
            customer=metered.owner.customer_id, request_id=metered.request_id,
        )  # fmt: skip
        context.current().outcome, context.current().cost = outcome, cost
        context.current().upstream_ms = metered.elapsed_ms() if metered.upstream_started else None
        if not metered.reserved:  # served fail-open: journaled now, settled by reconciliation
            self.pending.add(
                PendingCharge(
                    metered.owner.customer_id, metered.request_id, cost,
                    metered.owner.key_name, usage, unreserved=True,
                )
            )  # fmt: skip
            if cost > 0:
                self.metrics.settlements.labels("deferred").inc()
            return cost
        task = asyncio.create_task(self._settle(metered, cost, usage))
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return cost

    def _usage_headers(self) -> UsageHeaders:
        pricebook = self.config.pricebook
        return pricebook.usage_headers if pricebook else UsageHeaders()

    async def _settle(self, metered: Metered, cost: int, usage: Usage) -> None:
        customer = metered.owner.customer_id
        try:
            if cost == 0 and metered.reserved:
                await self.ledger.release(customer, metered.request_id)
                self.metrics.settlements.labels("released").inc()
                self.pending.settled(customer, metered.request_id)
                return
            if cost == 0:
                return
            settled = await self.ledger.settle(
                customer, metered.request_id, cost, key_id=metered.owner.key_name, usage=usage
            )
            self.metrics.settlements.labels("settled").inc()
            self.pending.settled(customer, metered.request_id)
            self.metrics.spend.labels(metered.currency).inc(settled.charged)
            if settled.absorbed:
                self.metrics.absorbed.labels(metered.currency, metered.rule.name).inc(
                    settled.absorbed
                )
                log.error(
                    "cost above the hold absorbed",
                    extra={"customer": customer, "request_id": metered.request_id,
                           "rule": metered.rule.name, "cost": cost, "hold": metered.hold,
                           "absorbed": settled.absorbed},
                )  # fmt: skip
        except (RedisError, OSError, TimeoutError, LocalExhaustion, TreeMoving) as error:
            self.metrics.redis_errors.labels("settle").inc()
            log.warning(
                "settle deferred",
                extra={"customer": customer, "request_id": metered.request_id,
                       "error": repr(error)},
            )  # fmt: skip
            if cost > 0:
                self.pending.add(
                    PendingCharge(customer, metered.request_id, cost, metered.owner.key_name, usage)
                )
                self.metrics.settlements.labels("deferred").inc()
