"""Reconciliation: a periodic pull from Stripe per linked budget repairs missed webhooks.

Entry points for the operator (leader only)::

    reconciler = Reconciler(redis, ledger, settings, gateway, on_event=emit)
    await reconciler.run(stop)                        # every settings.reconcile_interval_s
    effects = await reconciler.reconcile_customer(cid)   # one budget, e.g. right after linking
    when = await last_sync(redis, cid)                # epoch seconds of the last full pull

Per budget: the customer (deleted -> ``stripe-deleted``; payment methods for
``requirePaymentMethod``), the subscription (the linked one, else the customer's live one), its
latest invoice (paid -> lift ``payment``; open with a failed attempt -> payment failure policy),
every credit grant (paginated with ``starting_after``; live -> fund, voided/expired -> reverse
what is left) and, for capped budgets, the subscription's billing threshold.

Everything is applied through the same idempotent :class:`Applier` as webhook events: funding
by Stripe object id (never twice), states with a timestamp of ``now - clock_skew_s`` so a webhook
event newer than the pull still wins. Stripe's 429 and 5xx are retried with jittered backoff by
``StripeGateway.call``; a budget whose pull still fails is reported and retried next round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import stripe

from spendgate.ledger import Ledger
from spendgate.loops import run_every

from .access import payment_method_access
from .actions import Action, Notify, SetAccess
from .apply import Applier, OnEvent
from .client import StripeGateway, list_all, to_dict
from .links import SRC_DELETED, Link, linked_customers, load_link, stripe_key
from .mapping import (
    ACTIVE_SUBSCRIPTION_STATUSES,
    grant_actions,
    invoice_actions,
    subscription_actions,
)
from .settings import StripeSettings
from .thresholds import sync_billing_threshold
from .webhook import replay_missed_events

log = logging.getLogger("spendgate.operator.stripe")

PAGE = 100
MAX_PAGES = 50


async def last_sync(redis: Any, customer_id: str) -> float | None:
    raw = await redis.hget(stripe_key(customer_id), "synced_at")
    return float(raw) if raw is not None else None


def invoice_state(invoice: dict[str, Any]) -> str | None:
    """ "paid" (lift), "failed" (payment failure policy) or None (nothing to conclude)."""
    status = invoice.get("status")
    if status in ("paid", "void", "uncollectible"):
        return "paid"
    remaining = invoice.get("amount_remaining", invoice.get("amount_due")) or 0
    if status == "open" and invoice.get("attempted") and int(invoice.get("attempt_count") or 0) > 0:
        return "failed" if remaining > 0 else None
    return None


def pick_subscription(subs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The customer's subscription that decides access: a live one, else the newest."""
    if not subs:
        return None
    live = [s for s in subs if s.get("status") in ACTIVE_SUBSCRIPTION_STATUSES]
    pool = live or subs
    return max(pool, key=lambda s: int(s.get("created") or 0))


class Reconciler:
    def __init__(
        self,
        redis: Any,
        ledger: Ledger,
        settings: StripeSettings,
        gateway: StripeGateway,
        *,
        applier: Applier | None = None,
        on_event: OnEvent | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.gateway = gateway
        self.clock = clock
        self.applier = applier or Applier(
            redis, ledger, settings, gateway=gateway, on_event=on_event, clock=clock
        )

    async def run(self, stop: asyncio.Event) -> None:
        await run_every(
            stop,
            self.settings.reconcile_interval_s,
            self.reconcile_all,
            log=log,
            failed="stripe reconciliation pass failed",
        )

    async def reconcile_all(self) -> dict[str, list[str]]:
        results: dict[str, list[str]] = {}
        if self.settings.replay_events:
            try:
                await replay_missed_events(self.redis, self.gateway, self.settings)
            except Exception as error:
                log.warning("stripe event catch-up failed: %s", _describe(error))
        for cid in sorted(await linked_customers(self.redis)):
            try:
                results[cid] = await self.reconcile_customer(cid)
            except Exception as error:
                log.warning("stripe reconciliation of %s failed: %s", cid, _describe(error))
                results[cid] = [f"error:{_describe(error)}"]
        await self.applier.reindex_grace()
        return results

    async def reconcile_customer(self, customer_id: str) -> list[str]:
        link = await load_link(self.redis, customer_id)
        if link is None:
            return ["unlinked"]
        now = int(self.clock())
        created = now - self.settings.clock_skew_s
        client = self.gateway.client
        effects: list[str] = []

        try:
            customer = to_dict(
                await self.gateway.call(
                    lambda: client.v1.customers.retrieve_async(link.stripe_customer),
                    "retrieve customer",
                )
            )
        except stripe.InvalidRequestError as error:
            if error.http_status != 404:
                raise
            customer = {"deleted": True, "missing": True}
        if customer.get("deleted"):
            what = "does not exist" if customer.get("missing") else "was deleted"
            reason = f"Stripe customer {link.stripe_customer} {what}"
            return await self.applier.apply(link, [SetAccess(SRC_DELETED, True, reason, created)])

        actions: list[Action] = []
        sub = await self._subscription(link)
        if sub is not None:
            actions += subscription_actions(sub, link, created)
        invoice = await self._latest_invoice(link, sub)
        if invoice is not None:
            state = invoice_state(invoice)
            if state is not None:
                actions += invoice_actions(invoice, link, created, failed=state == "failed")
        async for grant in self._credit_grants(link):
            actions += grant_actions(grant, link, now)
        # Notifications belong to events; a pull repeats every round and would repeat them.
        # State changes still tell (Suspended/Resumed) through the applier.
        effects += await self.applier.apply(link, [x for x in actions if not isinstance(x, Notify)])

        if link.require_payment_method:
            has = await self.applier.has_payment_method(link)
            if has is not None:
                effects.append(
                    await self.applier.set_access(link, payment_method_access(has, created))
                )
        if self.settings.sync_billing_thresholds and link.mode == "capped" and link.subscription:
            effects.append("threshold:" + await sync_billing_threshold(self.gateway, link))
        await self.redis.hset(stripe_key(customer_id), "synced_at", str(self.clock()))
        return effects

    async def _subscription(self, link: Link) -> dict[str, Any] | None:
        client = self.gateway.client
        if link.subscription:
            sub_id = link.subscription
            return to_dict(
                await self.gateway.call(
                    lambda: client.v1.subscriptions.retrieve_async(sub_id), "retrieve subscription"
                )
            )
        page = to_dict(
            await self.gateway.call(
                lambda: client.v1.subscriptions.list_async(
                    {"customer": link.stripe_customer, "status": "all", "limit": 10}
                ),
                "list subscriptions",
            )
        )
        return pick_subscription(list(page.get("data") or []))

    async def _latest_invoice(
        self, link: Link, sub: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        client = self.gateway.client
        latest = (sub or {}).get("latest_invoice")
        if isinstance(latest, dict):
            return latest
        if isinstance(latest, str) and latest:
            return to_dict(
                await self.gateway.call(
                    lambda: client.v1.invoices.retrieve_async(latest), "retrieve invoice"
                )
            )
        page = to_dict(
            await self.gateway.call(
                lambda: client.v1.invoices.list_async(
                    {"customer": link.stripe_customer, "limit": 1}
                ),
                "list invoices",
            )
        )
        data = page.get("data") or []
        return data[0] if data else None

    async def _credit_grants(self, link: Link):  # type: ignore[no-untyped-def]
        """Every credit grant of the customer, page by page (``starting_after``)."""
        grants = list_all(
            self.gateway,
            self.gateway.client.v1.billing.credit_grants.list_async,
            {"customer": link.stripe_customer, "limit": PAGE},
            "list credit grants",
            max_pages=MAX_PAGES,
            on_truncated=lambda: log.warning(
                "credit grants of %s: more than %d pages; rest next round",
                link.customer_id,
                MAX_PAGES,
            ),
        )
        async for grant in grants:
            yield grant


def _describe(error: BaseException) -> str:
    status = getattr(error, "http_status", None)
    return f"{type(error).__name__}({status})" if status else type(error).__name__
