"""Reconciliation, billing thresholds and imported budgets against localstripe + the double.

The client's base address is the recording double; what the double does not implement itself
(customers, payment methods, subscriptions, invoices) it proxies to a localstripe process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio
import stripe
from aiohttp.test_utils import TestServer

from spendgate.config_store import ConfigStore
from spendgate.ledger import Ledger
from spendgate.models import parse_resource
from spendgate.operator.stripe import reconcile as reconcile_module
from spendgate.operator.stripe.client import StripeGateway
from spendgate.operator.stripe.links import link_budget, linked_customers, load_link
from spendgate.operator.stripe.reconcile import Reconciler, last_sync
from spendgate.operator.stripe.settings import StripeSettings
from spendgate.operator.stripe.sync import customers_to_import
from spendgate.operator.stripe.thresholds import sync_billing_threshold
from spendgate.operator.stripe.webhook import (
    EVENTS_STREAM,
    create_webhook_app,
    process_pending,
    replay_missed_events,
)
from tests.support.stripe_fakes import (  # noqa: F401  (fixtures)
    API_KEY,
    WEBHOOK_SECRET,
    LocalStripe,
    StripeDouble,
    localstripe,
    localstripe_server,
    stripe_double,
    wait_for,
)

GOOD_CARD = "4242424242424242"
DECLINED_CARD = "4000000000000341"  # attaches, every charge is declined
FAILING_IBAN = "DE62370400440532013001"  # SEPA debit that fails asynchronously (a webhook)


@dataclass
class Env:
    redis: Any
    ledger: Ledger
    store: ConfigStore
    double: StripeDouble
    localstripe: LocalStripe
    settings: StripeSettings
    gateway: StripeGateway  # through the double
    direct: stripe.StripeClient  # straight to localstripe: the test plays Stripe's customer
    events: list[tuple[str, str, str, bool]] = field(default_factory=list)
    plan: str = ""

    @property
    def reconciler(self) -> Reconciler:
        return Reconciler(
            self.redis,
            self.ledger,
            self.settings,
            self.gateway,
            on_event=lambda *a: self.events.append(a),
        )

    async def customer(self, card: str | None = GOOD_CARD, **extra: Any) -> str:
        cus = await self.direct.v1.customers.create_async({"email": "ops@acme.test", **extra})
        if card:
            await self.add_card(cus.id, card)
        return cus.id

    async def add_card(self, customer: str, card: str) -> str:
        if card.startswith("DE"):
            params: dict[str, Any] = {"type": "sepa_debit", "sepa_debit": {"iban": card}}
        else:
            params = {
                "type": "card",
                "card": {"number": card, "exp_month": 12, "exp_year": 2040, "cvc": "123"},
            }
        pm = await self.direct.v1.payment_methods.create_async(params)  # type: ignore[arg-type]
        await self.direct.v1.payment_methods.attach_async(pm.id, {"customer": customer})
        await self.direct.v1.customers.update_async(
            customer, {"invoice_settings": {"default_payment_method": pm.id}}
        )
        return pm.id

    async def subscribe(self, customer: str) -> Any:
        if not self.plan:
            product = await self.direct.v1.products.create_async({"name": "gpu"})
            plan = await self.direct.v1.plans.create_async(
                {"product": product.id, "amount": 1000, "currency": "usd", "interval": "month"}
            )
            self.plan = plan.id
        return await self.direct.v1.subscriptions.create_async(
            {"customer": customer, "items": [{"plan": self.plan}]}
        )

    async def link(self, customer_id: str, stripe_id: str, **spec: Any) -> None:
        manifest = {
            "apiVersion": "spendgate.dev/v1alpha1",
            "kind": "CustomerBudget",
            "metadata": {"name": customer_id, "namespace": "default"},
            "spec": {
                "customerId": customer_id,
                "currency": "USD",
                "stripe": {"customerId": stripe_id, **spec.pop("stripe", {})},
                **spec,
            },
        }
        if manifest["spec"].get("mode") != "capped":
            manifest["spec"].setdefault("balance", "0")
        budget = parse_resource(manifest)
        await self.store.apply_budget(budget, {})  # type: ignore[arg-type]
        await link_budget(self.redis, budget.spec)  # type: ignore[union-attr]

    async def account(self, customer_id: str = "acme") -> Any:
        return await self.ledger.account(customer_id)


@pytest_asyncio.fixture
async def env(
    redis_url: str,
    localstripe: LocalStripe,  # noqa: F811
    stripe_double: StripeDouble,  # noqa: F811
) -> AsyncIterator[Env]:
    stripe_double.upstream = localstripe.url
    client = redis.asyncio.Redis.from_url(redis_url)
    ledger = Ledger(client)
    settings = StripeSettings(
        api_base=stripe_double.url, max_attempts=4, backoff_base_s=0.001, backoff_cap_s=0.01
    )
    gateway = StripeGateway.create(API_KEY, settings)
    direct_http = stripe.AIOHTTPClient(timeout=10)
    direct = stripe.StripeClient(
        API_KEY,
        base_addresses={"api": localstripe.url},
        http_client=direct_http,
        max_network_retries=0,
    )
    environment = Env(
        client,
        ledger,
        ConfigStore(client, ledger),
        stripe_double,
        localstripe,
        settings,
        gateway,
        direct,
    )
    try:
        yield environment
    finally:
        await gateway.close()
        await direct_http.close_async()
        await client.aclose()


async def test_reconciliation_funds_grants_once_and_reverses_voided_ones(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconcile_module, "PAGE", 2)  # three grants: two pages
    cus = await env.customer()
    await env.link("acme", cus)
    grants = [env.double.add_grant(cus, value) for value in (1000, 2000, 3000)]
    env.double.fail("credit_grants", 429, 500)  # Stripe pushes back: retried, not skipped
    await env.reconciler.reconcile_customer("acme")
    assert (await env.account()).balance == 60_000_000
    pages = [r for r in env.double.requests if r.path == "/v1/billing/credit_grants"]
    assert [r.status for r in pages] == [429, 500, 200, 200]
    assert pages[-1].params["starting_after"] == grants[1]["id"]
    await env.reconciler.reconcile_all()  # again: nothing twice
    assert (await env.account()).balance == 60_000_000
    # Grant 2 voided in Stripe with 5.00 of its 20.00 left; the webhook was missed.
    grants[1]["voided_at"] = 1
    env.double.remaining[grants[1]["id"]] = 500
    await env.reconciler.reconcile_all()
    await env.reconciler.reconcile_all()
    assert (await env.account()).balance == 55_000_000
    assert await last_sync(env.redis, "acme") is not None
    assert [r for _, r, _, _ in env.events].count("StripeCreditGrantEnded") == 1


async def test_failed_invoice_suspends_and_paying_it_lifts(env: Env) -> None:
    cus = await env.customer(card=DECLINED_CARD)
    sub = await env.subscribe(cus)
    assert sub.status == "incomplete"
    await env.link("acme", cus)
    effects = await env.reconciler.reconcile_customer("acme")
    assert "payment:suspended" in effects
    assert "payment" in (await env.account()).suspensions
    # The customer fixes the card and the invoice is paid.
    await env.add_card(cus, GOOD_CARD)
    await env.direct.v1.invoices.pay_async(sub.latest_invoice)
    effects = await env.reconciler.reconcile_customer("acme")
    assert "payment:lifted" in effects
    assert (await env.account()).suspensions == {}


async def test_subscription_state_and_deleted_customer(env: Env) -> None:
    cus = await env.customer()
    sub = await env.subscribe(cus)
    await env.link("acme", cus, stripe={"subscriptionId": sub.id})
    assert "subscription:unchanged" in await env.reconciler.reconcile_customer("acme")
    await env.direct.v1.customers.delete_async(cus)
    await env.reconciler.reconcile_customer("acme")
    account = await env.account()
    assert "stripe-deleted" in account.suspensions and account.configured


async def test_pending_payment_method_until_one_is_on_file(env: Env) -> None:
    cus = await env.customer(card=None)
    await env.link("acme", cus, policy={"requirePaymentMethod": True})
    assert "payment-method" in (await env.account()).suspensions  # at once, before any pull
    await env.reconciler.reconcile_customer("acme")
    assert "payment-method" in (await env.account()).suspensions
    await env.add_card(cus, GOOD_CARD)
    await env.reconciler.reconcile_customer("acme")
    assert (await env.account()).suspensions == {}
    # Re-linking (every budget reconcile calls link_budget) does not re-suspend.
    await env.link("acme", cus, policy={"requirePaymentMethod": True})
    assert (await env.account()).suspensions == {}


async def test_capped_budget_keeps_the_billing_threshold_at_its_limit(env: Env) -> None:
    cus = await env.customer()
    env.double.subscriptions["sub_capped"] = {
        "id": "sub_capped",
        "object": "subscription",
        "customer": cus,
        "status": "active",
        "created": 1,
        "latest_invoice": None,
        "billing_thresholds": None,
    }
    await env.link(
        "acme",
        cus,
        mode="capped",
        limit="250.00",
        period="month",
        stripe={"subscriptionId": "sub_capped"},
    )
    effects = await env.reconciler.reconcile_customer("acme")
    assert "threshold:updated" in effects
    assert env.double.subscriptions["sub_capped"]["billing_thresholds"]["amount_gte"] == 25_000
    update = [r for r in env.double.requests if r.method == "POST" and "sub_capped" in r.path]
    assert update[0].params == {"billing_thresholds": {"amount_gte": "25000"}}
    assert update[0].headers["Idempotency-Key"].startswith("sg-threshold")
    link = await load_link(env.redis, "acme")
    assert await sync_billing_threshold(env.gateway, link) == "unchanged"
    await env.link(
        "acme",
        cus,
        mode="capped",
        limit="400",
        period="month",
        stripe={"subscriptionId": "sub_capped"},
    )
    await env.reconciler.reconcile_customer("acme")
    assert env.double.subscriptions["sub_capped"]["billing_thresholds"]["amount_gte"] == 40_000


async def test_marked_customers_become_budget_manifests(env: Env) -> None:
    marked = [await env.customer(card=None, metadata={"spendgate": "true"}) for _ in range(3)]
    await env.customer(card=None, metadata={"spendgate": "false"})
    await env.customer(card=None)
    await env.link("acme", marked[0])
    template = {
        "metadata": {"namespace": "billing"},
        "spec": {"currency": "USD", "balance": "0", "displayName": "${customer.email}"},
    }
    errors: list[str] = []
    manifests = await customers_to_import(
        env.gateway,
        env.settings,
        template,
        linked=set((await linked_customers(env.redis)).values()),
        errors=errors,
    )
    assert errors == []
    assert sorted(m["spec"]["stripe"]["customerId"] for m in manifests) == sorted(marked[1:])
    assert all(m["spec"]["displayName"] == "ops@acme.test" for m in manifests)
    assert all(parse_resource(m).kind == "CustomerBudget" for m in manifests)


async def test_localstripe_signed_webhook_suspends_a_failed_payment(env: Env) -> None:
    settings = StripeSettings(enabled=True)
    receiver = TestServer(
        create_webhook_app(env.redis, settings, [WEBHOOK_SECRET]), host="127.0.0.1"
    )
    await receiver.start_server()
    try:
        await env.localstripe.register_webhook(
            str(receiver.make_url("/stripe/webhook")),
            WEBHOOK_SECRET,
            events=["invoice.payment_failed", "customer.deleted"],
        )
        cus = await env.customer(card=FAILING_IBAN)
        await env.link("acme", cus)
        await env.subscribe(cus)  # the first invoice's debit fails later: a webhook

        async def suspended() -> bool:
            await process_pending(env.redis, env.ledger, settings, consumer="op", block_ms=0)
            return "payment" in (await env.account()).suspensions

        await wait_for(suspended, limit_s=10)
        reason = (await env.account()).suspensions["payment"]
        assert "payment failed" in reason
        await env.direct.v1.customers.delete_async(cus)

        async def deleted() -> bool:
            await process_pending(env.redis, env.ledger, settings, consumer="op", block_ms=0)
            return "stripe-deleted" in (await env.account()).suspensions

        await wait_for(deleted, limit_s=10)
    finally:
        await env.localstripe.register_webhook("http://127.0.0.1:9/none", WEBHOOK_SECRET, [])
        await receiver.close()


async def test_events_missed_while_the_receiver_was_down_are_replayed_once(env: Env) -> None:
    cus = await env.customer()
    await env.link("acme", cus)
    pm = (await env.direct.v1.payment_methods.list_async({"customer": cus, "type": "card"})).data
    topup = await env.direct.v1.payment_intents.create_async(
        {
            "amount": 1500,
            "currency": "usd",
            "customer": cus,
            "payment_method": pm[0].id,
            "confirm": True,
            "metadata": {"spendgate_topup": "true"},
        }
    )
    assert topup.status == "succeeded"
    # No webhook reached us. Reconciliation's catch-up reads Stripe's event list.
    await env.reconciler.reconcile_all()
    assert await env.redis.xlen(EVENTS_STREAM) >= 1
    settings = StripeSettings(enabled=True)
    while await process_pending(env.redis, env.ledger, settings, consumer="op", block_ms=0):
        pass
    assert (await env.account()).balance == 15_000_000
    # Again from the start of time: everything is known already.
    assert await replay_missed_events(env.redis, env.gateway, env.settings, since=0) == 0
    listed = [r for r in env.double.requests if r.path == "/v1/events"]
    assert listed and "gte" in listed[0].params["created"]
