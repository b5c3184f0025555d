"""Stripe inside the running operator: what ``main`` starts when ``settings.stripe`` is set.

- :class:`BudgetLinks` (the budgets' :class:`~..budgets.stripe_hooks.StripeHooks`): a
  reconciled budget is linked to its Stripe customer (``mapping.link_budget``), its status gets
  ``lastStripeSync``, ``exportLagSeconds`` and ``exchangeRate`` (custom units); a deleted
  budget's link is released only once its usage is exported (see :meth:`BudgetLinks.unlink`).
- :class:`StripeService`: on **every replica**, once kopf has logged in, reads the API key and
  signing secrets from Secrets in the operator's namespace (retrying every
  ``RETRY_CONFIG_S`` while they are missing, ``spendgate_stripe_configured`` 0 meanwhile) and
  serves the webhook receiver; the signing secrets are read again every ``SECRETS_REFRESH_S``
  (rotation). On the **leader** only (:meth:`StripeService.run_leader`, a leader task):
  ``StripeIntegration.run_leader`` (event processor, grace timer, reconciliation, usage export),
  the sweep that releases deleted budgets' links and, with ``import_enabled``, the import of
  marked Stripe customers as CustomerBudgets (:mod:`.budget_import`).
- :class:`BudgetEvents`: what Stripe did (``on_event``) becomes a Kubernetes Event on the
  budget, found by ``ConfigStore.owner_of``; the budget is also annotated so that its status is
  refreshed at once. Posting happens in the background: Stripe processing never waits on the
  Kubernetes API.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from spendgate.config_store import ConfigStore
from spendgate.loops import run_every
from spendgate.models import CustomerBudgetSpec

from ..kube.client import BUDGETS, GROUP, REFRESH_ANNOTATION, VERSION, KubeClient
from ..kube.retry import RetryableError
from . import metrics
from .budget_import import BudgetImport, TemplateFile, load_import_template
from .client import StripeNotConfigured, load_webhook_secrets
from .export_state import export_lag_seconds
from .links import (
    STRIPE_CUSTOMERS,
    StripeLinkConflict,
    current_exchange_rate,
    link_budget,
    load_link,
    unlink_budget,
)
from .links import stripe_key as stripe_link_key
from .reconcile import last_sync
from .service import StripeIntegration
from .settings import StripeSettings

log = logging.getLogger("spendgate.operator.stripe")

PENDING_UNLINKS = "sg:stripe:unlink"  # zset: customerId -> deletion time (ms)
UNLINK_GRACE_S = 300.0  # in-flight requests of a deleted budget settle within this
LAG_STEP_S = 30  # status.exportLagSeconds granularity: an idle refresh writes nothing
RETRY_CONFIG_S = 30.0
SECRETS_REFRESH_S = 60.0
MAX_PENDING_EVENTS = 200


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class BudgetLinks:
    """The budgets' Stripe hooks (Redis only; no Stripe API calls)."""

    def __init__(self, redis: Any, *, clock: Any = time.time) -> None:
        self.redis = redis
        self.clock = clock

    async def link(self, spec: CustomerBudgetSpec) -> str | None:
        try:
            await link_budget(self.redis, spec)
        except StripeLinkConflict as error:
            message = str(error)
            stripe_customer = spec.stripe.customer_id if spec.stripe is not None else ""
            holder = await self.redis.hget(STRIPE_CUSTOMERS, stripe_customer)
            if holder is not None and await self.redis.zscore(PENDING_UNLINKS, _text(holder)):
                message += (
                    f" (budget {_text(holder)!r} was deleted: its link is released once its"
                    " remaining usage is exported to Stripe)"
                )
            return message
        await self.redis.zrem(PENDING_UNLINKS, spec.customer_id)
        return None

    async def status(self, spec: CustomerBudgetSpec) -> dict[str, Any]:
        """Only for a budget linked to its Stripe customer (not one that lost a conflict)."""
        linked = await self.redis.hget(stripe_link_key(spec.customer_id), "customer")
        if spec.stripe is None or linked is None or _text(linked) != spec.stripe.customer_id:
            return {"lastStripeSync": None, "exportLagSeconds": None, "exchangeRate": None}
        synced = await last_sync(self.redis, spec.customer_id)
        lag = await export_lag_seconds(self.redis, spec.customer_id, self.clock())
        link = await load_link(self.redis, spec.customer_id)
        return {
            "lastStripeSync": _iso(synced) if synced is not None else None,
            "exportLagSeconds": int(lag // LAG_STEP_S) * LAG_STEP_S,
            "exchangeRate": current_exchange_rate(link) if link is not None else None,
        }

    async def unlink(self, customer_id: str) -> None:
        """Deleted: the link stays until the exporter sent what is left (it needs the link to
        know the Stripe customer), at least ``UNLINK_GRACE_S`` for requests still in flight."""
        if await self.redis.hget(stripe_link_key(customer_id), "customer") is None:
            return
        await self.redis.zadd(PENDING_UNLINKS, {customer_id: int(self.clock() * 1000)})

    async def sweep(self, store: ConfigStore) -> list[str]:
        """Release the links of deleted budgets whose usage is all exported (leader)."""
        horizon = (self.clock() - UNLINK_GRACE_S) * 1000
        released = []
        for raw in await self.redis.zrangebyscore(PENDING_UNLINKS, "-inf", horizon):
            customer = _text(raw)
            if await store.owner_of(customer) is None:
                if await export_lag_seconds(self.redis, customer, self.clock()) > 0:
                    continue
                await unlink_budget(self.redis, customer)
                released.append(customer)
            await self.redis.zrem(PENDING_UNLINKS, customer)
        if released:
            log.info("released the Stripe links of deleted budgets", extra={"customers": released})
        return released


class BudgetEvents:
    """``on_event(customer_id, reason, message, warning)`` -> an Event on the budget."""

    def __init__(self, store: ConfigStore, kube: KubeClient, *, instance: str = "") -> None:
        self.store = store
        self.kube = kube
        self.instance = instance
        self._pending: set[asyncio.Task[None]] = set()

    def __call__(self, customer_id: str, reason: str, message: str, warning: bool) -> None:
        if len(self._pending) >= MAX_PENDING_EVENTS:
            log.warning(
                "too many Events waiting for the API; dropped one",
                extra={"customer": customer_id, "reason": reason},
            )
            metrics.STRIPE_EVENTS_POSTED.labels("failed").inc()
            return
        task = asyncio.create_task(self.post(customer_id, reason, message, warning))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def post(self, customer_id: str, reason: str, message: str, warning: bool) -> bool:
        try:
            owner = await self.store.owner_of(customer_id)
            if owner is None:
                metrics.STRIPE_EVENTS_POSTED.labels("no_budget").inc()
                log.info(
                    "Stripe event for a customer without a budget",
                    extra={"customer": customer_id, "reason": reason},
                )
                return False
            namespace, _, name = owner.partition("/")
            cause = f"stripe:{reason}@{time.time():.3f}"
            budget = await self.kube.annotate(BUDGETS, namespace, name, {REFRESH_ANNOTATION: cause})
            if budget is None:
                metrics.STRIPE_EVENTS_POSTED.labels("no_budget").inc()
                return False
            involved = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "CustomerBudget",
                "namespace": namespace,
                "name": name,
                "uid": (budget.get("metadata") or {}).get("uid"),
            }
            await self.kube.create_event(
                involved,
                type="Warning" if warning else "Normal",
                reason=reason,
                message=message,
                action="StripeSync",
                instance=self.instance,
            )
        except Exception as error:
            metrics.STRIPE_EVENTS_POSTED.labels("failed").inc()
            log.warning(
                "could not post a Stripe Event on the budget",
                extra={"customer": customer_id, "reason": reason, "error": repr(error)},
            )
            return False
        metrics.STRIPE_EVENTS_POSTED.labels("posted").inc()
        return True

    async def drain(self, timeout_s: float = 5.0) -> None:
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=timeout_s)
        for task in list(self._pending):
            task.cancel()


class _MeteredIntegration(StripeIntegration):
    def webhook_app(self) -> web.Application:
        app = super().webhook_app()
        app.middlewares.append(metrics.count_stripe_webhooks)
        return app


class StripeService:
    """The Stripe integration's lifecycle in the operator (see the module's docstring)."""

    def __init__(
        self,
        settings: StripeSettings,
        *,
        store: ConfigStore,
        kube: KubeClient,
        namespace: str,
        identity: str,
        watched: tuple[str, ...] = (),
        template: TemplateFile | None = None,
        webhook_sock: socket.socket | None = None,
    ) -> None:
        """``watched``: the operator's namespaces (empty: all). With ``import_enabled`` the
        import template is loaded and validated here (``template``, if already loaded): an
        invalid one raises TemplateError before anything starts."""
        self.settings = settings
        self.store = store
        self.kube = kube
        self.webhook_sock = webhook_sock  # bound by the operator before it started
        self.namespace = namespace
        self.identity = identity
        self.links = BudgetLinks(store.redis)
        self.events = BudgetEvents(store, kube, instance=identity)
        self.importer: BudgetImport | None = None
        if settings.import_enabled:
            self.importer = BudgetImport(
                settings,
                kube=kube,
                redis=store.redis,
                template=template or load_import_template(settings, watched),
                watched=watched,
                instance=identity,
            )
        self.integration: StripeIntegration | None = None
        self.problem: str | None = "starting"
        self._ready = asyncio.Event()

    async def read_secret(self, name: str, key: str) -> str | None:
        """A Stripe ``SecretReader`` on the operator's API client (kopf's credentials)."""
        secret = await self.kube.read_secret(self.namespace, name)
        value = ((secret or {}).get("data") or {}).get(key)
        return base64.b64decode(value).decode("utf-8") if value else None

    async def run(self) -> None:
        """Every replica: configure, serve the webhook receiver, follow secret rotation."""
        await self.kube.wait_configured()
        try:
            while self.integration is None:
                try:
                    self.integration = await _MeteredIntegration.create(
                        self.store.redis,
                        self.store.ledger,
                        self.settings,
                        reader=self.read_secret,
                        consumer=self.identity,
                        on_event=self.events,
                    )
                except (StripeNotConfigured, RetryableError, ValueError) as error:
                    if self.problem != str(error):
                        log.error(
                            "Stripe is enabled but cannot start; retrying",
                            extra={"error": str(error), "retry_s": RETRY_CONFIG_S},
                        )
                    self.problem = str(error)
                    metrics.STRIPE_CONFIGURED.set(0)
                    await asyncio.sleep(RETRY_CONFIG_S)
            sock, self.webhook_sock = self.webhook_sock, None
            await self.integration.start_webhook(sock)
            self.problem = None
            metrics.STRIPE_CONFIGURED.set(1)
            self._ready.set()
            log.info(
                "Stripe webhook receiver listening",
                extra={"port": self.settings.webhook_port, "path": self.settings.webhook_path},
            )
            while True:
                await asyncio.sleep(SECRETS_REFRESH_S)
                with contextlib.suppress(StripeNotConfigured, RetryableError, ValueError):
                    secrets = await load_webhook_secrets(self.settings, self.read_secret)
                    self.integration.set_webhook_secrets(secrets)
        finally:
            metrics.STRIPE_CONFIGURED.set(0)
            self._ready.clear()
            await self.events.drain()
            if self.integration is not None:
                await self.integration.close()

    def readiness(self) -> str | None:
        """Informational (``/readyz/full``): Stripe never makes a replica unready."""
        return None if self.problem is None else f"Stripe: {self.problem}"

    async def run_leader(self, stop: asyncio.Event) -> None:
        """Leader task: Stripe's singleton work, once the integration is configured."""
        ready = asyncio.create_task(self._ready.wait())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([ready, stopped], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        stopped.cancel()
        if stop.is_set() or self.integration is None:
            return
        helpers = [asyncio.create_task(self._sweep(stop), name="stripe-unlink-sweep")]
        if self.importer is not None:
            helpers.append(
                asyncio.create_task(
                    self.importer.run(stop, self.integration.gateway), name="stripe-import"
                )
            )
        try:
            await self.integration.run_leader(stop)
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    async def _sweep(self, stop: asyncio.Event) -> None:
        await run_every(
            stop,
            self.settings.export_interval_s,
            lambda: self.links.sweep(self.store),
            log=log,
            failed="releasing Stripe links of deleted budgets failed",
        )


__all__ = ["PENDING_UNLINKS", "BudgetEvents", "BudgetLinks", "StripeService"]
