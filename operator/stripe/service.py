"""Wiring in one place: what the operator's main starts for Stripe.

::

    from spendgate.operator.stripe.service import StripeIntegration
    from spendgate.operator.stripe.settings import StripeSettings

    stripe_io = await StripeIntegration.create(
        redis, ledger, StripeSettings.from_env(), reader=read_secret,
        consumer=pod_name, on_event=emit_event)      # emit_event(customerId, reason, msg, warning)
    await stripe_io.start_webhook()                  # every replica: port settings.webhook_port
    ...
    await stripe_io.run_leader(stop)                 # leader only, until stop is set: event
                                                     # processor, grace timer, reconciliation,
                                                     # usage export
    await stripe_io.close()

and, from the CustomerBudget handlers: ``await link_budget(redis, spec)`` after the budget
is configured (``mapping.link_budget``), ``await unlink_budget(redis, customer_id)`` when it is
deleted, and for status: ``await export_lag_seconds(redis, cid)``, ``await last_sync(redis,
cid)``; the suspension source ``payment-method`` means state ``PendingPaymentMethod``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from aiohttp import web

from spendgate.ledger import Ledger
from spendgate.loops import run_every

from .apply import Applier, OnEvent
from .client import SecretReader, StripeGateway, load_api_key, load_webhook_secrets
from .exporter import Exporter
from .reconcile import Reconciler
from .settings import StripeSettings
from .webhook import create_webhook_app, run_processor, start_webhook_server

log = logging.getLogger("spendgate.operator.stripe")

GRACE_TICK_S = 1.0


class StripeIntegration:
    def __init__(
        self,
        redis: Any,
        ledger: Ledger,
        settings: StripeSettings,
        gateway: StripeGateway,
        secrets: list[str],
        *,
        consumer: str,
        on_event: OnEvent | None = None,
    ) -> None:
        self.redis = redis
        self.ledger = ledger
        self.settings = settings
        self.gateway = gateway
        self.secrets = secrets
        self.consumer = consumer
        self.on_event = on_event
        self.applier = Applier(redis, ledger, settings, gateway=gateway, on_event=on_event)
        self.reconciler = Reconciler(
            redis, ledger, settings, gateway, applier=self.applier, on_event=on_event
        )
        self.exporter = Exporter(redis, settings, gateway, on_event=on_event)
        self._runner: web.AppRunner | None = None

    @classmethod
    async def create(
        cls,
        redis: Any,
        ledger: Ledger,
        settings: StripeSettings,
        *,
        reader: SecretReader | None = None,
        consumer: str,
        on_event: OnEvent | None = None,
    ) -> StripeIntegration:
        api_key = await load_api_key(settings, reader)
        secrets = await load_webhook_secrets(settings, reader)
        gateway = StripeGateway.create(api_key, settings)
        return cls(redis, ledger, settings, gateway, secrets, consumer=consumer, on_event=on_event)

    def set_webhook_secrets(self, secrets: list[str]) -> None:
        """Rotation: the receiver reads the list on every request."""
        self.secrets[:] = [s for s in secrets if s][:2]

    def webhook_app(self) -> web.Application:
        return create_webhook_app(self.redis, self.settings, lambda: self.secrets)

    async def start_webhook(self, sock: socket.socket | None = None) -> None:
        """Serve the receiver on ``sock`` if bound already, else on the configured port."""
        self._runner = await start_webhook_server(self.webhook_app(), self.settings, sock=sock)

    async def run_leader(self, stop: asyncio.Event) -> None:
        tasks = [
            asyncio.create_task(
                run_processor(
                    self.redis,
                    self.ledger,
                    self.settings,
                    consumer=self.consumer,
                    stop=stop,
                    gateway=self.gateway,
                    on_event=self.on_event,
                ),
                name="stripe-processor",
            ),
            asyncio.create_task(self._grace_timer(stop), name="stripe-grace"),
            asyncio.create_task(self.reconciler.run(stop), name="stripe-reconcile"),
            asyncio.create_task(self.exporter.run(stop), name="stripe-export"),
        ]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _grace_timer(self, stop: asyncio.Event) -> None:
        await run_every(
            stop,
            GRACE_TICK_S,
            self.applier.apply_due_grace,
            log=log,
            failed="stripe grace timer failed",
        )

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.gateway.close()
